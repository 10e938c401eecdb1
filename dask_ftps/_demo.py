"""The machinery of ``dask-ftps demo``: a cluster process, the killers, the report.

The demo process is the driver and the supervisor. The cluster runs in a child
process (``python -m dask_ftps._demo cluster --port P``), so that the demo can
SIGKILL the scheduler's process for real, start a new cluster on the same port
with the :mod:`dask_ftps.preload`, and watch the parameter server rebuild the run
from the Zarr store.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import numpy as np

import dask_ftps
from dask_ftps._data import Dataset, load
from dask_ftps.models import MLP, Model

if TYPE_CHECKING:
    import psutil
    from distributed import Client

logger = logging.getLogger(__name__)

N_WORKERS = 2
# The demo's model and settings: on the digits plus their shifted copies (see
# dask_ftps._data.load), an MLP learns what LogisticRegression cannot.
HIDDEN = (256,)
BATCH_SIZE = 64
LR = 0.05
MOMENTUM = 0.9
EPOCHS = 8
WORKER_KILL_AT = 0.3
SCHEDULER_KILL_AT = 0.6
READY = "dask-ftps-demo-cluster "
START_TIMEOUT = 90.0  # seconds for a cluster process to come up
HISTORY_COLUMNS = ("loss", "accuracy", "val_loss", "val_accuracy", "seconds")

Say = Callable[[str], None]


class DemoError(Exception):
    """The demo could not run to its end (not a failed check: see the report)."""


# -- data and scores -------------------------------------------------------------


def accuracy(model: Model, params: dict[str, np.ndarray], X, y) -> float:
    """Share of ``X``'s rows whose predicted class is ``y``."""
    return float(np.mean(np.asarray(model.predict(params, X)) == y))


def sklearn_accuracy(X_train, X_test, y_train, y_test) -> float:
    """Test accuracy of scikit-learn's ``LogisticRegression`` on the same split."""
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(max_iter=2000).fit(X_train, y_train)
    return float(clf.score(X_test, y_test))


def format_history(history: list[dict[str, float]], first_epoch: int = 0) -> list[str]:
    """The per-epoch history of :func:`dask_ftps.train` as aligned text lines."""
    columns = [c for c in HISTORY_COLUMNS if history and c in history[0]]
    lines = ["epoch" + "".join(f"{c:>14}" for c in columns)]
    for epoch, record in enumerate(history, start=first_epoch):
        cells = "".join(f"{record[c]:>14.4f}" for c in columns)
        lines.append(f"{epoch:>5}{cells}")
    return lines


def same_params(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    """Whether two parameter dicts are equal bit for bit."""
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype
        and a[k].shape == b[k].shape
        and a[k].tobytes() == b[k].tobytes()
        for k in a
    )


# -- the cluster process ---------------------------------------------------------


