"""The scheduler half: the parameter server as a Dask scheduler plugin."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
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
    ModelVersion,
    RunSpec,
    Update,
    UpdateKey,
    Version,
    WorkerId,
    download_entries,
)
from dask_ftps._exceptions import (
    FTPSError,
    InvalidRequest,
    StaleIncarnation,
    StoreLocked,
    WaitTimeout,
)
from dask_ftps._journal import Journal, RunMeta
from dask_ftps._recovery import Rebuilt, rebuild
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
        Where the run lives: a local path or fsspec URL of a Zarr store. Every
        accepted update is written there before it is acknowledged, and a
        server registered on a store that holds a run resumes it, bit for bit.
        None keeps everything in memory (nothing survives the scheduler).
    model
        The model spec, for example :class:`dask_ftps.models.MLP`; None resumes
        the one the store holds.
    optimizer
        Applied on the server to every merged update; default ``SGD(lr=0.05)``,
        or the store's.
    mode
        ``"async"``, ``"sync"`` or ``"ssp"``; default ``ftps.mode``, or the store's.
    staleness
        Clocks a shard may run ahead of the slowest one in ``"ssp"`` mode.
    snapshot_every
        Versions between snapshots; default ``ftps.store.snapshot-every``.
    durable
        Also fsync each write of a local store; default ``ftps.store.durable``.

    Raises
    ------
    SpecMismatch
        At registration, if the store holds a run with another model, optimizer
        or mode.
    StoreLocked
        At registration, if another live server writes the store.

    Examples
    --------
    >>> ps = ParameterServer("runs/digits.zarr", model=MLP(64, (128,), 10))  # doctest: +SKIP
    >>> client.register_plugin(ps)  # doctest: +SKIP
    """

    name = "ftps"
    idempotent = False

    scheduler: Scheduler
    state: ParameterServerState
    journal: Journal | None
    rebuilt: Rebuilt | None

    def __init__(
        self,
        store: str | None = None,
        model: Model | None = None,
        optimizer: Optimizer | None = None,
        mode: Mode | None = None,
        staleness: int | None = None,
        snapshot_every: int | None = None,
        durable: bool | None = None,
    ) -> None:
        if mode is not None and mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if staleness is not None and (not isinstance(staleness, int) or staleness < 0):
            raise ValueError(f"staleness must be a non-negative integer: {staleness!r}")
        if model is None and store is None:
            raise TypeError(
                "model must be a dask_ftps.models.Model such as MLP(...); it may only "
                "be left out to resume the run a store holds"
            )
        if model is not None and not isinstance(model, Model):
            raise TypeError(
                "model must be a dask_ftps.models.Model such as MLP(...), got "
                f"{type(model).__name__}"
            )
        if optimizer is not None and not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a dask_ftps optimizer: {optimizer!r}")
        if snapshot_every is not None and (
            not isinstance(snapshot_every, int) or snapshot_every < 1
        ):
            raise ValueError(
                f"snapshot_every must be a positive integer: {snapshot_every!r}"
            )
        self.store = None if store is None else str(store)
        self.model = model
        self.optimizer = optimizer
        self.mode = mode
        self.staleness = staleness
        self.snapshot_every = snapshot_every
        self.durable = durable

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

    # -- lifecycle ------------------------------------------------------------

    async def start(self, scheduler: Scheduler) -> None:
        t0 = time.perf_counter()
        self.scheduler = scheduler
        self._identity = uuid.uuid4().hex
        old = scheduler.plugins.get(self.name)
        if isinstance(old, ParameterServer) and old is not self:
            await old._retire()
        self._lock = asyncio.Lock()
        self._changed = asyncio.Condition()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._snapshotting: asyncio.Task | None = None
        self._failed: BaseException | None = None
        self._offload_threshold = config.get("offload-threshold")
        self._wait_timeout = parse_timedelta(config.get("wait-timeout"))
        retention = config.get("retention")
        self._limits = {
            "download_limit": download_entries(
                retention["failure-probability"], retention["negligible-probability"]
            ),
            "gradient_entries": retention["gradient-entries"],
            "memory_rows": retention["memory-rows"],
        }
        self.journal, self.rebuilt = None, None
        if self.store is None:
            self.state = self._fresh_state(self._meta())
        else:
            await self._open_store()
        self._published: ModelVersion = self.state.model
        self._last_snapshot = (
            int(self.state.version)
            if self.journal is None
            else self.journal.doc.snapshots[-1].version
        )
        self._committer = asyncio.create_task(self._commit_loop())
        scheduler.handlers.update(self._handlers)
        # Idempotent: a server replacing another may use the workers' model copies
        # in its recovery (copies are tagged with the server that sent them).
        await scheduler.register_worker_plugin(
            None, dumps(FTPSWorkerPlugin()), name="ftps", idempotent=True
        )
        logger.info(
            "Parameter server started in %.3fs: %s, %d parameters, mode %s, "
            "incarnation %d, version %d, store %s",
            time.perf_counter() - t0,
            type(self.state.model_spec).__name__,
            self.state.model_spec.n_params(),
            self.state.mode,
            self.state.incarnation,
            self.state.version,
            self.store,
        )

    async def _retire(self) -> None:
        """Stop serving (a new server replaces this one in the same scheduler).

        Waits for the batch being committed, so that the new server reads a
        commit point that no longer moves; queued pushes are refused with
        :class:`StaleIncarnation`, and the workers ask the new server where
        their shards stand.
        """
        if not hasattr(self, "_lock"):
            return
        async with self._lock:
            self._failed = StaleIncarnation(
                f"parameter server incarnation {self.state.incarnation} was replaced"
            )
        logger.info("Incarnation %d retired", self.state.incarnation)

    async def close(self) -> None:
        handlers = getattr(getattr(self, "scheduler", None), "handlers", {})
        for op, handler in self._handlers.items():
            if handlers.get(op) == handler:
                del handlers[op]
        for task in (
            getattr(self, "_committer", None),
            getattr(self, "_snapshotting", None),
        ):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    def remove_worker(self, scheduler: Scheduler, worker: str, **kwargs: Any) -> None:
        self.state.forget_worker(WorkerId(worker))

    # -- handlers -------------------------------------------------------------

    @_replies_errors
    async def begin_run(self, spec: dict) -> dict:
        if not isinstance(spec, dict):
            raise InvalidRequest(f"spec must be a dict, got {type(spec).__name__}")
        run_spec = RunSpec.from_dict(spec)
        async with self._lock:
            self._check_healthy()
            runs = len(self.state.runs)
            run = self.state.begin_run(run_spec)
            if self.journal is not None and len(self.state.runs) > runs:
                await self.journal.record_run(run_spec, int(run.base_version))
        logger.info(
            "Run %d: %d shards, %d epochs, %d minibatches, from version %d (%d accepted)",
            run.run,
            run_spec.n_shards,
            run_spec.epochs,
            run_spec.minibatches,
            run.base_version,
            run.accepted,
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
        self._check_healthy()
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
        have_server: str | None = None,
    ) -> ModelMessage:
        self._check_healthy()
        self.state.next_step(run, shard)  # validates run and shard
        await self._wait_ready(run, shard, epoch, step)
        return self._model_reply(WorkerId(worker), have_version, have_server)

    @_replies_errors
    async def push(
        self,
        worker: str,
        update_id: str,
        grads: dict,
        incarnation: int,
        next_step: tuple[int, int] | None = None,
        have_version: int = -1,
        have_server: str | None = None,
    ) -> ModelMessage:
        """Accept one update once it is durable; with ``next_step``, answer with
        the model for that step."""
        self.state.check_incarnation(incarnation)
        self._check_healthy()
        update = Update(UpdateKey.parse(update_id), WorkerId(worker), grads)
        accepted = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((update, accepted))
        version = await accepted
        if next_step is None:
            return {"status": "OK", "version": int(version)}
        key = update.key
        await self._wait_ready(key.run, key.shard, *next_step)
        return self._model_reply(update.worker, have_version, have_server)

    @_replies_errors
    async def status(self) -> dict:
        rebuilt = self.rebuilt
        return {
            "status": "OK",
            **self.state.summary(),
            "version": int(self._published.version),
            "store": self.store,
            "workers": sorted(self.scheduler.workers),
            "nthreads": sum(ws.nthreads for ws in self.scheduler.workers.values()),
            "snapshots": []
            if self.journal is None
            else list(self.journal.stored_snapshots),
            "recovery": None
            if rebuilt is None
            else {
                "source": rebuilt.source,
                "start_version": rebuilt.start_version,
                "replayed": rebuilt.replayed,
                "seconds": rebuilt.seconds,
            },
        }

    @_replies_errors
    async def get_model(self) -> dict:
        model = self._published
        return {
            "status": "OK",
            "version": int(model.version),
            "params": ToPickle(model.params),
        }

    @_replies_errors
    async def records(self) -> dict:
        return {"status": "OK", **self.state.records()}

    # -- group commit -----------------------------------------------------------

    async def _commit_loop(self) -> None:
        """Apply queued pushes in batches; acknowledge each batch once it is durable."""
        while True:
            batch = [await self._queue.get()]
            while not self._queue.empty():
                batch.append(self._queue.get_nowait())
            async with self._lock:
                await self._commit_batch(batch)
            async with self._changed:
                self._changed.notify_all()
            if self._failed is not None and self._queue.empty():
                return  # pushes are refused before they queue from now on

    async def _commit_batch(self, batch: list[tuple[Update, asyncio.Future]]) -> None:
        accepted: list[tuple[Update, int, asyncio.Future]] = []
        for update, future in batch:
            try:
                self._check_healthy()
                admission = await self._maybe_offload(self.state.admit, update)
                model = await self._maybe_offload(self.state.merge, admission)
                self.state.commit(admission, model)
                accepted.append((update, int(admission.version), future))
            except Exception as e:  # noqa: BLE001 - refused; the state is unchanged
                future.set_exception(e)
        if not accepted:
            return
        if self.journal is not None:
            try:
                await self.journal.append(
                    [u for u, _, _ in accepted],
                    [v for _, v, _ in accepted],
                    self.state.downloads,
                )
            except StoreLocked as e:
                self._failed = StaleIncarnation(f"this server was fenced off: {e}")
                logger.error("%s; refusing every request from now on", e)
                for _, _, future in accepted:
                    future.set_exception(StaleIncarnation(str(self._failed)))
                return
            except Exception as e:
                self._failed = FTPSError(
                    f"the journal failed ({e!r}); restart the parameter server to "
                    "rebuild it from the store"
                )
                logger.critical(
                    "The journal failed; refusing every push from now on. Restart "
                    "the parameter server to rebuild from the store.",
                    exc_info=True,
                )
                for _, _, future in accepted:
                    future.set_exception(
                        FTPSError(f"the update could not be made durable: {e!r}")
                    )
                return
        self._published = self.state.model
        for _, version, future in accepted:
            if not future.done():
                future.set_result(version)
        self._maybe_snapshot()

    def _maybe_snapshot(self) -> None:
        if self.journal is None or (
            self._snapshotting is not None and not self._snapshotting.done()
        ):
            return
        every = self.snapshot_every or config.get("store.snapshot-every")
        if self.state.version - self._last_snapshot < every:
            return
        model, open_round, runs = self.state.snapshot_point()
        self._last_snapshot = int(model.version)
        replay_from = self.journal.doc.seq - open_round
        self._snapshotting = asyncio.create_task(
            self._snapshot(model, replay_from, runs)
        )

    async def _snapshot(
        self, model: ModelVersion, replay_from: int, runs: tuple
    ) -> None:
        t0 = time.perf_counter()
        try:
            await self.journal.write_snapshot(model, replay_from, runs)
            trimmed = await self.journal.trim(config.get("store.snapshots-kept"))
        except Exception:
            logger.exception("Snapshot of version %d failed", model.version)
            return
        logger.info(
            "Snapshot of version %d in %.3fs; trimmed %s",
            model.version,
            time.perf_counter() - t0,
            trimmed,
        )

    # -- store ----------------------------------------------------------------

    def _meta(self) -> RunMeta:
        return RunMeta(
            self.model,
            self.optimizer if self.optimizer is not None else SGD(lr=0.05),
            self.mode if self.mode is not None else config.get("mode"),
            self.staleness if self.staleness is not None else config.get("staleness"),
        )

    def _fresh_state(self, meta: RunMeta, incarnation: int = 1) -> ParameterServerState:
        return ParameterServerState(
            meta.model,
            meta.optimizer,
            mode=meta.mode,
            staleness=meta.staleness,
            incarnation=incarnation,
            **self._limits,
        )

    async def _open_store(self) -> None:
        journal = await Journal.open(self.store)
        if journal is None:
            if self.model is None:
                raise FTPSError(
                    f"the store {self.store!r} holds no run to resume: give a model"
                )
            meta = self._meta()
            journal = await Journal.create(
                self.store, meta, self._fresh_state(meta).model
            )
        else:
            given = RunMeta(
                self.model or journal.meta.model,
                self.optimizer or journal.meta.optimizer,
                self.mode or journal.meta.mode,
                self.staleness
                if self.staleness is not None
                else journal.meta.staleness,
            )
            journal.meta.check_same(given)
        journal.durable = (
            self.durable if self.durable is not None else config.get("store.durable")
        )
        previous = journal.doc.incarnation
        incarnation = await journal.claim(self.scheduler.address, self._owner_alive)
        self.rebuilt = await self._rebuild(journal, incarnation, previous)
        self.state = self.rebuilt.state
        self.journal = journal
        self.model = self.state.model_spec
        if journal.doc.seq or previous:
            logger.warning(
                "Recovered %s: incarnation %d -> %d, version %d from the %s at version "
                "%d plus %d replayed updates in %.3fs; 0 accepted updates lost",
                self.store,
                previous,
                incarnation,
                self.state.version,
                "snapshot"
                if self.rebuilt.source == "snapshot"
                else f"model copy of worker {self.rebuilt.source}",
                self.rebuilt.start_version,
                self.rebuilt.replayed,
                self.rebuilt.seconds,
            )

    async def _rebuild(
        self, journal: Journal, incarnation: int, previous: int
    ) -> Rebuilt:
        """The patent's recovery: the freshest model copy a live worker holds plus
        replay, falling back to the next candidate, then to the snapshot."""
        kwargs = {"incarnation": incarnation, "offload": offload, **self._limits}
        newest_snapshot = journal.doc.snapshots[-1].version
        stateless = not journal.meta.optimizer.init_state(
            journal.meta.model.init_params()
        )
        candidates = sorted(
            (
                (v, w)
                for w, v in journal.doc.downloads
                if v > newest_snapshot and w in self.scheduler.workers
            ),
            reverse=True,
        )
        if candidates and not stateless:
            logger.info(
                "Workers hold newer model copies, but %s keeps optimizer state they "
                "lack: rebuilding from the snapshot",
                journal.meta.optimizer,
            )
            candidates = []
        timeout = parse_timedelta(config.get("store.copy-timeout"))
        last_version = await journal.last_version()
        for version, worker in candidates:
            try:
                reply = await asyncio.wait_for(
                    self.scheduler.rpc(worker).ftps_model_copy(), timeout
                )
                # Every served version was committed first, so a version's bits
                # are the same in every incarnation; the worker may hold a newer
                # one than its row says (the row is written with the next commit).
                held = reply.get("version") if reply.get("status") == "OK" else None
                if reply.get("store") != self.store:
                    raise FTPSError("its copy came from another server")
                if held is None or not version <= held <= last_version:
                    raise FTPSError(f"it holds version {held!r}")
                copy = ModelVersion(Version(held), reply["params"], {})
                return await rebuild(journal, copy=copy, copy_source=worker, **kwargs)
            except Exception as e:  # noqa: BLE001 - any failure: next candidate
                logger.warning(
                    "Recovery from worker %s's copy of version %d failed (%s); "
                    "trying the next candidate",
                    worker,
                    version,
                    e,
                )
        return await rebuild(journal, **kwargs)

    async def _owner_alive(self, address: str, incarnation: int) -> bool:
        """Whether ``address`` still runs the server of ``incarnation`` on this store."""
        if address == self.scheduler.address:
            return False  # a server here replaces it, or this scheduler restarted
        try:
            reply = await asyncio.wait_for(
                self.scheduler.rpc(address).ftps_status(),
                parse_timedelta(config.get("store.owner-timeout")),
            )
        except Exception:  # noqa: BLE001 - unreachable or not ours: not alive
            return False
        return (
            isinstance(reply, dict)
            and reply.get("status") == "OK"
            and reply.get("store") == self.store
            and reply.get("incarnation") == incarnation
        )

    # -- internals ------------------------------------------------------------

    def _check_healthy(self) -> None:
        if self._failed is not None:
            raise type(self._failed)(str(self._failed))

    async def _maybe_offload(self, func: Callable, *args: Any) -> Any:
        if self.state.model_spec.n_params() >= self._offload_threshold:
            return await offload(func, *args)
        return func(*args)

    async def _wait_ready(self, run: int, shard: int, epoch: int, step: int) -> None:
        """Wait until the shard may compute ``(epoch, step)`` and what it needs is
        durable."""

        def ready() -> bool:
            return self.state.ready(run, shard, epoch, step)

        try:
            async with self._changed:
                await asyncio.wait_for(
                    self._changed.wait_for(ready), self._wait_timeout
                )
                target = self.state.version
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: self._published.version >= target),
                    self._wait_timeout,
                )
        except TimeoutError:
            raise WaitTimeout(
                f"shard {shard} of run {run} waited {self._wait_timeout}s for "
                f"(epoch {epoch}, step {step}) in {self.state.mode} mode"
            ) from None

    def _model_reply(
        self, worker: WorkerId, have_version: int, have_server: str | None
    ) -> ModelMessage:
        model = self._published
        fresh = have_version != model.version or have_server != self._identity
        if fresh:
            self.state.record_download(worker, model.version)
        return {
            "status": "OK",
            "server": self._identity,
            "store": self.store,
            "incarnation": self.state.incarnation,
            "version": int(model.version),
            "params": ToPickle(model.params) if fresh else None,
        }
