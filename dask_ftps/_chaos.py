"""``dask-ftps chaos``: real processes under seeded random kills, checked throughout.

A scheduler process (with :mod:`dask_ftps.preload`) and a group of worker
processes train an MLP on digits, one named run after another, for a set
time. A seeded killer SIGKILLs the scheduler or a worker at random moments;
some schedulers are started armed (:mod:`dask_ftps.testing`) to die right
before one of their log records (a commit's, nearly always) or inside a
snapshot. After every scheduler loss the harness, like a supervisor, restarts
the scheduler on the same port at once and checks it before any worker joins,
so with training stopped: no committed update lost (the new server holds what
the store held and at least what the old one reported accepted), no update
applied twice, and ``recover(store)`` equal to the live model bit for bit.
Then the workers start, and training goes on once the interrupted train() has
ended. A client that gave up reconnecting is replaced by a new one. At the end,
the model must have learned (test accuracy).
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
from distributed.comm import CommClosedError

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
    kills: int | None = None  # stop killing after this many (None: until the time)


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
    new_clients: int = 0  # clients made after one closed

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
            ("clients replaced", str(self.new_clients)),
            ("final test accuracy", f"{self.accuracy:.4f}"),
        ]  # fmt: skip
        width = max(len(a) for a, _ in rows) + 2
        return [f"{a:<{width}}{b}" for a, b in rows]


#: The harness's client: how long it tries to reconnect to a lost scheduler
#: before it closes (the harness then makes a new one).
CLIENT_TIMEOUT = "90s"
#: How long a train() may go on after its scheduler was restarted (it raises
#: SchedulerLost, or finishes the run it had begun on the new scheduler).
DRIVER_TIMEOUT = 300.0
#: How long a restarted scheduler may take to serve its rebuilt model.
SERVE_TIMEOUT = 120.0


class _Driver(threading.Thread):
    """Calls train() run after run until stopped or until a train() fails (its
    scheduler died: train() raises SchedulerLost; or its client closed)."""

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
            except BaseException as e:  # noqa: BLE001 - its scheduler died: _Harness
                logger.info("run chaos-%d ended: %r", self.run_index, e)
                self.error = e
                return
            self.run_index += 1
            self.finished += 1


class _Cluster:
    """The scheduler process and the worker processes; restarted on the same port."""

    def __init__(self, folder: Path, store: str, rng: np.random.Generator, say: Say):
        self.folder, self.store, self.rng, self.say = folder, store, rng, say
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.scheduler: Process | None = None
        self.workers: Process | None = None
        self.armed: str | None = None
        self.starts = 0

    def start_scheduler(self, aimed_share: float) -> float:
        """Start a scheduler (armed with a share of ``aimed_share``, never the
        first); return when its process was started."""
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
        return self.scheduler.started

    def start_workers(self) -> None:
        self.stop_workers()
        self.workers = start_workers(
            self.address, N_WORKERS, self.folder / f"workers-{self.starts}.log"
        )

    def stop_workers(self) -> None:
        """Kill the worker group (they close with their scheduler anyway)."""
        if self.workers is not None:
            self.workers.stop(kill=True)

    def worker_pids(self) -> list[int]:
        """The worker processes (each nanny's child) of the worker group."""
        import psutil

        if self.workers is None:
            return []
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


class _Harness:
    """The supervisor of a chaos run: its cluster, its client, its driver.

    Like a real supervisor, it restarts a dead scheduler at once, without
    waiting for the driver's train() to notice. The new scheduler serves and is
    checked with no workers, so that no update can be pushed meanwhile; the
    workers start after the checks, and a new driver once the old train() has
    ended (it raises SchedulerLost, or finishes the run it had begun on the new
    scheduler). A client that closed (it gave up reconnecting) is replaced.
    """

    def __init__(
        self,
        options: ChaosOptions,
        cluster: _Cluster,
        data: tuple,
        report: ChaosReport,
        rng: np.random.Generator,
        say: Say,
    ) -> None:
        self.options, self.cluster, self.data = options, cluster, data
        self.report, self.rng, self.say = report, rng, say
        self.client: Client | None = None
        self.driver: _Driver | None = None

    # -- the client ----------------------------------------------------------------

    def connect(self) -> Client:
        """The harness's client: a new one if the last one closed (a client closes
        when its scheduler stayed away longer than its timeout)."""
        from distributed import Client

        old = self.client
        if old is not None and old.status not in ("closing", "closed", "failed"):
            return old
        if old is not None:
            self.report.new_clients += 1
            self.say(f"the client was {old.status}: connecting a new one")
            try:
                old.close(timeout=5)
            except Exception:
                logger.debug("closing the old client failed", exc_info=True)
        self.client = Client(self.cluster.address, timeout=CLIENT_TIMEOUT)
        return self.client

    # -- the run -------------------------------------------------------------------

    def run(self, model: Any) -> None:
        options, cluster = self.options, self.cluster
        deadline = time.perf_counter() + options.seconds
        cluster.start_scheduler(0.0)
        cluster.start_workers()
        client = self.connect()
        client.wait_for_workers(N_WORKERS, timeout=120)
        client.register_plugin(
            dask_ftps.ParameterServer(
                cluster.store, model=model, mode=options.mode,
                optimizer=dask_ftps.SGD(lr=0.05, momentum=0.5),
                snapshot_every=options.snapshot_every,
            )
        )  # fmt: skip
        self.driver = _Driver(client, self.data, 0)
        self.driver.start()
        while time.perf_counter() < deadline and (
            options.kills is None or sum(self.report.kills.values()) < options.kills
        ):
            self.one_kill()
        # The last run goes to its end; an armed scheduler that dies in it is
        # recovered like any other, and its successors are unarmed.
        self.driver.stop_after_run.set()
        while True:
            died, acknowledged = self.watch(
                DRIVER_TIMEOUT, until=lambda: not self.driver.is_alive()
            )
            if not died:
                break
            self.scheduler_lost(acknowledged, died=True, aimed_share=0.0)
        if self.driver.is_alive():
            self.report.errors.append(
                f"the last run did not end within {DRIVER_TIMEOUT:.0f} s"
            )
        elif self.driver.error is not None:
            self.report.errors.append(f"the last run failed: {self.driver.error!r}")
        self.report.runs_finished += self.driver.finished
        if cluster.armed is not None and cluster.scheduler.alive:
            # An armed scheduler that outlived the last run: the final checks
            # need one that does not die under them; restart it, unarmed (a
            # restart, not a kill the report counts; its recovery is checked).
            cluster.kill_scheduler()
            self.report.recoveries.append(self.recover("restart", 0, 0.0))

    def watch(
        self, seconds: float, until: Callable[[], bool] | None = None
    ) -> tuple[bool, int]:
        """Watch the scheduler for ``seconds`` or until ``until()``: whether it died,
        and the most updates its server reported accepted meanwhile."""
        acknowledged, t_end = 0, time.perf_counter() + seconds
        while time.perf_counter() < t_end:
            if not self.cluster.scheduler.alive:
                return True, acknowledged
            if until is not None and until():
                break
            try:
                acknowledged = max(acknowledged, _status(self.client)["updates"])
            except Exception:
                logger.debug("status not answered", exc_info=True)
            time.sleep(0.05)
        return False, acknowledged

    def one_kill(self) -> None:
        """Wait a random interval (watching the counts), then kill something."""
        options = self.options
        died, acknowledged = self.watch(float(self.rng.uniform(*options.interval)))
        pids = self.cluster.worker_pids()
        if not died and pids and self.rng.random() < options.worker_share:
            victim = int(self.rng.choice(pids))
            os.kill(victim, signal.SIGKILL)
            self.report.kills["worker"] += 1
            self.say(f"SIGKILL worker process {victim} at {acknowledged} updates")
            return
        self.scheduler_lost(acknowledged, died)

    def scheduler_lost(
        self, acknowledged: int, died: bool, aimed_share: float | None = None
    ) -> None:
        """Kill the scheduler (unless it ``died`` by itself), restart it at once,
        check the recovery with no workers, then train on.

        The old driver is told to stop after its run and waited for once the
        workers are back: its train() raises SchedulerLost, or finishes on the new
        scheduler the run it had begun. A scheduler that dies meanwhile (an armed
        one) is recovered and checked the same way, in turn.
        """
        share = self.options.aimed_share if aimed_share is None else aimed_share
        driver = self.driver
        final = driver.stop_after_run.is_set()
        driver.stop_after_run.set()
        kind = (self.cluster.armed or "crashed") if died else "scheduler"
        if not died:
            self.cluster.kill_scheduler()
        while True:
            self.report.kills[kind] += 1
            recovery = self.recover(kind, acknowledged, share)
            if recovery is not None:
                self.report.recoveries.append(recovery)
                self.say(
                    f"scheduler died ({kind}) at {recovery.stored} committed; "
                    f"recovered {recovery.recovered} at version "
                    f"{recovery.version_recovered} in {recovery.served_seconds:.2f} "
                    f"s; lost {recovery.lost}, exact "
                    f"{'yes' if recovery.exact else 'NO'}"
                )
                died, acknowledged = self.train_on(driver)
            else:  # the new scheduler died before its checks ended
                died, acknowledged = True, 0
            if not died:
                break
            kind = self.cluster.armed or "crashed"
        self.report.runs_finished += driver.finished
        self.driver = _Driver(self.client, self.data, driver.run_index)
        if final:
            self.driver.stop_after_run.set()
        self.driver.start()

    def recover(
        self, kind: str, acknowledged: int, aimed_share: float
    ) -> Recovery | None:
        """Restart the scheduler, with no workers, and check what it serves; None if
        it died before the checks ended."""
        cluster = self.cluster
        cluster.stop_workers()
        before = dask_ftps.inspect(cluster.store)
        cluster.start_scheduler(aimed_share)
        status = self.wait_served()
        served = time.perf_counter() - cluster.scheduler.started
        for attempt in range(3):
            try:
                exact, duplicates = _exact(self.client, cluster.store)
                break
            except Exception as e:
                if not cluster.scheduler.alive:
                    logger.info("the scheduler died during its checks", exc_info=True)
                    return None
                if attempt == 2 or not isinstance(e, (CommClosedError, OSError)):
                    raise
                # A pooled connection to the scheduler before the restart.
                logger.info("checks met a closed connection (%r): again", e)
                time.sleep(0.2)
        return Recovery(
            kind, acknowledged, before["updates"], status["updates"],
            before["version"], status["version"], served, exact, duplicates,
        )  # fmt: skip

    def wait_served(self) -> dict:
        """The status of the restarted scheduler's server, once it serves; a
        scheduler that died in its own start (an armed one) is started again,
        unarmed, and a client that closed meanwhile is replaced."""
        from dask_ftps._processes import port_open

        cluster = self.cluster
        deadline = time.perf_counter() + SERVE_TIMEOUT
        last: BaseException | None = None
        while time.perf_counter() < deadline:
            if not cluster.scheduler.alive:
                cluster.start_scheduler(0.0)
            elif port_open(cluster.port):
                try:
                    return _status(self.connect())
                except Exception as e:  # noqa: BLE001 - not serving yet
                    last = e
            time.sleep(0.02)
        raise TimeoutError(
            f"no scheduler served on port {cluster.port} in {SERVE_TIMEOUT:.0f} s "
            f"(client {self.client.status}; last error {last!r}); see {cluster.folder}"
        )

    def train_on(self, driver: _Driver) -> tuple[bool, int]:
        """Start the workers and let the old driver end: whether the scheduler died
        meanwhile, and the most updates it reported accepted."""
        self.cluster.start_workers()
        try:
            self.connect().wait_for_workers(N_WORKERS, timeout=120)
        except Exception:
            if self.cluster.scheduler.alive:
                raise
            return True, 0
        died, acknowledged = self.watch(
            DRIVER_TIMEOUT, until=lambda: not driver.is_alive()
        )
        if died or not driver.is_alive():
            return died, acknowledged
        # A train() that neither failed nor trained on: a fault of train(), which
        # the report names; its client is closed under it and replaced.
        self.report.errors.append(
            f"a train() neither failed nor finished within {DRIVER_TIMEOUT:.0f} s "
            "of its scheduler's restart"
        )
        driver.client.close(timeout=10)
        driver.join(30)
        self.connect()
        return False, acknowledged


def run_chaos(options: ChaosOptions, say: Say = print) -> ChaosReport:
    """Train under random kills for ``options.seconds``; see the module docstring."""
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
    harness = _Harness(options, cluster, data, report, rng, say)
    try:
        harness.run(model)
        client = harness.connect()
        report.final_exact, report.final_duplicates = _exact(client, store)
        report.updates = dask_ftps.status(client)["updates"]
        _, params = dask_ftps.get_model(client)
        report.accuracy = accuracy(model, params, data[1], data[3])
    finally:
        if harness.client is not None:
            harness.client.close()
        cluster.stop()
    report.wall = time.perf_counter() - t_start
    return report


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