@dataclass
class ClusterProcess:
    """A LocalCluster running in a child process (see :func:`serve_cluster`).

    Attributes
    ----------
    proc
        The child process; its scheduler runs in it, its workers are its children.
    port
        The scheduler's port.
    log
        Where the child's standard error goes.
    spawned
        ``time.perf_counter()`` when the process was started.
    address, dashboard
        Known once :meth:`wait_ready` returned.
    children
        The child's own children (worker processes) when it was last stopped
        or killed.
    """

    proc: subprocess.Popen
    port: int
    log: Path
    spawned: float
    address: str = ""
    dashboard: str = ""
    children: list[psutil.Process] = field(default_factory=list)

    @classmethod
    def spawn(cls, port: int, log: Path, store: str | None = None) -> ClusterProcess:
        """Start ``python -m dask_ftps._demo cluster``; return at once."""
        args = [sys.executable, "-m", "dask_ftps._demo", "cluster", "--port", str(port)]
        if store is not None:
            args += ["--store", store]
        if logger.isEnabledFor(logging.INFO):
            args.append("--verbose")
        spawned = time.perf_counter()
        with log.open("ab") as err:
            proc = subprocess.Popen(
                args, stdout=subprocess.PIPE, stderr=err, start_new_session=True
            )
        logger.info("Cluster process %d started: %s", proc.pid, " ".join(args))
        return cls(proc, port, log, spawned)

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Wait for the child's ready line: its scheduler and workers are up."""
        info = json.loads(_read_ready_line(self, time.perf_counter() + timeout))
        self.address, self.dashboard = info["address"], info["dashboard"]

    def kill(self) -> None:
        """SIGKILL the process that runs the scheduler (and the workers' nannies)."""
        import psutil

        with contextlib.suppress(psutil.Error):
            self.children = psutil.Process(self.proc.pid).children(recursive=True)
        os.kill(self.proc.pid, signal.SIGKILL)

    def reap(self, timeout: float = 15.0) -> tuple[int, int]:
        """Wait for the killed process and its children.

        Returns
        -------
        (exited, killed)
            Children that exited by themselves within ``timeout``, and those
            still alive then, which are SIGKILLed.
        """
        import psutil

        self.proc.wait(timeout)
        gone, alive = psutil.wait_procs(self.children, timeout=timeout)
        for child in alive:
            with contextlib.suppress(psutil.Error):
                child.kill()
        return len(gone), len(alive)

    def stop(self, timeout: float = 15.0) -> None:
        """Shut the cluster down: SIGTERM (a clean close), then SIGKILL."""
        import psutil

        if self.proc.poll() is None:
            with contextlib.suppress(psutil.Error):
                self.children = psutil.Process(self.proc.pid).children(recursive=True)
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning("Cluster process %d ignored SIGTERM", self.proc.pid)
                self.proc.kill()
                self.proc.wait()
        psutil.wait_procs(self.children, timeout=timeout)
        for child in self.children:
            with contextlib.suppress(psutil.Error):
                child.kill()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _read_ready_line(cluster: ClusterProcess, deadline: float) -> str:
    """The JSON after :data:`READY` on the child's standard output."""
    stream = cluster.proc.stdout
    assert stream is not None
    buffer = b""
    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        while True:
            for line in buffer.decode(errors="replace").splitlines(keepends=True):
                if line.startswith(READY) and line.endswith("\n"):
                    return line.removeprefix(READY)
            left = deadline - time.perf_counter()
            if left <= 0:
                raise DemoError(f"the cluster did not start in time; see {cluster.log}")
            if not selector.select(left):
                continue
            chunk = os.read(stream.fileno(), 65536)
            if not chunk:
                raise DemoError(
                    f"the cluster process exited with status {cluster.proc.wait()}; "
                    f"see {cluster.log}"
                )
            buffer += chunk


def serve_cluster(port: int, store: str | None) -> None:
    """Run a LocalCluster until SIGTERM, SIGKILL or the parent's death.

    With ``store``, the scheduler loads :mod:`dask_ftps.preload`, which rebuilds
    the run the store holds before the scheduler serves anyone.
    """
    from distributed import LocalCluster

    kwargs: dict[str, Any] = {}
    if store is not None:
        kwargs = {
            "preload": ["dask_ftps.preload"],
            "preload_argv": [["--ftps-store", store]],
        }
    parent = os.getppid()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with LocalCluster(
        n_workers=N_WORKERS,
        threads_per_worker=1,
        processes=True,
        scheduler_port=port,
        host="127.0.0.1",
        dashboard_address=":0",
        scheduler_kwargs=kwargs,
    ) as cluster:
        info = {
            "address": cluster.scheduler_address,
            "dashboard": cluster.dashboard_link,
        }
        sys.stdout.write(READY + json.dumps(info) + "\n")
        sys.stdout.flush()
        while os.getppid() == parent:  # no orphan cluster if the demo dies
            time.sleep(0.5)
    logger.info("The demo process is gone: cluster closed")


# -- the killer --------------------------------------------------------------------


@dataclass(frozen=True)
class Kill:
    """One process the demo SIGKILLed."""

    target: str  # "worker" or "scheduler"
    name: str  # the worker's address, or the scheduler's
    pid: int
    version: int  # model version at the status poll just before the kill
    accepted: int
    minibatches: int


def kill_threshold(fraction: float, minibatches: int, epochs: int) -> int:
    """Accepted updates to wait for: the middle of the epoch ``fraction`` is in.

    Killing mid-epoch loses a running task, not just a finished result.
    """
    per_epoch = minibatches // epochs
    epoch = min(int(fraction * epochs), epochs - 1)
    return epoch * per_epoch + per_epoch // 2


