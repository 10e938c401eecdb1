"""The parameter-server state machine: pure, deterministic, no I/O and no Dask.

The same sequence of inputs (:meth:`ParameterServerState.begin_run` and pushes)
gives the same model, bit for bit, which is what makes a journal replayable.
A push goes through three steps so that the caller can do slow work in between:

1. :meth:`~ParameterServerState.admit` validates it against the current state
   and decides what it does (pure: raises and changes nothing on bad input);
2. :meth:`~ParameterServerState.merge` computes the next model, if the push
   completes one (pure: may run in a thread while readers use the old model);
3. :meth:`~ParameterServerState.commit` applies the decision (cheap).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dask_ftps._core import (
    MAX_WORKER_LENGTH,
    MODES,
    Holder,
    Mode,
    ModelVersion,
    RunId,
    RunSpec,
    Update,
    UpdateId,
    Version,
    WorkerId,
    holder_client,
)
from dask_ftps._exceptions import (
    DuplicateUpdate,
    InvalidRequest,
    InvalidUpdate,
    OutOfOrder,
    RunInUse,
    SpecMismatch,
    StaleIncarnation,
)
from dask_ftps._factored import Factored, may_overflow, merge_form, update_nbytes
from dask_ftps._sparse import RowSparse, mean_rows, sparse_problem
from dask_ftps.models import Model
from dask_ftps.optim import Optimizer

logger = logging.getLogger(__name__)


@dataclass
class RunState:
    """Progress of one training run: a clock position per shard.

    A run is known by its ``name`` and ``spec``: :meth:`ParameterServerState.begin_run`
    with both the same returns it, finished or not. ``holder`` names the
    ``train()`` call training it now (kept in memory only: a restarted scheduler
    has none of the calls of before).
    """

    run: RunId
    spec: RunSpec
    base_version: Version
    clocks: list[int]
    superseded: bool = False
    name: str = ""
    history: dict[int, dict[str, float | None]] = field(default_factory=dict)
    #: Whether ``train()`` stopped the run early (early stopping, a callback):
    #: an epoch's record says ``stopped``; kept by :meth:`record` and restores.
    stopped: bool = False
    holder: Holder | None = None

    def __post_init__(self) -> None:
        self.stopped = any(values.get("stopped") for values in self.history.values())

    def record(self, epoch: int, values: dict[str, float | None]) -> None:
        """Keep an epoch's record (and whether it stops the run)."""
        self.history[epoch] = dict(values)
        self.stopped = self.stopped or bool(values.get("stopped"))

    @property
    def end(self) -> int:
        return self.spec.epochs * self.spec.rounds_per_epoch

    @property
    def finished(self) -> bool:
        return self.stopped or all(c >= self.end for c in self.clocks)

    @property
    def accepted(self) -> int:
        """Updates of this run accepted so far."""
        total = 0
        for shard, clock in enumerate(self.clocks):
            epoch, step = divmod(clock, self.spec.rounds_per_epoch)
            total += epoch * self.spec.steps[shard] + step
        return total

    def next_step(self, shard: int) -> tuple[int, int]:
        """``(epoch, step)`` of the next update shard ``shard`` must push."""
        return divmod(self.clocks[shard], self.spec.rounds_per_epoch)

    def advance(self, shard: int, epoch: int, step: int) -> int:
        if step + 1 < self.spec.steps[shard]:
            return self.spec.position(epoch, step + 1)
        return self.spec.position(epoch + 1, 0)


@dataclass(frozen=True)
class Mark:
    """What :meth:`ParameterServerState.rollback` restores: the state before a
    batch of pushes that could not be made durable."""

    updates: int
    model: ModelVersion
    runs: int
    superseded: tuple[bool, ...]
    clocks: tuple[tuple[int, ...], ...]
    pending: dict[int, dict[int, Update]]
    gradients: dict[WorkerId, tuple[Any, ...]]


@dataclass(frozen=True)
class Admission:
    """What an admitted push does once committed."""

    update: Update
    version: Version  # the model version the update takes part in
    merge: tuple[Update, ...] = ()  # updates merged into that version, in order


