"""dask_ftps: a fault-tolerant parameter server for training classifiers on Dask.

``__all__`` lists what users use; the internals (the state machine
``dask_ftps._state.ParameterServerState``, the worker plugin, message types)
stay importable from their modules.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dask_ftps import config  # noqa: F401  (loads the ftps.* defaults)
from dask_ftps._client import get_model, records, status
from dask_ftps._core import UpdateKey
from dask_ftps._exceptions import (
    DuplicateUpdate,
    Fenced,
    FTPSError,
    InvalidRequest,
    InvalidUpdate,
    ModelError,
    ModelNotAllowed,
    NotDurable,
    NotRegistered,
    OutOfOrder,
    RunInUse,
    SchedulerLost,
    ServerReplaced,
    SpecMismatch,
    StaleIncarnation,
    StoreCorrupted,
    StoreError,
    StoreFormatError,
    StoreLocked,
    Voided,
    WaitTimeout,
)
from dask_ftps._factored import Factored
from dask_ftps._recovery import inspect, recover
from dask_ftps._scheduler_plugin import ParameterServer
from dask_ftps.optim import SGD, Adam
from dask_ftps.training import TrainResult, train

if TYPE_CHECKING:
    from dask_ftps._estimator import FTPSClassifier

__all__ = [
    "SGD",
    "Adam",
    "DuplicateUpdate",
    "FTPSClassifier",
    "FTPSError",
    "Factored",
    "Fenced",
    "InvalidRequest",
    "InvalidUpdate",
    "ModelError",
    "ModelNotAllowed",
    "NotDurable",
    "NotRegistered",
    "OutOfOrder",
    "ParameterServer",
    "RunInUse",
    "SchedulerLost",
    "ServerReplaced",
    "SpecMismatch",
    "StaleIncarnation",
    "StoreCorrupted",
    "StoreError",
    "StoreFormatError",
    "StoreLocked",
    "TrainResult",
    "UpdateKey",
    "Voided",
    "WaitTimeout",
    "get_model",
    "inspect",
    "records",
    "recover",
    "status",
    "train",
]


def __getattr__(name: str) -> Any:
    # scikit-learn is imported on first use only: a scheduler that hosts the
    # server (and recovers it) does not pay for it at start-up.
    if name == "FTPSClassifier":
        from dask_ftps._estimator import FTPSClassifier

        return FTPSClassifier
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
