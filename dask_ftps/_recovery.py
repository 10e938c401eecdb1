"""Rebuilding the exact state from a store: newest snapshot plus replay.

Used by the scheduler plugin at start-up and, with no cluster, by
:func:`recover` and :func:`inspect`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from dask_ftps._core import ModelVersion, RunId, Update, Version, WorkerId
from dask_ftps._journal import ROW_FIELDS, Journal, StoreFormatError
from dask_ftps._state import ParameterServerState, RunState

logger = logging.getLogger(__name__)

REPLAY_BATCH = 16

Offload = Callable[..., Awaitable[Any]]


@dataclass(frozen=True)
class Rebuilt:
    """How a state was rebuilt."""

    state: ParameterServerState
    source: str  # "snapshot" or the address of the worker whose copy was used
    start_version: int
    replayed: int
    seconds: float


async def rebuild(
    journal: Journal,
    *,
    incarnation: int = 0,
    download_limit: int = 5,
    gradient_entries: int = 2,
    memory_rows: int = 100_000,
    copy: ModelVersion | None = None,
    copy_source: str = "snapshot",
    offload: Offload = asyncio.to_thread,
) -> Rebuilt:
    """The state at the store's commit point, bit for bit.

    Parameters
    ----------
    copy
        A model copy newer than the newest snapshot (held by a worker, as the
        download dataset says): committed updates up to its version are not
        read or merged again; its parameters stand in for them. Only valid for
        an optimizer without state.
    """
    t0 = time.perf_counter()
    doc, meta = journal.doc, journal.meta
    ref = doc.snapshots[-1]
    snapshot = await journal.read_snapshot(ref)
    state = ParameterServerState(
        meta.model,
        meta.optimizer,
        mode=meta.mode,
        staleness=meta.staleness,
        incarnation=incarnation,
        download_limit=download_limit,
        gradient_entries=gradient_entries,
        memory_rows=memory_rows,
        model=snapshot,
    )
    for i, (clocks, superseded) in enumerate(ref.runs):
        start = doc.runs[i]
        state.runs.append(
            RunState(
                RunId(i),
                start.spec,
                Version(start.base_version),
                list(clocks),
                superseded,
            )
        )
    state.updates = ref.replay_from
    skip_to = -1 if copy is None else int(copy.version)

    rows = await journal.read_rows(ref.replay_from, doc.seq)
    versions = rows[:, ROW_FIELDS.index("version")]
    # Rows merged into the copy need no payload; the rest is read in batches,
    # the next batch while the current one is applied.
    first_read = ref.replay_from + int(np.searchsorted(versions, skip_to, side="right"))
    batches = [
        (i, min(i + REPLAY_BATCH, doc.seq))
        for i in range(first_read, doc.seq, REPLAY_BATCH)
    ]
    pending = (
        asyncio.ensure_future(journal.read_payloads(*batches[0])) if batches else None
    )

    def apply(start: int, stop: int, payloads: np.ndarray | None) -> None:
        for index in range(start, stop):
            _begin_runs_before(state, journal, index)
            row = rows[index - ref.replay_from]
            if payloads is None:
                _skip(state, journal.row_update(row, None), copy)
            else:
                update = journal.row_update(row, payloads[index - start])
                # Checked when it was accepted; nobody holds the models in between.
                admission = state.admit(update, check=False)
                state.commit(admission, state.merge(admission, inplace=True))
                if admission.version != row[-1]:
                    raise StoreFormatError(
                        f"replay of row {index} gave version {admission.version}, the "
                        f"store says {row[-1]}: the store is inconsistent"
                    )

    if first_read > ref.replay_from:
        await offload(apply, ref.replay_from, first_read, None)
    for n, (start, stop) in enumerate(batches):
        payloads = await pending
        if n + 1 < len(batches):
            pending = asyncio.ensure_future(journal.read_payloads(*batches[n + 1]))
        await offload(apply, start, stop, payloads)
    _begin_runs_before(state, journal, doc.seq)
    state.downloads = [(WorkerId(w), Version(v)) for w, v in doc.downloads]
    seconds = time.perf_counter() - t0
    return Rebuilt(
        state,
        copy_source,
        ref.version if copy is None else int(copy.version),
        doc.seq - first_read,
        seconds,
    )


def _begin_runs_before(
    state: ParameterServerState, journal: Journal, index: int
) -> None:
    """Replay the ``begin_run`` calls that came before row ``index``."""
    for start in journal.doc.runs[len(state.runs) :]:
        if start.begun_at > index:
            return
        run = state.begin_run(start.spec)
        if run.base_version != start.base_version:
            raise StoreFormatError(
                f"run {run.run} began at version {start.base_version} but replays "
                f"to {run.base_version}: the store is inconsistent"
            )


def _skip(state: ParameterServerState, update: Update, copy: ModelVersion) -> None:
    admission = state.admit(update, check=False)
    model = None
    if admission.merge:
        model = (
            copy
            if admission.version == copy.version
            else ModelVersion(admission.version, {}, {})
        )
    state.commit(admission, model)


# -- offline tools -------------------------------------------------------------


def recover(store: str | os.PathLike) -> tuple[int, dict[str, np.ndarray]]:
    """Rebuild the model a store holds, with no cluster.

    Returns
    -------
    (version, params)
        Bit for bit the model a live server would serve at that version.

    Examples
    --------
    >>> version, params = dask_ftps.recover("runs/digits.zarr")  # doctest: +SKIP
    """

    async def run() -> tuple[int, dict[str, np.ndarray]]:
        journal = await _open_read_only(store)
        rebuilt = await rebuild(journal)
        return int(rebuilt.state.version), rebuilt.state.model.params

    return _run(run())


def inspect(store: str | os.PathLike) -> dict[str, Any]:
    """What a store holds, read without changing it.

    Returns
    -------
    dict
        ``version`` (of the last committed update), ``incarnation``,
        ``updates`` (committed), ``snapshots`` (versions), ``global`` (the
        retained global-dataset rows: ``update_id``, ``worker``, ``version``),
        ``download`` (rows ``worker``, ``version``), and the run's ``model``,
        ``optimizer``, ``mode``, ``runs`` and ``first_row`` (the oldest retained row).
    """

    async def run() -> dict[str, Any]:
        journal = await _open_read_only(store)
        doc = journal.doc
        first = journal.floor
        rows = await journal.read_rows(first, doc.seq)
        return {
            "version": await journal.last_version(),
            "incarnation": doc.incarnation,
            "updates": doc.seq,
            "snapshots": [ref.version for ref in doc.snapshots],
            "global": [
                {
                    "update_id": ":".join(str(int(x)) for x in row[:4]),
                    "worker": doc.workers[int(row[4])],
                    "version": int(row[5]),
                }
                for row in rows
            ],
            "download": [{"worker": w, "version": v} for w, v in doc.downloads],
            "first_row": first,
            "model": journal.meta.model.to_dict(),
            "optimizer": journal.meta.optimizer.to_dict(),
            "mode": journal.meta.mode,
            "staleness": journal.meta.staleness,
            "runs": [
                {**start.spec.to_dict(), "base_version": start.base_version}
                for start in doc.runs
            ],
        }

    return _run(run())


async def _open_read_only(store: str | os.PathLike) -> Journal:
    journal = await Journal.open(store, read_only=True)
    if journal is None:
        raise StoreFormatError(f"{os.fspath(store)!r} holds no committed dask_ftps run")
    return journal


def _run(coro: Awaitable[Any]) -> Any:
    """Run ``coro`` to completion, also from a thread that runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = asyncio.run(coro)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            result["error"] = e

    thread = threading.Thread(target=target, name="ftps-offline")
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]
