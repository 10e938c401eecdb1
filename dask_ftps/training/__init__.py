"""``train()``: minibatch loops on Dask workers, merged by the parameter server.

The driver (:mod:`._driver`) runs a run's epochs; the worker loop
(:mod:`._worker`) computes and pushes one shard's minibatches; the input
(:mod:`._ingest`) is read, checked and cut into shards; the task
(:mod:`._task`) is classification, read through the model interface.
"""

from __future__ import annotations

from ._driver import Callback, TrainResult, train

__all__ = ["Callback", "TrainResult", "train"]
