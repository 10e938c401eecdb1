"""Benchmark 3, failures and work lost: time to a target test accuracy when
workers die and when the scheduler dies, against checkpoint-restart.

Every run uses a real ``dask scheduler`` process and ``dask worker --nworkers 2
--nthreads 1`` (nannies restart killed worker processes). The driver trains one
epoch per :func:`dask_ftps.train` call (``seed=epoch``, two shards), scoring the
live model on the test set after each epoch, until the target accuracy is
reached.

Systems:

- ``ftps``: ``ParameterServer(store=STORE)`` with the Zarr journal at default
  settings. After a scheduler loss a new scheduler starts with ``--preload
  dask_ftps.preload --ftps-store STORE``, new workers join, and the driver calls
  the same ``train`` again, which resumes the run.
- ``checkpoint``: the same parameter server with the journal off
  (``store=None``); the driver saves the model (``get_model``, ``np.savez``) every
  ``K`` versions (one epoch: Keras ``BackupAndRestore``'s default). After a
  scheduler loss a new scheduler starts a server from the last checkpoint and
  the driver redoes the epochs since.

Scenarios: no failure; a worker process SIGKILLed every ``T`` seconds; one
scheduler SIGKILL at a version drawn (stratified) within an epoch, the same
versions for both systems.

    python -m benchmarks.failures [--quick] [--out bench-results] [--store-dir DIR]
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import (
    Column,
    cpu_snapshot,
    cpu_usage,
    digits_split,
    format_table,
    generated_split,
    median,
    register_fresh,
    scratch_dir,
    script_main,
    write_json,
)
from dask_ftps import ParameterServer
from dask_ftps._processes import Process as Proc
from dask_ftps._processes import free_port, start_scheduler, start_workers, wait_port

logger = logging.getLogger("benchmarks.failures")

NAME = "failures"
N_WORKERS = 2


@dataclass(frozen=True)
class Problem:
    name: str
    load: Callable[[], tuple]
    hidden: tuple[int, ...]
    lr: float
    momentum: float
    batch_size: int
    target: float
    max_epochs: int
    kill_every: float  # seconds between worker kills

    def model(self, n_features: int) -> Any:
        from dask_ftps.models import MLP

        return MLP(n_features=n_features, hidden=self.hidden, n_classes=10, seed=0)

    def optimizer(self) -> Any:
        from dask_ftps import SGD

        return SGD(lr=self.lr, momentum=self.momentum)

    def describe(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "load"}


PROBLEMS = {
    "digits": Problem("digits", digits_split, (128,), 0.05, 0.5, 32, 0.95, 20, 1.0),
    "generated": Problem(
        "generated", generated_split, (128,), 0.02, 0.9, 128, 0.80, 20, 2.0
    ),
}


@dataclass(frozen=True)
class Config:
    problems: tuple[str, ...]
    scheduler_kills: int  # scheduler-loss runs per system and problem
    worker_kills: bool
    baseline_without_failure: bool
    target: float | None = None  # overrides the problems' targets

    @classmethod
    def make(cls, quick: bool) -> Config:
        if quick:
            return cls(("digits",), 1, True, False, target=0.9)
        return cls(("digits", "generated"), 3, True, True)

    def problem(self, name: str) -> Problem:
        problem = PROBLEMS[name]
        if self.target is not None:
            problem = dataclasses.replace(problem, target=self.target)
        return problem


# -- the checkpoint-restart baseline --------------------------------------------------


class CheckpointRestartPS(ParameterServer):
    """The baseline: the same parameter server, journal off, started from a model
    checkpoint ``(version, params)``; the optimizer state starts afresh (a model
    checkpoint holds none)."""

    def __init__(
        self, *args: Any, checkpoint: tuple[int, dict] | None = None, **kw: Any
    ) -> None:
        super().__init__(*args, **kw)
        self.checkpoint = checkpoint

    def _fresh_state(self, meta: Any, incarnation: int = 1) -> Any:
        from dask_ftps._core import ModelVersion, Version

        state = super()._fresh_state(meta, incarnation)
        if self.checkpoint is not None:
            version, params = self.checkpoint
            state.model = ModelVersion(
                Version(version), params, meta.optimizer.init_state(params)
            )
        return state


# -- a cluster of processes --------------------------------------------------------------


class Cluster:
    """A scheduler process and a ``dask worker`` process group, restartable."""

    def __init__(self, folder: Path, tag: str) -> None:
        self.folder = folder
        self.tag = tag
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.starts = 0
        self.scheduler: Proc | None = None
        self.workers: Proc | None = None
        self.client: Any = None

    def start(self, store: str | None = None) -> dict[str, float]:
        """Start the processes; return when each was ready (seconds since call)."""
        t0 = time.perf_counter()
        self.starts += 1
        log = self.folder / f"{self.tag}-{self.starts}"
        self.scheduler = start_scheduler(self.port, Path(f"{log}-scheduler.log"), store)
        # Workers started before the scheduler listens back off exponentially
        # between connection attempts: start them once it listens.
        listening = wait_port(self.port, timeout=120) - t0
        self.workers = start_workers(
            self.address, N_WORKERS, Path(f"{log}-workers.log")
        )
        if self.client is None:
            from distributed import Client

            self.client = Client(self.address, timeout="120s")
        self.client.wait_for_workers(N_WORKERS, timeout=120)
        return {
            "scheduler_listening": listening,
            "workers_joined": time.perf_counter() - t0,
        }

    def kill_scheduler(self) -> None:
        assert self.scheduler is not None
        self.scheduler.kill(signal.SIGKILL)

    def restart(self, store: str | None = None) -> dict[str, float]:
        """After a scheduler loss: the old workers go (they cannot serve a new
        scheduler: Dask workers close with theirs), new processes start."""
        for proc in (self.scheduler, self.workers):
            if proc is not None:
                proc.stop(timeout=5, kill=True)
        return self.start(store)

    def close(self) -> None:
        if self.client is not None:
            self.client.close(timeout=10)
        for proc in (self.workers, self.scheduler):
            if proc is not None:
                proc.stop(timeout=5)


# -- failure injection ---------------------------------------------------------------------


class SchedulerKiller(threading.Thread):
    """SIGKILLs the scheduler once the model reaches ``version``."""

    def __init__(self, cluster: Cluster, version: int, t0: float) -> None:
        super().__init__(name="bench-scheduler-killer", daemon=True)
        self.cluster = cluster
        self.version = version
        self.t0 = t0
        self.fired: dict | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        import dask_ftps

        while not self._halt.is_set():
            try:
                seen = dask_ftps.status(self.cluster.client)["version"]
            except Exception:  # noqa: BLE001 - between two runs: try again
                seen = -1
            if seen >= self.version:
                self.cluster.kill_scheduler()
                self.fired = {"t": time.perf_counter() - self.t0, "version": seen}
                logger.info("SIGKILL scheduler at version %d", seen)
                return
            self._halt.wait(0.01)

    def stop(self) -> None:
        self._halt.set()
        self.join()


class WorkerKiller(threading.Thread):
    """SIGKILLs a worker process that runs a training task every ``every`` s."""

    def __init__(self, cluster: Cluster, every: float, t0: float) -> None:
        super().__init__(name="bench-worker-killer", daemon=True)
        self.cluster = cluster
        self.every = every
        self.t0 = t0
        self.kills: list[dict] = []
        self._halt = threading.Event()

    def run(self) -> None:
        import dask_ftps

        client = self.cluster.client
        while not self._halt.wait(self.every):
            try:
                pids = client.run(os.getpid)
                processing = client.processing()
                busy = [
                    w
                    for w in sorted(pids)
                    if any("ftps-train" in str(k) for k in processing.get(w, ()))
                ]
                if not busy:
                    continue
                version = dask_ftps.status(client)["version"]
                os.kill(pids[busy[0]], signal.SIGKILL)
                self.kills.append(
                    {"t": time.perf_counter() - self.t0, "version": version}
                )
                logger.info("SIGKILL worker %s at version %d", busy[0], version)
            except Exception:  # a worker that just died: next time
                logger.debug("worker kill skipped", exc_info=True)

    def stop(self) -> None:
        self._halt.set()
        self.join()


# -- one run --------------------------------------------------------------------------------


@dataclass
class RunResult:
    problem: str
    system: str
    scenario: str
    timeline: list[dict] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    checkpoints: list[dict] = field(default_factory=list)
    time_to_target: float | None = None
    updates_to_target: int | None = None
    epochs: int = 0
    per_epoch: int = 0
    final_version: int = 0
    final_accuracy: float = float("nan")
    lost_updates: list[int] = field(default_factory=list)
    downtime: list[float] = field(default_factory=list)
    checkpoint_seconds: float = 0.0
    kill_version: int | None = None
    work_version: int | None = None  # the reference run's updates to target
    time_to_work: float | None = None  # when this run's version reached it

    @property
    def exactly_once(self) -> bool:
        """Async mode: one version per update, so the final version is the number
        of minibatches of the epochs done iff each was applied exactly once."""
        return self.final_version == self.epochs * self.per_epoch


def drive(
    problem: Problem,
    system: str,
    scenario: str,
    folder: Path,
    data: tuple,
    *,
    kill_version: int | None = None,
    work_version: int | None = None,
    cluster: Cluster | None = None,
) -> RunResult:
    """Train ``problem`` until the target accuracy, on ``cluster`` or (always for
    a scheduler loss) on a fresh one."""
    import dask_ftps

    X_train, X_test, y_train, y_test = data
    model = problem.model(X_train.shape[1])
    tag = f"{problem.name}-{system}-{scenario}-{time.monotonic_ns()}"
    store = str(folder / f"{tag}.zarr")
    result = RunResult(
        problem.name,
        system,
        scenario,
        kill_version=kill_version,
        work_version=work_version,
    )
    own = cluster is None or scenario == "scheduler-loss"
    if own:
        cluster = Cluster(folder, tag)
    assert cluster is not None
    try:
        if own:
            cluster.start()
        client = cluster.client
        client.wait_for_workers(N_WORKERS, timeout=120)

        def register(checkpoint: tuple[int, dict] | None = None) -> None:
            if system == "ftps":
                ps = ParameterServer(
                    store, model=model, optimizer=problem.optimizer(), mode="async"
                )
            else:
                ps = CheckpointRestartPS(
                    model=model,
                    optimizer=problem.optimizer(),
                    mode="async",
                    checkpoint=checkpoint,
                )
            register_fresh(client, ps)

        register()
        checkpoint = (0, 0, model.init_params())  # (epoch, version, params)
        t0 = time.perf_counter()
        scheduler_killer = worker_killer = None
        if scenario == "scheduler-loss":
            assert kill_version is not None
            scheduler_killer = SchedulerKiller(cluster, kill_version, t0)
            scheduler_killer.start()
        elif scenario == "worker-kills":
            worker_killer = WorkerKiller(cluster, problem.kill_every, t0)
            worker_killer.start()
        epoch = 0
        try:
            while epoch < problem.max_epochs:
                try:
                    trained = dask_ftps.train(
                        client,
                        X_train,
                        y_train,
                        epochs=1,
                        batch_size=problem.batch_size,
                        seed=epoch,
                        # one run per epoch, each its own: the same name would mean the
                        # same run (SpecMismatch for another seed); a retry resumes it
                        run_name=f"epoch-{epoch}",
                        n_shards=N_WORKERS,  # the same runs whoever is alive
                        validation=(X_test, y_test),
                        progress=False,
                    )
                except Exception:
                    if scheduler_killer is None or scheduler_killer.fired is None:
                        raise
                    if result.lost_updates:  # one scheduler loss per run
                        raise
                    epoch = _recover(
                        cluster,
                        system,
                        store,
                        scheduler_killer,
                        checkpoint,
                        register,
                        result,
                        t0,
                        epoch,
                    )
                    continue
                result.per_epoch = trained.minibatches
                t = time.perf_counter() - t0
                accuracy = trained.history[-1]["val_accuracy"]
                result.timeline.append(
                    {
                        "epoch": epoch,
                        "t": t,
                        "version": trained.version,
                        "accuracy": accuracy,
                    }
                )
                epoch += 1
                if system == "checkpoint":
                    checkpoint = _save_checkpoint(client, folder, tag, epoch, result)
                killed = scheduler_killer is None or scheduler_killer.fired is not None
                if accuracy >= problem.target and result.time_to_target is None:
                    result.time_to_target = t
                    result.updates_to_target = trained.version
                if result.work_version is None and result.time_to_target is not None:
                    result.work_version = result.updates_to_target
                if result.time_to_work is None and (
                    result.work_version is not None
                    and trained.version >= result.work_version
                ):
                    result.time_to_work = t
                if (
                    result.time_to_target is not None
                    and result.time_to_work is not None
                    and killed
                ):
                    break
        finally:
            for killer in (scheduler_killer, worker_killer):
                if killer is not None:
                    killer.stop()
        if worker_killer is not None:
            result.events += [{"kind": "worker", **k} for k in worker_killer.kills]
        result.epochs = epoch
        result.final_version = result.timeline[-1]["version"]
        result.final_accuracy = result.timeline[-1]["accuracy"]
    finally:
        if own:
            cluster.close()
    logger.info(
        "%s %s %s: target at %.2fs (%s updates), %d epochs, lost %s",
        problem.name,
        system,
        scenario,
        result.time_to_target or float("nan"),
        result.updates_to_target,
        result.epochs,
        result.lost_updates,
    )
    return result


def _save_checkpoint(
    client: Any, folder: Path, tag: str, epoch: int, result: RunResult
) -> tuple[int, int, dict]:
    """The baseline's model checkpoint: fetched and written to disk."""
    import dask_ftps

    t0 = time.perf_counter()
    version, params = dask_ftps.get_model(client)
    np.savez(folder / f"{tag}-checkpoint.npz", version=version, **params)
    result.checkpoint_seconds += time.perf_counter() - t0
    result.checkpoints.append({"epoch": epoch, "version": version})
    return epoch, version, params


