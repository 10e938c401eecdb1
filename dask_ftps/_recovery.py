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
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from dask_ftps._core import ModelVersion, RunId, Version, WorkerId
from dask_ftps._exceptions import StoreCorrupted, StoreFormatError
from dask_ftps._factored import prepare, replay_cost
from dask_ftps._state import ParameterServerState, RunState
from dask_ftps._store import CommittedUpdates, Journal, Record
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
        replayed, cost = await _replay(journal, record, state, copy, offload)
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
) -> tuple[int, float]:
    """Apply the events after snapshot ``start``; return the updates merged and
    what merging them cost (:func:`~dask_ftps._factored.replay_cost`).

    The log is read ahead of the merges (up to :data:`_LOOKAHEAD` events) and
    the products of factored updates, which do not depend on the model, are
    computed by a thread of their own as soon as they are read: reads,
    products and merges overlap. Everything is merged in logged order, and a
    read that fails is raised where it stands in that order, after the
    updates before it merged (as a replay one event at a time would).
    """
    payloads_after = -1 if copy is None else int(copy.version)
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
                _apply(state, event, copy)
            else:
                await offload(_apply, state, event, copy)
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
    return replayed, cost


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


def _apply(
    state: ParameterServerState, event: CommittedUpdates, copy: ModelVersion | None
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
            state.commit(admission, state.merge(admission, inplace=True))
    if state.version != event.commit.version:
        raise StoreCorrupted(
            f"replay of commit {event.record.serial} gave model version "
            f"{state.version}, its record says {event.commit.version}"
        )


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
        journal = await _open_read_only(store, storage_options)
        try:
            rebuilt = await rebuild(journal)
        finally:
            await journal.close()
        return int(rebuilt.state.version), rebuilt.state.model.params

    return _run(run())


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
        retained updates' payloads) and ``factored_updates`` (how many of them
        hold factored layers), ``records`` (log records kept),
        ``damaged`` (log records that fail their checks) and
        ``read_from_copies`` (the serials of those read instead from the copy
        their payload array keeps).
    """

    async def run() -> dict[str, Any]:
        journal = await _open_read_only(store, storage_options)
        try:
            return _describe(journal)
        finally:
            await journal.close()

    return _run(run())


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
