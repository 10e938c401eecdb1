"""The scheduler half: the parameter server as a Dask scheduler plugin.

:class:`ParameterServer` is a picklable spec (it is built on the client and
sent to the scheduler) plus the handlers the scheduler routes to. Every field
of every message is checked here, before anything changes; the work is done by
the :class:`~dask_ftps._server.Server` that :meth:`ParameterServer.start` runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import time
import uuid
import warnings
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from dask.utils import parse_timedelta
from distributed.core import error_message
from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.protocol.pickle import dumps
from distributed.protocol.serialize import ToPickle
from distributed.utils import offload
from tornado.ioloop import PeriodicCallback

from dask_ftps import _dashboard, _metrics, config
from dask_ftps._core import (
    MAX_COUNT,
    MAX_EPOCHS,
    MODES,
    Holder,
    Mode,
    ModelMessage,
    ModelVersion,
    RunSpec,
    Update,
    UpdateKey,
    Version,
    WorkerId,
    download_entries,
    field_holder,
    field_int,
    field_live,
    field_server,
    field_step,
    field_str,
    holder_client,
)
from dask_ftps._dashboard import Tracker
from dask_ftps._exceptions import (
    FTPSError,
    InvalidRequest,
    InvalidUpdate,
    NotRegistered,
    RunInUse,
    StaleIncarnation,
)
from dask_ftps._recovery import Rebuilt, rebuild
from dask_ftps._registry import importable_elsewhere, module_allowed
from dask_ftps._server import Server, ServerConfig, rebuilt_summary
from dask_ftps._state import ParameterServerState, check_worker
from dask_ftps._store import Journal, RunMeta, resolve, take_over
from dask_ftps._store._format import model_crc
from dask_ftps._store._io import check_location
from dask_ftps._worker_plugin import FTPSWorkerPlugin
from dask_ftps.models import Model, check_model
from dask_ftps.models._base import MODELS
from dask_ftps.optim import OPTIMIZERS, SGD, Optimizer

if TYPE_CHECKING:
    from distributed import Scheduler

logger = logging.getLogger(__name__)

#: The scheduler's periodic callback that samples the server for the dashboard.
_SAMPLER = "ftps-dashboard"


def _replies_errors(handler: Callable[..., Awaitable[dict]]):
    """Send a refusal back to the caller as an error message, never a crash."""

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
        except Exception as e:
            logger.warning("%s failed on a request", handler.__name__, exc_info=True)
            return error_message(InvalidRequest(f"{handler.__name__}: {e!r}"))

    return wrapper


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


class ParameterServer(SchedulerPlugin):
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
        At registration, if the store holds a run with another model, optimizer
        or mode.
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
    ) -> None:
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
        #: This object's own id, drawn where it was made (the client): whoever
        #: registered it can tell whether the scheduler still serves it.
        self.registration = uuid.uuid4().hex
        self._server: Server | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_server": None, "scheduler": None}

    @property
    def _handlers(self) -> dict[str, Callable]:
        return {
            "ftps_begin_run": self.begin_run,
            "ftps_find_run": self.find_run,
            "ftps_end_epoch": self.end_epoch,
            "ftps_end_run": self.end_run,
            "ftps_next_step": self.next_step,
            "ftps_pull": self.pull,
            "ftps_push": self.push,
            "ftps_status": self.status,
            "ftps_get_model": self.get_model,
            "ftps_model_spec": self.model_spec,
            "ftps_records": self.records,
        }

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
        _worker_copies()  # checked before the old server is retired
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

    async def close(self) -> None:
        handlers = getattr(getattr(self, "scheduler", None), "handlers", {})
        for op, handler in self._handlers.items():
            if handlers.get(op) == handler:
                del handlers[op]
        self._stop_dashboard()
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
            self._tracker = Tracker(self.server)
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
        if tracker is None or tracker.server.stopped:
            return
        try:
            await tracker.refresh()
        except Exception:  # a missed sample is no failure
            logger.debug("The dashboard's sample failed", exc_info=True)

    def remove_worker(self, scheduler: Scheduler, worker: str, **kwargs: Any) -> None:
        if self._server is not None:
            self._server.forget_worker(worker)

    def remove_client(self, scheduler: Scheduler, client: str) -> None:
        """A client disconnected: its train() calls hold no run any more (also
        the calls that ended without releasing theirs: a lost ``ftps_begin_run``
        reply, a client that was reconnecting when the call ended)."""
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

    @_replies_errors
    async def begin_run(
        self,
        spec: object,
        name: object = "",
        holder: object = None,
        live: object = (),
        server_id: object = None,
    ) -> dict:
        """Begin or find a run. ``holder`` (``"<client id>/<token>"``) names the
        ``train()`` call, ``live`` the calls of the same client still running,
        ``server_id`` the server the caller expects (from ``ftps_status``)."""
        run_spec = RunSpec.from_dict(spec)
        run_name = field_str("name", name)
        caller = None if holder is None else field_holder(holder)
        mine = field_live(live, caller)
        expect = None if server_id is None else field_server(server_id, "begin_run")
        clients = self.scheduler.clients
        own = None if caller is None else holder_client(caller)

        def alive(other: Holder) -> bool:
            client = holder_client(other)
            if client == own:  # the caller's client says which of its calls live
                return other in mine
            return client in clients

        return await self.server.begin_run(run_spec, run_name, caller, alive, expect)

    @_replies_errors
    async def end_run(self, server_id: object, run: object, holder: object) -> dict:
        """The ``train()`` call ``holder`` ended: it holds ``run`` no more."""
        server = self.server
        expect = field_server(server_id, "end_run")
        run_number = field_int("run", run, maximum=MAX_COUNT)
        caller = field_holder(holder)
        server.check_server(expect, "the run")
        return server.release(run_number, caller)

    @_replies_errors
    async def find_run(
        self,
        name: object,
        n_samples: object,
        batch_size: object,
        epochs: object,
        seed: object,
    ) -> dict:
        return self.server.find_run(
            field_str("name", name),
            field_int("n_samples", n_samples, maximum=MAX_COUNT),
            field_int("batch_size", batch_size, maximum=MAX_COUNT),
            field_int("epochs", epochs, maximum=MAX_EPOCHS),
            field_int("seed", seed, maximum=2**63 - 1),
        )

    @_replies_errors
    async def end_epoch(
        self, run: object, epoch: object, values: object, server_id: object = None
    ) -> dict:
        self.server.check_server(field_server(server_id, "end_epoch"), f"run {run}")
        return await self.server.end_epoch(
            field_int("run", run, maximum=MAX_COUNT),
            field_int("epoch", epoch, maximum=MAX_EPOCHS),
            _history_values(values),
        )

    @_replies_errors
    async def next_step(
        self,
        run: object,
        shard: object,
        server_id: object = None,
        holder: object = None,
    ) -> dict:
        expect = field_server(server_id, "next_step")
        caller = field_holder(holder)  # malformed: InvalidRequest, whatever server
        self.server.check_server(expect, f"run {run}")
        return await self.server.next_step(
            field_int("run", run, maximum=MAX_COUNT),
            field_int("shard", shard, maximum=MAX_COUNT),
            caller,
        )

    def _connected(self, holder: Holder) -> bool:
        """Whether the client of the train() call ``holder`` is connected."""
        return holder_client(holder) in self.scheduler.clients

    @_replies_errors
    async def pull(
        self,
        worker: object,
        run: object,
        shard: object,
        epoch: object,
        step: object,
        have_version: object = -1,
        have_server: object = None,
        server_id: object = None,
        holder: object = None,
    ) -> ModelMessage:
        """The model to compute ``(epoch, step)`` of a shard from. ``holder``
        names the train() call the asking task belongs to (every pull, push
        and next_step does): it must hold the run."""
        expect = field_server(server_id, "pull")
        caller = field_holder(holder)
        self.server.check_server(expect, f"run {run}")
        return await self.server.pull(
            WorkerId(check_worker(worker, InvalidRequest)),
            field_int("run", run, maximum=MAX_COUNT),
            field_int("shard", shard, maximum=MAX_COUNT),
            field_int("epoch", epoch, maximum=MAX_EPOCHS),
            field_int("step", step, maximum=MAX_COUNT),
            field_int("have_version", have_version, minimum=-1),
            field_str("have_server", have_server, optional=True),
            caller,
        )

    @_replies_errors
    async def push(
        self,
        worker: object,
        update_id: object,
        grads: object,
        incarnation: object,
        next_step: object = None,
        have_version: object = -1,
        have_server: object = None,
        server_id: object = None,
        holder: object = None,
    ) -> ModelMessage:
        """Accept one update once it is durable; with ``next_step``, answer with
        the model for that step. ``server_id`` names the server the update's run
        began on: an update of another server's run is refused first; ``holder``
        the train() call it belongs to: an update of a run another call holds
        is refused before it changes anything."""
        server = self.server
        expect = field_server(server_id, "push")
        caller = field_holder(holder)
        server.check_server(expect, f"update {str(update_id)[:40]!r}")
        if not isinstance(incarnation, int) or isinstance(incarnation, bool):
            raise StaleIncarnation(f"message from incarnation {incarnation!r:.40}")
        update = Update(
            UpdateKey.parse(update_id),
            WorkerId(check_worker(worker, InvalidUpdate)),
            _grads(grads),
            caller,
        )
        return await server.push(
            update,
            incarnation,
            field_step(next_step),
            field_int("have_version", have_version, InvalidUpdate, minimum=-1),
            field_str("have_server", have_server, InvalidUpdate, optional=True),
        )

    @_replies_errors
    async def status(self) -> dict:
        server = self.server
        reply = server.status()
        # Only async mode computes ahead of what was acknowledged: a sync round
        # needs the round before it, an ssp bound counts acknowledged clocks.
        reply["inflight"] = server.config.inflight if reply["mode"] == "async" else 1
        workers = self.scheduler.workers
        reply["workers"] = sorted(workers)
        reply["nthreads"] = sum(ws.nthreads for ws in workers.values())
        reply["registration"] = self.registration
        return reply

    @_replies_errors
    async def model_spec(self) -> dict:
        """The served model object itself (pickled, as the client registered it,
        or as this scheduler rebuilt it): what ``train()`` ships to its tasks,
        with no lookup of the class by name on the client."""
        return {
            "status": "OK",
            "server_id": self.server.server_id,
            "model": ToPickle(self.server.state.model_spec),
        }

    @_replies_errors
    async def get_model(self) -> dict:
        model = self.server.published
        return {
            "status": "OK",
            "version": int(model.version),
            "params": ToPickle(model.params),
        }

    @_replies_errors
    async def records(self) -> dict:
        return {"status": "OK", **(await self.server.records())}

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
        io = resolve(self.store, self.storage_options)
        try:
            existing = await Journal.read_meta(io)
        finally:
            await io.close()
        if existing is not None:
            existing.check_same(self._given(existing))
        elif self.model is None:
            raise FTPSError(f"the store {io} holds no run to resume: give a model")
        if old_server is not None:
            if existing is None or existing.run_id != old_server.server_id:
                # Another store's server: the runs of the old one end here. (The
                # same store's goes on with them: a rebuild, not a replacement.)
                self._check_replaceable(old_server)
            await old_server.retire("replaced")

        async def open_journal() -> Journal:
            io = resolve(self.store, self.storage_options)  # each attempt its own
            io.durable = durable
            try:
                journal = await Journal.open_io(io)
                if journal is None:
                    if self.model is None:
                        raise FTPSError(
                            f"the store {io} holds no run to resume: give a model"
                        )
                    meta = self._meta()
                    journal = await Journal.create_io(
                        io, meta, self._fresh_state(meta).model
                    )
                journal.meta.check_same(self._given(journal.meta))
            except BaseException:
                await io.close()
                raise
            return journal

        journal, incarnation, rebuilt = await take_over(
            open_journal, self.scheduler.address, self._owner_alive, self._rebuild
        )
        rebuilt.state.incarnation = incarnation
        if old_server is not None and old_server.server_id == journal.meta.run_id:
            # The same runs go on here: so do the train() calls holding them.
            rebuilt.state.adopt_holders(old_server.state)
        previous = journal.records[journal.claim_serial - 1].incarnation
        if journal.committed or previous:
            logger.warning(
                "Recovered %s: incarnation %d -> %d, version %d from the %s at version "
                "%d plus %d replayed updates in %.3fs; 0 accepted updates lost%s",
                journal.io,
                previous,
                incarnation,
                rebuilt.state.version,
                "snapshot"
                if rebuilt.source == "snapshot"
                else f"model copy of worker {rebuilt.source}",
                rebuilt.start_version,
                rebuilt.replayed,
                rebuilt.seconds,
                ""
                if not rebuilt.skipped
                else f"; damaged snapshots passed over: {'; '.join(rebuilt.skipped)}",
            )
        return Server(rebuilt.state, journal, settings, rebuilt, str(journal.io))

    def _log_event(self, event: dict) -> None:
        """An event on the scheduler's ``ftps`` topic (``client.get_events("ftps")``)."""
        self.scheduler.log_event("ftps", event)

    async def _rebuild(self, journal: Journal) -> Rebuilt:
        """The patent's recovery: the freshest model copy a live worker holds plus
        replay, falling back to the next candidate, then to the snapshot."""
        large = journal.meta.model.n_params() >= config.get("offload-threshold")
        kwargs = {"offload": offload if large else None, **self._limits}
        newest_snapshot = journal.snapshots()[0].body.version
        candidates = sorted(
            (
                (v, w)
                for w, v in journal.downloads
                if v > newest_snapshot and w in self.scheduler.workers
            ),
            reverse=True,
        )
        # Asked only where a worker holds a copy (a new scheduler has no workers:
        # no model's initial parameters are drawn for nothing).
        if candidates and not _stateless(journal.meta):
            logger.info(
                "Workers hold newer model copies, but %s keeps optimizer state they "
                "lack: rebuilding from the snapshot",
                journal.meta.optimizer,
            )
            candidates = []
        if candidates and not _worker_copies():
            logger.info(
                "Workers hold newer model copies; ftps.store.worker-copies is off: "
                "rebuilding from the store alone"
            )
            candidates = []
        timeout = parse_timedelta(config.get("store.copy-timeout"))
        for version, worker in candidates:
            try:
                reply = await asyncio.wait_for(
                    self.scheduler.rpc(worker).ftps_model_copy(), timeout
                )
                copy = _checked_copy(journal, reply, version)
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

    async def _owner_alive(
        self, journal: Journal, incarnation: int, address: str
    ) -> bool:
        """Whether ``address`` still runs the server of ``incarnation`` on this store."""
        if address == self.scheduler.address:
            return False  # a server here replaces it, or this scheduler restarted
        timeout = parse_timedelta(config.get("store.owner-timeout"))
        if not await _listening(address, timeout):
            return False  # refused: nothing listens there (distributed would retry)
        try:
            reply = await asyncio.wait_for(
                self.scheduler.rpc(address).ftps_status(), timeout
            )
        except Exception:  # noqa: BLE001 - unreachable or not ours: not alive
            return False
        return (
            isinstance(reply, dict)
            and reply.get("status") == "OK"
            and reply.get("run_id") == journal.meta.run_id
            and reply.get("incarnation") == incarnation
            and not reply.get("failed")
        )