def _recover(
    cluster: Cluster,
    system: str,
    store: str,
    killer: SchedulerKiller,
    checkpoint: tuple[int, int, dict],
    register: Callable,
    result: RunResult,
    t0: float,
    epoch: int,
) -> int:
    """Bring the cluster back after the scheduler loss; the epoch to go on with."""
    import dask_ftps

    fired = killer.fired
    assert fired is not None
    committed = None
    noticed = time.perf_counter() - t0
    if system == "ftps":
        # Accepted implies committed (durable before accepted): the store's
        # commit point bounds what any worker was told.
        committed = dask_ftps.inspect(store)["version"]
        restart = cluster.restart(store=store)  # the preload rebuilds the run
        status = dask_ftps.status(cluster.client)
        recovered = status["version"]
        restart["rebuild"] = (status["recovery"] or {}).get("seconds")
        if recovered != committed:
            raise RuntimeError(
                f"recovered version {recovered} != committed version {committed}"
            )
        lost = max(0, fired["version"] - recovered)
        resume_epoch = epoch  # the same train() call resumes the unfinished run
    else:
        restart = cluster.restart()
        ckpt_epoch, ckpt_version, params = checkpoint
        t_register = time.perf_counter()
        register((ckpt_version, params))
        restart["register"] = time.perf_counter() - t_register
        recovered = ckpt_version
        lost = fired["version"] - ckpt_version
        resume_epoch = ckpt_epoch
    up = time.perf_counter() - t0
    result.events.append(
        {
            "kind": "scheduler",
            "t": fired["t"],
            "version": fired["version"],
            "committed_version": committed,
            "recovered_version": recovered,
            "noticed_at": noticed,
            "back_at": up,
            "restart": restart,
        }
    )
    result.lost_updates.append(lost)
    result.downtime.append(up - fired["t"])
    logger.info(
        "%s: scheduler lost at version %d; back at version %d after %.2fs",
        system,
        fired["version"],
        recovered,
        up - fired["t"],
    )
    return resume_epoch


