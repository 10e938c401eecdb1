"""The ``dask-ftps`` command: a demo with a real worker failure, and training."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import click
import numpy as np

import dask_ftps
from dask_ftps._core import MODES
from dask_ftps.models import MLP, Model, SoftmaxRegression

if TYPE_CHECKING:
    from distributed import Client

logger = logging.getLogger(__name__)

_HISTORY_COLUMNS = ("loss", "accuracy", "val_loss", "val_accuracy", "seconds")


# -- shared pieces -------------------------------------------------------------


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )


def _load_digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits, scaled to [0, 1]: a stratified 75/25 split.

    Returns
    -------
    X_train, X_test, y_train, y_test
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X = (X / 16).astype(np.float32)
    return train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)


@contextmanager
def _cluster(scheduler: str | None, n_workers: int) -> Iterator[Client]:
    """A client of ``scheduler``, or of a fresh process-based LocalCluster."""
    from distributed import Client, LocalCluster

    if scheduler is not None:
        with Client(scheduler) as client:
            click.echo(f"Connected to {scheduler}")
            yield client
        return
    with (
        LocalCluster(
            n_workers=n_workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0",
        ) as cluster,
        Client(cluster) as client,
    ):
        click.echo(
            f"LocalCluster: {n_workers} worker processes x 1 thread; "
            f"dashboard {cluster.dashboard_link}"
        )
        yield client


def _accuracy(model: Model, params: dict[str, np.ndarray], X, y) -> float:
    return float(np.mean(np.asarray(model.predict(params, X)) == y))


def _format_history(history: list[dict[str, float]]) -> list[str]:
    """The per-epoch history of :func:`dask_ftps.train` as aligned text lines."""
    columns = [c for c in _HISTORY_COLUMNS if history and c in history[0]]
    lines = ["epoch" + "".join(f"{c:>14}" for c in columns)]
    for epoch, record in enumerate(history):
        cells = "".join(f"{record[c]:>14.4f}" for c in columns)
        lines.append(f"{epoch:>5}{cells}")
    return lines


def _parse_hidden(ctx: click.Context, param: click.Parameter, value: str):
    """``"128,64"`` -> ``(128, 64)``; ``""`` -> ``()`` (softmax regression)."""
    try:
        hidden = tuple(int(v) for v in value.replace(" ", "").split(",") if v)
    except ValueError:
        raise click.BadParameter(
            f"expected comma-separated integers such as '128,64', got {value!r}"
        ) from None
    if any(h < 1 for h in hidden):
        raise click.BadParameter(f"layer widths must be positive, got {value!r}")
    return hidden


_mode_option = click.option(
    "--mode",
    type=click.Choice(MODES),
    default="async",
    show_default=True,
    help="Consistency mode of the parameter server.",
)
_seed_option = click.option(
    "--seed", type=click.IntRange(min=0), default=0, show_default=True
)
_verbose_option = click.option(
    "-v", "--verbose", is_flag=True, help="Log at INFO level (default WARNING)."
)


@click.group()
@click.version_option(package_name="dask-ftps")
def main() -> None:
    """dask-ftps: a fault-tolerant parameter server on Dask."""


# -- demo ------------------------------------------------------------------------


@dataclass
class _Kill:
    """One worker the demo killed."""

    worker: str
    pid: int
    version: int
    accepted: int


class _WorkerKiller(threading.Thread):
    """SIGKILLs one worker process once ``fraction`` of the run is accepted.

    Runs beside :func:`dask_ftps.train`: it polls :func:`dask_ftps.status`,
    then kills a worker that is running a training task, so that the task is
    lost and Dask re-runs it elsewhere. The nanny starts a new worker process.

    Parameters
    ----------
    client
        A client of the cluster.
    epochs
        Epochs of the run, to aim the kill at the middle of an epoch.
    fraction
        Share of the run's minibatches accepted before the kill.
    poll
        Seconds between two status polls.
    """

    def __init__(
        self, client: Client, epochs: int, fraction: float = 0.4, poll: float = 0.02
    ):
        super().__init__(name="ftps-demo-killer", daemon=True)
        self.client = client
        self.epochs = epochs
        self.fraction = fraction
        self.poll = poll
        self.kills: list[_Kill] = []
        self.error: BaseException | None = None
        self._done = threading.Event()

    def stop(self) -> None:
        self._done.set()
        self.join()

    def run(self) -> None:
        try:
            pids = self.client.run(os.getpid)  # ahead of time: a kill must be quick
            while not self._done.is_set():
                status = dask_ftps.status(self.client)
                run = status["run"]
                if run and run["accepted"] >= self._threshold(run["minibatches"]):
                    self._kill_one(status, pids)
                    return
                self._done.wait(self.poll)
        except BaseException as e:  # reported by the demo, never swallowed
            logger.exception("The worker killer failed")
            self.error = e

    def _threshold(self, minibatches: int) -> int:
        """Accepted updates to wait for: the middle of the epoch ``fraction`` is in.

        Killing mid-epoch loses a running task, not just a finished result.
        """
        per_epoch = minibatches // self.epochs
        epoch = min(int(self.fraction * self.epochs), self.epochs - 1)
        return epoch * per_epoch + per_epoch // 2

    def _kill_one(self, status: dict, pids: dict[str, int]) -> None:
        worker = self._busy_worker(pids)
        os.kill(pids[worker], signal.SIGKILL)
        kill = _Kill(worker, pids[worker], status["version"], status["run"]["accepted"])
        self.kills.append(kill)
        logger.info("SIGKILLed %s", kill)
        click.echo(
            f"SIGKILL worker {worker} (pid {kill.pid}) at model version "
            f"{kill.version}, {kill.accepted}/{status['run']['minibatches']} "
            "updates accepted"
        )

    def _busy_worker(self, pids: dict[str, int]) -> str:
        """A worker running a training task, else the first one."""
        processing = self.client.processing()
        for worker in sorted(pids):
            if any("ftps-train" in str(k) for k in processing.get(worker, ())):
                return worker
        return min(pids)


def _exactly_once(rows: list[dict], run: int, minibatches: int) -> dict[str, int]:
    """Count the run's global-dataset rows: applied, distinct, duplicated ids."""
    prefix = f"{run}:"
    counts = Counter(r["update_id"] for r in rows if r["update_id"].startswith(prefix))
    applied = sum(counts.values())
    return {
        "applied": applied,
        "distinct": len(counts),
        "duplicates": sum(1 for c in counts.values() if c > 1),
        "missing": max(0, minibatches - len(counts)),
        "ok": applied == len(counts) == minibatches,
    }


