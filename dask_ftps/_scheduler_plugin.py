"""The scheduler half: the parameter server as a Dask scheduler plugin."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from dask.utils import parse_timedelta
from distributed.core import error_message
from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.protocol.pickle import dumps
from distributed.protocol.serialize import ToPickle
from distributed.utils import offload

from dask_ftps import config
from dask_ftps._core import (
    MODES,
    Mode,
    ModelMessage,
    RunSpec,
    Update,
    UpdateKey,
    WorkerId,
    download_entries,
)
from dask_ftps._exceptions import FTPSError, InvalidRequest, WaitTimeout
from dask_ftps._state import ParameterServerState
from dask_ftps._worker_plugin import FTPSWorkerPlugin
from dask_ftps.models import Model
from dask_ftps.optim import SGD, Optimizer

if TYPE_CHECKING:
    from distributed import Scheduler

logger = logging.getLogger(__name__)


def _replies_errors(handler: Callable[..., Awaitable[dict]]):
    """Send an expected :class:`FTPSError` back to the caller as an error message."""

    @functools.wraps(handler)
    async def wrapper(*args: Any, **kwargs: Any) -> dict:
        try:
            return await handler(*args, **kwargs)
        except FTPSError as e:
            logger.info("%s refused: %s", handler.__name__, e)
            return error_message(e)
        except TypeError as e:  # missing or unexpected message keys
            logger.info("%s refused: %s", handler.__name__, e)
            return error_message(InvalidRequest(f"{handler.__name__}: {e}"))

    return wrapper


class ParameterServer(SchedulerPlugin):
    """A fault-tolerant parameter server hosted by the Dask scheduler.

    Parameters
    ----------
    store
        Where the run is journaled: a local path or fsspec URL, or None to keep
        everything in memory. (Journaling is not implemented yet; the value is
        kept.)
    model
        The model spec, for example :class:`dask_ftps.models.MLP`.
    optimizer
        Applied on the server to every merged update; default ``SGD(lr=0.05)``.
    mode
        ``"async"``, ``"sync"`` or ``"ssp"``; default ``ftps.mode``.
    staleness
        Clocks a shard may run ahead of the slowest one in ``"ssp"`` mode;
        default ``ftps.staleness``.

    Examples
    --------
    >>> ps = ParameterServer(model=MLP(n_features=64, n_classes=10))  # doctest: +SKIP
    >>> client.register_plugin(ps)  # doctest: +SKIP
    """

    name = "ftps"
    idempotent = False

    scheduler: Scheduler
    state: ParameterServerState

    def __init__(
        self,
        store: str | None = None,
        model: Model | None = None,
        optimizer: Optimizer | None = None,
        mode: Mode | None = None,
        staleness: int | None = None,
    ) -> None:
        mode = mode if mode is not None else config.get("mode")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        staleness = staleness if staleness is not None else config.get("staleness")
        if not isinstance(staleness, int) or staleness < 0:
            raise ValueError(f"staleness must be a non-negative integer: {staleness!r}")
        if not isinstance(model, Model):
            raise TypeError(
                "model must be a dask_ftps.models.Model such as MLP(...), got "
                f"{type(model).__name__} (resuming from a store is not supported yet)"
            )
        optimizer = optimizer if optimizer is not None else SGD(lr=0.05)
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a dask_ftps optimizer: {optimizer!r}")
        self.store = None if store is None else str(store)
        self.model = model
        self.optimizer = optimizer
        self.mode = mode
        self.staleness = staleness

    @property
    def _handlers(self) -> dict[str, Callable]:
        return {
            "ftps_begin_run": self.begin_run,
            "ftps_next_step": self.next_step,
            "ftps_pull": self.pull,
            "ftps_push": self.push,
            "ftps_status": self.status,
            "ftps_get_model": self.get_model,
            "ftps_records": self.records,
        }

    async def start(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        retention = config.get("retention")
        self.state = ParameterServerState(
            self.model,
            self.optimizer,
            mode=self.mode,
            staleness=self.staleness,
            download_limit=download_entries(
                retention["failure-probability"], retention["negligible-probability"]
            ),
            gradient_entries=retention["gradient-entries"],
        )
        self._lock = asyncio.Lock()
        self._changed = asyncio.Condition()
        self._offload_threshold = config.get("offload-threshold")
        self._wait_timeout = parse_timedelta(config.get("wait-timeout"))
        scheduler.handlers.update(self._handlers)
        await scheduler.register_worker_plugin(
            None, dumps(FTPSWorkerPlugin()), name="ftps", idempotent=False
        )
        logger.info(
            "Parameter server started: %s, %d parameters, mode %s, incarnation %d",
            type(self.model).__name__,
            self.model.n_params(),
            self.mode,
            self.state.incarnation,
        )

    async def close(self) -> None:
        handlers = getattr(getattr(self, "scheduler", None), "handlers", {})
        for op, handler in self._handlers.items():
            if handlers.get(op) == handler:
                del handlers[op]

    def remove_worker(self, scheduler: Scheduler, worker: str, **kwargs: Any) -> None:
        self.state.forget_worker(WorkerId(worker))

    # -- handlers -------------------------------------------------------------

    @_replies_errors
    async def begin_run(self, spec: dict) -> dict:
        if not isinstance(spec, dict):
            raise InvalidRequest(f"spec must be a dict, got {type(spec).__name__}")
        run_spec = RunSpec.from_dict(spec)
        async with self._lock:
            run = self.state.begin_run(run_spec)
        logger.info(
            "Run %d: %d shards, %d epochs, %d minibatches, from version %d",
            run.run,
            run_spec.n_shards,
            run_spec.epochs,
            run_spec.minibatches,
            run.base_version,
        )
        return {
            "status": "OK",
            "run": int(run.run),
            "base_version": int(run.base_version),
            "incarnation": self.state.incarnation,
            "next": [list(run.next_step(s)) for s in range(run_spec.n_shards)],
        }

    @_replies_errors
    async def next_step(self, run: int, shard: int) -> dict:
        epoch, step = self.state.next_step(run, shard)
        return {"status": "OK", "epoch": epoch, "step": step}

    @_replies_errors
    async def pull(
        self,
        worker: str,
        run: int,
        shard: int,
        epoch: int,
        step: int,
        have_version: int = -1,
        incarnation: int | None = None,
    ) -> ModelMessage:
        self.state.next_step(run, shard)  # validates run and shard
        await self._wait_ready(run, shard, epoch, step)
        return self._model_reply(WorkerId(worker), have_version, incarnation)

    @_replies_errors
    async def push(
        self,
        worker: str,
        update_id: str,
        grads: dict,
        incarnation: int,
        next_step: tuple[int, int] | None = None,
        have_version: int = -1,
    ) -> ModelMessage:
        """Accept one update; with ``next_step``, answer with the model for it."""
        self.state.check_incarnation(incarnation)
        update = Update(UpdateKey.parse(update_id), WorkerId(worker), grads)
        async with self._lock:
            admission = await self._maybe_offload(self.state.admit, update)
            model = await self._maybe_offload(self.state.merge, admission)
            self.state.commit(admission, model)
        if model is not None:
            async with self._changed:
                self._changed.notify_all()
        if next_step is None:
            return {"status": "OK", "version": int(self.state.version)}
        key = update.key
        await self._wait_ready(key.run, key.shard, *next_step)
        return self._model_reply(update.worker, have_version, incarnation)

    @_replies_errors
    async def status(self) -> dict:
        return {
            "status": "OK",
            **self.state.summary(),
            "store": self.store,
            "workers": sorted(self.scheduler.workers),
            "nthreads": sum(ws.nthreads for ws in self.scheduler.workers.values()),
        }

    @_replies_errors
    async def get_model(self) -> dict:
        model = self.state.model
        return {
            "status": "OK",
            "version": int(model.version),
            "params": ToPickle(model.params),
        }

    @_replies_errors
    async def records(self) -> dict:
        return {"status": "OK", **self.state.records()}

    # -- internals ------------------------------------------------------------

    async def _maybe_offload(self, func: Callable, *args: Any) -> Any:
        if self.state.model_spec.n_params() >= self._offload_threshold:
            return await offload(func, *args)
        return func(*args)

    async def _wait_ready(self, run: int, shard: int, epoch: int, step: int) -> None:
        def ready() -> bool:
            return self.state.ready(run, shard, epoch, step)

        if ready():
            return
        try:
            async with self._changed:
                await asyncio.wait_for(
                    self._changed.wait_for(ready), self._wait_timeout
                )
        except TimeoutError:
            raise WaitTimeout(
                f"shard {shard} of run {run} waited {self._wait_timeout}s for "
                f"(epoch {epoch}, step {step}) in {self.state.mode} mode"
            ) from None

    def _model_reply(
        self, worker: WorkerId, have_version: int, incarnation: int | None
    ) -> ModelMessage:
        model = self.state.model
        fresh = have_version != model.version or incarnation != self.state.incarnation
        if fresh:
            self.state.record_download(worker, model.version)
        return {
            "status": "OK",
            "incarnation": self.state.incarnation,
            "version": int(model.version),
            "params": ToPickle(model.params) if fresh else None,
        }
