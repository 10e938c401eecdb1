"""The scheduler half: the parameter server as a Dask scheduler plugin.

:class:`ParameterServer` is a picklable spec (it is built on the client and
sent to the scheduler) plus the handlers the scheduler routes to. Every field
of every message is checked here, before anything changes; the work is done by
the :class:`~dask_ftps._server.Server` that :meth:`ParameterServer.start` runs.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
import uuid
import warnings
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any

from dask.utils import parse_timedelta
from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.protocol.pickle import dumps
from tornado.ioloop import PeriodicCallback

from dask_ftps import _dashboard, _metrics, config
from dask_ftps._coordinator import Coordinator
from dask_ftps._core import (
    MODES,
    Mode,
    ModelVersion,
    download_entries,
    holder_client,
)
from dask_ftps._dashboard import Tracker
from dask_ftps._exceptions import (
    FTPSError,
    NotRegistered,
    RunInUse,
    SpecMismatch,
)
from dask_ftps._recovery import Rebuilt, open_run, read_meta, worker_copies
from dask_ftps._registry import importable_elsewhere, module_allowed
from dask_ftps._server import Server, ServerConfig, rebuilt_summary
from dask_ftps._shards import MAX_SHARDS, ModelShard, plan, shard_store
from dask_ftps._state import ParameterServerState
from dask_ftps._store import Journal, RunMeta
from dask_ftps._store._io import check_location
from dask_ftps._worker_plugin import FTPSWorkerPlugin
from dask_ftps.models import Model, check_model
from dask_ftps.models._base import MODELS
from dask_ftps.optim import OPTIMIZERS, SGD, Optimizer
from dask_ftps.protocol import SHARDS_OP, Endpoint

if TYPE_CHECKING:
    from distributed import Scheduler

logger = logging.getLogger(__name__)

#: The scheduler's periodic callback that samples the server for the dashboard.
_SAMPLER = "ftps-dashboard"


def _warn_unimportable(model: Model) -> None:
    """Say, where a store-backed server is made, that a restarted scheduler
    could not import its model's class."""
    why = importable_elsewhere(type(model))
    if why is not None:
        warnings.warn(
            f"model {type(model).kind}: a restarted scheduler cannot import it "
            f"({why}): training works, but a scheduler restarted on the store "
            "cannot rebuild the run; put the class in a module on the scheduler's "
            "and workers' path and list it in ftps.models.allowed",
            UserWarning,
            stacklevel=3,
        )


def _log_unrebuildable(model: Model) -> None:
    """Say, on the scheduler, when a restart with this configuration would not
    rebuild the store's model."""
    module = type(model).__module__
    why = importable_elsewhere(type(model))
    builtin = type(model).kind in MODELS.builtins
    if why is None and not builtin and not module_allowed(module):
        why = f"its module {module!r} is not in this scheduler's ftps.models.allowed"
    if why is not None:
        logger.warning(
            "Model %s: a scheduler restarted on this store will not rebuild it (%s)",
            type(model).kind,
            why,
        )


