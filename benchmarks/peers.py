"""Benchmark 4, peers: the same data and accuracy target with what a user would
pick instead.

- dask_ftps: ``ParameterServer(store)`` (journal on) on a ``LocalCluster`` of two
  worker processes, one ``train(epochs=1)`` call per epoch;
- dask-ml ``Incremental(SGDClassifier)`` on the same cluster (blocks of the
  training set walked sequentially, one ``partial_fit`` task per block);
- scikit-learn ``SGDClassifier`` and ``MLPClassifier`` in one process
  (``partial_fit`` once per epoch on the shuffled training set).

Each trains until the test accuracy reaches the target (or ``max_epochs``).
Then, on digits, each is fitted again while a worker is SIGKILLed mid-fit
(for the single-process fits: the process itself), and what happens is
recorded: whether the fit completes, the time it takes, and what is lost.

    python -m benchmarks.peers [--quick] [--out bench-results] [--store-dir DIR]
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import (
    Column,
    cpu_snapshot,
    cpu_usage,
    format_table,
    local_cluster,
    register_fresh,
    scratch_dir,
    script_main,
    write_json,
)
from benchmarks.failures import PROBLEMS, Problem

logger = logging.getLogger("benchmarks.peers")

NAME = "peers"
N_WORKERS = 2
SYSTEMS = ("dask_ftps", "dask-ml Incremental", "sklearn SGDClassifier", "sklearn MLP")


@dataclass(frozen=True)
class Config:
    problems: tuple[str, ...]
    max_epochs: int
    kill_problem: str
    target: float | None = None  # overrides the problems' targets

    @classmethod
    def make(cls, quick: bool) -> Config:
        if quick:
            return cls(("digits",), 6, "digits", target=0.9)
        return cls(("digits", "generated"), 20, "digits")

    def problem(self, name: str) -> Problem:
        problem = PROBLEMS[name]
        if self.target is not None:
            problem = dataclasses.replace(problem, target=self.target)
        return problem


@dataclass
class Fit:
    """The course of one fit: accuracy after each epoch."""

    problem: str
    system: str
    where: str
    target: float
    timeline: list[dict] = field(default_factory=list)
    kill: dict | None = None
    error: str | None = None

    def add(self, t: float, accuracy: float) -> None:
        self.timeline.append(
            {"epoch": len(self.timeline), "t": t, "accuracy": accuracy}
        )

    @property
    def time_to_target(self) -> float | None:
        for point in self.timeline:
            if point["accuracy"] >= self.target:
                return point["t"]
        return None

    @property
    def epochs_to_target(self) -> int | None:
        for point in self.timeline:
            if point["accuracy"] >= self.target:
                return point["epoch"] + 1
        return None

    def reached(self) -> bool:
        return self.time_to_target is not None


# -- the fits -----------------------------------------------------------------------------


def fit_ftps(
    client: Any,
    problem: Problem,
    data: tuple,
    store: Path,
    max_epochs: int,
    *,
    kill_after: int | None = None,
) -> Fit:
    import dask_ftps

    X_train, X_test, y_train, y_test = data
    model = problem.model(X_train.shape[1])
    register_fresh(
        client,
        dask_ftps.ParameterServer(
            str(store), model=model, optimizer=problem.optimizer(), mode="async"
        ),
    )
    fit = Fit(
        problem.name, "dask_ftps", f"cluster, {N_WORKERS} workers", problem.target
    )
    killer = None
    t0 = time.perf_counter()
    per_epoch = 0
    for epoch in range(max_epochs):
        if kill_after is not None and epoch == kill_after:
            killer = _WorkerKiller(client, "ftps-train", t0)
            killer.start()
        result = dask_ftps.train(
            client,
            X_train,
            y_train,
            epochs=1,
            batch_size=problem.batch_size,
            seed=epoch,
            # one run per epoch, each its own: the same name would mean the
            # same run (SpecMismatch for another seed); a retry resumes it
            run_name=f"epoch-{epoch}",
            n_shards=N_WORKERS,
            validation=(X_test, y_test),
            progress=False,
        )
        per_epoch = result.minibatches
        fit.add(time.perf_counter() - t0, result.history[-1]["val_accuracy"])
        if fit.reached() and (killer is None or killer.done.is_set()):
            break
    if killer is not None:
        killer.stop()
        version = dask_ftps.status(client)["version"]
        # Counted from the global dataset: every minibatch of every epoch's run
        # once (each epoch is a run of its own: another seed).
        ids = [r["update_id"] for r in dask_ftps.records(client)["global"]]
        expected = len(fit.timeline) * per_epoch
        duplicated = len(ids) - len(set(ids))
        lost = expected - len(set(ids))
        fit.kill = {
            **killer.report(),
            "completed": True,
            "exactly_once": version == expected and lost == 0 and duplicated == 0,
            "lost_updates": lost,
            "duplicated_updates": duplicated,
            "lost": f"{lost} of {expected} updates lost, {duplicated} applied twice "
            "(counted in the global dataset)",
        }
    return fit


def fit_incremental(
    client: Any,
    problem: Problem,
    data: tuple,
    max_epochs: int,
    *,
    kill_after: int | None = None,
) -> tuple[Fit, Any]:
    import dask.array as da
    from dask_ml.wrappers import Incremental
    from sklearn.linear_model import SGDClassifier

    X_train, X_test, y_train, y_test = data
    block = 4 * problem.batch_size
    X = da.from_array(X_train, chunks=(block, -1)).persist()
    y = da.from_array(y_train, chunks=(block,)).persist()
    inc = Incremental(
        SGDClassifier(random_state=0), shuffle_blocks=True, random_state=0
    )
    fit = Fit(
        problem.name,
        "dask-ml Incremental",
        f"cluster, {N_WORKERS} workers",
        problem.target,
    )
    killer = None
    t0 = time.perf_counter()
    for epoch in range(max_epochs):
        if kill_after is not None and epoch == kill_after:
            killer = _WorkerKiller(client, "fit-", t0)
            killer.start()
        inc.partial_fit(X, y, classes=np.arange(10))
        fit.add(time.perf_counter() - t0, float(inc.estimator_.score(X_test, y_test)))
        if fit.reached() and (killer is None or killer.done.is_set()):
            break
    if killer is not None:
        killer.stop()
        fit.kill = {**killer.report(), "completed": True}
    return fit, inc.estimator_


def _sklearn_estimator(kind: str, problem: Problem) -> Any:
    from sklearn.linear_model import SGDClassifier
    from sklearn.neural_network import MLPClassifier

    if kind == "sgd":
        return SGDClassifier(random_state=0)
    return MLPClassifier(
        hidden_layer_sizes=problem.hidden,
        batch_size=problem.batch_size,
        random_state=0,
    )


def fit_sklearn(
    kind: str, problem: Problem, data: tuple, max_epochs: int, progress=None
) -> Fit:
    import warnings

    X_train, X_test, y_train, y_test = data
    estimator = _sklearn_estimator(kind, problem)
    system = "sklearn SGDClassifier" if kind == "sgd" else "sklearn MLP"
    fit = Fit(problem.name, system, "1 process", problem.target)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for _ in range(max_epochs):
        order = rng.permutation(len(X_train))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            estimator.partial_fit(X_train[order], y_train[order], classes=np.arange(10))
        fit.add(time.perf_counter() - t0, float(estimator.score(X_test, y_test)))
        if progress is not None:
            progress.put(fit.timeline[-1])
        if fit.reached() and progress is None:
            break
    return fit


def _child_fit(kind: str, problem_name: str, max_epochs: int, progress: Any) -> None:
    """A single-process fit in a child process that reports each epoch."""
    problem = PROBLEMS[problem_name]
    fit_sklearn(kind, problem, problem.load(), max_epochs, progress)
    progress.put(None)


def kill_sklearn(kind: str, problem: Problem, max_epochs: int, kill_after: int) -> dict:
    """SIGKILL a single-process fit after ``kill_after`` epochs: what is left."""
    ctx = multiprocessing.get_context("spawn")
    progress = ctx.Queue()
    proc = ctx.Process(
        target=_child_fit, args=(kind, problem.name, max_epochs, progress), daemon=True
    )
    t0 = time.perf_counter()
    proc.start()
    done = []
    try:
        while len(done) < kill_after:
            point = progress.get(timeout=120)
            if point is None:
                break
            done.append(point)
        os.kill(proc.pid, signal.SIGKILL)
        t_kill = time.perf_counter() - t0
    finally:
        proc.join(30)
    return {
        "killed": "the fitting process",
        "at_s": t_kill,
        "epochs_done": len(done),
        "exitcode": proc.exitcode,
        "completed": False,
        "lost": f"all {len(done)} epochs: the model lived only in the killed process",
    }


class _WorkerKiller(threading.Thread):
    """SIGKILLs the worker that runs a task whose key holds ``marker``, as soon
    as one is seen (else any worker after ``patience`` seconds)."""

    def __init__(self, client: Any, marker: str, t0: float, patience: float = 3.0):
        super().__init__(name="bench-peers-killer", daemon=True)
        self.client = client
        self.marker = marker
        self.t0 = t0
        self.patience = patience
        self.done = threading.Event()
        self.killed: dict | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        pids = self.client.run(os.getpid)
        start = time.perf_counter()
        while not self._halt.is_set():
            processing = self.client.processing()
            busy = [
                w
                for w in sorted(pids)
                if any(self.marker in str(k) for k in processing.get(w, ()))
            ]
            late = time.perf_counter() - start > self.patience
            if busy or late:
                worker = busy[0] if busy else min(pids)
                os.kill(pids[worker], signal.SIGKILL)
                self.killed = {
                    "killed": "a worker running a fit task" if busy else "a worker",
                    "at_s": time.perf_counter() - self.t0,
                }
                logger.info("SIGKILL %s", self.killed)
                break
            time.sleep(0.001)
        self.done.set()

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def report(self) -> dict:
        return dict(self.killed or {"killed": "nothing (no task seen)"})


# -- the benchmark --------------------------------------------------------------------------


def run(
    quick: bool = False, out: str = "bench-results", store_dir: str | None = None
) -> dict[str, Any]:
    config = Config.make(quick)
    cpu = cpu_snapshot()
    fits: list[Fit] = []
    started = time.perf_counter()
    versions: dict[str, str] = {}
    estimators: dict[str, Any] = {}
    with scratch_dir(store_dir, NAME) as folder, local_cluster(N_WORKERS) as client:
        _warm_up(client, config.problem(config.problems[0]), folder)
        for name in config.problems:
            problem = config.problem(name)
            data = problem.load()
            fits.append(
                fit_ftps(client, problem, data, _store(folder, name), config.max_epochs)
            )
            try:
                import dask_ml

                versions["dask-ml"] = dask_ml.__version__
                fit, estimators[name] = fit_incremental(
                    client, problem, data, config.max_epochs
                )
                fits.append(fit)
            except ImportError as e:
                logger.warning("dask-ml is not available (%s): skipping its row", e)
                fits.append(_missing(problem, "dask-ml Incremental", e))
            for kind in ("sgd", "mlp"):
                fits.append(fit_sklearn(kind, problem, data, config.max_epochs))
        # Kill mid-fit, on the kill problem, in the second epoch.
        problem = config.problem(config.kill_problem)
        data = problem.load()
        killed = [
            fit_ftps(
                client,
                problem,
                data,
                _store(folder, "kill"),
                config.max_epochs,
                kill_after=1,
            )
        ]
        client.wait_for_workers(N_WORKERS, timeout=120)
        if problem.name in estimators:
            reference = next(
                f
                for f in fits
                if f.system == "dask-ml Incremental" and f.problem == problem.name
            )
            fit, estimator = fit_incremental(
                client, problem, data, len(reference.timeline), kill_after=1
            )
            if len(fit.timeline) == len(reference.timeline):
                # Deterministic: the same block order and partial_fit calls.
                fit.kill["same_model_as_without_kill"] = bool(
                    np.array_equal(estimator.coef_, estimators[problem.name].coef_)
                )
            fit.kill["lost"] = (
                "the killed worker's tasks, recomputed from lineage (data blocks "
                "and the chain of partial_fit results)"
            )
            killed.append(fit)
    kinds = (("mlp", "sklearn MLP"),)
    if not quick:
        kinds = (("sgd", "sklearn SGDClassifier"), *kinds)
    for kind, system in kinds:
        fit = Fit(problem.name, system, "1 process", problem.target)
        fit.kill = kill_sklearn(kind, problem, config.max_epochs, kill_after=2)
        killed.append(fit)
    rows = [_row(f) for f in fits]
    kill_rows = [_kill_row(f, fits) for f in killed]
    print()
    print(table(rows))
    print()
    print(kill_table(kill_rows))
    payload = {
        "quick": quick,
        "cpu": cpu_usage(cpu),
        "config": {
            "problems": {n: config.problem(n).describe() for n in config.problems},
            "max_epochs": config.max_epochs,
            "cluster": f"LocalCluster({N_WORKERS} processes x 1 thread)",
            "dask_ftps": "ParameterServer(store) journal on, MLP as in failures.py",
            "dask-ml": "Incremental(SGDClassifier(random_state=0), shuffle_blocks) "
            "blocks of 4 x batch_size rows",
            "sklearn": "SGDClassifier(random_state=0); MLPClassifier(hidden, "
            "batch_size, random_state=0); partial_fit per epoch",
            "versions": versions,
        },
        "results": rows,
        "fits": [f.__dict__ for f in fits],
        "kills": kill_rows,
        "seconds": time.perf_counter() - started,
    }
    write_json(out, NAME, payload)
    return payload


def _warm_up(client: Any, problem: Problem, folder: Path) -> None:
    """One untimed epoch of each cluster fit: the workers' first imports and
    data loading are not charged to whichever system runs first."""
    data = problem.load()
    fit_ftps(client, problem, data, _store(folder, "warm-up"), 1)
    try:
        fit_incremental(client, problem, data, 1)
    except ImportError:
        pass


def _store(folder: Path, name: str) -> Path:
    return folder / f"{name}-{time.monotonic_ns()}.zarr"


def _missing(problem: Problem, system: str, error: Exception) -> Fit:
    fit = Fit(problem.name, system, f"cluster, {N_WORKERS} workers", problem.target)
    fit.error = f"skipped: {error}"
    return fit


def _row(fit: Fit) -> dict:
    best = max((p["accuracy"] for p in fit.timeline), default=None)
    return {
        "problem": fit.problem,
        "system": fit.system,
        "where": fit.where,
        "target": fit.target,
        "time_to_target_s": fit.time_to_target,
        "epochs_to_target": fit.epochs_to_target,
        "epochs": len(fit.timeline),
        "best_accuracy": best,
        "note": fit.error
        or (
            "" if fit.reached() else f"target not reached in {len(fit.timeline)} epochs"
        ),
    }


def _kill_row(fit: Fit, fits: list[Fit]) -> dict:
    kill = fit.kill or {}
    reference = next(
        (f for f in fits if f.system == fit.system and f.problem == fit.problem), None
    )
    extra = None
    if fit.time_to_target is not None and reference and reference.time_to_target:
        extra = fit.time_to_target - reference.time_to_target
    return {
        "problem": fit.problem,
        "system": fit.system,
        "killed": kill.get("killed"),
        "at_s": kill.get("at_s"),
        "completed": kill.get("completed"),
        "time_to_target_s": fit.time_to_target,
        "extra_s": extra,
        "same_model": kill.get("same_model_as_without_kill"),
        "exactly_once": kill.get("exactly_once"),
        "lost": kill.get("lost"),
        "lost_updates": kill.get("lost_updates"),
        "duplicated_updates": kill.get("duplicated_updates"),
    }


COLUMNS = (
    Column("problem", "problem"),
    Column("system", "system"),
    Column("where", "where"),
    Column("target", "target", "{:.2f}"),
    Column("time_to_target_s", "to target s", "{:.2f}"),
    Column("epochs_to_target", "epochs"),
    Column("best_accuracy", "best acc", "{:.3f}"),
    Column("note", "note"),
)

KILL_COLUMNS = (
    Column("system", "system"),
    Column("killed", "killed"),
    Column("at_s", "at s", "{:.2f}"),
    Column("completed", "completes"),
    Column("time_to_target_s", "to target s", "{:.2f}"),
    Column("extra_s", "extra s", "{:+.2f}"),
    Column("lost", "lost"),
)


def table(rows: list[dict]) -> str:
    return format_table("Peers: time to target test accuracy", COLUMNS, rows)


def kill_table(rows: list[dict]) -> str:
    return format_table(
        "Peers: a worker (or the process) SIGKILLed mid-fit", KILL_COLUMNS, rows
    )


def main(argv: list[str] | None = None) -> None:
    script_main(NAME, __doc__, run, argv)


if __name__ == "__main__":
    main()
