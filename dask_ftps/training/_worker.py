"""The worker loop of ``train()``: one shard's minibatches for one epoch, pushed
through a window of unacknowledged pushes, resumed where the server says the
shard stands."""

from __future__ import annotations

import concurrent.futures
import logging
import time
from collections import deque
from typing import Any

import numpy as np
from dask.utils import parse_timedelta
from distributed import secede

from dask_ftps import config
from dask_ftps._core import Holder, ServerId, UpdateKey
from dask_ftps._exceptions import (
    DuplicateUpdate,
    FTPSError,
    OutOfOrder,
    StaleIncarnation,
    Voided,
)
from dask_ftps._factored import to_host, use_factors
from dask_ftps._worker_plugin import get_worker_plugin
from dask_ftps._xp import gpu_available, to_namespace
from dask_ftps.models import Model
from dask_ftps.models._check import checked_loss_and_grad

from ._ingest import _is_sparse

logger = logging.getLogger(__name__)


class PushWindow:
    """Pushes in flight, oldest first: the worker loop's window of
    unacknowledged pushes (``ftps.inflight``), which the benchmarks reuse.

    Each push is a future of the server's reply and what the loop wants back
    with it (``info``). :meth:`settle` takes replies, oldest first, until few
    enough are in flight.
    """

    def __init__(self) -> None:
        self._pushes: deque[tuple[concurrent.futures.Future, Any]] = deque()

    def __len__(self) -> int:
        return len(self._pushes)

    def add(self, future: concurrent.futures.Future, info: Any = None) -> None:
        """A push sent: ``future`` of its reply."""
        self._pushes.append((future, info))

    def settle(self, until: int) -> tuple[list[tuple[Any, Any]], Exception | None]:
        """Take replies, oldest first, until at most ``until`` are in flight (and
        the ones already answered).

        Returns
        -------
        accepted : list of (reply, info)
            The pushes the server accepted, oldest first; the reply of one
            answered after the first refusal is None (it is not the newest
            model the loop may go on from).
        refusal : Exception or None
            The first refusal; every push after it is taken too (the window is
            empty then).
        """
        accepted: list[tuple[Any, Any]] = []
        refusal = None
        while self._pushes and (
            refusal is not None
            or len(self._pushes) > until
            or self._pushes[0][0].done()
        ):
            future, info = self._pushes.popleft()
            try:
                reply = future.result()
            except Exception as e:  # noqa: BLE001 - returned once the window is empty
                refusal = refusal or e
                continue
            accepted.append((reply if refusal is None else None, info))
        return accepted, refusal


def factor_names(model: Model, update_format: str, batch_size: int) -> frozenset[str]:
    """The weights whose updates a worker sends as factors: those the model can
    factor (:meth:`~dask_ftps.models.Model.factorable`) where ``update_format``
    says so for minibatches of ``batch_size``."""
    names = model.factorable()
    if not names:
        return frozenset()
    shapes, dtypes = model.param_shapes(), model.param_dtypes()
    return frozenset(
        name
        for name in names
        if use_factors(update_format, batch_size, shapes[name], dtypes[name])
    )


