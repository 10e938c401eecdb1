"""``dask-ftps chaos``: real processes under seeded random kills, checked throughout.

A scheduler process (with :mod:`dask_ftps.preload`) and a group of worker
processes train an MLP on digits, one named run after another, for a set
time. A seeded killer SIGKILLs the scheduler or a worker at random moments;
some schedulers are started armed (:mod:`dask_ftps.testing`) to die right
before one of their log records (a commit's, nearly always) or inside a snapshot. After every scheduler loss the
killer restarts the cluster on the same port and checks, with training
stopped: no committed update lost (the new server holds what the store held
and at least what the old one reported accepted), no update applied twice,
and ``recover(store)`` equal to the live model bit for bit. At the end, the
model must have learned (test accuracy).
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

import dask_ftps
from dask_ftps._processes import Process, free_port, start_scheduler, start_workers
from dask_ftps.testing import KILL_ENV

if TYPE_CHECKING:
    from distributed import Client

logger = logging.getLogger(__name__)

N_WORKERS = 2
BATCH_SIZE = 32
EPOCHS_PER_RUN = 3
#: What an armed scheduler dies before: its n-th write or deletion of a log record
#: (mostly a commit's record, its payload array written; or a trim's deletion),
#: or a chunk of its n-th snapshot (the first is written within 20 versions).
AIMS = {
    "record": (r"ftps/log/\d+$", (5, 120)),
    "snapshot": (r"snapshots/v\d+\.\w+/c\.0$", (1, 3)),
}

Say = Callable[[str], None]


@dataclass(frozen=True)
class ChaosOptions:
    """What ``dask-ftps chaos`` was asked for."""

    seconds: float = 60.0
    seed: int = 0
    mode: str = "async"
    store: str | None = None
    interval: tuple[float, float] = (1.0, 4.0)  # seconds between kills
    worker_share: float = 0.3  # of the kills, the share that hit a worker
    aimed_share: float = 0.4  # of the schedulers, the share started armed
    snapshot_every: int = 20


@dataclass
class Recovery:
    kind: str  # "scheduler" (SIGKILL), "record" or "snapshot" (armed: died there)
    acknowledged: int  # updates the old server last reported accepted
    stored: int  # updates the store held after the kill
    recovered: int  # updates the new server holds
    version_stored: int
    version_recovered: int
    served_seconds: float  # new scheduler process started -> status answered
    exact: bool  # recover(store) == live model, bit for bit
    duplicates: int

    @property
    def lost(self) -> int:
        return max(0, self.stored - self.recovered) + max(
            0, self.acknowledged - self.recovered
        )


@dataclass
class ChaosReport:
    options: ChaosOptions
    kills: Counter = field(default_factory=Counter)
    recoveries: list[Recovery] = field(default_factory=list)
    runs_finished: int = 0
    updates: int = 0
    final_exact: bool = False
    final_duplicates: int = 0
    accuracy: float = float("nan")
    wall: float = 0.0
    errors: list[str] = field(default_factory=list)

    @property
    def lost(self) -> int:
        return sum(r.lost for r in self.recoveries)

    @property
    def duplicates(self) -> int:
        return sum(r.duplicates for r in self.recoveries) + self.final_duplicates

    def failures(self) -> list[str]:
        failed = list(self.errors)
        if self.lost:
            failed.append(f"committed updates lost: {self.lost}")
        if self.duplicates:
            failed.append(f"updates applied twice: {self.duplicates}")
        inexact = sum(not r.exact for r in self.recoveries) + (not self.final_exact)
        if inexact:
            failed.append(
                f"recover(store) differed from the live model {inexact} times"
            )
        if not self.accuracy >= 0.9:
            failed.append(f"the model did not learn: test accuracy {self.accuracy:.3f}")
        return failed

    @property
    def ok(self) -> bool:
        return not self.failures()

    def lines(self) -> list[str]:
        served = sorted(r.served_seconds for r in self.recoveries) or [float("nan")]
        by_kind = Counter(r.kind for r in self.recoveries)
        rows = [
            ("wall time", f"{self.wall:.0f} s (seed {self.options.seed})"),
            ("scheduler kills", f"{sum(by_kind.values())} ("
             + ", ".join(f"{k} {v}" for k, v in sorted(by_kind.items())) + ")"),
            ("worker kills", str(self.kills["worker"])),
            ("recoveries checked", str(len(self.recoveries))),
            ("runs finished", str(self.runs_finished)),
            ("updates committed", str(self.updates)),
            ("committed updates lost", str(self.lost)),
            ("updates applied twice", str(self.duplicates)),
            ("recover == live, bit for bit",
             (f"{sum(r.exact for r in self.recoveries) + self.final_exact} of "
              f"{len(self.recoveries) + 1}")),
            ("start -> served (median, max)",
             f"{served[len(served) // 2]:.2f} s, {served[-1]:.2f} s"),
            ("final test accuracy", f"{self.accuracy:.4f}"),
        ]  # fmt: skip
        width = max(len(a) for a, _ in rows) + 2
        return [f"{a:<{width}}{b}" for a, b in rows]


class _Driver(threading.Thread):
    """Calls train() run after run until stopped or its scheduler dies (train()
    raises SchedulerLost then, within its grace, even from a call in flight)."""

    def __init__(self, client: Client, data: tuple, first_run: int) -> None:
        super().__init__(name="ftps-chaos-driver", daemon=True)
        self.client = client
        self.data = data
        self.run_index = first_run
        self.finished = 0
        self.stop_after_run = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        X_train, _, y_train, _ = self.data
        while not self.stop_after_run.is_set():
            try:
                dask_ftps.train(
                    self.client, X_train, y_train, epochs=EPOCHS_PER_RUN,
                    batch_size=BATCH_SIZE, progress=False,
                    run_name=f"chaos-{self.run_index}",
                )  # fmt: skip
            except BaseException as e:  # noqa: BLE001 - the scheduler died: see run_chaos
                self.error = e
                return
            self.run_index += 1
            self.finished += 1


class _Cluster:
    """The scheduler and worker processes; restarted on the same port."""

    def __init__(self, folder: Path, store: str, rng: np.random.Generator, say: Say):
        self.folder, self.store, self.rng, self.say = folder, store, rng, say
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.scheduler: Process | None = None
        self.workers: Process | None = None
        self.armed: str | None = None
        self.starts = 0

    def start(self, aimed_share: float) -> float:
        """Start the scheduler (armed with a share of ``aimed_share``) and workers;
        return when the scheduler process was started."""
        self.starts += 1
        env, preloads, self.armed = {}, (), None
        if self.starts > 1 and self.rng.random() < aimed_share:
            self.armed = str(self.rng.choice(sorted(AIMS)))
            pattern, (low, high) = AIMS[self.armed]
            env = {KILL_ENV: f"{pattern}:{int(self.rng.integers(low, high + 1))}"}
            preloads = ("dask_ftps.testing",)
        log = self.folder / f"scheduler-{self.starts}.log"
        self.scheduler = start_scheduler(
            self.port, log, self.store, env, preloads=preloads
        )
        self.workers = start_workers(
            self.address, N_WORKERS, self.folder / f"workers-{self.starts}.log"
        )
        return self.scheduler.started

    def worker_pids(self) -> list[int]:
        """The worker processes (each nanny's child) of the worker group."""
        import psutil

        try:
            children = psutil.Process(self.workers.pid).children(recursive=True)
            return sorted(
                p.pid for p in children if "spawn_main" in " ".join(p.cmdline())
            )
        except psutil.Error:
            return []

    def kill_scheduler(self) -> None:
        self.scheduler.kill(signal.SIGKILL)
        self.scheduler.wait(30)

    def stop(self) -> None:
        for proc in (self.workers, self.scheduler):
            if proc is not None:
                proc.stop(kill=True)


def run_chaos(options: ChaosOptions, say: Say = print) -> ChaosReport:
    """Train under random kills for ``options.seconds``; see the module docstring."""
    from distributed import Client

    from dask_ftps._data import load
    from dask_ftps._demo import accuracy
    from dask_ftps.models import MLP

    t_start = time.perf_counter()
    rng = np.random.default_rng(options.seed)
    folder = Path(tempfile.mkdtemp(prefix="dask-ftps-chaos-"))
    store = options.store or str(folder / "chaos.zarr")
    data = load(scale=False).split  # digits in [0, 1], unstandardised
    model = MLP(n_features=64, hidden=(32,), n_classes=10, seed=options.seed)
    report = ChaosReport(options)
    say(f"chaos: {options.seconds:.0f} s, seed {options.seed}, mode {options.mode}; "
        f"store {store}; logs {folder}")  # fmt: skip
    cluster = _Cluster(folder, store, rng, say)
    cluster.start(options.aimed_share)
    try:
        with Client(cluster.address, timeout="90s") as client:
            client.wait_for_workers(N_WORKERS, timeout=120)
            client.register_plugin(
                dask_ftps.ParameterServer(
                    store, model=model, mode=options.mode,
                    optimizer=dask_ftps.SGD(lr=0.05, momentum=0.5),
                    snapshot_every=options.snapshot_every,
                )
            )  # fmt: skip
            driver = _Driver(client, data, 0)
            driver.start()
            deadline = t_start + options.seconds
            while time.perf_counter() < deadline:
                driver = _one_kill(
                    client, cluster, driver, data, options, rng, report, say
                )
            # The last run goes to its end; an armed scheduler that dies in it is
            # recovered like any other, unarmed.
            driver.stop_after_run.set()
            while driver.is_alive() or not cluster.scheduler.alive:
                driver.join(0.2)
                if not cluster.scheduler.alive:
                    driver = _scheduler_lost(
                        client, cluster, driver, data, options, report, say,
                        0, True, aimed_share=0.0,
                    )  # fmt: skip
            if driver.error is not None:
                report.errors.append(f"the last run failed: {driver.error!r}")
            report.runs_finished += driver.finished
            if cluster.armed is not None and cluster.scheduler.alive:
                # An armed scheduler that outlived the last run: the final checks
                # need one that does not die under them; restart it, unarmed (a
                # restart, not a kill the report counts; its recovery is checked).
                cluster.kill_scheduler()
                report.recoveries.append(_recover(client, cluster, "restart", 0, 0.0))
            report.final_exact, report.final_duplicates = _exact(client, store)
            report.updates = dask_ftps.status(client)["updates"]
            _, params = dask_ftps.get_model(client)
            report.accuracy = accuracy(model, params, data[1], data[3])
    finally:
        cluster.stop()
    report.wall = time.perf_counter() - t_start
    return report


def _one_kill(
    client: Client,
    cluster: _Cluster,
    driver: _Driver,
    data: tuple,
    options: ChaosOptions,
    rng: np.random.Generator,
    report: ChaosReport,
    say: Say,
) -> _Driver:
    """Wait a random interval (watching the counts), then kill something."""
    wait = float(rng.uniform(*options.interval))
    acknowledged, t_end = 0, time.perf_counter() + wait
    died = False
    while time.perf_counter() < t_end:
        if not cluster.scheduler.alive:  # an armed scheduler died by itself
            died = True
            break
        try:
            acknowledged = max(acknowledged, _status(client)["updates"])
        except Exception:
            logger.debug("status not answered", exc_info=True)
        time.sleep(0.05)
    pids = cluster.worker_pids()
    if not died and pids and rng.random() < options.worker_share:
        victim = int(rng.choice(pids))
        os.kill(victim, signal.SIGKILL)
        report.kills["worker"] += 1
        say(f"SIGKILL worker process {victim} at {acknowledged} updates")
        return driver
    return _scheduler_lost(client, cluster, driver, data, options, report, say,
                           acknowledged, died)  # fmt: skip


def _scheduler_lost(
    client: Client,
    cluster: _Cluster,
    driver: _Driver,
    data: tuple,
    options: ChaosOptions,
    report: ChaosReport,
    say: Say,
    acknowledged: int,
    died: bool,
    aimed_share: float | None = None,
) -> _Driver:
    """Kill the scheduler (unless it ``died`` by itself), restart the cluster,
    check the recovery with training stopped, and train on."""
    kind = cluster.armed if died else "scheduler"
    if not died:
        cluster.kill_scheduler()
    report.kills[kind] += 1
    driver.join(120)  # its train() fails without a scheduler
    report.runs_finished += driver.finished
    share = options.aimed_share if aimed_share is None else aimed_share
    recovery = _recover(client, cluster, kind, acknowledged, share)
    report.recoveries.append(recovery)
    say(
        f"scheduler died ({kind}) at {recovery.stored} committed; recovered "
        f"{recovery.recovered} at version {recovery.version_recovered} in "
        f"{recovery.served_seconds:.2f} s; lost {recovery.lost}, exact "
        f"{'yes' if recovery.exact else 'NO'}"
    )
    fresh = _Driver(client, data, driver.run_index)
    if driver.stop_after_run.is_set():
        fresh.stop_after_run.set()
    fresh.start()
    return fresh


def _recover(
    client: Client, cluster: _Cluster, kind: str, acknowledged: int,
    aimed_share: float,
) -> Recovery:  # fmt: skip
    cluster.workers.stop(kill=True)  # they close with their scheduler anyway
    before = dask_ftps.inspect(cluster.store)
    started = cluster.start(aimed_share)
    status = _wait_served(client, cluster)
    served = time.perf_counter() - started
    client.wait_for_workers(N_WORKERS, timeout=120)
    exact, duplicates = _exact(client, cluster.store)
    return Recovery(
        kind, acknowledged, before["updates"], status["updates"], before["version"],
        status["version"], served, exact, duplicates,
    )  # fmt: skip


def _wait_served(client: Client, cluster: _Cluster, timeout: float = 120) -> dict:
    from dask_ftps._processes import port_open

    deadline = time.perf_counter() + timeout
    last: BaseException | None = None
    while time.perf_counter() < deadline:
        if port_open(cluster.port):
            try:
                return _status(client)
            except Exception as e:  # noqa: BLE001 - not serving yet
                last = e
        if not cluster.scheduler.alive:  # an armed one died in its own start
            cluster.workers.stop(kill=True)
            cluster.start(0.0)
        time.sleep(0.02)
    raise TimeoutError(
        f"no scheduler served on port {cluster.port} in {timeout:.0f} s (client "
        f"{client.status}; last error {last!r}); see {cluster.folder}"
    )


def _status(client: Client, timeout: float = 2.0) -> dict:
    """The server's status, or an error within ``timeout`` (a plain client call
    to a dead scheduler waits for the client to reconnect, up to its timeout,
    after which the client closes for good)."""
    from dask_ftps._core import check_reply

    reply = client.sync(client.scheduler.ftps_status, callback_timeout=timeout)
    return check_reply(reply, "ftps_status")


def _exact(client: Client, store: str) -> tuple[bool, int]:
    """Whether recover(store) is the live model bit for bit, and how many update
    ids the retained global dataset holds twice, or the server counts beyond its
    runs' clocks."""
    from dask_ftps._demo import same_params

    version, live = dask_ftps.get_model(client)
    offline_version, offline = dask_ftps.recover(store)
    info = dask_ftps.inspect(store)
    ids = Counter(row["update_id"] for row in info["global"])

    def clocks(dask_scheduler: Any) -> tuple[int, int]:
        state = dask_scheduler.plugins["ftps"].state
        return state.updates, sum(r.accepted for r in state.runs)

    updates, accepted = client.run_on_scheduler(clocks)
    duplicates = sum(n - 1 for n in ids.values()) + abs(updates - accepted)
    return version == offline_version and same_params(live, offline), duplicates
