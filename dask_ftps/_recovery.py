"""Rebuilding the exact state from a store: a snapshot (or a worker's model
copy) plus the replay of the log's events after it.

Used by the scheduler plugin at start-up and, with no cluster, by
:func:`recover` and :func:`inspect`. Every replayed update must reproduce the
version its record names, and the rebuilt model the checksum the last commit
recorded: a store that disagrees is reported, never served.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable, Collection, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from dask.utils import parse_timedelta

from dask_ftps import config
from dask_ftps._core import ModelVersion, RunId, Version, WorkerId
from dask_ftps._exceptions import FTPSError, StoreCorrupted, StoreFormatError
from dask_ftps._factored import prepare, replay_cost
from dask_ftps._state import ParameterServerState, RunState
from dask_ftps._store import (
    CommittedUpdates,
    Journal,
    Record,
    RunMeta,
    resolve,
    take_over,
)
from dask_ftps._store._format import EpochEnded, RunBegun, model_crc

logger = logging.getLogger(__name__)

Offload = Callable[..., Awaitable[Any]]


@dataclass(frozen=True)
class Rebuilt:
    """How a state was rebuilt.

    Attributes
    ----------
    source
        ``"snapshot"``, or the address of the worker whose model copy was used.
    start_version
        The version of the snapshot or copy the replay started from.
    replayed
        Updates whose payloads were read and merged.
    skipped
        Damaged snapshots passed over, newest first (``"v<version>: <error>"``).
    cost
        What the replayed updates cost to merge again, in parameters merged
        (:func:`dask_ftps._factored.replay_cost`): a server that snapshots by
        cost starts counting from it.
    """

    state: ParameterServerState
    source: str
    start_version: int
    replayed: int
    seconds: float
    skipped: tuple[str, ...] = ()
    cost: float = 0.0
    #: Sync mode: the model before the last round, if the replay merged it (a
    #: shard server one round ahead of another answers a pull of that round
    #: with it).
    previous: ModelVersion | None = None


async def rebuild(
    journal: Journal,
    *,
    incarnation: int = 0,
    download_limit: int = 5,
    gradient_entries: int = 2,
    memory_rows: int = 100_000,
    copy: ModelVersion | None = None,
    copy_source: str = "snapshot",
    offload: Offload | None = None,
) -> Rebuilt:
    """The state at the journal's last commit, bit for bit.

    Parameters
    ----------
    copy
        A model copy newer than the newest snapshot, already checked against the
        commit that produced it: updates up to its version are not read or
        merged again. Only for an optimizer without state.
    offload
        Runs the merges (``await offload(func, *args)``); None: inline.

    Raises
    ------
    StoreCorrupted
        If no snapshot is whole, or the replay disagrees with the log.
    """
    t0 = time.perf_counter()
    limits = {
        "incarnation": incarnation,
        "download_limit": download_limit,
        "gradient_entries": gradient_entries,
        "memory_rows": memory_rows,
    }
    skipped: list[str] = []
    errors: list[StoreCorrupted] = []
    for record in journal.snapshots():
        try:
            if copy is None:
                start, snap = await journal.read_snapshot(record)
            else:  # the copy stands in for the snapshot's parameters
                snap = record.body
                start = ModelVersion(Version(snap.version), copy.params, {})
        except StoreCorrupted as e:
            errors.append(e)
            skipped.append(f"v{record.body.version}: {e}")
            logger.warning(
                "%s: the snapshot of version %d is damaged (%s); rebuilding from the "
                "one before it",
                journal,
                record.body.version,
                e,
            )
            continue
        state = _start_state(journal, record, start, limits)
        replayed, cost, previous = await _replay(journal, record, state, copy, offload)
        state.downloads = [(WorkerId(w), Version(v)) for w, v in journal.downloads]
        state.settle()
        return Rebuilt(
            state,
            copy_source,
            record.body.version if copy is None else int(copy.version),
            replayed,
            time.perf_counter() - t0,
            tuple(skipped),
            cost,
            previous,
        )
    raise StoreCorrupted(
        f"{journal}: no snapshot can be read whole ({'; '.join(map(str, errors))}): "
        "the store cannot be rebuilt exactly",
        errors[0].key if errors else None,
    )


def _start_state(
    journal: Journal, record: Record, model: ModelVersion, limits: dict
) -> ParameterServerState:
    meta = journal.meta
    state = ParameterServerState(
        meta.model,
        meta.optimizer,
        mode=meta.mode,
        staleness=meta.staleness,
        model=model,
        **limits,
    )
    for entry in record.body.runs:
        state.runs.append(
            RunState(
                RunId(entry.run),
                entry.spec,
                Version(entry.base_version),
                list(entry.clocks),
                entry.superseded,
                entry.name,
                {epoch: dict(values) for epoch, values in entry.history},
            )
        )
    state.updates = record.body.replay_from
    return state


#: Events read (and their factored products started) ahead of the one merged.
_LOOKAHEAD = 8


async def _replay(
    journal: Journal,
    start: Record,
    state: ParameterServerState,
    copy: ModelVersion | None,
    offload: Offload | None,
) -> tuple[int, float, ModelVersion | None]:
    """Apply the events after snapshot ``start``; return the updates merged,
    what merging them cost (:func:`~dask_ftps._factored.replay_cost`) and, in
    sync mode, the model before the last round (None if the replay did not
    merge that round).

    The log is read ahead of the merges (up to :data:`_LOOKAHEAD` events) and
    the products of factored updates, which do not depend on the model, are
    computed by a thread of their own as soon as they are read: reads,
    products and merges overlap. Everything is merged in logged order, and a
    read that fails is raised where it stands in that order, after the
    updates before it merged (as a replay one event at a time would).
    """
    payloads_after = -1 if copy is None else int(copy.version)
    keep = _Keep(journal.version) if state.mode == "sync" else None
    replayed = 0
    cost = 0.0
    last: Record | None = None
    events: asyncio.Queue = asyncio.Queue(maxsize=_LOOKAHEAD)
    products = ThreadPoolExecutor(_PRODUCT_THREADS, thread_name_prefix="ftps-product")
    limits = contextlib.ExitStack()
    limited = False

    def submit(*args: Any) -> Future:
        nonlocal limited
        if not limited:  # the first product: BLAS threads limited from now on
            limits.enter_context(_one_blas_thread())
            limited = True
        return products.submit(*args)

    async def read() -> None:
        try:
            async for event in journal.replay(start, payloads_after=payloads_after):
                if isinstance(event, CommittedUpdates):
                    for update in event.updates:
                        prepare(update.grads, submit)
                await events.put(event)
        except Exception as e:  # noqa: BLE001 - raised where it stands in the log's order
            await events.put(_Failed(e))
            return
        await events.put(None)

    reader = asyncio.create_task(read(), name="ftps-replay-read")
    try:
        while (event := await events.get()) is not None:
            if isinstance(event, _Failed):
                raise event.error
            if isinstance(event, RunBegun):
                _begin_run(state, event)
                continue
            if isinstance(event, EpochEnded):
                state.record_epoch(event.run, event.epoch, dict(event.values))
                continue
            merged = sum(1 for u in event.updates if u.grads)
            if offload is None or not merged:
                _apply(state, event, copy, keep)
            else:
                await offload(_apply, state, event, copy, keep)
            replayed += merged
            cost += sum(replay_cost(u.grads) for u in event.updates if u.grads)
            last = event.record
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        products.shutdown(wait=True, cancel_futures=True)
        limits.close()  # after the last product: BLAS threads as they were
    if state.updates != journal.committed:
        raise StoreCorrupted(
            f"{journal}: replay ends at update {state.updates}, the log holds "
            f"{journal.committed}"
        )
    if last is not None and last.body.version > payloads_after:
        crc = model_crc(state.model.params, journal.params_layout.names)
        if crc != last.body.model_crc:
            raise StoreCorrupted(
                f"{journal}: the rebuilt model of version {state.version} has checksum "
                f"{crc:08x}, the server served {last.body.model_crc:08x}: the store "
                "does not replay to what was served",
            )
    return replayed, cost, None if keep is None else keep.model


#: Threads that multiply out factored updates during a replay.
_PRODUCT_THREADS = 2


@contextlib.contextmanager
def _one_blas_thread() -> Iterator[None]:
    """BLAS calls of one thread each while a replay runs: its products run in
    threads of their own beside the merges, and a multithreaded BLAS's waiting
    threads would compete with them for the cores (on a busy two-core machine
    a replay of factored updates took several times longer). The products'
    bits do not depend on it."""
    global _blas_users, _blas_limits
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # no control: the BLAS's own threads
        yield
        return
    # Process-wide: replays that overlap (a scheduler's and a client's
    # recover() in one process) share one limit, set by the first and
    # undone by the last, so the BLAS gets its threads back.
    with _blas_lock:
        if _blas_users == 0:
            _blas_limits = threadpool_limits(limits=1, user_api="blas")
        _blas_users += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_users -= 1
            if _blas_users == 0 and _blas_limits is not None:
                _blas_limits.restore_original_limits()
                _blas_limits = None


_blas_lock = threading.Lock()
_blas_users = 0
_blas_limits: Any = None


@dataclass(frozen=True)
class _Failed:
    """A read of the log that failed, in the queue where its event would be."""

    error: Exception


def _begin_run(state: ParameterServerState, event: RunBegun) -> None:
    if event.run < len(state.runs):
        return  # the snapshot holds it
    run = state.begin_run(event.spec, event.name)
    if run.run != event.run or run.base_version != event.base_version:
        raise StoreCorrupted(
            f"run {event.run} began at version {event.base_version} but replays as "
            f"run {run.run} at version {run.base_version}: the store is inconsistent"
        )


@dataclass
class _Keep:
    """The model before the merge that makes version ``final`` (sync mode)."""

    final: int
    model: ModelVersion | None = None


def _copied(model: ModelVersion) -> ModelVersion:
    return ModelVersion(
        model.version,
        {k: v.copy() for k, v in model.params.items()},
        {k: v.copy() for k, v in model.opt_state.items()},
    )


def _apply(
    state: ParameterServerState,
    event: CommittedUpdates,
    copy: ModelVersion | None,
    keep: _Keep | None = None,
) -> None:
    for update, version in zip(event.updates, event.versions, strict=True):
        # Checked when it was accepted; nobody holds the models in between.
        admission = state.admit(update, check=False)
        if admission.version != version:
            raise StoreCorrupted(
                f"replay of update {update.key.id} (commit {event.record.serial}) gave "
                f"version {admission.version}, its record says {version}: the store "
                "is inconsistent"
            )
        if not update.grads:  # before the copy's version: the copy stands in
            model = None
            if admission.merge:
                model = (
                    copy
                    if admission.version == copy.version
                    else ModelVersion(admission.version, copy.params, {})
                )
            state.commit(admission, model)
        else:
            if keep is not None and admission.merge and admission.version == keep.final:
                # The sync round before the last: a shard server one round ahead
                # of another answers a pull of that round with it.
                keep.model = _copied(state.model)
            state.commit(admission, state.merge(admission, inplace=True))
    if state.version != event.commit.version:
        raise StoreCorrupted(
            f"replay of commit {event.record.serial} gave model version "
            f"{state.version}, its record says {event.commit.version}"
        )


# -- a server's start: open the store, rebuild, claim ----------------------------


async def read_meta(store: Any, storage_options: dict | None) -> RunMeta | None:
    """The run a store holds (its root attributes), or None; read only."""
    io = resolve(store, storage_options)
    try:
        return await Journal.read_meta(io)
    finally:
        await io.close()


async def open_run(
    store: Any,
    storage_options: dict | None,
    *,
    durable: bool,
    create: Callable[[], tuple[RunMeta, ModelVersion]],
    given: Callable[[RunMeta], RunMeta],
    address: str,
    rpc: Callable[[str], Any],
    workers: Callable[[], Collection[str]],
    limits: dict[str, int],
    status_op: tuple[str, dict[str, Any]],
) -> tuple[Journal, Rebuilt]:
    """Open a run's store for writing, rebuild its state exactly and claim it.

    What a starting scheduler plugin and a starting shard server both do.

    Parameters
    ----------
    store, storage_options
        The run's store (a shard server's: its shard's).
    durable
        fsync every local write.
    create
        ``() -> (meta, model)`` of a new run, for a store that holds none.
    given
        ``given(stored) -> meta``: the run the caller asks for, the store's
        where it says nothing (another one is :class:`SpecMismatch`).
    address
        This server's address: recorded in the claim.
    rpc
        ``rpc(address)``: a connection to another process (a worker holding a
        model copy; the owner the log names).
    workers
        The workers alive now (whose model copies may serve the rebuild).
    limits
        Retention limits of the state (``download_limit``, ...).
    status_op
        The operation (name, arguments) that asks the owner the log names for
        its status: ``("ftps_status", {})`` at a scheduler.

    Returns
    -------
    (journal, rebuilt)
        ``rebuilt.state.incarnation`` is the claimed incarnation.
    """

    async def open_journal() -> Journal:
        io = resolve(store, storage_options)  # each attempt its own
        io.durable = durable
        try:
            journal = await Journal.open_io(io)
            if journal is None:
                meta, model = create()
                journal = await Journal.create_io(io, meta, model)
            journal.meta.check_same(given(journal.meta))
        except BaseException:
            await io.close()
            raise
        return journal

    async def alive(journal: Journal, incarnation: int, owner: str) -> bool:
        return await owner_alive(journal, incarnation, owner, address, rpc, status_op)

    async def rebuild_it(journal: Journal) -> Rebuilt:
        return await rebuild_from_copies(journal, workers(), rpc, limits)

    journal, incarnation, rebuilt = await take_over(
        open_journal, address, alive, rebuild_it
    )
    rebuilt.state.incarnation = incarnation
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
    return journal, rebuilt


async def rebuild_from_copies(
    journal: Journal,
    workers: Collection[str],
    rpc: Callable[[str], Any],
    limits: dict[str, int],
) -> Rebuilt:
    """The patent's recovery: the freshest model copy a live worker holds plus
    replay, falling back to the next candidate, then to the snapshot."""
    from distributed.utils import offload

    large = journal.meta.model.n_params() >= config.get("offload-threshold")
    kwargs: dict[str, Any] = {"offload": offload if large else None, **limits}
    newest_snapshot = journal.snapshots()[0].body.version
    candidates = sorted(
        ((v, w) for w, v in journal.downloads if v > newest_snapshot and w in workers),
        reverse=True,
    )
    # Asked only where a worker holds a copy (a new scheduler has no workers:
    # no model's initial parameters are drawn for nothing).
    if candidates and not stateless(journal.meta):
        logger.info(
            "Workers hold newer model copies, but %s keeps optimizer state they "
            "lack: rebuilding from the snapshot",
            journal.meta.optimizer,
        )
        candidates = []
    if candidates and not worker_copies():
        logger.info(
            "Workers hold newer model copies; ftps.store.worker-copies is off: "
            "rebuilding from the store alone"
        )
        candidates = []
    timeout = parse_timedelta(config.get("store.copy-timeout"))
    for version, worker in candidates:
        try:
            reply = await asyncio.wait_for(rpc(worker).ftps_model_copy(), timeout)
            copy = checked_copy(journal, reply, version)
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


async def owner_alive(
    journal: Journal,
    incarnation: int,
    owner: str,
    address: str,
    rpc: Callable[[str], Any],
    status_op: tuple[str, dict[str, Any]],
) -> bool:
    """Whether ``owner`` still runs the server of ``incarnation`` on this store
    (``address`` is the asking server's own)."""
    if owner == address:
        return False  # a server here replaces it, or this process restarted
    timeout = parse_timedelta(config.get("store.owner-timeout"))
    if not await listening(owner, timeout):
        return False  # refused: nothing listens there (distributed would retry)
    op, kwargs = status_op
    try:
        reply = await asyncio.wait_for(getattr(rpc(owner), op)(**kwargs), timeout)
    except Exception:  # noqa: BLE001 - unreachable or not ours: not alive
        return False
    return (
        isinstance(reply, dict)
        and reply.get("status") == "OK"
        and reply.get("run_id") == journal.meta.run_id
        and reply.get("incarnation") == incarnation
        and not reply.get("failed")
    )


def checked_copy(journal: Journal, reply: object, row_version: int) -> ModelVersion:
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


def stateless(meta: RunMeta) -> bool:
    """Whether the run's optimizer keeps no state (a worker's model copy is then
    all a rebuild needs)."""
    return not meta.optimizer.init_state(meta.model.init_params())


def worker_copies() -> bool:
    """``ftps.store.worker-copies``: whether a recovery may start from a worker's
    model copy (the patent's path) or only from the store."""
    value = config.get("store.worker-copies")
    if not isinstance(value, bool):
        raise FTPSError(
            f"ftps.store.worker-copies must be true or false, got {value!r}"
        )
    return value


async def listening(address: str, timeout: float) -> bool:
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


# -- offline tools -------------------------------------------------------------


def recover(
    store: Any, storage_options: dict | None = None
) -> tuple[int, dict[str, np.ndarray]]:
    """Rebuild the model a store holds, with no cluster.

    Parameters
    ----------
    store
        A local path, an fsspec URL or a Zarr store.
    storage_options
        fsspec options for a URL (endpoint, credentials).

    Returns
    -------
    (version, params)
        Bit for bit the model a live server serves at that version.

    Raises
    ------
    StoreCorrupted
        If the store cannot be rebuilt exactly (it names the damaged object).

    Examples
    --------
    >>> version, params = dask_ftps.recover("runs/digits.zarr")  # doctest: +SKIP
    """

    async def run() -> tuple[int, dict[str, np.ndarray]]:
        shards = await sharded_run(store, storage_options)
        if shards is not None:
            return await _recover_sharded(store, storage_options, shards)
        journal = await _open_read_only(store, storage_options)
        try:
            rebuilt = await rebuild(journal)
        finally:
            await journal.close()
        return int(rebuilt.state.version), rebuilt.state.model.params

    return _run(run())


async def sharded_run(store: Any, storage_options: dict | None) -> RunMeta | None:
    """The meta of shard 0 of a sharded run's store (None: not sharded)."""
    from dask_ftps._shards import shard_store

    if not isinstance(store, str):
        return None
    try:
        return await read_meta(shard_store(store, 0), storage_options)
    except StoreFormatError:
        return None


async def _recover_sharded(
    store: str, storage_options: dict | None, meta: RunMeta
) -> tuple[int, dict[str, np.ndarray]]:
    """Every shard rebuilt from its journal, the model assembled; the version
    is the lowest shard version (every shard has merged that many updates)."""
    from dask_ftps._shards import assemble, plan, shard_store

    versions, parts = [], []
    for k in range(meta.model.shards):
        journal = await _open_read_only(shard_store(store, k), storage_options)
        try:
            rebuilt = await rebuild(journal)
        finally:
            await journal.close()
        versions.append(int(rebuilt.state.version))
        parts.append(rebuilt.state.model.params)
    layout = plan(meta.model.model.param_shapes(), meta.model.shards)
    return min(versions), assemble(parts, layout)


def inspect(store: Any, storage_options: dict | None = None) -> dict[str, Any]:
    """What a store holds, read without changing it.

    Returns
    -------
    dict
        ``version`` (the model after the last commit), ``incarnation``,
        ``updates`` (committed), ``snapshots`` (versions), ``global`` (the
        retained global-dataset rows: ``update_id``, ``worker``, ``version``),
        ``download`` (rows ``worker``, ``version``), ``first_row`` (the oldest
        retained row), the run's ``model``, ``optimizer``, ``mode``,
        ``staleness``, ``run_id`` and ``runs``, ``payload_bytes`` (of the
        retained updates' payloads), ``retained_updates`` (how many updates
        those are), ``factored_updates`` and ``sparse_updates`` (how many of
        them hold factored layers, and row-sparse ones), ``records`` (log
        records kept),
        ``damaged`` (log records that fail their checks) and
        ``read_from_copies`` (the serials of those read instead from the copy
        their payload array keeps).
    """

    async def run() -> dict[str, Any]:
        shards = await sharded_run(store, storage_options)
        if shards is not None:
            return await _describe_sharded(store, storage_options, shards)
        journal = await _open_read_only(store, storage_options)
        try:
            return _describe(journal)
        finally:
            await journal.close()

    return _run(run())


async def _describe_sharded(
    store: str, storage_options: dict | None, meta: RunMeta
) -> dict[str, Any]:
    """Each shard described; the whole run's ``version`` (the lowest shard's),
    ``versions``, ``model``, ``updates`` beside them."""
    from dask_ftps._shards import shard_store

    shards = []
    for k in range(meta.model.shards):
        journal = await _open_read_only(shard_store(store, k), storage_options)
        try:
            shards.append({"shard": k, **_describe(journal)})
        finally:
            await journal.close()
    return {
        "version": min(d["version"] for d in shards),
        "versions": [d["version"] for d in shards],
        "updates": min(d["updates"] for d in shards),
        "model": meta.model.model.to_dict(),
        "optimizer": meta.optimizer.to_dict(),
        "mode": meta.mode,
        "staleness": meta.staleness,
        "run_id": shards[0]["run_id"],
        "runs": shards[0]["runs"],
        "shards": shards,
        "payload_bytes": sum(d["payload_bytes"] for d in shards),
        "damaged": [x for d in shards for x in d["damaged"]],
    }


def _describe(journal: Journal) -> dict[str, Any]:
    commits = journal.commits()
    rows = [
        {
            "update_id": f"{run}:{epoch}:{shard}:{step}",
            "worker": worker,
            "version": version,
        }
        for record in commits
        for run, epoch, shard, step, worker, version in record.body.rows
    ]
    first_row = commits[0].body.seq if commits else journal.committed
    runs = journal.runs()
    return {
        "version": journal.version,
        "incarnation": journal.incarnation,
        "updates": journal.committed,
        "snapshots": sorted(r.body.version for r in journal.snapshots()),
        "global": rows,
        "download": [{"worker": w, "version": v} for w, v in journal.downloads],
        "first_row": first_row,
        "model": journal.meta.model.to_dict(),
        "optimizer": journal.meta.optimizer.to_dict(),
        "mode": journal.meta.mode,
        "staleness": journal.meta.staleness,
        "run_id": journal.meta.run_id,
        "runs": [
            {
                **r.spec.to_dict(),
                "name": r.name,
                "base_version": r.base_version,
                "history": [history[e] for e in sorted(history)],
            }
            for r, history in runs
        ],
        "payload_bytes": sum(4 * math.prod(r.body.data.shape) for r in commits),
        "factored_updates": sum(
            bool(f[1]) for r in commits for f in r.body.data.formats
        ),
        "sparse_updates": sum(bool(f[2]) for r in commits for f in r.body.data.formats),
        "retained_updates": sum(r.body.data.rows for r in commits),
        "records": len(journal.records),
        "damaged": [str(journal.damaged[s]) for s in sorted(journal.damaged)],
        "read_from_copies": sorted(s for s in journal.damaged if s in journal.records),
    }


async def _open_read_only(store: Any, storage_options: dict | None) -> Journal:
    journal = await Journal.open(store, storage_options, read_only=True)
    if journal is None:
        raise StoreFormatError(f"{store!s} holds no committed dask_ftps run")
    return journal


def _run(coro: Awaitable[Any]) -> Any:
    """Run ``coro`` on zarr's own event loop (a thread that lives as long as the
    process), so that stores bound to a loop (fsspec, s3fs) work every time."""
    from zarr.core.sync import sync

    return sync(coro)
