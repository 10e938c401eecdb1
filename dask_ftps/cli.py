"""The ``dask-ftps`` command: the demo, training, and reading a store offline."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import numpy as np

import dask_ftps
from dask_ftps._core import MODES
from dask_ftps._demo import (
    DemoError,
    DemoOptions,
    accuracy,
    format_history,
    load_digits,
    report_lines,
    run_demo,
)
from dask_ftps.models import MLP, Model, SoftmaxRegression
from dask_ftps.preload import storage_options

if TYPE_CHECKING:
    from distributed import Client

logger = logging.getLogger(__name__)

# -- shared pieces -------------------------------------------------------------


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )


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


def _new_store(ctx: click.Context, param: click.Parameter, value: str | None):
    """``--store``: an absolute local path that holds nothing yet."""
    if value is None or "://" in value:
        return value
    path = Path(value).expanduser().resolve()
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise click.BadParameter(
            f"{path} already exists; the demo starts a new run: give a new path"
        )
    return str(path)


_new_store_option = click.option(
    "--store",
    metavar="PATH",
    default=None,
    callback=_new_store,
    help="Zarr store of the run (a new path); default: in a fresh temporary directory.",
)


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
    help="SIGKILL a worker process about 30% into the run (mid-epoch).",
)
@click.option(
    "--kill-scheduler/--no-kill-scheduler",
    default=True,
    show_default=True,
    help="SIGKILL the scheduler's process about 60% into the run, then restart it.",
)
@_new_store_option
@click.option("--quick", is_flag=True, help="A small run for tests: 3 epochs.")
@_seed_option
@_verbose_option
def demo(
    epochs: int,
    mode: str,
    kill_worker: bool,
    kill_scheduler: bool,
    store: str | None,
    quick: bool,
    seed: int,
    verbose: bool,
) -> None:
    """Train on digits while a worker and the scheduler are SIGKILLed.

    Starts a LocalCluster of two worker processes in a child process, hosts the
    parameter server in its scheduler with a local Zarr store, and trains. A
    worker is killed about 30% into the run, and the cluster's process (the
    scheduler) about 60% in. A new cluster on the same port rebuilds the run
    from the store, and training resumes. The report checks that no accepted
    update was lost and that every minibatch was applied exactly once, and
    compares the test accuracy with scikit-learn's LogisticRegression.
    """
    _setup_logging(verbose)
    options = DemoOptions(
        epochs=3 if quick else epochs,
        mode=mode,
        kill_worker=kill_worker,
        kill_scheduler=kill_scheduler,
        store=store,
        seed=seed,
    )
    try:
        report = run_demo(options, say=click.echo)
    except DemoError as e:
        raise click.ClickException(str(e)) from e
    click.echo("\n".join(report_lines(report)))
    if not report.ok:
        raise click.ClickException("; ".join(report.failures()))


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
    X_train, X_test, y_train, y_test = load_digits()
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
    for line in format_history(result.history):
        click.echo(line)
    score = accuracy(model, params, X_test, y_test)
    click.echo(
        f"{type(model).__name__}: test accuracy {score:.4f} at model version "
        f"{version}; {result.minibatches} minibatches in {result.seconds:.1f} s "
        f"({result.minibatches / result.seconds:.1f} updates/s)"
    )


def _digits_model(hidden: tuple[int, ...], seed: int) -> Model:
    if not hidden:
        return SoftmaxRegression(n_features=64, n_classes=10, seed=seed)
    return MLP(n_features=64, hidden=hidden, n_classes=10, seed=seed)


# -- chaos -----------------------------------------------------------------------


@main.command()
@click.option(
    "--seconds",
    type=click.FloatRange(min=5),
    default=60,
    show_default=True,
    help="How long to train under kills.",
)
@_seed_option
@_mode_option
@_new_store_option
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, writable=True),
    default=None,
    help="Also write the counts and every recovery to this JSON file.",
)
@_verbose_option
def chaos(
    seconds: float,
    seed: int,
    mode: str,
    store: str | None,
    json_path: str | None,
    verbose: bool,
) -> None:
    """Train on digits while real processes are SIGKILLed at seeded random moments.

    A scheduler (with the dask_ftps preload) and two worker processes train run
    after run. The scheduler, or a worker, is killed every 1-4 s; some
    schedulers die right before a log record (a commit's) or inside a snapshot. After
    every scheduler loss the cluster restarts on the same port and the checks
    run with training stopped: committed updates lost 0, applied twice 0,
    recover(store) == live model bit for bit; at the end the model must have
    learned. Exits 1 if any check failed.
    """
    from dataclasses import asdict

    from dask_ftps._chaos import ChaosOptions, run_chaos

    _setup_logging(verbose)
    report = run_chaos(
        ChaosOptions(seconds=seconds, seed=seed, mode=mode, store=store), say=click.echo
    )
    click.echo("\n".join(report.lines()))
    if json_path is not None:
        payload = {
            "options": asdict(report.options),
            "kills": dict(report.kills),
            "recoveries": [{**asdict(r), "lost": r.lost} for r in report.recoveries],
            "runs_finished": report.runs_finished,
            "updates": report.updates,
            "lost": report.lost,
            "duplicates": report.duplicates,
            "final_exact": report.final_exact,
            "accuracy": report.accuracy,
            "wall": report.wall,
            "failures": report.failures(),
        }
        Path(json_path).write_text(json.dumps(payload, indent=2, default=_json_default))
    if not report.ok:
        raise click.ClickException("; ".join(report.failures()))


# -- inspect and recover -------------------------------------------------------------


def _open_store_error(store: str, e: Exception) -> click.ClickException:
    return click.ClickException(f"cannot read a dask_ftps run from {store!r}: {e}")


def _spec(d: dict[str, Any]) -> str:
    """``{"kind": "SGD", "lr": 0.05}`` -> ``SGD(lr=0.05)``."""
    args = ", ".join(f"{k}={v}" for k, v in d.items() if k != "kind")
    return f"{d.get('kind', '?')}({args})"


def _json_default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple | set):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _inspect_lines(store: str, info: dict[str, Any], n_rows: int) -> list[str]:
    """What :func:`dask_ftps.inspect` returned, as a readable table."""
    rows = info["global"]
    lines = [
        f"store          {store}",
        f"run id         {info['run_id']}",
        f"version        {info['version']} (model after the last commit)",
        f"incarnation    {info['incarnation']}",
        f"updates        {info['updates']} committed",
        f"snapshots      {', '.join(map(str, info['snapshots'])) or 'none'} (versions)",
        f"model          {_spec(info['model'])}",
        f"optimizer      {_spec(info['optimizer'])}",
        f"mode           {info['mode']} (staleness {info['staleness']})",
        f"runs           {len(info['runs'])}",
    ]
    for i, run in enumerate(info["runs"]):
        name = f" {run['name']!r}" if run["name"] else ""
        lines.append(
            f"  run {i}{name}: shards {run['shard_sizes']}, batch size {run['batch_size']}, "
            f"{run['epochs']} epochs, seed {run['seed']}, from version "
            f"{run['base_version']}"
        )
    shown = rows[-n_rows:] if n_rows else []
    first = info["first_row"]
    lines.append(
        f"global dataset: rows {first}-{first + len(rows) - 1} kept "
        f"({len(rows)} rows; older ones are trimmed with old snapshots); "
        f"the last {len(shown)}:"
        if rows
        else "global dataset: no rows"
    )
    if shown:
        lines.append(f"  {'row':>7}  {'update id':<16}{'version':>9}  worker")
        start = first + len(rows) - len(shown)
        for i, row in enumerate(shown, start=start):
            lines.append(
                f"  {i:>7}  {row['update_id']:<16}{row['version']:>9}  {row['worker']}"
            )
    lines.append(f"download dataset: {len(info['download'])} rows")
    if info["download"]:
        lines.append(f"  {'version':>7}  worker")
        lines.extend(f"  {r['version']:>7}  {r['worker']}" for r in info["download"])
    if info["damaged"]:
        lines.append(
            f"damaged log records: {len(info['damaged'])} "
            f"({len(info['read_from_copies'])} read from their payload arrays' copies)"
        )
        lines.extend(f"  {d}" for d in info["damaged"])
    return lines


_storage_options_option = click.option(
    "--storage-options",
    metavar="JSON",
    default=None,
    callback=storage_options,
    help="fsspec options for a URL store, as JSON (endpoint, credentials).",
)


@main.command()
@click.argument("store")
@_storage_options_option
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON.")
@click.option(
    "--rows",
    type=click.IntRange(min=0),
    default=10,
    show_default=True,
    help="Newest global-dataset rows shown in the table.",
)
def inspect(store: str, storage_options: dict | None, as_json: bool, rows: int) -> None:
    """Show what the Zarr store STORE holds, without changing it.

    Reads the store alone: no cluster is needed, and a live parameter server
    may be writing it. STORE is a path or an fsspec URL (s3://...).
    """
    try:
        info = dask_ftps.inspect(store, storage_options)
    except (dask_ftps.FTPSError, OSError, ValueError, TypeError) as e:
        raise _open_store_error(store, e) from e
    if as_json:
        click.echo(json.dumps(info, indent=2, default=_json_default))
    else:
        click.echo("\n".join(_inspect_lines(store, info, rows)))


@main.command()
@click.argument("store")
@_storage_options_option
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, writable=True),
    default=None,
    help="Save the parameters to this .npz file (numpy.savez).",
)
def recover(store: str, storage_options: dict | None, output: str | None) -> None:
    """Rebuild the model the Zarr store STORE holds, with no cluster.

    Reads the newest snapshot and replays the committed updates after it: the
    result is bit for bit the model a live parameter server serves at that
    version.
    """
    t0 = time.perf_counter()
    try:
        version, params = dask_ftps.recover(store, storage_options)
    except (dask_ftps.FTPSError, OSError, ValueError, TypeError) as e:
        raise _open_store_error(store, e) from e
    seconds = time.perf_counter() - t0
    n_params = sum(p.size for p in params.values())
    click.echo(
        f"{store}: model version {version}, {n_params} parameters, rebuilt in "
        f"{seconds:.3f} s"
    )
    for name, value in params.items():
        click.echo(f"  {name:<8}{value.dtype!s:<10}{value.shape}")
    if output is not None:
        np.savez(output, **params)
        click.echo(f"saved to {output}")


if __name__ == "__main__":
    main()
