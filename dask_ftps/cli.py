"""The ``dask-ftps`` command: the demo, training, and reading a store offline."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import numpy as np
from click.core import ParameterSource

import dask_ftps
from dask_ftps._client import model_spec
from dask_ftps._core import MODES
from dask_ftps._data import DataError, Dataset
from dask_ftps._data import load as load_data
from dask_ftps._demo import EPOCHS as DEMO_EPOCHS
from dask_ftps._demo import (
    DemoError,
    DemoOptions,
    format_history,
    report_lines,
    run_demo,
)
from dask_ftps._exceptions import one_line
from dask_ftps.models import Model, dense_model
from dask_ftps.preload import storage_options
from dask_ftps.training._task import Classification

if TYPE_CHECKING:
    from distributed import Client

logger = logging.getLogger(__name__)

# -- shared pieces -------------------------------------------------------------


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )


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

_storage_options_option = click.option(
    "--storage-options",
    metavar="JSON",
    default=None,
    callback=storage_options,
    help="fsspec options for a URL store, as JSON (endpoint, credentials).",
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
    default=DEMO_EPOCHS,
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
@click.option(
    "--quick",
    is_flag=True,
    help="A small run for tests: 3 epochs on the original images alone.",
)
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

    Trains an MLP (64-256-10) on scikit-learn's digits, standardised, each
    training image with four copies shifted by one pixel. Starts a
    LocalCluster of two worker processes in a child process, hosts the
    parameter server in its scheduler with a local Zarr store, and trains. A
    worker is killed about 30% into the run, and the cluster's process (the
    scheduler) about 60% in. A new cluster on the same port rebuilds the run
    from the store, and training resumes. The report checks that no accepted
    update was lost and that every minibatch was applied exactly once, and
    compares the test accuracy with scikit-learn's LogisticRegression on the
    same split (fit on the original training images: the shifted copies make
    it worse) and says whether the MLP beat it.
    """
    _setup_logging(verbose)
    options = DemoOptions(
        epochs=3 if quick else epochs,
        shifted=not quick,
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

#: Most parameters a model of ``dask-ftps train`` may have (4 GB per float32 copy).
MAX_PARAMS = 10**9
#: The options ``train`` leaves to a running server it trains on.
_SERVER_OPTIONS = ("hidden", "lr", "momentum", "mode")


def _store_path(ctx: click.Context, param: click.Parameter, value: str | None):
    """``--store``: a URL as given; a local path made absolute (the scheduler
    may run in another folder)."""
    if value is None or ("://" in value and not value.startswith("file://")):
        return value
    return str(Path(value.removeprefix("file://")).expanduser().resolve())


def _output_folder(output: str | None) -> Path | None:
    """``--output``: create the folder and check that it can be written, before
    any training."""
    if output is None:
        return None
    folder = Path(output).expanduser()
    probe = folder / f".dask-ftps-write-test-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise click.ClickException(
            f"cannot write to the output folder {folder}: {e.strerror or one_line(e)}"
        ) from None
    return folder


def _check_store(store: str, storage_options: dict | None) -> bool:
    """Whether ``store`` holds a run; a damaged or foreign store is refused here,
    before a cluster starts."""
    from zarr.core.sync import sync

    from dask_ftps.preload import holds_run

    try:
        return sync(holds_run(store, storage_options))
    except (dask_ftps.FTPSError, OSError, ValueError, TypeError) as e:
        raise click.ClickException(
            f"cannot use the store {store}: {one_line(e)}"
        ) from None


def _connect(address: str, timeout: float) -> Client:
    from distributed import Client

    try:
        return Client(address, timeout=timeout)
    except (OSError, TimeoutError, ValueError, TypeError) as e:
        raise click.ClickException(
            f"cannot connect to the scheduler {address!r} within {timeout:g} s: "
            f"{one_line(e)}"
        ) from None