class Killer(threading.Thread):
    """SIGKILLs a worker, then the scheduler, at set points of the run.

    Runs beside :func:`dask_ftps.train`, polling :func:`dask_ftps.status`.

    Parameters
    ----------
    client
        A client of the cluster.
    cluster
        The cluster process, whose process is the scheduler's.
    epochs
        Epochs of the run, to aim the kills at the middle of an epoch.
    targets
        ``(target, fraction)`` pairs in order: ``"worker"`` or ``"scheduler"``,
        and the share of the run's minibatches accepted before the kill.
    say
        Told of each kill as it happens.
    poll
        Seconds between two status polls.
    """

    def __init__(
        self,
        client: Client,
        cluster: ClusterProcess,
        epochs: int,
        targets: list[tuple[str, float]],
        say: Say = print,
        poll: float = 0.05,
    ):
        super().__init__(name="ftps-demo-killer", daemon=True)
        self.client = client
        self.say = say
        self.cluster = cluster
        self.epochs = epochs
        self.pending = list(targets)
        self.poll = poll
        self.kills: list[Kill] = []
        self.error: BaseException | None = None
        self._done = threading.Event()

    @property
    def scheduler_killed(self) -> bool:
        return any(k.target == "scheduler" for k in self.kills)

    def stop(self) -> None:
        self._done.set()
        self.join()

    def run(self) -> None:
        try:
            pids = self.client.run(os.getpid)  # ahead of time: a kill must be quick
            while self.pending and not self._done.is_set():
                self._poll_once(pids)
                self._done.wait(self.poll)
        except BaseException as e:  # reported by the demo, never swallowed
            if not self._done.is_set():  # not just training ending under a poll
                logger.exception("The killer failed")
                self.error = e

    def _poll_once(self, pids: dict[str, int]) -> None:
        status = dask_ftps.status(self.client)
        run = status["run"]
        while run and self.pending:
            target, fraction = self.pending[0]
            if run["accepted"] < kill_threshold(
                fraction, run["minibatches"], self.epochs
            ):
                return
            self.pending.pop(0)
            if target == "worker":
                self._kill_worker(status, pids)
            else:
                self._kill_scheduler(status)

    def _kill_worker(self, status: dict, pids: dict[str, int]) -> None:
        worker = self._busy_worker(pids)
        os.kill(pids[worker], signal.SIGKILL)
        self._record("worker", worker, pids[worker], status)

    def _kill_scheduler(self, status: dict) -> None:
        self.cluster.kill()
        self._record("scheduler", self.cluster.address, self.cluster.proc.pid, status)
        self.pending.clear()  # nothing left to kill

    def _record(self, target: str, name: str, pid: int, status: dict) -> None:
        run = status["run"]
        kill = Kill(
            target, name, pid, status["version"], run["accepted"], run["minibatches"]
        )
        self.kills.append(kill)
        logger.info("SIGKILLed %s", kill)
        self.say(_describe_kill(kill))

    def _busy_worker(self, pids: dict[str, int]) -> str:
        """A worker running a training task, else the first one."""
        processing = self.client.processing()
        for worker in sorted(pids):
            if any("ftps-train" in str(k) for k in processing.get(worker, ())):
                return worker
        return min(pids)


# -- the demo ----------------------------------------------------------------------


@dataclass(frozen=True)
class DemoOptions:
    """What ``dask-ftps demo`` was asked for."""

    epochs: int = EPOCHS
    mode: str = "async"
    kill_worker: bool = True
    kill_scheduler: bool = True
    store: str | None = None
    seed: int = 0
    shifted: bool = True  # train on the images and their shifted copies


@dataclass(frozen=True)
class Attempt:
    """The first :func:`dask_ftps.train` call, with the killer beside it."""

    result: dask_ftps.TrainResult | None  # None: the scheduler died under it
    seconds: float
    kills: list[Kill]
    missed: list[tuple[str, float]]  # kills not made: training ended first
    error: str = ""

    @property
    def scheduler_killed(self) -> bool:
        return any(kill.target == "scheduler" for kill in self.kills)


@dataclass(frozen=True)
class Recovery:
    """The new scheduler's rebuild of the run."""

    accepted_before: int  # committed in the store = acknowledged before the kill
    version_before: int
    recovered: int  # updates the new server holds
    recovered_version: int
    incarnation: int
    source: str
    start_version: int
    replayed: int
    rebuild_seconds: float  # as the server reports it
    served_seconds: float  # new cluster process started -> status answered
    children_exited: int  # the dead cluster's processes that exited by themselves
    children_killed: int

    @property
    def lost(self) -> int:
        return self.accepted_before - self.recovered