def _train_shard(
    X: np.ndarray,
    y: np.ndarray,
    *,
    model: Model,
    mode: str,
    first: UpdateKey,
    server: ServerId,
    holder: Holder,
    n_steps: int,
    seed: int,
    device: str,
    update_format: str = "auto",
    batch_size: int | None = None,
    inflight: int = 1,
    class_weight: np.ndarray | None = None,
) -> dict[str, float]:
    """One shard's minibatch loop for one epoch; runs in a task on a worker.

    Up to ``inflight`` pushes may be unacknowledged: the next gradient is
    computed from the newest model received while they are written. A refused
    push ends the window: the shard waits for the others and goes on from where
    the server says it stands (what was committed). Every call names
    ``server``, the server the run began on, and ``holder``, the train() call
    it belongs to (a run another call holds refuses it with RunInUse).

    What the model returns is checked before it is pushed
    (:func:`~dask_ftps.models._check.checked_loss_and_grad`): a model that
    misbehaves raises :class:`~dask_ftps.ModelError` here, and nothing of that
    minibatch reaches the server.
    """
    if mode != "async":
        secede()  # a waiting shard must never hold the thread another shard needs
    plugin = get_worker_plugin()
    run, epoch, shard = first.run, first.epoch, first.shard
    xp = _namespace(device)
    sparse = _is_sparse(X)  # kept sparse; each minibatch is made dense
    if sparse:
        X = X.tocsr().astype(np.float32)
    else:
        X = to_namespace({"X": np.asarray(X, dtype=np.float32)}, xp)["X"]
    y = to_namespace({"y": np.asarray(y, dtype=np.int64)}, xp)["y"]
    weight = (
        None
        if class_weight is None
        else to_namespace({"w": np.asarray(class_weight, dtype=np.float32)}, xp)["w"]
    )
    order = np.random.default_rng([seed, epoch, shard]).permutation(X.shape[0])
    batches = np.array_split(order, n_steps)  # near-equal: no tiny last minibatch
    factors = factor_names(
        model, update_format, batch_size or max(len(b) for b in batches)
    )
    stats = {"loss_sum": 0.0, "correct": 0, "n": 0, "computed": 0, "skipped": 0}

    def resume() -> tuple[int, Any]:
        next_epoch, step = plugin.next_step(run, shard, server=server, holder=holder)
        if next_epoch < epoch:
            raise FTPSError(
                f"shard {shard} of run {run} has not finished epoch {next_epoch}"
            )
        if next_epoch > epoch:
            return n_steps, None
        return step, plugin.pull(run, shard, epoch, step, server=server, holder=holder)

    window = PushWindow()

    def settle(until: int) -> Exception | None:
        """Take replies until at most ``until`` are in flight; count what was
        accepted; the first refusal."""
        nonlocal copy
        accepted, refusal = window.settle(until)
        for reply, (loss, correct, n) in accepted:
            if reply is not None:
                copy = reply
            stats["loss_sum"] += loss * n
            stats["correct"] += correct
            stats["n"] += n
            stats["computed"] += 1
        return refusal

    step, copy = resume()
    stats["skipped"] = step
    device_version, params = None, None
    while step < n_steps or window:
        refusal = settle(inflight - 1 if step < n_steps else 0)
        if isinstance(refusal, (DuplicateUpdate, OutOfOrder, Voided)):
            # Another attempt got there first, a push in flight was lost, or one
            # was undone with a batch that could not be made durable: go on from
            # where the server says the shard stands.
            step, copy = resume()
            continue
        if isinstance(refusal, StaleIncarnation):
            step, copy = _resume_after_rebuild(resume, copy.incarnation)
            continue
        if refusal is not None:
            raise refusal
        if step == n_steps:
            continue
        if device_version != (copy.server, copy.version):
            params = to_namespace(copy.params, xp)
            device_version = (copy.server, copy.version)
        batch = batches[step]
        xb = X[batch]
        if sparse:
            xb = to_namespace({"X": xb.toarray()}, xp)["X"]
        yb = y[batch]
        loss, grads, correct = checked_loss_and_grad(
            model, params, xb, yb, None if weight is None else weight[yb], factors
        )
        nxt = (epoch, step + 1) if step + 1 < n_steps else None
        future = plugin.push_async(
            UpdateKey(run, epoch, shard, step),
            to_host(grads),  # only the update leaves the device
            copy.incarnation,
            nxt,
            server=server,
            holder=holder,
        )
        window.add(future, (loss, correct, len(batch)))
        step += 1
    return stats


def _resume_after_rebuild(resume, incarnation: int):
    """``resume()`` once a new server incarnation serves (it may be rebuilding)."""
    deadline = time.monotonic() + parse_timedelta(config.get("wait-timeout"))
    while True:
        try:
            step, copy = resume()
            if copy is None or copy.incarnation != incarnation:
                return step, copy
        except StaleIncarnation:
            pass
        if time.monotonic() > deadline:
            raise StaleIncarnation(
                f"incarnation {incarnation} was replaced and no new server answered"
            )
        time.sleep(0.1)


def _namespace(device: str):
    """The array module a worker computes with for ``ftps.device``: CuPy on a
    GPU (``"gpu"``, or ``"auto"`` where one is usable), else NumPy."""
    if device == "gpu" or (device == "auto" and gpu_available()):
        try:
            import cupy
        except ImportError as e:
            raise FTPSError(
                "ftps.device is 'gpu' but CuPy does not import on this worker "
                f"({e}); install dask_ftps[gpu] or set ftps.device to 'auto'"
            ) from e
        if not gpu_available():
            raise FTPSError(
                "ftps.device is 'gpu' but CuPy sees no usable CUDA device on this "
                "worker; set ftps.device to 'auto' to compute with NumPy there"
            )
        return cupy
    return np