def _history_values(value: object) -> dict[str, float | None]:
    """An epoch's history record: at most 32 short names, each a number or None
    (NaN and infinities are kept as None)."""
    if not isinstance(value, dict) or len(value) > 32:
        raise InvalidRequest("values must be a dict of at most 32 numbers by name")
    out: dict[str, float | None] = {}
    for name, number in value.items():
        field_str("a history name", name, max_length=64)
        if number is not None and (
            isinstance(number, bool) or not isinstance(number, int | float)
        ):
            raise InvalidRequest(f"history value {name!r} must be a number or None")
        out[name] = None if number is None or not np.isfinite(number) else float(number)
    return out


def _grads(value: object) -> dict[str, np.ndarray]:
    """The ``grads`` field: a dict of NumPy arrays by name (shapes are the state's
    to check)."""
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise InvalidUpdate(
            f"grads must be a dict of arrays by parameter name, got "
            f"{type(value).__name__}"
        )
    return value


def _checked_copy(journal: Journal, reply: object, row_version: int) -> ModelVersion:
    """A worker's model copy, if the store vouches for it: the same run, a version
    no older than its download row and no newer than the last commit, and the
    checksum the commit of that version recorded."""
    if not isinstance(reply, dict) or reply.get("status") != "OK":
        raise FTPSError(f"it answered {reply!r:.200}")
    if reply.get("run_id") != journal.meta.run_id:
        raise FTPSError("its copy came from another store's run")
    held = reply.get("version")
    if not isinstance(held, int) or not row_version <= held <= journal.version:
        raise FTPSError(
            f"it holds version {held!r}, outside [{row_version}, {journal.version}]"
        )
    record = journal.commit_at_version(held)
    if record is None:
        raise FTPSError(f"no retained commit produced version {held}")
    params = reply.get("params")
    shapes = journal.meta.model.param_shapes()
    if (
        not isinstance(params, dict)
        or set(params) != set(shapes)
        or any(
            not isinstance(params[k], np.ndarray)
            or params[k].shape != shapes[k]
            or params[k].dtype != np.float32
            for k in shapes
        )
    ):
        raise FTPSError("its copy does not have the model's arrays")
    if model_crc(params, journal.params_layout.names) != record.body.model_crc:
        raise FTPSError(
            f"its copy of version {held} differs from the model that version was"
        )
    return ModelVersion(Version(held), params, {})


def _stateless(meta: RunMeta) -> bool:
    """Whether the run's optimizer keeps no state (a worker's model copy is then
    all a rebuild needs)."""
    return not meta.optimizer.init_state(meta.model.init_params())


def _worker_copies() -> bool:
    """``ftps.store.worker-copies``: whether a recovery may start from a worker's
    model copy (the patent's path) or only from the store."""
    value = config.get("store.worker-copies")
    if not isinstance(value, bool):
        raise FTPSError(
            f"ftps.store.worker-copies must be true or false, got {value!r}"
        )
    return value


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


async def _listening(address: str, timeout: float) -> bool:
    """Whether a TCP ``address`` accepts connections; True for other protocols
    (asked in full then). A refused connection answers at once: a process that
    died leaves no listener, and its host says so."""
    from distributed.comm import parse_address, parse_host_port

    scheme, location = parse_address(address)
    if scheme not in ("tcp", "tls"):
        return True
    host, port = parse_host_port(location)
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True