@dataclass(frozen=True)
class Checks:
    """The final checks, read from the store and the live server."""

    updates: int  # committed in the store
    minibatches: int
    retained_rows: int
    first_row: int
    duplicates: int
    version: int
    recovered_equal: bool  # recover(store) == get_model(client), bit for bit
    factored: int = 0  # retained updates whose payload holds factored layers
    payload_share: float = 1.0  # their payloads' bytes over the dense bytes

    @property
    def contiguous(self) -> bool:
        return self.first_row + self.retained_rows == self.updates

    @property
    def exactly_once(self) -> bool:
        return (
            self.updates == self.minibatches
            and self.duplicates == 0
            and self.contiguous
        )


@dataclass(frozen=True)
class DemoReport:
    """Everything the final table shows."""

    model: Model
    mode: str
    store: str
    ftps_accuracy: float
    sklearn_accuracy: float
    attempt: Attempt
    recovery: Recovery | None
    result: dask_ftps.TrainResult
    checks: Checks
    wall: float
    sklearn_samples: int = 0  # training rows LogisticRegression was fit on (0: all)

    @property
    def margin(self) -> float:
        """The MLP's test accuracy minus LogisticRegression's."""
        return self.ftps_accuracy - self.sklearn_accuracy

    def verdict(self) -> str:
        """Whether the MLP beat LogisticRegression, in words."""
        margin = round(self.margin, 4)
        if margin > 0:
            return f"the MLP beats it by {margin:.4f}"
        if margin == 0:
            return "a tie: the MLP does NOT beat it"
        return f"the MLP does NOT beat it: {-margin:.4f} below"

    def failures(self) -> list[str]:
        """The checks that failed; empty when the demo proved its point."""
        failed = []
        rec = self.recovery
        if rec is not None and rec.lost != 0:
            failed.append(f"accepted updates lost: {rec.lost}")
        if rec is not None and rec.recovered_version != rec.version_before:
            failed.append(
                f"recovered version {rec.recovered_version}, the store held "
                f"{rec.version_before}"
            )
        if not self.checks.exactly_once:
            failed.append(f"exactly-once check failed: {self.checks}")
        if not self.checks.recovered_equal:
            failed.append("recover(store) differs from the live model")
        return failed

    @property
    def ok(self) -> bool:
        return not self.failures()

    @property
    def training_seconds(self) -> float:
        second = self.result.seconds if self.attempt.result is None else 0.0
        return self.attempt.seconds + second


def run_demo(options: DemoOptions, say: Say = print) -> DemoReport:
    """Train on digits while a worker and then the scheduler are SIGKILLed.

    Parameters
    ----------
    options
        What to run.
    say
        Where the progress lines go (the CLI passes :func:`click.echo`).

    Returns
    -------
    DemoReport
        Its ``lines()`` are the final table; ``ok`` says whether every check
        passed.

    Raises
    ------
    DemoError
        If a cluster does not start or a killer fails.
    """
    start = time.perf_counter()
    data = load(shifted=options.shifted)
    model = MLP(
        n_features=data.n_features,
        hidden=HIDDEN,
        n_classes=data.n_classes,
        seed=options.seed,
    )
    workdir = Path(tempfile.mkdtemp(prefix="dask-ftps-demo-"))
    store = options.store or str(workdir / "digits.zarr")
    say(
        f"{data.describe()}; {model.n_params()} parameters; mode {options.mode}; "
        f"{options.epochs} epochs of minibatches of {BATCH_SIZE}"
    )
    say(f"store: {store}; cluster logs: {workdir}")
    port = _free_port()
    clusters: list[ClusterProcess] = []
    with _stopping(clusters):
        first = _start_cluster(port, workdir / "cluster-1.log", None, 1, say)
        clusters.append(first)
        with _client(first.address) as client:
            client.wait_for_workers(N_WORKERS, timeout=START_TIMEOUT)
            client.register_plugin(
                dask_ftps.ParameterServer(
                    store,
                    model=model,
                    optimizer=dask_ftps.SGD(lr=LR, momentum=MOMENTUM),
                    mode=options.mode,
                )
            )
            attempt = _first_attempt(client, first, data, options, say)
            recovery, result = None, attempt.result
            if attempt.scheduler_killed:
                second, recovery = _restart(client, first, store, workdir, say)
                clusters.append(second)
                client.wait_for_workers(N_WORKERS, timeout=START_TIMEOUT)
            if result is None:
                say(f"{N_WORKERS} new workers joined; train() again resumes the run")
                result = _train(client, data, options)
            _print_history(result, options.epochs, say)
            checks = _final_checks(client, store, result)
            _, params = dask_ftps.get_model(client)
    return DemoReport(
        model=model,
        mode=options.mode,
        store=store,
        ftps_accuracy=accuracy(model, params, data.X_test, data.y_test),
        # Fit on the original images alone: with the shifted copies it scores
        # lower (0.92 against 0.97) and takes seconds longer.
        sklearn_accuracy=sklearn_accuracy(
            data.X_train[: data.n_original],
            data.X_test,
            data.y_train[: data.n_original],
            data.y_test,
        ),
        sklearn_samples=data.n_original,
        attempt=attempt,
        recovery=recovery,
        result=result,
        checks=checks,
        wall=time.perf_counter() - start,
    )