# -- the benchmark ------------------------------------------------------------------------


def _warm_up(cluster: Cluster, problem: Problem, data: tuple) -> None:
    """One untimed epoch, so that the first timed run on a shared cluster does
    not pay the workers' first imports and data loading alone."""
    import dask_ftps

    X_train, _, y_train, _ = data
    register_fresh(
        cluster.client,
        ParameterServer(
            model=problem.model(X_train.shape[1]), optimizer=problem.optimizer()
        ),
    )
    dask_ftps.train(
        cluster.client,
        X_train,
        y_train,
        epochs=1,
        batch_size=problem.batch_size,
        n_shards=N_WORKERS,
        progress=False,
    )


def kill_versions(
    per_epoch: int, epochs_to_target: int, n: int, seed: int
) -> list[int]:
    """``n`` scheduler-kill versions half way to the target, at positions within
    an epoch drawn stratified over [0, 1)."""
    rng = np.random.default_rng(seed)
    epoch = max(1, epochs_to_target // 2)
    fractions = [(k + rng.uniform()) / n for k in range(n)]
    return [int(epoch * per_epoch + f * per_epoch) for f in fractions]


def run(
    quick: bool = False, out: str = "bench-results", store_dir: str | None = None
) -> dict[str, Any]:
    config = Config.make(quick)
    cpu = cpu_snapshot()
    results: list[RunResult] = []
    started = time.perf_counter()
    with scratch_dir(store_dir, NAME) as folder:
        for name in config.problems:
            problem = config.problem(name)
            data = problem.load()
            shared = Cluster(folder, f"{name}-shared")
            try:
                shared.start()
                _warm_up(shared, problem, data)
                base = drive(problem, "ftps", "none", folder, data, cluster=shared)
                results.append(base)
                work = base.updates_to_target
                if config.baseline_without_failure:
                    results.append(
                        drive(
                            problem,
                            "checkpoint",
                            "none",
                            folder,
                            data,
                            work_version=work,
                            cluster=shared,
                        )
                    )
                if config.worker_kills:
                    results.append(
                        drive(
                            problem,
                            "ftps",
                            "worker-kills",
                            folder,
                            data,
                            work_version=work,
                            cluster=shared,
                        )
                    )
            finally:
                shared.close()
            epochs_to_target = (base.updates_to_target or base.final_version) // max(
                1, base.per_epoch
            )
            versions = kill_versions(
                base.per_epoch, epochs_to_target, config.scheduler_kills, seed=len(name)
            )
            for version in versions:
                for system in ("ftps", "checkpoint"):
                    results.append(
                        drive(
                            problem,
                            system,
                            "scheduler-loss",
                            folder,
                            data,
                            kill_version=version,
                            work_version=work,
                        )
                    )
    rows = [_row(r, results) for r in results]
    summary = _summary(results)
    print()
    print(table(rows))
    print()
    print(format_table("Work lost per scheduler failure", SUMMARY_COLUMNS, summary))
    payload = {
        "quick": quick,
        "cpu": cpu_usage(cpu),
        "config": {
            "problems": {n: config.problem(n).describe() for n in config.problems},
            "workers": f"{N_WORKERS} dask worker processes x 1 thread (nannies)",
            "driver": "one dask_ftps.train(epochs=1, seed=epoch, n_shards=2) call "
            "per epoch, test accuracy after each",
            "ftps": "ParameterServer(store) at default settings (snapshot_every=100)",
            "checkpoint": "ParameterServer(store=None) + get_model/np.savez every "
            "epoch; on scheduler loss a new server from the last checkpoint "
            "(optimizer state reset) and the epochs since redone",
            "scheduler_kills": config.scheduler_kills,
        },
        "results": rows,
        "runs": [{**r.__dict__, "exactly_once": r.exactly_once} for r in results],
        "summary": summary,
        "seconds": time.perf_counter() - started,
    }
    write_json(out, NAME, payload)
    return payload