def _sklearn_accuracy(X_train, X_test, y_train, y_test) -> float:
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(max_iter=2000).fit(X_train, y_train)
    return float(clf.score(X_test, y_test))


def _demo_report(
    *,
    model: Model,
    mode: str,
    ftps_accuracy: float,
    sklearn_accuracy: float,
    check: dict[str, int],
    result: dask_ftps.TrainResult,
    kills: list[_Kill],
    wall: float,
) -> list[str]:
    """The demo's final table."""
    layers = "-".join(
        str(n) for n in (model.n_features, *model.hidden, model.n_classes)
    )
    killed = ", ".join(f"{k.worker} at v{k.version}" for k in kills)
    rows = [
        ("model", "test accuracy"),
        (f"FTPS MLP {layers} ({mode})", f"{ftps_accuracy:.4f}"),
        ("sklearn LogisticRegression", f"{sklearn_accuracy:.4f}"),
        ("", ""),
        ("updates applied / minibatches", f"{check['applied']} / {result.minibatches}"),
        ("duplicate update ids", str(check["duplicates"])),
        ("missing update ids", str(check["missing"])),
        ("exactly once", "yes" if check["ok"] else "NO"),
        ("workers killed", f"{len(kills)}" + (f" ({killed})" if kills else "")),
        ("final model version", str(result.version)),
        ("training time", f"{result.seconds:.1f} s"),
        ("updates/s", f"{check['applied'] / result.seconds:.1f}"),
        ("wall time (whole demo)", f"{wall:.1f} s"),
    ]
    width = max(len(a) for a, _ in rows) + 2
    rule = "-" * (width + 24)
    lines = [rule]
    for label, value in rows:
        lines.append(f"{label:<{width}}{value}" if label else rule)
    lines.append(rule)
    return lines


@main.command()
@click.option(
    "--epochs",
    type=click.IntRange(min=1),
    default=20,
    show_default=True,
    help="Passes over the training set.",
)
@_mode_option
@click.option(
    "--kill-worker/--no-kill-worker",
    default=True,
    show_default=True,
    help="SIGKILL a worker process about 40% into the run (mid-epoch).",
)
@click.option("--quick", is_flag=True, help="A small run for tests: 3 epochs.")
@_seed_option
@_verbose_option
def demo(
    epochs: int, mode: str, kill_worker: bool, quick: bool, seed: int, verbose: bool
) -> None:
    """Train an MLP on the digits data set while a worker is SIGKILLed.

    Starts a LocalCluster of two worker processes, hosts the parameter server
    in its scheduler, trains, kills a worker partway, then checks that every
    minibatch update was applied exactly once and compares the test accuracy
    with scikit-learn's LogisticRegression.
    """
    _setup_logging(verbose)
    epochs = 3 if quick else epochs
    start = time.perf_counter()
    X_train, X_test, y_train, y_test = _load_digits()
    model = MLP(n_features=64, hidden=(128,), n_classes=10, seed=seed)
    click.echo(
        f"digits: {len(X_train)} train / {len(X_test)} test samples; "
        f"{model.n_params()} parameters; mode {mode}; {epochs} epochs"
    )
    with _cluster(None, n_workers=2) as client:
        client.register_plugin(
            dask_ftps.ParameterServer(
                model=model, optimizer=dask_ftps.SGD(lr=0.05, momentum=0.5), mode=mode
            )
        )
        killer = _WorkerKiller(client, epochs) if kill_worker else None
        result = _train_with_killer(
            client, killer, X_train, y_train, (X_test, y_test), epochs, seed
        )
        _, params = dask_ftps.get_model(client)
        rows = dask_ftps.records(client)["global"]
    for line in _format_history(result.history):
        click.echo(line)
    check = _exactly_once(rows, result.run, result.minibatches)
    report = _demo_report(
        model=model,
        mode=mode,
        ftps_accuracy=_accuracy(model, params, X_test, y_test),
        sklearn_accuracy=_sklearn_accuracy(X_train, X_test, y_train, y_test),
        check=check,
        result=result,
        kills=[] if killer is None else killer.kills,
        wall=time.perf_counter() - start,
    )
    click.echo("\n".join(report))
    if not check["ok"]:
        raise click.ClickException(f"exactly-once check failed: {check}")