class ParameterServer(SchedulerPlugin, Endpoint):
    """A fault-tolerant parameter server hosted by the Dask scheduler.

    Parameters
    ----------
    store
        Where the run lives: a local path, an fsspec URL (``s3://...``, with
        ``storage_options``) or a Zarr :class:`~zarr.abc.store.Store`. Every
        accepted update is written there before it is acknowledged, and a
        server registered on a store that holds a run resumes it, bit for bit.
        None keeps everything in memory (nothing survives the scheduler).
    model
        The model, for example :class:`dask_ftps.models.MLP`, or your own
        :class:`~dask_ftps.models.Model`; None resumes the one the store holds.
        The store records it by its class's import path: a restarted scheduler
        rebuilds it only if it can import that module and ``ftps.models.allowed``
        lists it (a class defined in ``__main__`` or a notebook trains, with a
        warning here that a restart could not rebuild it).
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
    storage_options
        fsspec options for a URL store (endpoint, credentials, ...).
    shards
        Split the parameters into this many key ranges (whole arrays, the
        large ones by rows), each served by a shard server on a Dask worker
        started with the resource ``ftps-server`` (``dask worker --resources
        ftps-server=1``, or ``LocalCluster(resources={"ftps-server": 1})``);
        workers push and pull their slices straight to them, and each shard
        keeps its own journal in the store's folder ``shards/<k>``. A lost
        shard server is replaced and its shard rebuilt exactly while the
        others go on. Default 1, or the store's: the server in the scheduler.
        Needs a store path or URL. See "Shards" in the docs.

    Raises
    ------
    TypeError
        If ``store`` is not a path, URL or Zarr store, or ``storage_options``
        go with something other than a URL.
    ModelError
        If the model does not do what it declares (its parameters' names,
        shapes, dtypes or values; fields that are not JSON values).
    ModelNotAllowed
        At registration, if the store's model is in a module that
        ``ftps.models.allowed`` does not list.
    SpecMismatch
        At registration, if the store holds a run with another model, optimizer,
        mode or number of shards.
    StoreLocked
        At registration, if another live server writes the store.
    StoreCorrupted
        At registration, if the store cannot be rebuilt exactly.
    RunInUse
        At registration, if the server it would replace trains a run for a
        client still connected (and the new server is not on that run's store).

    Examples
    --------
    >>> ps = ParameterServer("runs/digits.zarr", model=MLP(64, (128,), 10))  # doctest: +SKIP
    >>> client.register_plugin(ps)  # doctest: +SKIP
    """

    name = "ftps"
    idempotent = False

    scheduler: Scheduler

    def __init__(
        self,
        store: Any = None,
        model: Model | None = None,
        optimizer: Optimizer | None = None,
        mode: Mode | None = None,
        staleness: int | None = None,
        snapshot_every: int | None = None,
        durable: bool | None = None,
        storage_options: dict | None = None,
        shards: int | None = None,
    ) -> None:
        if shards is not None and (
            not isinstance(shards, int)
            or isinstance(shards, bool)
            or not 1 <= shards <= MAX_SHARDS
        ):
            raise ValueError(
                f"shards must be an integer in [1, {MAX_SHARDS}], got {shards!r}"
            )
        if (
            shards is not None
            and shards > 1
            and not isinstance(
                os.fspath(store) if isinstance(store, os.PathLike) else store, str
            )
        ):
            raise TypeError(
                "a sharded parameter server (shards > 1) needs a store path or URL: "
                "each shard keeps its run in a folder of it"
            )
        if mode is not None and mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if staleness is not None and (
            not isinstance(staleness, int)
            or isinstance(staleness, bool)
            or staleness < 0
        ):
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
        if model is not None:
            check_model(model)
            if store is not None:
                _warn_unimportable(model)
        if optimizer is not None and (
            not isinstance(optimizer, Optimizer)
            or type(optimizer).kind not in OPTIMIZERS.builtins
        ):
            # A store names its optimizer, and only dask_ftps's can be rebuilt.
            raise TypeError(
                f"optimizer must be dask_ftps.SGD or dask_ftps.Adam, got {optimizer!r:.80}"
                " (optimizers of your own are not supported yet)"
            )
        if snapshot_every is not None and (
            not isinstance(snapshot_every, int)
            or isinstance(snapshot_every, bool)
            or snapshot_every < 1
        ):
            raise ValueError(
                f"snapshot_every must be a positive integer: {snapshot_every!r}"
            )
        if durable is not None and not isinstance(durable, bool):
            raise TypeError(f"durable must be True, False or None: {durable!r}")
        if store is not None:
            check_location(store, storage_options)
        elif storage_options is not None:
            raise TypeError("storage_options need a store URL")
        self.store = os.fspath(store) if isinstance(store, os.PathLike) else store
        self.storage_options = storage_options
        self.model = model
        self.optimizer = optimizer
        self.mode = mode
        self.staleness = staleness
        self.snapshot_every = snapshot_every
        self.durable = durable
        self.shards = shards
        #: This object's own id, drawn where it was made (the client): whoever
        #: registered it can tell whether the scheduler still serves it.
        self.registration = uuid.uuid4().hex
        self._server: Server | None = None
        self._coordinator: Coordinator | None = None

    def __getstate__(self) -> dict:
        return {
            **self.__dict__,
            "_server": None,
            "_coordinator": None,
            "scheduler": None,
        }

    @property
    def _handlers(self) -> dict[str, Callable]:
        if self._coordinator is not None:
            handlers = self._coordinator.handlers()
            handlers["ftps_status"] = self._sharded_status
            return handlers
        return {**self.endpoint_handlers(), SHARDS_OP: self._no_shards}

    async def _no_shards(self, **kwargs: Any) -> dict:
        """``ftps_shards`` of a server that is not sharded."""
        return {"status": "OK", "shards": None}

    @property
    def coordinator(self) -> Coordinator | None:
        """The placement of a sharded server's shards (None: not sharded)."""
        return self._coordinator

    @property
    def server(self) -> Server:
        """The running server; :class:`NotRegistered` before ``start`` ended."""
        if self._server is None:
            raise NotRegistered("the parameter server has not started")
        return self._server

    @property
    def state(self) -> ParameterServerState:
        """The running server's state (for tests and inspection)."""
        return self.server.state

    @property
    def journal(self) -> Journal | None:
        return self.server.journal

    @property
    def rebuilt(self) -> Rebuilt | None:
        return self.server.rebuilt

    # -- lifecycle ------------------------------------------------------------

    async def start(self, scheduler: Scheduler) -> None:
        t0 = time.perf_counter()
        self.scheduler = scheduler
        old = scheduler.plugins.get(self.name)
        old_server = (
            old._server
            if isinstance(old, ParameterServer) and old is not self
            else None
        )
        retention = config.get("retention")
        self._limits = {
            "download_limit": download_entries(
                retention["failure-probability"], retention["negligible-probability"]
            ),
            "gradient_entries": retention["gradient-entries"],
            "memory_rows": retention["memory-rows"],
        }
        settings = ServerConfig(
            snapshot_every=self.snapshot_every or config.get("store.snapshot-every"),
            snapshots_kept=max(1, int(config.get("store.snapshots-kept"))),
            offload_threshold=config.get("offload-threshold"),
            wait_timeout=parse_timedelta(config.get("wait-timeout")),
            address=scheduler.address,
            inflight=_window(config.get("inflight")),
            reorder_timeout=parse_timedelta(config.get("reorder-timeout")),
            replay_budget=_replay_budget(config.get("store.replay-budget")),
        )
        worker_copies()  # checked before the old server is retired
        if (
            isinstance(old, ParameterServer)
            and old is not self
            and old._coordinator is not None
            and not _same_store(old, self)
        ):
            # Another store's sharded server: its shard servers stop.
            await old._coordinator.close(stop_servers=True)
        sharded = None
        if isinstance(self.store, str):
            sharded = await read_meta(shard_store(self.store, 0), self.storage_options)
        if sharded is not None or _on_workers(self.shards, self.store):
            await self._start_sharded(old, old_server, settings, sharded)
            logger.info(
                "Sharded parameter server started in %.3fs: %s over %d shards, "
                "store %s",
                time.perf_counter() - t0,
                self.model.summary(),
                self._coordinator.shards,
                self.store,
            )
            return
        if self.store is None:
            if old_server is not None:
                self._check_replaceable(old_server)
                await old_server.retire("replaced")
            server = Server(self._fresh_state(self._meta()), None, settings)
        else:
            server = await self._open_store(old_server, settings)
        self._server = server
        server.on_event = self._log_event
        server.connected = self._connected
        if server.recovered:
            self._log_event(
                {
                    "action": "recovered",
                    "incarnation": server.state.incarnation,
                    "version": int(server.state.version),
                    **rebuilt_summary(server.rebuilt),
                }
            )
        self.model = server.state.model_spec
        if old is not None and old is not self:
            # This server replaces the one registered before (retired above):
            # drop it here, so that distributed does not warn of an overwrite.
            logger.info("Replacing the registered parameter server %r", self.name)
            del scheduler.plugins[self.name]
        scheduler.handlers.update(self._handlers)
        await self._start_dashboard(old if isinstance(old, ParameterServer) else None)
        # Idempotent: a server replacing another may use the workers' model copies
        # in its recovery (copies are tagged with the server that sent them).
        await scheduler.register_worker_plugin(
            None, dumps(FTPSWorkerPlugin()), name="ftps", idempotent=True
        )
        state = server.state
        if server.journal is not None:
            _log_unrebuildable(state.model_spec)
        logger.info(
            "Parameter server started in %.3fs: %s, %d parameters, mode %s, "
            "incarnation %d, version %d, store %s",
            time.perf_counter() - t0,
            state.model_spec.summary(),
            state.model_spec.n_params(),
            state.mode,
            state.incarnation,
            state.version,
            server.description,
        )

    async def _start_sharded(
        self,
        old: Any,
        old_server: Server | None,
        settings: ServerConfig,
        stored: RunMeta | None,
    ) -> None:
        """Coordinate a sharded run: its shard servers run on tagged workers."""
        scheduler = self.scheduler
        if stored is None:
            if await read_meta(self.store, self.storage_options) is not None:
                raise SpecMismatch(
                    f"the store {self.store} holds a run of one server: it cannot "
                    f"be resumed with shards={self.shards}"
                )
            if self.model is None:
                raise FTPSError(
                    f"the store {self.store} holds no run to resume: give a model"
                )
            meta = self._meta()
            shards = int(self.shards or 1)
        else:
            shards = stored.model.shards
            if self.shards is not None and self.shards != shards:
                raise SpecMismatch(
                    f"the store {self.store} holds a run of {shards} shards, this "
                    f"server asks for {self.shards}"
                )
            base = stored.model.model
            given = self._given(
                RunMeta(base, stored.optimizer, stored.mode, stored.staleness)
            )
            stored.check_same(
                RunMeta(
                    ModelShard.of(given.model, shards, 0),
                    given.optimizer,
                    given.mode,
                    given.staleness,
                )
            )
            meta = given
        plan(meta.model.param_shapes(), shards)  # a model too small: an error now
        if old_server is not None:
            self._check_replaceable(old_server)
            await old_server.retire("replaced")
        if isinstance(old, ParameterServer) and old._coordinator is not None:
            await old._coordinator.close()
        durable = (
            self.durable if self.durable is not None else config.get("store.durable")
        )
        server_settings = dataclasses.asdict(settings)
        del server_settings["address"]
        if math.isinf(server_settings["replay_budget"]):
            server_settings["replay_budget"] = math.inf
        # Every worker can serve a shard once it has the worker plugin.
        await scheduler.register_worker_plugin(
            None, dumps(FTPSWorkerPlugin()), name="ftps", idempotent=True
        )
        self._coordinator = Coordinator(
            scheduler,
            meta.model,
            {
                "store": self.store,
                "storage_options": self.storage_options,
                "shards": shards,
                "model": meta.model.to_dict(),
                "optimizer": meta.optimizer.to_dict(),
                "mode": meta.mode,
                "staleness": meta.staleness,
                "durable": durable,
                "settings": server_settings,
                "limits": dict(self._limits),
            },
        )
        self.model = meta.model
        if old is not None and old is not self:
            logger.info("Replacing the registered parameter server %r", self.name)
            del scheduler.plugins[self.name]
        scheduler.handlers.update(self._handlers)
        await self._start_dashboard(old if isinstance(old, ParameterServer) else None)

    async def _sharded_status(self) -> dict:
        assert self._coordinator is not None
        reply = await self._coordinator.status()
        if reply.get("status") == "OK":
            reply["registration"] = self.registration
        return reply

    async def close(self) -> None:
        handlers = getattr(getattr(self, "scheduler", None), "handlers", {})
        for op, handler in self._handlers.items():
            if handlers.get(op) == handler:
                del handlers[op]
        self._stop_dashboard()
        if self._coordinator is not None:
            await self._coordinator.close()
        if self._server is not None:
            await self._server.close()

    # -- the dashboard page and the metrics (dask_ftps._dashboard, _metrics) ------

    _tracker: Tracker | None = None
    _sampler: PeriodicCallback | None = None

    async def _start_dashboard(self, old: ParameterServer | None) -> None:
        """Serve ``/ftps`` and the metrics of this server, in place of ``old``'s."""
        for previous in (old, self):  # self: started again
            if previous is not None:
                previous._stop_dashboard()
        try:
            self._tracker = _dashboard.tracker_for(self)
            await self._tracker.refresh()  # a rebuilt run's shards at once
            _dashboard.install(self.scheduler)
            _metrics.attach(self)
        except Exception:  # the server serves without its page
            logger.warning("The /ftps page and metrics are not served", exc_info=True)
            self._stop_dashboard()
            return
        self._sampler = PeriodicCallback(
            self._refresh_dashboard, _dashboard.SAMPLE_INTERVAL * 1000
        )
        self.scheduler.periodic_callbacks[_SAMPLER] = self._sampler
        self._sampler.start()

    def _stop_dashboard(self) -> None:
        """Leave ``/ftps`` answering "no parameter server" and the metrics out."""
        if self._sampler is not None:
            self._sampler.stop()
            callbacks = self.scheduler.periodic_callbacks
            if callbacks.get(_SAMPLER) is self._sampler:
                del callbacks[_SAMPLER]
            self._sampler = None
        self._tracker = None
        _metrics.detach(self)

    async def _refresh_dashboard(self) -> None:
        tracker = self._tracker
        if tracker is None or tracker.stopped:
            return
        try:
            await tracker.refresh()
        except Exception:  # a missed sample is no failure
            logger.debug("The dashboard's sample failed", exc_info=True)

    def add_worker(self, scheduler: Scheduler, worker: str) -> None:
        if self._coordinator is not None:
            self._coordinator.worker_added()

    def remove_worker(self, scheduler: Scheduler, worker: str, **kwargs: Any) -> None:
        if self._coordinator is not None:
            self._coordinator.worker_removed(worker)
        if self._server is not None:
            self._server.forget_worker(worker)

    def remove_client(self, scheduler: Scheduler, client: str) -> None:
        """A client disconnected: its train() calls hold no run any more (also
        the calls that ended without releasing theirs: a lost ``ftps_begin_run``
        reply, a client that was reconnecting when the call ended)."""
        if self._coordinator is not None:
            self._coordinator.clients_changed()
        if self._server is None:
            return
        for run in self._server.state.release_client(client):
            logger.info(
                "Run %d (%r) released: its client %s disconnected",
                run.run,
                run.name,
                client,
            )

    # -- handlers: every field is checked here, before anything changes ---------

    def _check_replaceable(self, old: Server) -> None:
        """Refuse to replace a server whose run a connected client trains now:
        its updates would go nowhere (or, without run identities, into this
        server's model)."""
        clients = self.scheduler.clients
        run = old.state.held(lambda holder: holder_client(holder) in clients)
        if run is not None:
            raise RunInUse(
                f"the scheduler's parameter server is training run {run.run} "
                f"({run.name!r}) for client {holder_client(run.holder)!r}, which is "
                "still connected: a new server would end that run. Wait for its "
                "train() to end (or close that client), or use another scheduler"
            )
        # No await between this check and the retirement's: a begin_run waiting
        # for the old server's state is refused from now on, and takes no hold
        # that the retirement would end.
        old.retiring = True

    def _clients(self) -> Collection[str]:
        return self.scheduler.clients

    def _status_extra(self, reply: dict) -> dict:
        workers = self.scheduler.workers
        reply["workers"] = sorted(workers)
        reply["nthreads"] = sum(ws.nthreads for ws in workers.values())
        reply["registration"] = self.registration
        return reply

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

    def _given(self, stored: RunMeta) -> RunMeta:
        """The run this plugin asks for, the store's where it says nothing."""
        return RunMeta(
            self.model or stored.model,
            self.optimizer or stored.optimizer,
            self.mode or stored.mode,
            self.staleness if self.staleness is not None else stored.staleness,
        )

    async def _open_store(
        self, old_server: Server | None, settings: ServerConfig
    ) -> Server:
        durable = (
            self.durable if self.durable is not None else config.get("store.durable")
        )
        # Refuse another spec before the old server stops serving.
        existing = await read_meta(self.store, self.storage_options)
        if existing is not None:
            existing.check_same(self._given(existing))
        elif self.model is None:
            raise FTPSError(
                f"the store {self.store} holds no run to resume: give a model"
            )
        if old_server is not None:
            if existing is None or existing.run_id != old_server.server_id:
                # Another store's server: the runs of the old one end here. (The
                # same store's goes on with them: a rebuild, not a replacement.)
                self._check_replaceable(old_server)
            await old_server.retire("replaced")

        def create() -> tuple[RunMeta, ModelVersion]:
            if self.model is None:
                raise FTPSError(
                    f"the store {self.store} holds no run to resume: give a model"
                )
            meta = self._meta()
            return meta, self._fresh_state(meta).model

        scheduler = self.scheduler
        journal, rebuilt = await open_run(
            self.store,
            self.storage_options,
            durable=durable,
            create=create,
            given=self._given,
            address=scheduler.address,
            rpc=scheduler.rpc,
            workers=lambda: scheduler.workers,
            limits=self._limits,
            status_op=("ftps_status", {}),
        )
        if old_server is not None and old_server.server_id == journal.meta.run_id:
            # The same runs go on here: so do the train() calls holding them.
            rebuilt.state.adopt_holders(old_server.state)
        return Server(rebuilt.state, journal, settings, rebuilt, str(journal.io))

    def _log_event(self, event: dict) -> None:
        """An event on the scheduler's ``ftps`` topic (``client.get_events("ftps")``)."""
        self.scheduler.log_event("ftps", event)


def _same_store(a: ParameterServer, b: ParameterServer) -> bool:
    """Whether two plugins name the same store (by path or URL)."""
    return (
        isinstance(a.store, str)
        and a.store == b.store
        and a.storage_options == b.storage_options
    )


def _on_workers(shards: int | None, store: Any) -> bool:
    """Whether a new server's model lives on shard servers: more than one shard,
    or one with ``ftps.shards.on-workers`` (and a store path or URL)."""
    if (shards or 1) > 1:
        return True
    on_workers = config.get("shards.on-workers")
    if not isinstance(on_workers, bool):
        raise FTPSError(
            f"ftps.shards.on-workers must be true or false, got {on_workers!r}"
        )
    return shards == 1 and on_workers and isinstance(store, str)


def _replay_budget(value: Any) -> float:
    """``ftps.store.replay-budget``: a positive number (None: no bound)."""
    if value is None:
        return math.inf
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(
            f"ftps.store.replay-budget must be a positive number, got {value!r}"
        )
    return float(value)


def _window(value: object) -> int:
    """``ftps.inflight``: a positive integer."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise FTPSError(f"ftps.inflight must be a positive integer, got {value!r}")
    return value