def _free_port() -> int:
    from distributed.utils import open_port

    return open_port()


@contextlib.contextmanager
def _stopping(clusters: list[ClusterProcess]) -> Iterator[None]:
    """Stop every cluster process on the way out, whatever happened."""
    try:
        yield
    finally:
        for cluster in reversed(clusters):
            cluster.stop()


@contextlib.contextmanager
def _client(address: str) -> Iterator[Client]:
    from distributed import Client

    # A 60 s timeout: the client reconnects by itself to the new scheduler.
    with Client(address, timeout="60s") as client:
        yield client


def _start_cluster(
    port: int, log: Path, store: str | None, n: int, say: Say
) -> ClusterProcess:
    cluster = ClusterProcess.spawn(port, log, store)
    try:
        cluster.wait_ready()
    except BaseException:
        cluster.stop()
        raise
    _say_cluster(cluster, n, time.perf_counter() - cluster.spawned, say)
    return cluster


def _say_cluster(cluster: ClusterProcess, n: int, seconds: float, say: Say) -> None:
    dashboard = cluster.dashboard or "none (install bokeh for one)"
    say(
        f"cluster {n} (pid {cluster.proc.pid}, up in {seconds:.1f} s): scheduler "
        f"{cluster.address}, {N_WORKERS} worker processes x 1 thread; "
        f"dashboard {dashboard}"
    )


def _train(
    client: Client, data: Dataset, options: DemoOptions
) -> dask_ftps.TrainResult:
    return dask_ftps.train(
        client,
        data.X_train,
        data.y_train,
        epochs=options.epochs,
        batch_size=BATCH_SIZE,
        seed=options.seed,
        validation=(data.X_test, data.y_test),
        progress=False,
    )


def _first_attempt(
    client: Client,
    cluster: ClusterProcess,
    data: Dataset,
    options: DemoOptions,
    say: Say,
) -> Attempt:
    """Train with the killer beside; a dead scheduler ends the call."""
    targets = [("worker", WORKER_KILL_AT)] if options.kill_worker else []
    if options.kill_scheduler:
        targets.append(("scheduler", SCHEDULER_KILL_AT))
    killer = Killer(client, cluster, options.epochs, targets, say)
    result, error = None, None
    t0 = time.perf_counter()
    killer.start()
    try:
        result = _train(client, data, options)
    except (Exception, asyncio.CancelledError) as e:  # noqa: BLE001 - see below
        error = e  # re-raised below unless the killer killed the scheduler
    finally:
        seconds = time.perf_counter() - t0
        killer.stop()
    if error is not None and not killer.scheduler_killed:
        raise error
    if killer.error is not None:
        raise DemoError(f"the killer failed: {killer.error!r}") from killer.error
    for target, fraction in killer.pending:
        say(f"no {target} killed: training ended before the {fraction:.0%} mark")
    message = ""
    if error is not None:
        message = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"
        say(f"train() raised, as it must without a scheduler: {message}")
    return Attempt(result, seconds, killer.kills, killer.pending, message)