def _reference(results: list[RunResult], problem: str, system: str) -> RunResult | None:
    """The run without failure to compare with: the same system's, else ftps's."""
    for wanted in (system, "ftps"):
        for r in results:
            if (r.problem, r.system, r.scenario) == (problem, wanted, "none"):
                return r
    return None


def _seconds_per_update(reference: RunResult | None) -> float | None:
    if reference is None or not reference.final_version:
        return None
    return reference.timeline[-1]["t"] / reference.final_version


def _row(r: RunResult, results: list[RunResult]) -> dict[str, Any]:
    reference = _reference(results, r.problem, r.system)
    extra = None
    if reference is not None and r.time_to_work and reference.time_to_work:
        extra = r.time_to_work - reference.time_to_work
    per_update = _seconds_per_update(reference)
    lost = r.lost_updates[0] if r.lost_updates else None
    if lost is None and r.scenario == "worker-kills":
        lost = 0 if r.exactly_once else None
    return {
        "problem": r.problem,
        "system": r.system,
        "scenario": r.scenario,
        "kill_version": r.kill_version,
        "kills": len(r.events),
        "time_to_target_s": r.time_to_target,
        "updates_to_target": r.updates_to_target,
        "work_version": r.work_version,
        "time_to_work_s": r.time_to_work,
        "extra_s": extra,
        "lost_updates": lost,
        "redo_s": None if lost is None or per_update is None else lost * per_update,
        "downtime_s": median(r.downtime) if r.downtime else None,
        "checkpoint_s": r.checkpoint_seconds if r.system == "checkpoint" else None,
        "final_accuracy": r.final_accuracy,
        "exactly_once": r.exactly_once,
    }