@contextmanager
def _cluster(
    scheduler: str | None, n_workers: int, timeout: float = 30.0
) -> Iterator[Client]:
    """A client of ``scheduler``, or of a fresh process-based LocalCluster."""
    from distributed import LocalCluster

    if scheduler is not None:
        with _connect(scheduler, timeout) as client:
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
        _connect(cluster.scheduler_address, timeout) as client,
    ):
        click.echo(
            f"LocalCluster: {n_workers} worker processes x 1 thread; "
            f"dashboard {cluster.dashboard_link}"
        )
        yield client


def _make_model(hidden: tuple[int, ...], data: Dataset, seed: int) -> Model:
    model = dense_model(data.n_features, hidden, data.n_classes, seed)
    if model.n_params() > MAX_PARAMS:
        raise click.BadParameter(
            f"{model.summary()} would have {model.n_params():.3g} parameters, more "
            f"than {MAX_PARAMS:.0e}: give narrower layers",
            param_hint="'--hidden'",
        )
    return model


def _same_store(mine: str, running: str) -> bool:
    if "://" in mine or "://" in running:
        return mine.rstrip("/") == running.rstrip("/")
    return os.path.realpath(mine) == os.path.realpath(running)


def _hosts_server(client: Client) -> bool:
    from dask_ftps._client import hosts_server

    try:
        return client.sync(hosts_server, client)
    except dask_ftps.NotRegistered as e:
        raise click.ClickException(one_line(e)) from None


def _server_to_register(
    ctx: click.Context,
    client: Client,
    data: Dataset,
    server: dask_ftps.ParameterServer,
    replace: bool,
) -> dask_ftps.ParameterServer | None:
    """The server to register, or None to train on the one the scheduler hosts.

    A server that journals to a store is never replaced without ``--replace``:
    ``train`` trains on it when its model fits the data, and refuses otherwise.
    """
    if not _hosts_server(client):
        return server
    status = dask_ftps.status(client)
    running = status.get("store")
    if running is None:
        click.echo(
            f"Replacing the scheduler's in-memory parameter server (version "
            f"{status['version']})"
        )
        return server
    if replace:
        click.echo(
            f"--replace: replacing the parameter server that journals to {running}"
        )
        return server
    if server.store is not None and not _same_store(server.store, running):
        raise click.ClickException(
            f"the scheduler's parameter server journals to {running}; refusing to "
            f"replace it with one on {server.store}: leave out --store to train on it, "
            "or pass --replace"
        )
    model = client.sync(model_spec, client)
    task = Classification.of(model)
    if task.n_features not in (None, data.n_features) or task.n_classes != (
        data.n_classes
    ):
        raise click.ClickException(
            f"the scheduler's parameter server journals to {running} and its model "
            f"({model.summary()}) takes {task.n_features} features and "
            f"{task.n_classes} classes, but the data has {data.n_features} features "
            f"and {data.n_classes} classes: refusing to replace it (--replace replaces it)"
        )
    click.echo(
        f"Training on the scheduler's parameter server: {model.summary()}, store "
        f"{running}, version {status['version']}, mode {status['mode']}"
    )
    given = [
        f"--{name}"
        for name in _SERVER_OPTIONS
        if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE
    ]
    if given:
        click.echo(
            f"  ({', '.join(given)} ignored: the server keeps its own; --replace "
            "registers a new server)"
        )
    return None


def _label_lines(data: Dataset, most: int = 10) -> list[str]:
    """The label mapping, unless the labels are their own codes (0, 1, ...)."""
    labels = data.labels()
    if labels == list(range(len(labels))):
        return []
    pairs = [f"{code}={label}" for code, label in enumerate(labels[:most])]
    more = f", ... ({len(labels)} classes)" if len(labels) > most else ""
    return [f"labels of {data.target!r} (code=label): {', '.join(pairs)}{more}"]


#: Rows predicted at once when the command scores the model.
_SCORE_ROWS = 1 << 16