def _describe_kill(kill: Kill) -> str:
    what = (
        f"worker {kill.name}" if kill.target == "worker" else f"scheduler {kill.name}"
    )
    return (
        f"SIGKILL {what} (pid {kill.pid}) at model version {kill.version}, "
        f"{kill.accepted}/{kill.minibatches} updates accepted"
    )


def _restart(
    client: Client, first: ClusterProcess, store: str, workdir: Path, say: Say
) -> tuple[ClusterProcess, Recovery]:
    """Start a new cluster on the same port and store; time its rebuild."""
    exited, killed = first.reap()
    before = dask_ftps.inspect(store)
    say(
        f"the old cluster's {exited + killed} child processes are gone ({exited} exited by "
        f"themselves); the store holds {before['updates']} committed updates, "
        f"version {before['version']}"
    )
    second = ClusterProcess.spawn(first.port, workdir / "cluster-2.log", store)
    try:
        status, served = _wait_served(client, second)
        second.wait_ready()
    except BaseException:
        second.stop()
        raise
    _say_cluster(second, 2, time.perf_counter() - second.spawned, say)
    recovery = _recovery(before, status, served, exited, killed)
    say(
        f"new scheduler served the model {served:.2f} s after its process started "
        f"(rebuild {recovery.rebuild_seconds:.3f} s from the {recovery.source} at "
        f"version {recovery.start_version} + {recovery.replayed} replayed updates); "
        f"accepted updates lost: {recovery.lost}"
    )
    return second, recovery


def _wait_served(
    client: Client, cluster: ClusterProcess, timeout: float = START_TIMEOUT
) -> tuple[dict, float]:
    """Poll until the new scheduler answers :func:`dask_ftps.status`.

    Returns
    -------
    (status, seconds)
        Its answer, and the seconds since the cluster process was started.
    """
    deadline = cluster.spawned + timeout
    while time.perf_counter() < deadline:
        if cluster.proc.poll() is not None:
            raise DemoError(f"the new cluster process exited; see {cluster.log}")
        # Probe the port first: a call to a closed port backs off for seconds.
        if _port_open(cluster.port):
            try:
                status = dask_ftps.status(client)
            except Exception as e:  # noqa: BLE001 - not serving yet
                logger.debug("status not answered yet: %r", e)
            else:
                return status, time.perf_counter() - cluster.spawned
        time.sleep(0.02)
    raise DemoError(f"the new scheduler did not serve in {timeout:.0f} s")


def _port_open(port: int) -> bool:
    with (
        contextlib.suppress(OSError),
        socket.create_connection(("127.0.0.1", port), timeout=0.2),
    ):
        return True
    return False


def _recovery(
    before: dict, status: dict, served: float, exited: int, killed: int
) -> Recovery:
    rebuilt = status["recovery"] or {}
    return Recovery(
        accepted_before=before["updates"],
        version_before=before["version"],
        recovered=status["updates"],
        recovered_version=status["version"],
        incarnation=status["incarnation"],
        source=rebuilt.get("source", "?"),
        start_version=rebuilt.get("start_version", -1),
        replayed=rebuilt.get("replayed", -1),
        rebuild_seconds=rebuilt.get("seconds", float("nan")),
        served_seconds=served,
        children_exited=exited,
        children_killed=killed,
    )


def _print_history(result: dask_ftps.TrainResult, epochs: int, say: Say) -> None:
    """The run's history; the epochs trained after the restart are marked."""
    first = result.first_epoch
    if first:
        say(f"epochs 0-{first - 1} before the restart, {first}-{epochs - 1} after it:")
    for line in format_history(result.history, 0):
        say(line)


def _final_checks(client: Client, store: str, result: dask_ftps.TrainResult) -> Checks:
    info = dask_ftps.inspect(store)
    ids = Counter(row["update_id"] for row in info["global"])
    version, live = dask_ftps.get_model(client)
    offline_version, offline = dask_ftps.recover(store)
    return Checks(
        updates=info["updates"],
        minibatches=result.minibatches,
        retained_rows=len(info["global"]),
        first_row=info["first_row"],
        duplicates=sum(1 for n in ids.values() if n > 1),
        version=version,
        recovered_equal=version == offline_version and same_params(live, offline),
        factored=info["factored_updates"],
        payload_share=info["payload_bytes"]
        / max(1, 4 * len(info["global"]) * sum(v.size for v in live.values())),
    )