COLUMNS = (
    Column("problem", "problem"),
    Column("system", "system"),
    Column("scenario", "scenario"),
    Column("kill_version", "kill at v"),
    Column("kills", "kills"),
    Column("time_to_target_s", "to target s", "{:.2f}"),
    Column("updates_to_target", "updates"),
    Column("time_to_work_s", "to V* s", "{:.2f}"),
    Column("extra_s", "extra s", "{:+.2f}"),
    Column("lost_updates", "lost upd"),
    Column("redo_s", "redo s", "{:.2f}"),
    Column("downtime_s", "down s", "{:.2f}"),
    Column("checkpoint_s", "ckpt s", "{:.3f}"),
    Column("final_accuracy", "accuracy", "{:.3f}"),
    Column("exactly_once", "exactly once"),
)

SUMMARY_COLUMNS = (
    Column("problem", "problem"),
    Column("system", "system"),
    Column("failures", "failures"),
    Column("interval", "ckpt interval K"),
    Column("lost_mean", "lost/failure", "{:.1f}"),
    Column("lost_over_interval", "lost/K", "{:.2f}"),
    Column("extra_mean_s", "extra s/failure", "{:+.2f}"),
    Column("redo_mean_s", "redo s/failure", "{:.2f}"),
    Column("downtime_s", "down s", "{:.2f}"),
)


