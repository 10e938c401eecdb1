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

With ``shards`` > 1 the parameter server is sharded: its shard servers run on a
second group of worker processes, with the ``ftps-server`` resource (one per
shard), and the killer also SIGKILLs the worker process that serves a random
shard (its nanny starts a new one; the scheduler serves the shard again,
rebuilt from its journal). Training goes on meanwhile; once the shard is served
again the harness checks it: no committed update lost (the shard holds at least
what it had reported accepted and what its journal held after the kill), and
no update applied twice (each shard's retained global dataset, read from the
store). recover(store) == live model is checked where training is quiet: after
every scheduler loss and at the end. A scheduler loss restarts both worker
groups: the shard servers' group joins before the checks (they serve the
model), the training workers after them; every shard is checked as the one
server is. Sharded schedulers are never armed: they write no log record.
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
    shards: int = 1  # > 1: a sharded server, its shard servers on tagged workers
    shard_share: float = 0.3  # with shards, of the kills, the share of shard servers


def _lost(acknowledged: int, stored: int, recovered: int) -> int:
    """Committed updates a server lost: what its store held, or its predecessor
    reported accepted, beyond what it holds."""
    return max(0, stored - recovered) + max(0, acknowledged - recovered)


@dataclass
class ShardCount:
    """One shard's counts at a scheduler loss (a sharded server)."""

    shard: int
    acknowledged: int  # updates the shard last reported accepted
    stored: int  # updates its journal held after the kill
    recovered: int  # updates its new server holds

    @property
    def lost(self) -> int:
        return _lost(self.acknowledged, self.stored, self.recovered)


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
    #: A sharded server's shards, each checked (the counts above: the lowest).
    shards: list[ShardCount] = field(default_factory=list)

    @property
    def lost(self) -> int:
        if self.shards:
            return sum(s.lost for s in self.shards)
        return _lost(self.acknowledged, self.stored, self.recovered)