@dataclass
class ParameterServerState:
    """Model, optimizer state, version and the patent's three records.

    Parameters
    ----------
    model
        The model spec.
    optimizer
        Applied to every merged update.
    mode
        ``"async"``: merge each update on arrival; ``"sync"``: one version per
        round, merged in shard order; ``"ssp"``: merge on arrival, but a shard
        may not run more than ``staleness`` clocks ahead of the slowest one.
    staleness
        The ssp bound.
    incarnation
        The server incarnation; messages from another one are refused.
    download_limit
        Distinct workers kept in the download dataset.
    gradient_entries
        A worker's gradient dataset keeps its newest payloads that fit in the
        bytes of this many dense payloads (the newest always).
    memory_rows
        Newest global-dataset rows kept in memory (the store keeps what any
        recovery needs).
    """

    model_spec: Model
    optimizer: Optimizer
    mode: Mode = "async"
    staleness: int = 0
    incarnation: int = 1
    download_limit: int = 5
    gradient_entries: int = 2
    model: ModelVersion | None = None
    runs: list[RunState] = field(default_factory=list)
    updates: int = 0
    memory_rows: int = 100_000
    global_rows: deque[tuple[UpdateId, WorkerId, Version]] = field(
        default_factory=deque
    )
    downloads: list[tuple[WorkerId, Version]] = field(default_factory=list)
    gradients: dict[WorkerId, deque] = field(default_factory=dict)
    pending: dict[int, dict[int, Update]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InvalidRequest(f"mode must be one of {MODES}, got {self.mode!r}")
        if (
            not isinstance(self.staleness, int)
            or isinstance(self.staleness, bool)
            or self.staleness < 0
        ):
            raise InvalidRequest(
                f"staleness must be a non-negative integer, got {self.staleness!r}"
            )
        if (
            not isinstance(self.gradient_entries, int)
            or isinstance(self.gradient_entries, bool)
            or self.gradient_entries < 1
        ):
            raise InvalidRequest(
                "ftps.retention.gradient-entries must be a positive integer, got "
                f"{self.gradient_entries!r}"
            )
        if self.model is None:
            params = self.model_spec.init_params()
            self.model = ModelVersion(
                Version(0), params, self.optimizer.init_state(params)
            )
        self.global_rows = deque(self.global_rows)
        self._shapes = self.model_spec.param_shapes()
        self._dtypes = {k: v.dtype for k, v in self.model.params.items()}
        self._dense_nbytes = sum(v.nbytes for v in self.model.params.values())

    # -- runs ---------------------------------------------------------------

    def begin_run(
        self,
        spec: RunSpec,
        name: str = "",
        holder: Holder | None = None,
        alive: Callable[[Holder], bool] = lambda holder: False,
    ) -> RunState:
        """The run named ``name`` with ``spec``, finished or not; else a new one.

        A new run supersedes the latest run if that one is unfinished: its
        pushes are refused from then on. ``holder`` (a ``train()`` call) holds
        the run it gets until :meth:`release`; ``alive(h)`` says whether the
        call ``h`` holding a run still trains it.

        Raises
        ------
        RunInUse
            If the run to resume, or the unfinished run a new one would
            supersede, is held by another call that is alive.
        SpecMismatch
            If a run named ``name`` finished with another spec: the same name
            means the same run; training more takes another name.
        """
        if not isinstance(name, str) or len(name) > MAX_WORKER_LENGTH:
            raise InvalidRequest(f"a run name is a short string, got {name!r}")
        for run in reversed(self.runs):
            if run.name == name and run.spec == spec and not run.superseded:
                if not run.finished:
                    self._check_free(run, holder, alive, "resume it")
                    run.holder = holder
                return run
        for run in reversed(self.runs):
            if run.name == name and run.finished and not run.superseded:
                raise SpecMismatch(
                    f"run {run.run} ({name!r}) finished with other settings "
                    f"({_describe(run.spec)}; this call: {_describe(spec)}): the "
                    "same run name means the same run. To train more on the model, "
                    "give another run_name"
                )
        if self.runs and not self.runs[-1].finished and not self.runs[-1].superseded:
            last = self.runs[-1]
            self._check_free(last, holder, alive, "start a run that supersedes it")
            last.superseded = True
            self.pending.clear()  # its open sync round will never merge
            logger.warning(
                "Run %d superseded by a new run with another spec at version %d",
                last.run,
                self.version,
            )
        run = RunState(
            RunId(len(self.runs)),
            spec,
            self.version,
            [0] * spec.n_shards,
            name=name,
            holder=holder,
        )
        self.runs.append(run)
        return run

    @staticmethod
    def _check_free(
        run: RunState,
        holder: Holder | None,
        alive: Callable[[Holder], bool],
        action: str,
    ) -> None:
        held = run.holder
        if held is not None and held != holder and alive(held):
            raise RunInUse(
                f"run {run.run} ({run.name!r}) is being trained by another train() "
                f"call (client {held.rpartition('/')[0]!r}, still connected): it "
                f"cannot {action} before that call ends. Two calls at once would "
                "merge their updates into one model; give another run_name once "
                "it ended, or use another scheduler"
            )

    def check_holder(
        self,
        run: int,
        holder: Holder,
        connected: Callable[[Holder], bool] = lambda holder: False,
    ) -> RunState:
        """Refuse a push, pull or next_step of ``run`` by ``holder`` (the train()
        call its tasks belong to) unless that call holds the run. A run no call
        holds (its client's connection dropped, or the scheduler restarted) is
        held again by ``holder`` when ``connected(holder)`` (its client is
        connected), so that no other call can begin it while this one trains.

        Raises
        ------
        InvalidRequest
            If ``run`` is unknown.
        RunInUse
            If another call holds the run.
        """
        state = self.get_run(run)
        if state.holder is None:
            if not (state.finished or state.superseded) and connected(holder):
                state.holder = holder
        elif state.holder != holder:
            raise _held_by_another(state, holder)
        return state

    def release(self, run: int, holder: Holder) -> None:
        """``holder`` no longer trains ``run`` (a no-op if it does not hold it)."""
        state = self.get_run(run)
        if state.holder == holder:
            state.holder = None

    def release_client(self, client: str) -> list[RunState]:
        """Every call of Dask client ``client`` ended (it disconnected): the runs
        they held are free; return them."""
        freed = []
        for run in self.runs:
            if run.holder is not None and holder_client(run.holder) == client:
                run.holder = None
                freed.append(run)
        return freed

    def adopt_holders(self, old: ParameterServerState) -> None:
        """Keep the holds of ``old``, a server of the same runs (its store's run
        id) that this one replaces: each unfinished run here is held by the call
        that held the run of the same number and spec there."""
        for run in self.runs:
            if run.finished or run.superseded or run.run >= len(old.runs):
                continue
            before = old.runs[run.run]
            if (before.spec, before.name) == (run.spec, run.name) and not (
                before.superseded
            ):
                run.holder = before.holder

    def held(self, alive: Callable[[Holder], bool]) -> RunState | None:
        """The unfinished run a live call trains, if any."""
        for run in reversed(self.runs):
            if (
                run.holder is not None
                and not run.finished
                and not run.superseded
                and alive(run.holder)
            ):
                return run
        return None

    def find_run(
        self, name: str, n_samples: int, batch_size: int, epochs: int, seed: int
    ) -> RunState | None:
        """The newest run named ``name`` over ``n_samples`` samples with these
        settings (whatever its shards), unless it was superseded."""
        for run in reversed(self.runs):
            spec = run.spec
            if (
                not run.superseded
                and run.name == name
                and (sum(spec.shard_sizes), spec.batch_size, spec.epochs, spec.seed)
                == (n_samples, batch_size, epochs, seed)
            ):
                return run
        return None

    def record_epoch(
        self, run: int, epoch: int, values: dict[str, float | None]
    ) -> None:
        """Keep what ``train()`` measured at the end of ``epoch`` of ``run``."""
        state = self.get_run(run)
        if not isinstance(epoch, int) or not 0 <= epoch < state.spec.epochs:
            raise InvalidRequest(f"run {run} has no epoch {epoch!r}")
        state.record(epoch, values)

    def get_run(self, run: object) -> RunState:
        if not isinstance(run, int) or not 0 <= run < len(self.runs):
            raise InvalidRequest(f"unknown run {run!r}")
        return self.runs[run]

    def next_step(self, run: int, shard: object) -> tuple[int, int]:
        """``(epoch, step)`` where shard ``shard`` of ``run`` continues."""
        state = self.get_run(run)
        if not isinstance(shard, int) or not 0 <= shard < state.spec.n_shards:
            raise InvalidRequest(f"unknown shard {shard!r} of run {run}")
        return state.next_step(shard)

    # -- pull ----------------------------------------------------------------

    @property
    def version(self) -> Version:
        return self.model.version

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """The model's parameter shapes by name."""
        return self._shapes

    def check_incarnation(self, incarnation: object) -> None:
        if incarnation != self.incarnation:
            raise StaleIncarnation(
                f"message from incarnation {incarnation!r}; this parameter server "
                f"is incarnation {self.incarnation}"
            )

    def ready(self, run: int, shard: int, epoch: int, step: int) -> bool:
        """Whether shard ``shard`` may compute ``(epoch, step)`` from the current model."""
        state = self.get_run(run)
        position = state.spec.position(epoch, step)
        if self.mode == "sync":
            return self.version >= state.base_version + position
        if self.mode == "ssp":
            lagging = [c for c in state.clocks if c < state.end]
            return not lagging or position - min(lagging) <= self.staleness
        return True

    def record_download(self, worker: WorkerId, version: Version) -> None:
        """Log that ``worker`` was sent ``version``; keep the newest distinct workers."""
        check_worker(worker, InvalidRequest)
        self.forget_worker(worker)
        self.downloads.append((worker, version))
        del self.downloads[: -self.download_limit]

    def forget_worker(self, worker: WorkerId) -> None:
        """Drop ``worker``'s download row: its copy can no longer serve a recovery."""
        self.downloads = [row for row in self.downloads if row[0] != worker]

    # -- push ----------------------------------------------------------------

    def admit(self, update: Update, check: bool = True) -> Admission:
        """Validate ``update`` and decide what it does; change nothing.

        ``check=False`` skips the payload checks (replay of a committed update
        whose effect is taken from a model copy).

        Raises
        ------
        DuplicateUpdate
            If the update id was accepted before.
        InvalidUpdate
            If the id, names, shapes, dtypes or values are bad, or the update
            comes out of order.
        RunInUse
            If another train() call than the update's holds its run.
        """
        key = update.key
        check_worker(update.worker, InvalidUpdate)
        if not 0 <= key.run < len(self.runs):
            raise InvalidUpdate(f"update {key.id}: unknown run {key.run}")
        run = self.runs[key.run]
        spec = run.spec
        if update.holder is not None and run.holder not in (None, update.holder):
            raise _held_by_another(run, update.holder)
        if run.superseded:
            raise InvalidUpdate(f"update {key.id}: run {key.run} was superseded")
        if key.shard >= spec.n_shards or key.epoch >= spec.epochs:
            raise InvalidUpdate(f"update {key.id}: no such epoch or shard in the run")
        if key.step >= spec.steps[key.shard]:
            raise InvalidUpdate(f"update {key.id}: shard {key.shard} has no such step")
        position = spec.position(key.epoch, key.step)
        clock = run.clocks[key.shard]
        if position < clock:
            raise DuplicateUpdate(f"update {key.id} was already accepted")
        if run.stopped:
            raise InvalidUpdate(f"update {key.id}: run {key.run} was stopped early")
        if position > clock:
            raise OutOfOrder(
                f"update {key.id} out of order: shard {key.shard} is at "
                f"{run.next_step(key.shard)} (epoch, step)"
            )
        if check:
            self._check_grads(key.id, update.grads, spec.batch_size)

        if self.mode != "sync":
            return Admission(update, Version(self.version + 1), (update,))
        if self.version != run.base_version + position:
            raise InvalidUpdate(
                f"update {key.id}: its sync round is not open (model version "
                f"{self.version}, round opens at {run.base_version + position})"
            )
        waiting = dict(self.pending.get(position, {}))
        waiting[key.shard] = update
        members = [s for s, n in enumerate(spec.steps) if key.step < n]
        merge = (
            tuple(waiting[s] for s in members) if len(waiting) == len(members) else ()
        )
        return Admission(update, Version(self.version + 1), merge)

    def merge(self, admission: Admission, inplace: bool = False) -> ModelVersion | None:
        """The model after ``admission``, or None if it completes no version.

        ``inplace`` lets the optimizer overwrite the current model's arrays: only
        for a replay, where nobody holds the current model.
        """
        if not admission.merge:
            return None
        model = self.model
        with np.errstate(over="ignore", invalid="ignore"):  # checked below
            grads = _mean([merge_form(u.grads) for u in admission.merge])
            params, opt_state = self.optimizer.apply(
                model.params,
                model.opt_state,
                grads,
                step=int(admission.version),
                epoch=admission.update.key.epoch,
                inplace=inplace,
            )
        # Finite updates can still overflow float32 together (a sync round's
        # sum, momentum, a large rate): refused before anyone sees the model. A
        # replay (inplace) merges what was accepted, which passed this check.
        if not inplace and not all(
            np.isfinite(p[g.indices] if isinstance(g, RowSparse) else p).all()
            for p, g in zip(params.values(), (grads[n] for n in params), strict=True)
        ):
            raise InvalidUpdate(
                f"update {admission.update.key.id}: the merged model would hold Inf "
                "or NaN (the update overflows float32 in the optimizer)"
            )
        return ModelVersion(admission.version, params, opt_state)

    def commit(self, admission: Admission, model: ModelVersion | None) -> None:
        """Apply an admitted push and the model :meth:`merge` computed for it."""
        update = admission.update
        key = update.key
        run = self.runs[key.run]
        self.updates += 1
        self.global_rows.append((key.id, update.worker, admission.version))
        entries = self.gradients.setdefault(update.worker, deque())
        entries.append((key.id, update.grads, update_nbytes(update.grads)))
        self._retain(entries)
        run.clocks[key.shard] = run.advance(key.shard, key.epoch, key.step)
        position = run.spec.position(key.epoch, key.step)
        if model is not None:
            self.model = model
            self.pending.pop(position, None)
        elif self.mode == "sync":
            self.pending.setdefault(position, {})[key.shard] = update

    def mark(self) -> Mark:
        """The state before a batch of pushes, for :meth:`rollback`."""
        return Mark(
            self.updates,
            self.model,
            len(self.runs),
            tuple(r.superseded for r in self.runs),
            tuple(tuple(r.clocks) for r in self.runs),
            {p: dict(w) for p, w in self.pending.items()},
            {w: tuple(d) for w, d in self.gradients.items()},
        )

    def rollback(self, mark: Mark) -> None:
        """Undo every push and run begun since ``mark`` (they were not made durable)."""
        for _ in range(self.updates - mark.updates):  # one row per update since
            self.global_rows.pop()
        self.updates = mark.updates
        self.model = mark.model
        del self.runs[mark.runs :]
        for run, clocks, superseded in zip(
            self.runs, mark.clocks, mark.superseded, strict=True
        ):
            run.clocks = list(clocks)
            run.superseded = superseded
        self.pending = mark.pending
        self.gradients = {w: deque(entries) for w, entries in mark.gradients.items()}

    def _retain(self, entries: deque) -> None:
        """Keep a worker's newest payloads that fit in ``gradient_entries`` dense
        payloads' bytes (patent claim 9, counted by real size): factored payloads
        are smaller, so more of them fit. The newest is always kept."""
        budget = self.gradient_entries * self._dense_nbytes
        total = sum(entry[2] for entry in entries)
        while len(entries) > 1 and total > budget:
            total -= entries.popleft()[2]

    def settle(self, keep: int = 0) -> None:
        """Keep the newest ``memory_rows`` global rows in memory (after a commit),
        and at least the newest ``keep`` (rows a :meth:`rollback` may yet undo)."""
        while len(self.global_rows) > max(self.memory_rows, keep):
            self.global_rows.popleft()

    def push(self, update: Update) -> Admission:
        """Admit, merge and commit ``update`` in one call."""
        admission = self.admit(update)
        self.commit(admission, self.merge(admission))
        self.settle()
        return admission

    def snapshot_point(self) -> tuple[ModelVersion, int, tuple]:
        """What a snapshot of this moment holds.

        Returns the published model, how many of the latest accepted updates it
        does not include (a sync round still open), and each run's
        ``(clocks, superseded)`` with those updates not yet counted.
        """
        open_round = [u for waiting in self.pending.values() for u in waiting.values()]
        runs = []
        for run in self.runs:
            clocks = list(run.clocks)
            for u in open_round:
                if u.key.run == run.run:
                    clocks[u.key.shard] = run.spec.position(u.key.epoch, u.key.step)
            runs.append((tuple(clocks), run.superseded))
        return self.model, len(open_round), tuple(runs)

    # -- reading --------------------------------------------------------------

    def summary(self) -> dict:
        """Counters for :func:`dask_ftps.status`."""
        run = self.runs[-1] if self.runs else None
        return {
            "version": int(self.version),
            "incarnation": self.incarnation,
            "updates": self.updates,
            "mode": self.mode,
            "staleness": self.staleness,
            "model": self.model_spec.to_dict(),
            "optimizer": self.optimizer.to_dict(),
            "n_params": self.model_spec.n_params(),
            "runs": len(self.runs),
            "run": None
            if run is None
            else {
                "run": int(run.run),
                "name": run.name,
                "n_shards": run.spec.n_shards,
                "finished": run.finished,
                "accepted": run.accepted,
                "minibatches": run.spec.minibatches,
                "base_version": int(run.base_version),
                "spec": run.spec.to_dict(),
            },
            "global_rows": len(self.global_rows),
            "download_rows": len(self.downloads),
            "gradient_entries": sum(len(d) for d in self.gradients.values()),
            "gradient_bytes": sum(e[2] for d in self.gradients.values() for e in d),
        }

    def records(self) -> dict[str, list[dict]]:
        """The global dataset and the download dataset as lists of rows."""
        return {
            "global": [
                {"update_id": u, "worker": w, "version": int(v)}
                for u, w, v in self.global_rows
            ],
            "download": [{"worker": w, "version": int(v)} for w, v in self.downloads],
        }

    def _check_grads(self, update_id: str, grads: object, max_batch: int) -> None:
        if not isinstance(grads, dict):
            raise InvalidUpdate(f"update {update_id}: grads must be a dict of arrays")
        unknown = sorted(set(grads) - set(self._shapes), key=str)
        missing = sorted(set(self._shapes) - set(grads))
        if unknown or missing:
            raise InvalidUpdate(
                f"update {update_id}: unknown parameter names {unknown}, "
                f"missing {missing}"
            )
        batches = set()
        for name, shape in self._shapes.items():
            g = grads[name]
            if isinstance(g, Factored):
                batches.add(self._check_factors(update_id, name, g, max_batch))
                continue
            if isinstance(g, RowSparse):
                problem = sparse_problem(
                    g, shape, self._dtypes[name], f"update {update_id}: {name}"
                )
                if problem:
                    raise InvalidUpdate(problem)
                continue
            if type(g) is not np.ndarray:  # a subclass (masked...) hides values
                raise InvalidUpdate(
                    f"update {update_id}: {name} is a {type(g).__name__}, "
                    "not a NumPy array"
                )
            if g.shape != shape or g.dtype != self._dtypes[name]:
                raise InvalidUpdate(
                    f"update {update_id}: {name} has shape {g.shape} and dtype "
                    f"{g.dtype}, expected {shape} and {self._dtypes[name]}"
                )
            if not np.isfinite(g).all():
                raise InvalidUpdate(f"update {update_id}: {name} holds NaN or Inf")
        if len(batches) > 1:
            raise InvalidUpdate(
                f"update {update_id}: its factors hold {sorted(batches)} samples: "
                "one minibatch has one number of samples"
            )

    def _check_factors(
        self, update_id: str, name: str, g: Factored, max_batch: int
    ) -> int:
        """A factored weight update: two finite float32 matrices ``(B, m)`` and
        ``(B, n)`` with ``1 <= B <= max_batch`` whose product cannot overflow;
        return ``B``."""
        shape, dtype = self._shapes[name], self._dtypes[name]
        if len(shape) != 2 or dtype != np.float32:
            raise InvalidUpdate(
                f"update {update_id}: {name} is not a float32 matrix: it cannot be "
                "sent factored"
            )
        u, v = getattr(g, "u", None), getattr(g, "v", None)
        if type(g) is not Factored or not all(
            type(f) is np.ndarray and f.ndim == 2 and f.dtype == dtype for f in (u, v)
        ):
            raise InvalidUpdate(
                f"update {update_id}: the factors of {name} must be two 2-d "
                f"{dtype} NumPy arrays"
            )
        if u.shape[1] != shape[0] or v.shape[1] != shape[1] or u.shape[0] != v.shape[0]:
            raise InvalidUpdate(
                f"update {update_id}: {name} of shape {shape} has factors of shapes "
                f"{u.shape} and {v.shape}; expected (B, {shape[0]}) and (B, {shape[1]})"
            )
        batch = u.shape[0]
        if not 1 <= batch <= max_batch:
            raise InvalidUpdate(
                f"update {update_id}: the factors of {name} hold {batch} samples; a "
                f"minibatch of the run holds 1 to {max_batch}"
            )
        if not (np.isfinite(u).all() and np.isfinite(v).all()):
            raise InvalidUpdate(f"update {update_id}: {name} holds NaN or Inf")
        if may_overflow(u, v):
            raise InvalidUpdate(
                f"update {update_id}: the product of the factors of {name} may "
                "overflow float32"
            )
        return batch


def _describe(spec: RunSpec) -> str:
    return (
        f"{spec.n_shards} shards, batch_size {spec.batch_size}, {spec.epochs} "
        f"epochs, seed {spec.seed}, {sum(spec.shard_sizes)} samples"
    )


def check_worker(worker: object, error: type[Exception] = InvalidUpdate) -> str:
    """A worker id: a non-empty string of at most ``MAX_WORKER_LENGTH`` characters."""
    if not isinstance(worker, str) or not 0 < len(worker) <= MAX_WORKER_LENGTH:
        raise error(
            f"worker must be a non-empty string of at most {MAX_WORKER_LENGTH} "
            f"characters, got {type(worker).__name__} {str(worker)[:80]!r}"
        )
    return worker


def _mean(grads: list[dict[str, Any]]) -> dict[str, Any]:
    """Element-wise mean, summed in the given order (deterministic bits); the
    mean of row-sparse updates of one matrix is row-sparse (a matrix some send
    dense and some as rows is made whole)."""
    if len(grads) == 1:
        return grads[0]
    out = {}
    for name in grads[0]:
        parts = [g[name] for g in grads]
        if all(isinstance(p, RowSparse) for p in parts):
            out[name] = mean_rows(parts)
            continue
        if any(isinstance(p, RowSparse) for p in parts):
            grads = [
                {**g, name: g[name].dense()} if isinstance(g[name], RowSparse) else g
                for g in grads
            ]
        acc = grads[0][name].copy()
        for g in grads[1:]:
            acc += g[name]
        acc /= len(grads)
        out[name] = acc
    return out


def _held_by_another(run: RunState, holder: Holder) -> RunInUse:
    """The refusal of a message of ``holder``'s tasks for ``run``, which another
    train() call holds."""
    return RunInUse(
        f"run {run.run} ({run.name!r}) is held by another train() call (client "
        f"{holder_client(run.holder or '')!r}), not by the call of client "
        f"{holder_client(holder)!r} these tasks belong to: two calls at once would "
        "merge their updates into one model. Call train() again once the other "
        "call ended"
    )