# -- the report --------------------------------------------------------------------


def report_lines(report: DemoReport) -> list[str]:
    """The demo's final table."""
    rows = [
        *_accuracy_rows(report),
        ("", ""),
        *_update_rows(report),
        ("", ""),
        *_failure_rows(report),
        ("", ""),
        *_time_rows(report),
    ]
    width = max(len(a) for a, _ in rows) + 2
    rule = "-" * (width + 36)
    lines = [rule]
    for label, value in rows:
        lines.append(f"{label:<{width}}{value}" if label else rule)
    lines.append(rule)
    return lines


def _yes(flag: bool) -> str:
    return "yes" if flag else "NO"


def _accuracy_rows(report: DemoReport) -> list[tuple[str, str]]:
    model = report.model
    layers = model.summary().split()[-1]
    fit_on = (
        f" (fit on the {report.sklearn_samples} original images)"
        if report.sklearn_samples
        else ""
    )
    return [
        ("model", "test accuracy"),
        (f"FTPS MLP {layers} ({report.mode})", f"{report.ftps_accuracy:.4f}"),
        ("sklearn LogisticRegression", f"{report.sklearn_accuracy:.4f}{fit_on}"),
        ("MLP vs LogisticRegression", report.verdict()),
    ]


def _update_rows(report: DemoReport) -> list[tuple[str, str]]:
    checks = report.checks
    return [
        ("updates applied / minibatches", f"{checks.updates} / {checks.minibatches}"),
        ("duplicate update ids", str(checks.duplicates)),
        (
            "global rows kept (from row)",
            (
                f"{checks.retained_rows} (from {checks.first_row}; "
                f"contiguous {_yes(checks.contiguous)})"
            ),
        ),
        (
            "updates sent factored (kept)",
            (
                f"{checks.factored} of {checks.retained_rows}; payloads "
                f"{checks.payload_share:.2f} of the dense bytes"
            ),
        ),
        ("exactly once", _yes(checks.exactly_once)),
        ("final model version", str(checks.version)),
        ("recover(store) == live model", _yes(checks.recovered_equal)),
    ]


def _failure_rows(report: DemoReport) -> list[tuple[str, str]]:
    kills = {k.target: k for k in report.attempt.kills}
    rows = [
        ("worker killed", _kill_cell(kills.get("worker"))),
        ("scheduler killed", _kill_cell(kills.get("scheduler"))),
    ]
    rec = report.recovery
    if rec is None:
        return rows
    return [
        *rows,
        ("accepted before the scheduler kill", f"{rec.accepted_before} (store)"),
        ("recovered", f"{rec.recovered} (version {rec.recovered_version})"),
        ("accepted updates lost", str(rec.lost)),
        ("recovered from", f"{rec.source} at version {rec.start_version}"),
        ("updates replayed", str(rec.replayed)),
        ("recovery: rebuild", f"{rec.rebuild_seconds:.3f} s"),
        ("recovery: scheduler start to model served", f"{rec.served_seconds:.2f} s"),
    ]


def _kill_cell(kill: Kill | None) -> str:
    if kill is None:
        return "no"
    where = f"at v{kill.version} ({kill.accepted}/{kill.minibatches} accepted)"
    if kill.target == "worker":
        return f"{kill.name} {where}"
    return f"pid {kill.pid} {where}"


def _time_rows(report: DemoReport) -> list[tuple[str, str]]:
    seconds = report.training_seconds
    return [
        ("training time (train() calls)", f"{seconds:.1f} s"),
        ("updates/s", f"{report.checks.minibatches / seconds:.1f}"),
        ("wall time (whole demo)", f"{report.wall:.1f} s"),
    ]


# -- python -m dask_ftps._demo cluster ---------------------------------------------


@click.group()
def _main() -> None:
    """Helpers of ``dask-ftps demo``."""


@_main.command()
@click.option("--port", type=int, required=True, help="The scheduler's port.")
@click.option("--store", default=None, help="Resume this store's run (preload).")
@click.option("-v", "--verbose", is_flag=True, help="Log at INFO level.")
def cluster(port: int, store: str | None, verbose: bool) -> None:
    """Run a LocalCluster of the demo until killed."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    serve_cluster(port, store)


if __name__ == "__main__":
    _main()
