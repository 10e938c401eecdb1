"""The running parameter server: state, journal, commit loop, snapshots, lifecycle.

:class:`Server` is what a started :class:`~dask_ftps.ParameterServer` plugin
runs. Its arguments are checked values (the plugin checks every field of every
message first); it owns its tasks and its journal, and :meth:`Server.retire` /
:meth:`Server.close` stop the one and close the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from distributed.protocol.serialize import ToPickle
from distributed.utils import offload

from dask_ftps._core import (
    Holder,
    ModelMessage,
    ModelVersion,
    RunSpec,
    ServerId,
    Update,
    UpdateId,
    Version,
    WorkerId,
)
from dask_ftps._exceptions import (
    DuplicateUpdate,
    Fenced,
    FTPSError,
    InvalidUpdate,
    NotDurable,
    ServerReplaced,
    StaleIncarnation,
    Voided,
    WaitTimeout,
)
from dask_ftps._factored import replay_cost
from dask_ftps._recovery import Rebuilt
from dask_ftps._sparse import RowSparse
from dask_ftps._state import Mark, ParameterServerState
from dask_ftps._store import Journal, RunEntry
from dask_ftps.protocol import (
    BeginRunMessage,
    FindRunMessage,
    OKMessage,
    StepMessage,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerConfig:
    """The settings a server runs with (from the plugin's arguments and config)."""

    snapshot_every: int
    snapshots_kept: int
    offload_threshold: int
    wait_timeout: float
    address: str
    inflight: int = 1  # unacknowledged pushes a shard may have (async mode)
    reorder_timeout: float = 2.0  # longest a push waits for its predecessor
    #: Replay work between snapshots, in dense updates of the model: a snapshot
    #: is also taken when the updates since the last one would cost more than
    #: this to merge again (a factored update costs more than a dense one).
    replay_budget: float = math.inf


def snapshot_point(
    state: ParameterServerState,
) -> tuple[ModelVersion, int, tuple[RunEntry, ...]]:
    """What a snapshot of ``state`` now holds: the published model, the number of
    updates merged into it, and every run with its clocks and history."""
    model, open_round, runs = state.snapshot_point()
    entries = tuple(
        RunEntry(
            int(r.run),
            r.name,
            r.spec,
            int(r.base_version),
            clocks,
            superseded,
            tuple(
                (epoch, tuple(sorted(r.history[epoch].items())))
                for epoch in sorted(r.history)
            ),
        )
        for r, (clocks, superseded) in zip(state.runs, runs, strict=True)
    )
    return model, state.updates - open_round, entries


#: Batches in the pipeline at once: one being written, one merged behind it.
PIPELINE_DEPTH = 2


@dataclass(frozen=True)
class _Merged:
    """A batch merged into the state, waiting to be made durable."""

    generation: int
    mark: Mark  # the state before it
    accepted: tuple[tuple[Update, int, asyncio.Future], ...]  # update, version, reply
    model: ModelVersion  # the model after it
    downloads: tuple[tuple[str, int], ...]
    view: dict  # status() once it is durable


class Server:
    """A parameter server at work: one state, optionally one journal.

    Parameters
    ----------
    state
        The state to serve (fresh, or rebuilt from the journal).
    journal
        The claimed journal, or None for a memory-only server.
    config
        Settings.
    rebuilt
        How the state was rebuilt, if it was.
    description
        How to name the store in status replies.
    """

    def __init__(
        self,
        state: ParameterServerState,
        journal: Journal | None,
        config: ServerConfig,
        rebuilt: Rebuilt | None = None,
        description: str | None = None,
    ) -> None:
        self.state = state
        self.journal = journal
        self.config = config
        self.rebuilt = rebuilt
        #: Whether this server rebuilt a run its store held (set at the start,
        #: before it accepts anything).
        self.recovered = rebuilt is not None and bool(
            journal is not None and journal.committed
        )
        self.description = description
        self.identity = uuid.uuid4().hex
        self.run_id = None if journal is None else journal.meta.run_id
        #: What every message of a run names: the store's run id (a rebuilt
        #: server goes on with the runs its store holds), else this object's own
        #: id (a fresh memory-only server shares no run with another).
        self.server_id = ServerId(self.run_id or self.identity)
        self.published: ModelVersion = _read_only(state.model)
        #: The model published before it (a sync round's, for a shard that is
        #: one round ahead of another).
        self._previous: ModelVersion | None = (
            None
            if rebuilt is None or rebuilt.previous is None
            else _read_only(rebuilt.previous)
        )
        #: Set (with no await before its retirement) once a newly registered
        #: server is to replace this one: no run begins here any more.
        self.retiring = False
        #: Called with a dict for each run started, snapshot and refusal (the
        #: plugin logs them as events on the scheduler's ``ftps`` topic).
        self.on_event: Callable[[dict], None] | None = None
        #: Whether the client of a train() call (a holder) is connected: a run
        #: no call holds is taken again by a connected caller's tasks.
        self.connected: Callable[[Holder], bool] = lambda holder: False
        self._offload = state.model_spec.n_params() >= config.offload_threshold
        self._durable = self._view()
        self._lock = asyncio.Lock()  # held while the state changes
        self._changed = asyncio.Condition()
        self._queue: asyncio.Queue[tuple[Update, asyncio.Future]] = asyncio.Queue()
        # The pipeline: batches merged into the state, oldest first, not yet
        # durable; the writer makes them durable in order.
        self._merged: asyncio.Queue[_Merged] = asyncio.Queue()
        self._in_flight = 0  # batches being merged, merged or being written
        self._generation = 0  # bumped when a rollback voids the merged batches
        self._pauses = 0  # requests waiting for a quiet state: the merger waits
        self._snapshot_due = False
        self._queued: dict[tuple[int, int], int] = {}  # (run, shard): next position
        self._turns = asyncio.Condition()
        self._failed: FTPSError | None = None
        self._snapshot_task: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self._last_snapshot = (
            int(state.version)
            if journal is None
            else journal.snapshots()[0].body.version
        )
        # What merging the updates since the last snapshot again costs a
        # replay (parameters merged), and the most it may cost.
        self._replay_cost = rebuilt.cost if rebuilt is not None else 0.0
        #: Model replies sent: whole models, rows only (a sparse pull), none
        #: (the worker held that version); the bytes of their arrays.
        self.pulls = {"whole": 0, "rows": 0, "none": 0, "bytes": 0}
        self._replay_limit = config.replay_budget * sum(
            int(np.size(p)) for p in state.model.params.values()
        )
        self._merger = asyncio.create_task(self._merge_loop(), name="ftps-merge")
        self._writer = asyncio.create_task(self._write_loop(), name="ftps-write")
        if journal is not None:
            self._spawn(journal.cleanup(), "ftps-cleanup")

    # -- requests ---------------------------------------------------------------

    def check_server(self, server_id: ServerId | None, what: str = "a run") -> None:
        """Refuse a message of another server's run (one this server replaced)."""
        if server_id is not None and server_id != self.server_id:
            raise ServerReplaced(
                f"{what} of server {server_id[:12]!r} is not served here: the "
                f"scheduler's parameter server is now {self.server_id[:12]!r} (it "
                "was replaced by a fresh memory-only server or another store's); "
                "that run cannot go on here. Register a server on the run's store "
                "to resume it, or call train() again to train on this server"
            )

    async def begin_run(
        self,
        spec: RunSpec,
        name: str,
        holder: Holder | None = None,
        alive: Callable[[Holder], bool] = lambda holder: False,
        expect: ServerId | None = None,
    ) -> BeginRunMessage:
        """Begin (or find) the run ``name`` with ``spec`` for ``holder``; with
        ``expect``, only if this server is still the one the caller asked."""
        self.check_server(expect, "the run to begin")
        self._check_not_retiring()
        async with self._quiet():
            self.check_healthy()
            self._check_not_retiring()  # marked while this call waited
            mark = self.state.mark()
            runs = len(self.state.runs)
            run = self.state.begin_run(spec, name, holder, alive)
            created = len(self.state.runs) > runs
            if created and self.journal is not None:
                try:
                    await self.journal.record_run(
                        int(run.run), name, spec, int(run.base_version)
                    )
                except BaseException as e:
                    self.state.rollback(mark)
                    self._journal_failed(e)
                    raise self._refusal(e) from e
            self._durable = self._view()
        if created:
            self._event(
                action="run-started",
                run=int(run.run),
                name=name,
                shards=spec.n_shards,
                epochs=spec.epochs,
                minibatches=spec.minibatches,
                base_version=int(run.base_version),
            )
        logger.info(
            "Run %d%s: %d shards, %d epochs, %d minibatches, from version %d "
            "(%d accepted%s)",
            run.run,
            f" {name!r}" if name else "",
            spec.n_shards,
            spec.epochs,
            spec.minibatches,
            run.base_version,
            run.accepted,
            ", finished" if run.finished else "",
        )
        return {
            "status": "OK",
            "run": int(run.run),
            "server_id": self.server_id,
            "base_version": int(run.base_version),
            "incarnation": self.state.incarnation,
            "finished": run.finished,
            "next": [list(run.next_step(s)) for s in range(spec.n_shards)],
            "history": [run.history[e] for e in sorted(run.history)],
            "version": int(self.published.version),
        }

    def _check_not_retiring(self) -> None:
        if self.retiring:
            raise ServerReplaced(
                "the scheduler's parameter server is being replaced by a newly "
                "registered one: no run begins on it. Call train() again to train "
                "on the new server"
            )

    def release(self, run: int, holder: Holder) -> OKMessage:
        """``holder`` ended: it no longer trains ``run``."""
        self.state.release(run, holder)
        return {"status": "OK"}

    def find_run(
        self, name: str, n_samples: int, batch_size: int, epochs: int, seed: int
    ) -> FindRunMessage:
        self.check_healthy()
        run = self.state.find_run(name, n_samples, batch_size, epochs, seed)
        return {
            "status": "OK",
            "run": None if run is None else int(run.run),
            "spec": None if run is None else run.spec.to_dict(),
            "finished": None if run is None else run.finished,
        }

    async def end_epoch(
        self, run: int, epoch: int, values: dict[str, float | None]
    ) -> OKMessage:
        async with self._quiet():
            self.check_healthy()
            state = self.state.get_run(run)
            before = (dict(state.history), state.stopped)
            self.state.record_epoch(run, epoch, values)
            if self.journal is not None:
                try:
                    await self.journal.record_epoch(run, epoch, values)
                except BaseException as e:
                    state.history, state.stopped = before
                    self._journal_failed(e)
                    raise self._refusal(e) from e
            self._durable = self._view()  # a run stopped early is finished now
        return {"status": "OK"}

    async def next_step(
        self,
        run: int,
        shard: int,
        holder: Holder,
    ) -> StepMessage:
        """Where a shard goes on: answered between batches, so that a batch being
        written (which may yet be refused) is never counted as done. ``holder``
        names the train() call asking: it must hold the run (or take it again
        where no call holds it: see ``ParameterServerState.check_holder``)."""
        async with self._quiet():
            self.check_healthy()
            self.state.next_step(run, shard)  # validates run and shard first
            self.state.check_holder(run, holder, self.connected)
            epoch, step = self.state.next_step(run, shard)
        return {"status": "OK", "epoch": epoch, "step": step}

    async def pull(
        self,
        worker: WorkerId,
        run: int,
        shard: int,
        epoch: int,
        step: int,
        have_version: int,
        have_server: str | None,
        holder: Holder,
        rows: dict[str, np.ndarray] | None = None,
    ) -> ModelMessage:
        self.check_healthy()
        self.state.next_step(run, shard)  # validates run and shard
        self.state.check_holder(run, holder, self.connected)
        want = await self._wait_ready(run, shard, epoch, step)
        self.state.check_holder(run, holder)  # another call took it meanwhile?
        return self._model_reply(worker, have_version, have_server, want, rows)

    async def push(
        self,
        update: Update,
        incarnation: int,
        next_step: tuple[int, int] | None,
        have_version: int,
        have_server: str | None,
        rows: dict[str, np.ndarray] | None = None,
    ) -> ModelMessage:
        """Accept one update once it is durable; with ``next_step``, answer with
        the model for that step (only ``rows`` of its matrices, if given). ``update.holder`` names the train() call it
        belongs to: an update of a run another call holds is refused with
        RunInUse before it changes anything (also at its admission: a call may
        take the run while it is queued); its acceptance takes a run no call
        holds again for its call, if that call's client is connected."""
        self.state.check_incarnation(incarnation)
        self.check_healthy()
        if next_step is not None:
            self.state.get_run(update.key.run)
        if not 0 <= update.key.run < len(self.state.runs):
            raise InvalidUpdate(f"update {update.key.id}: unknown run {update.key.run}")
        run = self.state.runs[update.key.run]
        if update.holder is not None:
            self.state.check_holder(update.key.run, update.holder)
        if next_step is not None:  # checked before the update changes anything
            shard = update.key.shard
            epoch, step = next_step
            if (
                shard >= run.spec.n_shards
                or epoch >= run.spec.epochs
                or step >= run.spec.steps[shard]
            ):
                raise InvalidUpdate(
                    f"update {update.key.id}: next_step {next_step} is not a step of "
                    f"shard {shard}"
                )
        await self._take_turn(update)
        self.check_healthy()
        accepted = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((update, accepted))
        async with self._turns:
            self._turns.notify_all()
        version = await accepted
        if next_step is None:
            return {"status": "OK", "version": int(version)}
        key = update.key
        want = await self._wait_ready(key.run, key.shard, *next_step)
        return self._model_reply(update.worker, have_version, have_server, want, rows)

    def status(self) -> dict:
        rebuilt = self.rebuilt
        return {
            **self._durable,
            "version": int(self.published.version),
            "store": self.description,
            "run_id": self.run_id,
            "server_id": self.server_id,
            "failed": None if self._failed is None else str(self._failed),
            "snapshots": []
            if self.journal is None
            else sorted(r.body.version for r in self.journal.snapshots()),
            "recovery": None if rebuilt is None else rebuilt_summary(rebuilt),
            "pulls": dict(self.pulls),
        }

    async def records(self) -> dict:
        async with self._lock:  # not while a batch is applied off the loop
            records = self.state.records()
        speculative = self.state.updates - self._durable["updates"]
        if speculative > 0:  # a batch is being written: not accepted yet
            records["global"] = records["global"][:-speculative]
        return records

    @property
    def accepted(self) -> int:
        """Updates accepted so far (with a journal: durable in it)."""
        return int(self._durable["updates"])

    @property
    def stopped(self) -> bool:
        """Whether :meth:`retire` or :meth:`close` stopped this server."""
        return self._merger.done()

    @property
    def failed(self) -> bool:
        """Whether this server refuses everything (its journal failed, or a
        newer server fenced it off): a restart rebuilds it from the store."""
        return self._failed is not None

    async def durable_rows(
        self, start: int
    ) -> tuple[int, list[tuple[UpdateId, WorkerId, Version]]]:
        """The global dataset's durable rows from number ``start`` on (counted
        from the server's first update), and the number of the first one given:
        above ``start`` where older rows were trimmed from memory."""
        async with self._lock:  # not while a batch is applied off the loop
            rows = self.state.global_rows
            offset = self.state.updates - len(rows)  # rows trimmed before these
            first = max(start, offset)
            end = self.accepted
            if end <= first:
                return first, []
            # From the end, where the rows asked for are (no walk from the start)
            behind = self.state.updates - end  # rows being written: not durable
            tail = list(itertools.islice(reversed(rows), behind, behind + end - first))
            tail.reverse()
            return first, tail

    def forget_worker(self, worker: str) -> None:
        self.state.forget_worker(WorkerId(worker))

    def check_healthy(self) -> None:
        if self._failed is not None:
            raise type(self._failed)(str(self._failed))

    # -- lifecycle -----------------------------------------------------------------

    async def retire(self, reason: str) -> None:
        """Stop serving: a new server replaces this one.

        Waits for the batch being committed, so that the new server reads a log
        that no longer moves; refuses what is queued with
        :class:`StaleIncarnation`, stops every task and closes the journal.
        """
        async with self._lock:
            self._fail(
                StaleIncarnation(
                    f"parameter server incarnation {self.state.incarnation} was {reason}"
                )
            )
        await self._drain()
        await self._stop()
        logger.info("Incarnation %d %s", self.state.incarnation, reason)

    async def close(self) -> None:
        """Stop serving and say in the store that nobody writes it any more."""
        if self._merger.done() and (self.journal is None or self.journal.closed):
            return
        async with self._lock:
            if self._failed is None:
                self._fail(StaleIncarnation("the parameter server was closed"))
                release = self.journal is not None
            else:
                release = False
        await self._drain()
        await self._stop(release=release)

    async def _drain(self, timeout: float = 30.0) -> None:
        """Wait (a while) until what was merged is written or refused."""
        with contextlib.suppress(TimeoutError):
            async with self._changed:
                await asyncio.wait_for(
                    self._changed.wait_for(
                        lambda: self._in_flight == 0 or self._writer.done()
                    ),
                    timeout,
                )

    async def _stop(self, release: bool = False) -> None:
        tasks = [self._merger, self._writer, *self._tasks]
        if self._snapshot_task is not None:
            tasks.append(self._snapshot_task)
        for task in tasks:
            if not task.done():
                task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._refuse_queued()
        while not self._merged.empty():
            self._refuse([f for _, _, f in self._merged.get_nowait().accepted])
            self._in_flight -= 1
        if self.journal is not None and not self.journal.closed:
            if release:
                try:
                    await self.journal.release("closed")
                except Exception as e:  # noqa: BLE001 - fenced or gone: nothing to say
                    logger.info("No release record written to %s: %r", self.journal, e)
            await self.journal.close()
        await self._wake()

    # -- the commit pipeline ----------------------------------------------------------
    #
    # The merger takes every queued push, admits and merges them into the state
    # (one batch) and hands the batch to the writer; while the writer makes it
    # durable, the merger merges the next one. The writer acknowledges batches
    # strictly in order, each push only once its batch is durable; only durable
    # models are published. A batch that cannot be made durable rolls the state
    # back to before it, which voids the batches merged after it (refused too).

    async def _merge_loop(self) -> None:
        """Merge queued pushes in batches, at most ``PIPELINE_DEPTH`` ahead."""
        while True:
            batch = [await self._queue.get()]
            try:
                async with self._changed:
                    await self._changed.wait_for(self._may_merge)
                while not self._queue.empty():  # what came while the writer wrote
                    batch.append(self._queue.get_nowait())
                async with self._lock:
                    if self._snapshot_due and self._in_flight == 0:
                        self._start_snapshot()
                    # Trims rows the writer made durable, never those of batches
                    # still being written (a failed write rolls them back).
                    self.state.settle(keep=self.state.updates - self.accepted)
                    self._in_flight += 1  # counted while merging: not quiet
                    merged = None
                    try:
                        merged = await self._merge_batch(batch)
                    finally:
                        if merged is None:
                            self._in_flight -= 1
                        else:
                            self._merged.put_nowait(merged)
            except BaseException:  # stopped (cancelled) with a batch in hand
                self._refuse([f for _, f in batch])
                raise
            if merged is None:
                async with self._changed:
                    self._changed.notify_all()
            async with self._turns:  # refusals may have given turns back
                self._turns.notify_all()

    def _may_merge(self) -> bool:
        if self._failed is not None:
            return True  # to refuse the batch
        if self._pauses or self._in_flight >= PIPELINE_DEPTH:
            return False
        return not (self._snapshot_due and self._in_flight)

    async def _merge_batch(
        self, batch: list[tuple[Update, asyncio.Future]]
    ) -> _Merged | None:
        if self._failed is not None:  # retired, closed or failed: refuse quietly
            self._refuse([f for _, f in batch])
            return None
        mark = self.state.mark()
        try:
            accepted = await self._admit_and_merge(batch)
        except Exception as e:  # a bug: nothing of the batch may stay half-applied
            self.state.rollback(mark)
            self._fail(FTPSError(f"the commit loop failed ({e!r}); restart the server"))
            logger.critical(
                "The commit loop failed; refusing everything", exc_info=True
            )
            self._refuse([f for _, f in batch])
            return None
        if not accepted:
            return None
        return _Merged(
            self._generation,
            mark,
            tuple(accepted),
            self.state.model,
            tuple((str(w), int(v)) for w, v in self.state.downloads),
            self._view(),
        )

    async def _admit_and_merge(
        self, batch: list[tuple[Update, asyncio.Future]]
    ) -> list[tuple[Update, int, asyncio.Future]]:
        live = []
        for update, future in batch:
            if future.done():  # the caller went away
                self._queued.pop((update.key.run, update.key.shard), None)
            else:
                live.append((update, future))
        updates = [u for u, _ in live]
        if self._offload:  # one thread hop for the whole batch
            outcomes = await offload(self._apply, updates)
        else:
            outcomes = self._apply(updates)
        accepted: list[tuple[Update, int, asyncio.Future]] = []
        for (update, future), outcome in zip(live, outcomes, strict=True):
            if isinstance(outcome, int):
                accepted.append((update, outcome, future))
                continue
            if not isinstance(outcome, DuplicateUpdate):
                # The pushes queued after it from its shard are out of order now.
                self._queued.pop((update.key.run, update.key.shard), None)
            if not future.done():
                future.set_exception(outcome)
        return accepted

    def _apply(self, updates: list[Update]) -> list[int | Exception]:
        """Admit, merge and commit each update in turn: the version it takes part
        in, or why it was refused. Runs off the event loop for a large model
        while the merger holds the lock (nothing else changes the state then)."""
        outcomes: list[int | Exception] = []
        state = self.state
        for update in updates:
            try:
                admission = state.admit(update)
                model = state.merge(admission)
            except FTPSError as e:  # refused; admit and merge change nothing
                outcomes.append(e)
                continue
            except Exception as e:  # noqa: BLE001 - a payload the checks let by
                outcomes.append(InvalidUpdate(f"update {update.key.id}: {e!r}"))
                continue
            state.commit(admission, model)
            self._take_run(update)
            outcomes.append(int(admission.version))
        return outcomes

    def _take_run(self, update: Update) -> None:
        """An accepted update of a run no call holds (its call's client dropped
        its connection, or the scheduler restarted): its call, if its client is
        connected, holds the run again; another call's begin_run is refused."""
        run = self.state.runs[update.key.run]
        holder = update.holder
        if (
            holder is not None
            and run.holder is None
            and not (run.finished or run.superseded)
            and self.connected(holder)
        ):
            run.holder = holder

    async def _write_loop(self) -> None:
        """Make merged batches durable in order; acknowledge and publish each."""
        while True:
            item = await self._merged.get()
            try:
                await self._write(item)
            except asyncio.CancelledError:
                self._refuse([f for _, _, f in item.accepted])
                raise
            except Exception as e:  # a bug: refuse everything, never hang a push
                self._fail(FTPSError(f"the writer failed ({e!r}); restart the server"))
                logger.critical("The writer failed; refusing everything", exc_info=True)
                self._refuse([f for _, _, f in item.accepted])
            finally:
                self._in_flight -= 1
            async with self._changed:
                self._changed.notify_all()

    async def _write(self, item: _Merged) -> None:
        if item.generation != self._generation:  # undone with a batch before it
            self._refuse(
                [f for _, _, f in item.accepted],
                self._failed
                or Voided(
                    "an earlier batch could not be made durable: this update was "
                    "undone with it; push it again"
                ),
            )
            return
        if self.journal is not None:
            try:
                await self.journal.commit(
                    [u for u, _, _ in item.accepted],
                    [v for _, v, _ in item.accepted],
                    int(item.model.version),
                    item.model.params,
                    item.downloads,
                )
            except asyncio.CancelledError:
                raise  # stopping: the loop refuses the batch with the reason
            except Exception as e:  # noqa: BLE001 - any failure: refused, rolled back
                async with self._lock:  # the merger is not changing the state
                    self.state.rollback(item.mark)
                    self._generation += 1  # the batches merged after it go too
                    self._queued.clear()
                    self._journal_failed(e)
                self._refuse([f for _, _, f in item.accepted], self._refusal(e))
                await self._wake()
                return
        if self.state.mode == "sync" and item.model.version != self.published.version:
            self._previous = self.published
        self.published = _read_only(item.model)
        self._durable = item.view
        for _, version, future in item.accepted:
            if not future.done():
                future.set_result(version)
        if self.journal is not None:
            self._replay_cost += sum(replay_cost(u.grads) for u, _, _ in item.accepted)
        if self._failed is None and (
            item.model.version - self._last_snapshot >= self.config.snapshot_every
            or self._replay_cost >= self._replay_limit
        ):
            if self._in_flight == 1 and not self._lock.locked():
                self._start_snapshot()  # nothing merged past it: the state is durable
            else:
                self._snapshot_due = True  # the merger takes it between batches

    @contextlib.asynccontextmanager
    async def _quiet(self):
        """Hold the state with nothing in the pipeline: what the state says is
        durable (for requests that read clocks or write records of their own)."""
        self._pauses += 1
        try:
            while True:
                async with self._changed:
                    await self._changed.wait_for(
                        lambda: self._in_flight == 0 or self._failed is not None
                    )
                await self._lock.acquire()
                if self._in_flight == 0 or self._failed is not None:
                    break
                self._lock.release()
        finally:
            self._pauses -= 1
            self._spawn(self._wake(), "ftps-wake")  # no await here: the lock is held
        try:
            yield
        finally:
            self._lock.release()

    async def _take_turn(self, update: Update) -> None:
        """Queue ``update`` after its shard's previous step.

        A shard with several pushes in flight sends them on separate connections:
        they may arrive out of order. A push waits (at most ``reorder_timeout``) until
        its predecessor is queued; a push further ahead than the window, or one
        whose predecessor never comes, is queued at once and refused as out of order.
        """
        key = update.key
        if not 0 <= key.run < len(self.state.runs):
            return  # admit refuses it
        run = self.state.runs[key.run]
        spec = run.spec
        if not (
            0 <= key.shard < spec.n_shards
            and key.epoch < spec.epochs
            and key.step < spec.steps[key.shard]
        ):
            return  # admit refuses it
        position = spec.position(key.epoch, key.step)
        slot = (key.run, key.shard)

        def turn() -> int:
            return self._queued.get(slot, run.clocks[key.shard])

        if 0 < position - turn() < self.config.inflight:
            with contextlib.suppress(TimeoutError):
                async with self._turns:
                    await asyncio.wait_for(
                        self._turns.wait_for(
                            lambda: self._failed is not None or position <= turn()
                        ),
                        self.config.reorder_timeout,
                    )
        if position == turn():
            self._queued[slot] = position + 1

    def _event(self, **event: Any) -> None:
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:  # an event is never worth a failure
                logger.debug("Event %s not logged", event, exc_info=True)

    def _journal_failed(self, e: BaseException) -> None:
        if not isinstance(e, asyncio.CancelledError):
            self._event(action="refused", reason=f"{type(e).__name__}: {e}")
        if isinstance(e, Fenced):
            self._fail(StaleIncarnation(f"this server was fenced off: {e}"))
            logger.error("%s; refusing every request from now on", e)
        elif isinstance(e, NotDurable):
            logger.error("%s; the updates were refused and nothing was applied", e)
        elif not isinstance(e, asyncio.CancelledError):
            self._fail(
                FTPSError(
                    f"the journal failed ({e!r}); restart the parameter server to rebuild "
                    "it from the store"
                )
            )
            logger.critical(
                "The journal failed; refusing every request from now on. Restart the "
                "parameter server to rebuild from the store.",
                exc_info=e,
            )

    def _refusal(self, e: BaseException) -> FTPSError:
        if isinstance(e, Fenced):
            return StaleIncarnation(f"this server was fenced off: {e}")
        if isinstance(e, NotDurable):
            return NotDurable(f"the update could not be made durable: {e}")
        return NotDurable(f"the update could not be made durable: {e!r}")

    # -- snapshots --------------------------------------------------------------------

    def _start_snapshot(self) -> None:
        """Snapshot the state now: called only while it holds nothing not durable."""
        self._snapshot_due = False
        if self.journal is None or (
            self._snapshot_task is not None and not self._snapshot_task.done()
        ):
            return
        model, replay_from, entries = snapshot_point(self.state)
        self._last_snapshot = int(model.version)
        self._replay_cost = 0.0
        self._snapshot_task = asyncio.create_task(
            self._snapshot(
                model,
                replay_from,
                self.journal.head.serial,
                entries,
                tuple((str(w), int(v)) for w, v in self.state.downloads),
            ),
            name="ftps-snapshot",
        )
        self._snapshot_task.add_done_callback(self._after_snapshot)

    def _after_snapshot(self, task: asyncio.Task) -> None:
        """A snapshot that fell due while this one was written was skipped: take
        it now if the server is quiet (otherwise the next batch takes it), so a
        server that goes idle does not leave more than its budget to replay."""
        if (
            self._failed is None
            and self.journal is not None
            and self._in_flight == 0
            and not self._lock.locked()
            and (
                int(self.state.version) - self._last_snapshot
                >= self.config.snapshot_every
                or self._replay_cost >= self._replay_limit
            )
        ):
            self._start_snapshot()

    async def _snapshot(
        self,
        model: ModelVersion,
        replay_from: int,
        at_serial: int,
        runs: tuple[RunEntry, ...],
        downloads: tuple[tuple[str, int], ...],
    ) -> None:
        t0 = time.perf_counter()
        journal = self.journal
        try:
            array = await journal.write_snapshot(model)
            t1 = time.perf_counter()
            await journal.publish(
                array,
                int(model.version),
                replay_from,
                at_serial,
                runs,
                downloads,
                self.config.address,
            )
            t2 = time.perf_counter()
            trimmed = await journal.trim(self.config.snapshots_kept)
        except Fenced as e:
            async with self._lock:
                self._journal_failed(e)
            return
        except Exception:
            logger.exception("Snapshot of version %d failed", model.version)
            return
        t3 = time.perf_counter()
        # Merging goes on meanwhile: only the snapshot's record waits its turn
        # between two commits; the writing and the trim run beside them.
        self._event(
            action="snapshot",
            version=int(model.version),
            seconds=t3 - t0,
            write_s=t1 - t0,
            publish_s=t2 - t1,
            trim_s=t3 - t2,
            trimmed=trimmed,
        )
        logger.info(
            "Snapshot of version %d in %.3fs (array %.3fs, record %.3fs, trim of "
            "what lies below the oldest kept %.3fs: %s)",
            model.version,
            t3 - t0,
            t1 - t0,
            t2 - t1,
            t3 - t2,
            trimmed,
        )

    # -- internals -----------------------------------------------------------------

    def _view(self) -> dict:
        """What status() reports: the state as of its last durable change."""
        return {"status": "OK", **self.state.summary()}

    def _fail(self, error: FTPSError) -> None:
        if self._failed is None:
            self._failed = error
        self._refuse_queued()
        self._spawn(self._wake(), "ftps-wake")

    async def _wake(self) -> None:
        """Wake every waiter (to see a failure)."""
        for condition in (self._changed, self._turns):
            async with condition:
                condition.notify_all()

    def _refuse_queued(self) -> None:
        while not self._queue.empty():
            self._refuse([self._queue.get_nowait()[1]])

    def _refuse(
        self, futures: list[asyncio.Future], error: FTPSError | None = None
    ) -> None:
        """Refuse the pushes of ``futures`` not answered yet."""
        if error is None:
            error = self._failed or StaleIncarnation("the parameter server stopped")
        for future in futures:
            if not future.done():
                future.set_exception(type(error)(str(error)))

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _wait_ready(
        self, run: int, shard: int, epoch: int, step: int
    ) -> int | None:
        """Wait until the shard may compute ``(epoch, step)`` and what it needs is
        durable; return the version a sync round computes from (None: the
        newest)."""

        def ready() -> bool:
            self.check_healthy()
            return self.state.ready(run, shard, epoch, step)

        timeout = self.config.wait_timeout
        state = self.state.get_run(run)
        try:
            async with self._changed:
                await asyncio.wait_for(self._changed.wait_for(ready), timeout)
                # A sync round needs the version that closed the round before it;
                # ssp, what made it ready to be durable (the clocks include merged
                # batches); async takes whatever is published (always durable).
                mode = self.state.mode
                target = (
                    state.base_version + state.spec.position(epoch, step)
                    if mode == "sync"
                    else self.state.version
                    if mode == "ssp"
                    else 0
                )
                await asyncio.wait_for(
                    self._changed.wait_for(
                        lambda: self.check_healthy() or self.published.version >= target
                    ),
                    timeout,
                )
                return target if mode == "sync" else None
        except TimeoutError:
            raise WaitTimeout(
                f"shard {shard} of run {run} waited {timeout}s for (epoch {epoch}, "
                f"step {step}) in {self.state.mode} mode"
            ) from None

    def _model_reply(
        self,
        worker: WorkerId,
        have_version: int,
        have_server: str | None,
        want: int | None = None,
        rows: dict[str, np.ndarray] | None = None,
    ) -> ModelMessage:
        """The model reply: the whole model (or nothing, where the worker holds
        it already), or with ``rows`` only those rows of those matrices (as
        :class:`~dask_ftps.RowSparse`) and the rest whole: a partial copy,
        always sent, recorded in the download dataset as the version held."""
        model = self.published
        if (
            want is not None
            and model.version != want
            and (self._previous is None or self._previous.version != want)
        ):
            # Not kept (this server was rebuilt since): the pusher computes
            # from a newer model here than one server would have given it.
            logger.warning(
                "Sync round model %d asked, %d served (this server is a round "
                "ahead and was rebuilt since): the result may differ in its last "
                "bits from one server's",
                want,
                model.version,
            )
            self._event(action="round-model-gone", want=want, served=int(model.version))
        elif (
            want is not None
            and model.version != want
            and self._previous is not None
            and self._previous.version == want
        ):
            # A sync round's model when this server merged the next round
            # already: a shard server of a sharded run that got every push of
            # that round, while another shard (rebuilt) waits for one again.
            # The task that pushes it again computes from the round's model on
            # every shard, so each shard merges what one server would.
            model = self._previous
        fresh = (
            rows is not None
            or have_version != model.version
            or have_server != self.identity
        )
        params = model.params
        if rows is not None:
            params = {
                name: RowSparse(rows[name], p[rows[name]], p.shape[0])
                if name in rows
                else p
                for name, p in params.items()
            }
        if fresh:  # once the reply is built: nothing before can fail
            self.state.record_download(worker, Version(model.version))
        pulls = self.pulls
        pulls["none" if not fresh else "whole" if rows is None else "rows"] += 1
        if fresh:
            pulls["bytes"] += sum(int(p.nbytes) for p in params.values())
        return {
            "status": "OK",
            "server": self.identity,
            "run_id": self.run_id,
            "incarnation": self.state.incarnation,
            "version": int(model.version),
            "params": ToPickle(params) if fresh else None,
        }


def _read_only(model: ModelVersion) -> ModelVersion:
    """``model``, its arrays made read-only: readers in this process (an
    in-process cluster's workers and clients get these very arrays) cannot
    change the served model behind the journal's back."""
    for arrays in (model.params, model.opt_state):
        for a in arrays.values():
            if isinstance(a, np.ndarray):
                a.flags.writeable = False
    return model


def rebuilt_summary(rebuilt: Rebuilt) -> dict:
    """What a rebuild did, as ``status()`` and the "recovered" event say it."""
    return {
        "source": rebuilt.source,
        "start_version": rebuilt.start_version,
        "replayed": rebuilt.replayed,
        "seconds": rebuilt.seconds,
        "skipped": list(rebuilt.skipped),
    }