def _accuracy(model: Model, params: dict[str, np.ndarray], X: Any, y: Any) -> float:
    """Share of ``X``'s rows whose predicted class is ``y``, predicted a slice of
    rows at a time (``X`` may be a large SciPy sparse matrix)."""
    n = X.shape[0]
    hits = 0
    for start in range(0, n, _SCORE_ROWS):
        rows = slice(start, start + _SCORE_ROWS)
        hits += int(
            np.count_nonzero(np.asarray(model.predict(params, X[rows])) == y[rows])
        )
    return hits / n


def _scaler(data: Dataset) -> dict[str, list[float]] | None:
    """``model.json``'s ``scaler``: the standardisation, or an svmlight file's
    max-abs scaling (divide each column by ``max_abs``), or None."""
    if data.mean is not None:
        return {"mean": data.mean.tolist(), "scale": data.scale.tolist()}
    if data.scale is not None:
        return {"max_abs": data.scale.tolist()}
    return None


def _save_output(
    folder: Path,
    data: Dataset,
    model: Model,
    version: int,
    params: dict[str, np.ndarray],
    result: dask_ftps.TrainResult,
    scores: dict[str, float],
    store: str | None,
) -> list[Path]:
    """``params.npz`` (numpy.savez) and ``model.json`` (model, labels, scaling;
    for an svmlight file, how to read more such files)."""
    params_path, meta_path = folder / "params.npz", folder / "model.json"
    meta = {
        "model": model.to_dict(),
        "version": version,
        "classes": data.labels(),
        "target": data.target,
        "features": None if data.sparse else list(data.features),
        "scaler": _scaler(data),
        "data": data.source,
        "store": store,
        "run": result.run,
        "run_name": result.run_name,
        **scores,
        "history": result.history,
    }
    if data.zero_based is not None:  # an svmlight file: its features are indices
        meta["svmlight"] = {
            "n_features": data.n_features,
            "zero_based": data.zero_based,
        }
    try:
        np.savez(params_path, **params)
        meta_path.write_text(json.dumps(meta, indent=2, default=_json_default) + "\n")
    except OSError as e:
        raise click.ClickException(
            f"cannot write to the output folder {folder}: {e.strerror or one_line(e)}"
        ) from None
    return [params_path, meta_path]


def _train_or_fail(client: Client, data: Dataset, **kwargs: Any):
    """:func:`dask_ftps.train`, its user-caused errors as one line."""
    import concurrent.futures

    validation = (data.X_test, data.y_test) if data.n_test else None
    try:
        return dask_ftps.train(
            client, data.X_train, data.y_train, validation=validation, **kwargs
        )
    except dask_ftps.FTPSError as e:
        raise click.ClickException(f"training failed: {one_line(e)}") from None
    except (OSError, TimeoutError, concurrent.futures.CancelledError) as e:
        raise click.ClickException(
            f"training stopped, the scheduler was lost or closed: "
            f"{type(e).__name__}: {one_line(e)}"
        ) from None