def _train_with_killer(
    client: Client,
    killer: _WorkerKiller | None,
    X_train: np.ndarray,
    y_train: np.ndarray,
    validation: tuple[np.ndarray, np.ndarray],
    epochs: int,
    seed: int,
) -> dask_ftps.TrainResult:
    """:func:`dask_ftps.train` with the worker killer running beside it."""
    if killer is not None:
        killer.start()
    try:
        result = dask_ftps.train(
            client,
            X_train,
            y_train,
            epochs=epochs,
            batch_size=32,
            seed=seed,
            validation=validation,
        )
    finally:
        if killer is not None:
            killer.stop()
    if killer is not None and killer.error is not None:
        raise click.ClickException(f"the worker killer failed: {killer.error}")
    if killer is not None and not killer.kills:
        logger.warning("Training ended before a worker could be killed")
    return result


# -- train -----------------------------------------------------------------------


@main.command()
@click.option(
    "--scheduler",
    metavar="ADDRESS",
    default=None,
    help="Scheduler to use (e.g. tcp://host:8786); default: a fresh LocalCluster.",
)
@click.option(
    "--n-workers",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="Worker processes of the fresh LocalCluster.",
)
@_mode_option
@click.option(
    "--epochs",
    type=click.IntRange(min=1),
    default=10,
    show_default=True,
    help="Passes over the training set.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=32,
    show_default=True,
    help="Most samples per minibatch.",
)
@click.option(
    "--hidden",
    default="128",
    show_default=True,
    callback=_parse_hidden,
    help="Hidden layer widths, e.g. '128' or '128,64'; '' trains softmax regression.",
)
@click.option(
    "--lr",
    type=click.FloatRange(min=0, min_open=True),
    default=0.05,
    show_default=True,
    help="SGD learning rate.",
)
@click.option(
    "--momentum",
    type=click.FloatRange(0, 1, max_open=True),
    default=0.5,
    show_default=True,
    help="SGD momentum.",
)
@_seed_option
@_verbose_option
def train(
    scheduler: str | None,
    n_workers: int,
    mode: str,
    epochs: int,
    batch_size: int,
    hidden: tuple[int, ...],
    lr: float,
    momentum: float,
    seed: int,
    verbose: bool,
) -> None:
    """Train an MLP (or softmax regression) on the digits data set.

    Registers a new parameter server on the scheduler (replacing any one it
    hosts), trains, and prints the per-epoch history and the test accuracy.
    """
    _setup_logging(verbose)
    X_train, X_test, y_train, y_test = _load_digits()
    model = _digits_model(hidden, seed)
    with _cluster(scheduler, n_workers) as client:
        client.register_plugin(
            dask_ftps.ParameterServer(
                model=model,
                optimizer=dask_ftps.SGD(lr=lr, momentum=momentum),
                mode=mode,
            )
        )
        result = dask_ftps.train(
            client,
            X_train,
            y_train,
            epochs=epochs,
            batch_size=batch_size,
            seed=seed,
            validation=(X_test, y_test),
        )
        version, params = dask_ftps.get_model(client)
    for line in _format_history(result.history):
        click.echo(line)
    accuracy = _accuracy(model, params, X_test, y_test)
    click.echo(
        f"{type(model).__name__}: test accuracy {accuracy:.4f} at model version "
        f"{version}; {result.minibatches} minibatches in {result.seconds:.1f} s "
        f"({result.minibatches / result.seconds:.1f} updates/s)"
    )


def _digits_model(hidden: tuple[int, ...], seed: int) -> Model:
    if not hidden:
        return SoftmaxRegression(n_features=64, n_classes=10, seed=seed)
    return MLP(n_features=64, hidden=hidden, n_classes=10, seed=seed)


if __name__ == "__main__":
    main()