@dataclass
class ShardRecovery:
    """A shard whose server was SIGKILLed, served again while training went on."""

    shard: int
    killed: str  # the address of the worker that served it
    address: str  # the worker that serves it again
    incarnation: int  # its new server's
    acknowledged: int  # updates it last reported accepted before the kill
    stored: int  # updates its journal held after the kill
    recovered: int  # updates its new server holds (asked after the store was read)
    served_seconds: float  # SIGKILL -> the scheduler's status shows it served
    since_lost_s: float | None  # the scheduler's: loss noticed -> served again
    duplicates: int  # update ids its retained global dataset holds twice

    @property
    def lost(self) -> int:
        return _lost(self.acknowledged, self.stored, self.recovered)


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
    shard_recoveries: list[ShardRecovery] = field(default_factory=list)

    @property
    def lost(self) -> int:
        return sum(r.lost for r in self.recoveries) + sum(
            r.lost for r in self.shard_recoveries
        )

    @property
    def duplicates(self) -> int:
        return (
            sum(r.duplicates for r in self.recoveries)
            + sum(r.duplicates for r in self.shard_recoveries)
            + self.final_duplicates
        )

    def shard_served(self) -> tuple[float, float]:
        """The median and the longest SIGKILL -> served again of the shard
        recoveries (NaN: none)."""
        served = sorted(r.served_seconds for r in self.shard_recoveries)
        if not served:
            return float("nan"), float("nan")
        return served[len(served) // 2], served[-1]

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
            *self._shard_rows(),
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

    def _shard_rows(self) -> list[tuple[str, str]]:
        """The lines of a sharded run (none for one server)."""
        if self.options.shards <= 1:
            return []
        median, longest = self.shard_served()
        return [
            ("shard-server kills", str(self.kills["shard-server"])),
            ("kills by kind",
             ", ".join(f"{k} {v}" for k, v in sorted(self.kills.items()))),
            ("shards", str(self.options.shards)),
            ("shard recoveries checked", str(len(self.shard_recoveries))),
            ("kill -> shard served (median, max)",
             f"{median:.2f} s, {longest:.2f} s"),
        ]  # fmt: skip


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

    def __init__(
        self,
        folder: Path,
        store: str,
        rng: np.random.Generator,
        say: Say,
        shards: int = 1,
    ):
        self.folder, self.store, self.rng, self.say = folder, store, rng, say
        self.shards = shards
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.scheduler: Process | None = None
        self.workers: Process | None = None
        #: A sharded server's shard servers: workers with its resource.
        self.servers: Process | None = None
        self.armed: str | None = None
        self.starts = 0

    @property
    def n_workers(self) -> int:
        """The workers of the cluster: the training ones, and the shard servers'."""
        return N_WORKERS + (self.shards if self.shards > 1 else 0)

    def start_scheduler(self, aimed_share: float) -> float:
        """Start a scheduler (armed with a share of ``aimed_share``, never the
        first); return when its process was started."""
        self.starts += 1
        env, preloads, self.armed = {}, (), None
        if self.shards > 1:
            aimed_share = 0.0  # a sharded scheduler writes no log record
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

    def start_servers(self) -> None:
        """A sharded server's worker group with its resource, one worker per
        shard (none for one server)."""
        if self.shards <= 1:
            return
        from dask_ftps import config

        self.stop_servers()
        self.servers = start_workers(
            self.address, self.shards, self.folder / f"servers-{self.starts}.log",
            resources={str(config.get("shards.resource")): 1},
        )  # fmt: skip

    def stop_servers(self) -> None:
        if self.servers is not None:
            self.servers.stop(kill=True)

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
        for proc in (self.workers, self.servers, self.scheduler):
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
        #: A sharded server's: the most updates each shard reported accepted
        #: during the last watch.
        self.shard_acks: list[int] = [0] * options.shards

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
        cluster.start_servers()
        client = self.connect()
        client.wait_for_workers(cluster.n_workers, timeout=120)
        sharded = {"shards": options.shards} if options.shards > 1 else {}
        client.register_plugin(
            dask_ftps.ParameterServer(
                cluster.store, model=model, mode=options.mode,
                optimizer=dask_ftps.SGD(lr=0.05, momentum=0.5),
                snapshot_every=options.snapshot_every, **sharded,
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
        self.shard_acks = [0] * self.options.shards
        while time.perf_counter() < t_end:
            if not self.cluster.scheduler.alive:
                return True, acknowledged
            if until is not None and until():
                break
            try:
                status = _status(self.client)
                acknowledged = max(acknowledged, status["updates"])
                if self.options.shards > 1:
                    self.shard_acks = [
                        max(a, s["updates"])
                        for a, s in zip(self.shard_acks, status["shards"], strict=True)
                    ]
            except Exception:
                logger.debug("status not answered", exc_info=True)
            time.sleep(0.05)
        return False, acknowledged

    def one_kill(self) -> None:
        """Wait a random interval (watching the counts), then kill something."""
        options = self.options
        died, acknowledged = self.watch(float(self.rng.uniform(*options.interval)))
        if options.shards > 1:
            self.one_kill_sharded(died, acknowledged)
            return
        pids = self.cluster.worker_pids()
        if not died and pids and self.rng.random() < options.worker_share:
            self.kill_worker(pids, acknowledged)
            return
        self.scheduler_lost(acknowledged, died)

    def kill_worker(self, pids: list[int], acknowledged: int) -> None:
        """SIGKILL a random training worker process of ``pids``."""
        victim = int(self.rng.choice(pids))
        os.kill(victim, signal.SIGKILL)
        self.report.kills["worker"] += 1
        self.say(f"SIGKILL worker process {victim} at {acknowledged} updates")

    # -- a sharded server: shard servers killed too ----------------------------------

    def one_kill_sharded(self, died: bool, acknowledged: int) -> None:
        """Kill a shard server (``shard_share``), a training worker
        (``worker_share``) or the scheduler (the rest)."""
        options = self.options
        if not died:
            self.check_driver()
        draw = self.rng.random()
        if not died and draw < options.shard_share:
            if self.shard_lost():  # the scheduler died meanwhile
                self.scheduler_lost(0, died=True)
            return
        pids = self.cluster.worker_pids()
        if not died and pids and draw < options.shard_share + options.worker_share:
            self.kill_worker(pids, acknowledged)
            return
        self.scheduler_lost(acknowledged, died)

    def check_driver(self) -> None:
        """A train() that failed while its scheduler lived (after a shard server
        or a worker was killed): a fault the report names; training goes on
        with a new driver, which resumes that run."""
        driver = self.driver
        if driver.is_alive() or not self.cluster.scheduler.alive:
            return
        if driver.error is not None:
            self.report.errors.append(
                f"run chaos-{driver.run_index} failed with its scheduler alive: "
                f"{driver.error!r}"
            )
        self.report.runs_finished += driver.finished
        self.driver = _Driver(self.client, self.data, driver.run_index)
        self.driver.start()

    def shard_lost(self) -> bool:
        """SIGKILL the worker process serving a random shard, wait until the
        scheduler serves every shard it served again, and check each; return
        whether the scheduler died meanwhile (a shard that cannot be found now,
        one being placed, is not killed)."""
        cluster, report = self.cluster, self.report
        k = int(self.rng.integers(self.options.shards))
        try:
            status = _status(self.client, timeout=5.0)
            address = status["shards"][k]["address"]
            pid = self.client.run(os.getpid, workers=[address])[address]
        except Exception as e:  # noqa: BLE001 - not served now: no kill this time
            logger.info("shard %d not found to kill: %r", k, e)
            return not cluster.scheduler.alive
        lost = {s["shard"]: s for s in status["shards"] if s["address"] == address}
        served: dict[int, float] = {}  # shard -> SIGKILL to status showing it served
        poller = threading.Thread(
            target=self._poll_served, args=(lost, served), daemon=True
        )
        os.kill(pid, signal.SIGKILL)
        poller.start()
        report.kills["shard-server"] += 1
        self.say(
            f"SIGKILL shard server {pid} at {address} (shards {sorted(lost)}) at "
            f"{[s['updates'] for s in status['shards']]} updates"
        )
        # What the killed server's journals hold (read while the shards are
        # placed again: a new server's writes only add to it), then what their
        # new servers hold, asked after that read.
        stored = _inspect(cluster.store)
        poller.join(SERVE_TIMEOUT + 10)
        if not cluster.scheduler.alive:
            return True
        missing = sorted(set(lost) - set(served))
        if missing:
            report.errors.append(
                f"shards {missing} not served again within {SERVE_TIMEOUT:.0f} s of "
                f"their server's SIGKILL; see {cluster.folder}"
            )
            return False
        now = self._status_when_served()
        if now is None:
            return not cluster.scheduler.alive
        twice = _twice(_inspect(cluster.store))
        for j, seconds in sorted(served.items()):
            new = now["shards"][j]
            since = next(
                (e.get("since_lost_s") for e in reversed(now.get("recoveries") or [])
                 if e.get("shard") == j and e.get("incarnation") == new["incarnation"]),
                None,
            )  # fmt: skip
            recovery = ShardRecovery(
                j, address, new["address"], new["incarnation"],
                max(lost[j]["updates"], self.shard_acks[j]),
                stored["shards"][j]["updates"], new["updates"], seconds, since,
                twice[j],
            )  # fmt: skip
            report.shard_recoveries.append(recovery)
            self.say(
                f"shard {j} served again at {recovery.address} (incarnation "
                f"{recovery.incarnation}) {seconds:.2f} s after the SIGKILL: held "
                f"{recovery.stored} committed, {recovery.acknowledged} reported; "
                f"holds {recovery.recovered}; lost {recovery.lost}, applied twice "
                f"{recovery.duplicates}"
            )
        return False

    def _poll_served(self, lost: dict[int, dict], served: dict[int, float]) -> None:
        """Poll the status from a shard server's SIGKILL on (in a thread): when
        each shard it served is served again (a new incarnation, or worker)."""
        t_kill = time.perf_counter()
        deadline = t_kill + SERVE_TIMEOUT
        while (
            len(served) < len(lost)
            and time.perf_counter() < deadline
            and self.cluster.scheduler.alive
        ):
            try:
                now = _status(self.client)
            except Exception:  # a shard not served yet
                logger.debug("status not answered", exc_info=True)
                time.sleep(0.02)
                continue
            seconds = time.perf_counter() - t_kill
            for j, old in lost.items():
                new = now["shards"][j]
                if j not in served and (
                    new["incarnation"] != old["incarnation"]
                    or new["address"] != old["address"]
                ):
                    served[j] = seconds
            time.sleep(0.02)

    def _status_when_served(self) -> dict | None:
        """The status, once answered (every shard served), or None, named an error,
        when it is not answered within ``SERVE_TIMEOUT``."""
        deadline = time.perf_counter() + SERVE_TIMEOUT
        last: BaseException | None = None
        while time.perf_counter() < deadline and self.cluster.scheduler.alive:
            try:
                return _status(self.client)
            except Exception as e:  # noqa: BLE001 - again, until the deadline
                last = e
                time.sleep(0.05)
        if self.cluster.scheduler.alive:
            self.report.errors.append(
                f"the status was not answered after a shard server's SIGKILL: {last!r}"
            )
        return None

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
        sharded = self.options.shards > 1
        acks = list(self.shard_acks) if acknowledged else [0] * self.options.shards
        cluster.stop_workers()
        cluster.stop_servers()
        before = dask_ftps.inspect(cluster.store)
        cluster.start_scheduler(aimed_share)
        cluster.start_servers()  # they serve the shards: they join before the checks
        status = self.wait_served()
        served = time.perf_counter() - cluster.scheduler.started
        check = _exact_sharded if sharded else _exact
        for attempt in range(3):
            try:
                exact, duplicates = check(self.client, cluster.store)
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
        shards = [
            ShardCount(k, acks[k], before["shards"][k]["updates"], s["updates"])
            for k, s in enumerate(status["shards"] if sharded else ())
        ]
        return Recovery(
            kind, acknowledged, before["updates"], status["updates"],
            before["version"], status["version"], served, exact, duplicates, shards,
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
            self.connect().wait_for_workers(self.cluster.n_workers, timeout=120)
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
    sharded = f", {options.shards} shards" if options.shards > 1 else ""
    say(f"chaos: {options.seconds:.0f} s, seed {options.seed}, mode {options.mode}"
        f"{sharded}; store {store}; logs {folder}")  # fmt: skip
    cluster = _Cluster(folder, store, rng, say, options.shards)
    harness = _Harness(options, cluster, data, report, rng, say)
    try:
        harness.run(model)
        client = harness.connect()
        check = _exact_sharded if options.shards > 1 else _exact
        report.final_exact, report.final_duplicates = check(client, store)
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


#: How long a check of a sharded server waits for the shards to be quiet: the
#: same versions before and after it reads the live model and the store.
QUIET_TIMEOUT = 30.0


def _inspect(store: str, attempts: int = 5) -> dict:
    """``inspect(store)`` of a store its servers may be writing (a trim may
    delete a record as it is read): tried again on an error."""
    for attempt in range(attempts):
        try:
            return dask_ftps.inspect(store)
        except Exception:
            if attempt == attempts - 1:
                raise
            logger.info("inspect failed: again", exc_info=True)
            time.sleep(0.1)
    raise AssertionError("unreachable")


def _twice(info: dict) -> list[int]:
    """Per shard of a sharded store's ``inspect``: the update ids its retained
    global dataset holds twice."""
    return [
        sum(n - 1 for n in Counter(r["update_id"] for r in shard["global"]).values())
        for shard in info["shards"]
    ]


def _exact_sharded(client: Client, store: str) -> tuple[bool, int]:
    """:func:`_exact` for a sharded server: whether recover(store) is the live
    model bit for bit, read while every shard's version stays the same (training
    is stopped where this is called; an interrupted train() that resumed on
    the tagged workers is waited out), and how many update ids each shard's
    retained global dataset holds twice, or each shard counts beyond its runs'
    clocks."""
    from dask_ftps._demo import same_params

    deadline = time.perf_counter() + QUIET_TIMEOUT
    while True:
        before = _status(client, timeout=10.0)
        version, live = dask_ftps.get_model(client)
        offline_version, offline = dask_ftps.recover(store)
        info = _inspect(store)
        after = _status(client, timeout=10.0)
        versions = [list(v) for v in (before["versions"], after["versions"])]
        quiet = versions[0] == versions[1] == list(info["versions"])
        if quiet or time.perf_counter() > deadline:
            break
        time.sleep(0.2)
    if not quiet:
        logger.warning(
            "the shards were not quiet for %.0f s: versions %s, then %s; stored %s",
            QUIET_TIMEOUT, before["versions"], after["versions"], info["versions"],
        )  # fmt: skip

    def clocks(dask_worker: Any, shard: int) -> tuple[int, int]:
        state = dask_worker.plugins["ftps"].hosts.hosts[shard].server.state
        return state.updates, sum(r.accepted for r in state.runs)

    duplicates = sum(_twice(info))
    for entry in after["shards"]:
        address = entry["address"]
        reply = client.run(clocks, shard=entry["shard"], workers=[address])
        updates, accepted = reply[address]
        duplicates += abs(updates - accepted)
    exact = quiet and version == offline_version and same_params(live, offline)
    return exact, duplicates