@main.command()
@click.argument("data_file", metavar="[DATA]", required=False)
@click.option(
    "--target",
    metavar="COLUMN",
    default=None,
    help="Label column of a .csv/.parquet DATA; default: the last column.",
)
@click.option(
    "--n-features",
    metavar="N",
    type=click.IntRange(min=1),
    default=None,
    help="svmlight DATA: its number of features, at least its highest index "
    "(+1 if zero-based); default: as many as that index needs.",
)
@click.option(
    "--test-size",
    type=click.FloatRange(0, 1, max_open=True),
    default=0.25,
    show_default=True,
    help="Share held out (stratified) to report test accuracy; 0: none.",
)
@click.option(
    "--scale/--no-scale",
    default=True,
    show_default=True,
    help="Standardise the features (scikit-learn's StandardScaler, fit on the "
    "training rows); svmlight DATA, sparse: divide each by its largest absolute "
    "value.",
)
@click.option(
    "--scheduler",
    metavar="ADDRESS",
    default=None,
    help="Scheduler to use (e.g. tcp://host:8786); default: a fresh LocalCluster.",
)
@click.option(
    "--connect-timeout",
    metavar="SECONDS",
    type=click.FloatRange(min=0, min_open=True),
    default=10.0,
    show_default=True,
    help="How long to try to reach --scheduler.",
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
@click.option(
    "--store",
    metavar="URL",
    default=None,
    callback=_store_path,
    help="Journal the server to this Zarr store (path or fsspec URL); a store "
    "that holds this model's run resumes it.",
)
@_storage_options_option
@click.option(
    "--replace",
    is_flag=True,
    help="Register a new server even over a running one that journals to a store.",
)
@click.option(
    "--run-name",
    default="",
    help="Name of the run: another name trains more on top of a finished run.",
)
@click.option(
    "-o",
    "--output",
    metavar="DIR",
    default=None,
    help="Save params.npz and model.json (labels, scaling, scores) in this folder.",
)
@_verbose_option
@click.pass_context
def train(
    ctx: click.Context,
    data_file: str | None,
    target: str | None,
    n_features: int | None,
    test_size: float,
    scale: bool,
    scheduler: str | None,
    connect_timeout: float,
    n_workers: int,
    mode: str,
    epochs: int,
    batch_size: int,
    hidden: tuple[int, ...],
    lr: float,
    momentum: float,
    seed: int,
    store: str | None,
    storage_options: dict | None,
    replace: bool,
    run_name: str,
    output: str | None,
    verbose: bool,
) -> None:
    """Train an MLP (or softmax regression) on DATA, by default on digits.

    DATA is a .npz file with arrays X (samples x features) and y (labels), a
    .csv or .parquet table whose --target column holds the labels (default: the
    last column) and whose other columns, all numeric, are the features, or an
    svmlight/libsvm file (.svm, .svmlight, .libsvm, also .gz, .bz2 or .xz
    compressed) of lines 'label index:value ...', read into memory and kept
    sparse. Labels of any type are encoded as 0, 1, ... (scikit-learn's
    LabelEncoder); the mapping is printed and saved with --output. Without
    DATA: scikit-learn's digits.

    Registers a parameter server on the scheduler (with --store, journalled to
    a Zarr store), trains, and prints the per-epoch history and the test
    accuracy. A server the scheduler already hosts is replaced if it keeps its
    model in memory only; one that journals to a store is trained on when its
    model fits the data, and never replaced without --replace.
    """
    _setup_logging(verbose)
    try:
        data = load_data(
            data_file,
            target=target,
            test_size=test_size,
            scale=scale,
            n_features=n_features,
        )
    except DataError as e:
        raise click.ClickException(str(e)) from None
    folder = _output_folder(output)
    model = _make_model(hidden, data, seed)
    try:
        server = dask_ftps.ParameterServer(
            store,
            model=model,
            optimizer=dask_ftps.SGD(lr=lr, momentum=momentum),
            mode=mode,
            storage_options=storage_options,
        )
    except (TypeError, ValueError) as e:
        raise click.ClickException(one_line(e)) from None
    if store is not None and _check_store(store, storage_options):
        click.echo(f"The store {store} holds a run: the server resumes it")
    click.echo(data.describe())
    for line in _label_lines(data):
        click.echo(line)
    with _cluster(scheduler, n_workers, connect_timeout) as client:
        to_register = _server_to_register(ctx, client, data, server, replace)
        if to_register is not None:
            try:
                client.register_plugin(to_register)
            except (dask_ftps.FTPSError, OSError, ValueError, TypeError) as e:
                raise click.ClickException(
                    f"cannot start the parameter server: {one_line(e)}"
                ) from None
        result = _train_or_fail(
            client,
            data,
            epochs=epochs,
            batch_size=batch_size,
            seed=seed,
            run_name=run_name,
        )
        status = dask_ftps.status(client)
        version, params = dask_ftps.get_model(client)
        model = client.sync(model_spec, client)
    for line in format_history(result.history):
        click.echo(line)
    if not result.trained:
        click.echo(
            f"Run {result.run} ({run_name!r}) was already finished on this server: "
            "nothing trained (--run-name NAME trains more on top of it)"
        )
    scores = {"train_accuracy": _accuracy(model, params, data.X_train, data.y_train)}
    if data.n_test:
        scores["test_accuracy"] = _accuracy(model, params, data.X_test, data.y_test)
    which = "test" if data.n_test else "training"
    speed = (
        f"; {result.minibatches} minibatches in {result.seconds:.1f} s "
        f"({result.minibatches / result.seconds:.1f} updates/s)"
        if result.trained and result.seconds > 0
        else ""
    )
    click.echo(
        f"{type(model).__name__}: {which} accuracy {scores[f'{which}_accuracy']:.4f} "
        f"at model version {version}{speed}"
    )
    if folder is not None:
        saved = _save_output(
            folder, data, model, version, params, result, scores, status.get("store")
        )
        click.echo(f"Saved {', '.join(str(p) for p in saved)}")


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
@click.option(
    "--shards",
    type=click.IntRange(min=1, max=16),
    default=1,
    show_default=True,
    help="Shard the parameter server: its shard servers run on as many worker "
    "processes with the ftps-server resource, and they are killed too.",
)
@click.option(
    "--shard-share",
    type=click.FloatRange(min=0, max=0.7),
    default=0.3,
    show_default=True,
    help="With --shards: the share of the kills that SIGKILL a shard server "
    "(0.3 of them hit a training worker, the rest the scheduler).",
)
@_verbose_option
def chaos(
    seconds: float,
    seed: int,
    mode: str,
    store: str | None,
    json_path: str | None,
    shards: int,
    shard_share: float,
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

    With --shards N the worker process serving a random shard is SIGKILLed too;
    once the scheduler serves that shard again (its kill -> served time is
    reported), the shard is checked while training goes on: committed updates
    lost 0, applied twice 0.
    """
    from dataclasses import asdict

    from dask_ftps._chaos import ChaosOptions, run_chaos

    _setup_logging(verbose)
    report = run_chaos(
        ChaosOptions(
            seconds=seconds, seed=seed, mode=mode, store=store, shards=shards,
            shard_share=shard_share,
        ),
        say=click.echo,
    )  # fmt: skip
    click.echo("\n".join(report.lines()))
    if json_path is not None:
        payload = {
            "options": asdict(report.options),
            "kills": dict(report.kills),
            "recoveries": [{**asdict(r), "lost": r.lost} for r in report.recoveries],
            "runs_finished": report.runs_finished,
            "new_clients": report.new_clients,
            "updates": report.updates,
            "lost": report.lost,
            "duplicates": report.duplicates,
            "final_exact": report.final_exact,
            "accuracy": report.accuracy,
            "wall": report.wall,
            "failures": report.failures(),
        }
        if shards > 1:
            median, longest = report.shard_served()
            payload["shard_recoveries"] = [
                {**asdict(r), "lost": r.lost} for r in report.shard_recoveries
            ]
            payload["shard_served"] = {"median": median, "max": longest}
        else:  # one server: as before
            for recovery in payload["recoveries"]:
                del recovery["shards"]
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
    """What :func:`dask_ftps.inspect` returned, as a readable table (a sharded
    store's: the whole run, then each shard's)."""
    if "shards" in info:
        lines = [
            f"store          {store} ({len(info['shards'])} shards)",
            f"run id         {info['run_id']}",
            (
                f"version        {info['version']} (the lowest shard's; shards: "
                f"{', '.join(map(str, info['versions']))})"
            ),
            f"updates        {info['updates']} committed on every shard",
            f"model          {_spec(info['model'])}",
            f"optimizer      {_spec(info['optimizer'])}",
            f"mode           {info['mode']} (staleness {info['staleness']})",
        ]
        for shard in info["shards"]:
            lines.append("")
            lines.append(f"shard {shard['shard']}:")
            lines.extend(
                "  " + line
                for line in _inspect_lines(
                    f"{store}/shards/{shard['shard']}", shard, n_rows
                )
            )
        return lines
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
