"""dask_ftps: a fault-tolerant parameter server for training classifiers on Dask.

``__all__`` lists what users use; the internals (the state machine
``dask_ftps._state.ParameterServerState``, the worker plugin, message types)
stay importable from their modules.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from dask_ftps import config  # noqa: F401  (loads the ftps.* defaults)

if TYPE_CHECKING:
    from dask_ftps._client import get_model, records, status
    from dask_ftps._core import UpdateKey
    from dask_ftps._data import sparse_text
    from dask_ftps._estimator import FTPSClassifier
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
        ShardUnavailable,
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
    from dask_ftps._sparse import RowSparse, rows_of
    from dask_ftps.optim import SGD, Adam
    from dask_ftps.training import TrainResult, train

#: Where each public name lives: imported on first use. ``import dask_ftps``
#: (and the scheduler preload, ``dask_ftps.preload``) then costs a scheduler
#: nothing before it listens; the server's modules (Zarr, the state machine,
#: the models) load when a server starts, scikit-learn when the estimator is
#: first used.
_LAZY = {
    "get_model": "dask_ftps._client",
    "records": "dask_ftps._client",
    "status": "dask_ftps._client",
    "UpdateKey": "dask_ftps._core",
    "FTPSClassifier": "dask_ftps._estimator",
    **dict.fromkeys(
        (
            "DuplicateUpdate",
            "Fenced",
            "FTPSError",
            "InvalidRequest",
            "InvalidUpdate",
            "ModelError",
            "ModelNotAllowed",
            "NotDurable",
            "NotRegistered",
            "OutOfOrder",
            "RunInUse",
            "SchedulerLost",
            "ServerReplaced",
            "ShardUnavailable",
            "SpecMismatch",
            "StaleIncarnation",
            "StoreCorrupted",
            "StoreError",
            "StoreFormatError",
            "StoreLocked",
            "Voided",
            "WaitTimeout",
        ),
        "dask_ftps._exceptions",
    ),
    "Factored": "dask_ftps._factored",
    "RowSparse": "dask_ftps._sparse",
    "rows_of": "dask_ftps._sparse",
    "sparse_text": "dask_ftps._data",
    "inspect": "dask_ftps._recovery",
    "recover": "dask_ftps._recovery",
    "ParameterServer": "dask_ftps._scheduler_plugin",
    "SGD": "dask_ftps.optim",
    "Adam": "dask_ftps.optim",
    "TrainResult": "dask_ftps.training",
    "train": "dask_ftps.training",
}

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
    "RowSparse",
    "RunInUse",
    "SchedulerLost",
    "ServerReplaced",
    "ShardUnavailable",
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
    "rows_of",
    "sparse_text",
    "status",
    "train",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # found directly from now on
    return value


def __dir__() -> list[str]:
    # The public names and the module's own dunders and submodules, not the
    # names this file imports for itself.
    own = {n for n in globals() if n.startswith("__") or n in _SUBMODULES}
    return sorted({*own, *__all__})


_SUBMODULES = ("config", "models", "optim", "preload", "testing", "training", "cli")