def table(rows: list[dict]) -> str:
    return format_table(
        "Failures: time to target test accuracy; V* = updates the run without "
        "failure needed; extra = time to V* minus that of the same system "
        "without failure",
        COLUMNS,
        rows,
    )


def _summary(results: list[RunResult]) -> list[dict]:
    out = []
    for problem in dict.fromkeys(r.problem for r in results):
        ftps_reference = _reference(results, problem, "ftps")
        per_epoch = ftps_reference.per_epoch if ftps_reference else None
        for system in ("ftps", "checkpoint"):
            runs = [
                r
                for r in results
                if r.problem == problem
                and r.system == system
                and r.scenario == "scheduler-loss"
                and r.lost_updates
            ]
            if not runs:
                continue
            reference = _reference(results, problem, system)
            per_update = _seconds_per_update(reference)
            lost = [x for r in runs for x in r.lost_updates]
            extras = [
                r.time_to_work - reference.time_to_work
                for r in runs
                if reference and r.time_to_work and reference.time_to_work
            ]
            lost_mean = float(np.mean(lost))
            out.append(
                {
                    "problem": problem,
                    "system": system,
                    "failures": len(lost),
                    "interval": per_epoch if system == "checkpoint" else None,
                    "lost": lost,
                    "lost_mean": lost_mean,
                    "lost_over_interval": lost_mean / per_epoch
                    if system == "checkpoint" and per_epoch
                    else None,
                    "extra_mean_s": float(np.mean(extras)) if extras else None,
                    "redo_mean_s": lost_mean * per_update if per_update else None,
                    "downtime_s": median(d for r in runs for d in r.downtime),
                    "exactly_once": all(r.exactly_once for r in runs),
                }
            )
    return out


def main(argv: list[str] | None = None) -> None:
    script_main(NAME, __doc__, run, argv)


if __name__ == "__main__":
    main()
