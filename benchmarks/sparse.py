"""Sparse input: row-sparse updates against dense ones, the time to an accuracy
against scikit-learn and dask-ml, and a scheduler SIGKILL with a sparse store.

The data is :func:`dask_ftps.sparse_text` (power-law features, about 100
nonzero a sample, a planted linear rule) and the model
:class:`~dask_ftps.models.SoftmaxRegression`, minibatches of 64.

**Bytes and speed.** For each ``n_features`` x ``n_classes`` cell, two
variants: ``sparse`` (``ftps.update-format`` ``auto``, the default: the weight
gradient goes as :class:`~dask_ftps.RowSparse` and a worker pulls only the rows
its next minibatch reads) and ``dense`` (``ftps.update-format`` ``dense``: each
minibatch is made dense and the whole model goes both ways, the behaviour
before row-sparse updates). Per cell:

- ``payload``: the bytes of one push and one pull, from the model's own
  gradients on real minibatches of the cell's data (the sparse push:
  :func:`dask_ftps._factored.update_nbytes` of what ``loss_and_grad`` returns;
  the sparse pull: the rows :meth:`~dask_ftps.models.Model.sparse_rows` names
  x width x 4 + their int32 indices + the bias; a dense push or pull is every
  parameter, 4 bytes each);
- ``wire``: the same, measured during the cluster runs: the bytes of the
  gradients the scheduler's push handler received per push, and the bytes of
  the model replies the server sent (its ``pulls`` counter) per reply;
- ``train()`` updates/s on a ``LocalCluster`` of 2 one-thread worker processes,
  async, SGD with momentum, a local Zarr store, over the warm window of
  :func:`benchmarks._common.warm_window` (and the whole call's beside it), and
  the store's growth per update (``inspect(store)["payload_bytes"]`` over the
  updates it retains: older ones go with older snapshots).

Every variant of a cell gets one untimed warm-up ``train()`` (its first tasks
pay for imports, ``auto``'s cost measurement and the first model download),
then ``repeats`` measured ones, the variants interleaved and their order
rotated, each on a fresh server and store. Each measured run is sized from its
warm-up's rate to last about ``window_s`` seconds: the variants see the same
data (the same cell's samples, a prefix as long as its rate needs). A variant
whose model would not fit this machine sensibly is not run, and the JSON says
why (``skipped``) instead of giving numbers.

**Time to accuracy.** On one train/test split of 2^20 features and 10 classes:
dask_ftps ``train()`` (sparse, async, the same 2 workers), scikit-learn's
``SGDClassifier(loss="log_loss")`` on one core (``partial_fit``, one epoch a
call) and dask-ml's ``Incremental(SGDClassifier(loss="log_loss"))`` on a dask
array of sparse chunks (the same 2 workers). Each runs a fixed number of
epochs and is scored on the test set after every one; the clock starts with
the data in the client's memory and stops while it is scored. The target is
``TARGET_SHARE`` of the best scikit-learn reaches; each system's time to the
target is the first scored epoch at or above it. The systems are interleaved,
their order rotated over ``repeats``.

**Recovery.** A real ``dask scheduler --preload dask_ftps.preload`` (the
``dask_ftps._processes`` harness) and two worker processes train a 2^20-feature
sparse run into a store; the scheduler is SIGKILLed mid-run (its workers too:
they cannot serve a new scheduler) and a new one is started on the same port
with the preload. Measured: the SIGKILL to the model served again (the new
scheduler answers ``ftps_get_model`` with the committed version). New workers
join and the same ``train()`` call resumes the run; at the end
``recover(store)`` must equal the live ``get_model`` bit for bit and every
update id of the run must be in the global dataset exactly once.

    python -m benchmarks.sparse [--quick] [--out bench-results] [--store-dir DIR]
    python -m benchmarks.sparse --svmlight data.svm [--quick]   # the race on your file
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import shutil
import signal
import statistics
import threading
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import (
    Column,
    clocked_window,
    cpu_snapshot,
    cpu_usage,
    format_table,
    local_cluster,
    make_parser,
    print_header,
    ratio,
    register_fresh,
    remove_plugin,
    scratch_dir,
    setup_logging,
    write_json,
)

logger = logging.getLogger("benchmarks.sparse")

NAME = "sparse"
N_WORKERS = 2
BATCH = 64
#: ``sparse_text``'s ``nnz`` (features drawn per sample): repeats merge, so
#: about 100 distinct nonzero features a sample are left (96 to 105 from 2^16
#: to 2^22 features).
DRAWS = 150
VARIANTS = ("sparse", "dense")
FORMATS = {"sparse": "auto", "dense": "dense"}
#: The throughput runs' optimizer (the lazy momentum of row-sparse merges).
LR, MOMENTUM = 0.5, 0.9
#: The dense variant runs only for models of at most this many bytes of float32
#: parameters: above it every push, pull and journal entry is the whole model.
DENSE_LIMIT_BYTES = 100e6
#: A variant runs on the cluster only where this many times the model's bytes
#: fit in three quarters of the machine's memory. Measured with 2^22 x 100
#: (1.68 GB of parameters; SGD with momentum, 2 workers, a 23.5 GiB machine):
#: the scheduler at 10 GB while it registered the store and 6.8 GB after (the
#: parameters, the momentum, the first snapshot), each worker at 6.5 to 7.8 GB
#: during ``auto``'s one-off cost measurement (a float64 product of the first
#: layer's shape, although a sparse minibatch sends that layer as rows), before
#: the first update: the machine ran out of memory. A merge of rows then writes
#: the parameters and the momentum into copies of the whole matrices (the served
#: model is never changed in place), and each worker computes from a whole copy
#: of the first layer: about 17 times the model in all.
MEMORY_FACTOR = 17
#: The recovery's schedulers keep every snapshot, so that their store keeps every
#: row of the global dataset (older rows go with older snapshots).
KEEP_EVERY_ROW = {"DASK_FTPS__STORE__SNAPSHOTS_KEPT": "1000"}
#: Time to accuracy: the target is this share of scikit-learn's best.
TARGET_SHARE = 0.9


@dataclass(frozen=True)
class Race:
    """The time-to-accuracy problem and each system's settings."""

    n_features: int
    n_classes: int
    n_train: int
    n_test: int
    noise: float
    lr: float  # dask_ftps: plain SGD, as scikit-learn's
    epochs: dict[str, int]
    chunk: int  # dask-ml: samples per chunk of the dask array
    repeats: int


@dataclass(frozen=True)
class Kill:
    """The recovery run."""

    n_features: int
    n_classes: int
    n_samples: int
    epochs: int
    kill_after: int  # accepted updates before the SIGKILL
    snapshot_every: int


@dataclass(frozen=True)
class Config:
    features: tuple[int, ...]
    classes: tuple[int, ...]
    repeats: int
    window_s: float  # about how long each measured run lasts
    warm_steps: int  # minibatches per shard of a warm-up run
    min_steps: int  # minibatches of a measured run, all shards
    max_steps: int
    payload_batches: int  # minibatches the payload bytes are measured on
    race: Race
    kill: Kill

    @classmethod
    def make(cls, quick: bool) -> Config:
        if quick:
            return cls(
                features=(1 << 16,),
                classes=(10,),
                repeats=1,
                window_s=1.0,
                warm_steps=4,
                min_steps=24,
                max_steps=120,
                payload_batches=8,
                race=Race(1 << 16, 10, 10_000, 2000, 0.1, 1.0,
                          {"dask_ftps": 5, "sklearn": 5, "dask-ml": 5}, 1500, 1),
                kill=Kill(1 << 16, 10, 6400, 1, 40, 25),
            )  # fmt: skip
        return cls(
            features=(1 << 16, 1 << 18, 1 << 20, 1 << 22),
            classes=(2, 10, 100),
            repeats=3,
            window_s=4.0,
            warm_steps=12,
            min_steps=40,
            max_steps=1200,
            payload_batches=32,
            race=Race(1 << 20, 10, 40_000, 10_000, 0.1, 1.0,
                      {"dask_ftps": 6, "sklearn": 12, "dask-ml": 12}, 5000, 2),
            kill=Kill(1 << 20, 10, 24_000, 2, 250, 100),
        )  # fmt: skip


def _model(n_features: int, n_classes: int) -> Any:
    from dask_ftps.models import SoftmaxRegression

    return SoftmaxRegression(n_features=n_features, n_classes=n_classes, seed=0)


def _data(n: int, n_features: int, n_classes: int, **kw: Any) -> tuple[Any, Any]:
    import dask_ftps

    return dask_ftps.sparse_text(n, n_features, n_classes, DRAWS, **kw)


def _memory_bytes() -> float:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024.0
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def skip_reason(variant: str, model_bytes: int, memory: float) -> str | None:
    """Why ``variant`` of a model of ``model_bytes`` is not run here (None: it is)."""
    if variant == "dense" and model_bytes > DENSE_LIMIT_BYTES:
        return (
            f"dense model of {model_bytes / 1e6:.0f} MB > {DENSE_LIMIT_BYTES / 1e6:.0f}"
            " MB: every push, pull and journal entry would be the whole model"
        )
    if MEMORY_FACTOR * model_bytes > 0.75 * memory:
        return (
            f"model of {model_bytes / 1e9:.2f} GB: the cluster needs about "
            f"{MEMORY_FACTOR} x that ({MEMORY_FACTOR * model_bytes / 2**30:.1f} GiB; "
            "server: parameters, momentum and the whole-matrix copy of each merge "
            "of rows; workers: a whole first layer each and auto's float64 cost "
            "product), more than 3/4 of this machine's "
            f"{memory / 2**30:.1f} GiB"
        )
    return None


# -- payload bytes from the model's own gradients ---------------------------------


def payload_bytes(model: Any, X: Any, y: Any, n_batches: int) -> dict[str, Any]:
    """Bytes of one push and one pull, sparse and dense, on the first
    ``n_batches`` minibatches of ``X`` (median over them).

    The sparse push is what ``loss_and_grad`` returns on the sparse minibatch
    (a :class:`~dask_ftps.RowSparse` weight gradient and the dense bias); the
    sparse pull the rows ``sparse_rows`` names for it, their int32 indices and
    the rest of the model whole (what the server sends for them). A dense push
    and pull hold every parameter. The weights' values change no size: the
    gradient is taken at a zero matrix (pages of which are never touched).
    """
    from dask_ftps import RowSparse
    from dask_ftps._factored import update_nbytes

    shapes = model.param_shapes()
    params = {name: np.zeros(shape, np.float32) for name, shape in shapes.items()}
    dense = 4 * model.n_params()
    push, pull, rows = [], [], []
    for k in range(n_batches):
        xb, yb = X[k * BATCH : (k + 1) * BATCH], y[k * BATCH : (k + 1) * BATCH]
        if xb.shape[0] == 0:
            break
        _, grads, _ = model.loss_and_grad(params, xb, yb)
        push.append(update_nbytes(grads))
        wanted = model.sparse_rows(xb)
        reply = 0
        for name, shape in shapes.items():
            if name in wanted:
                idx = np.asarray(wanted[name], np.int32)
                reply += idx.nbytes + 4 * idx.size * int(np.prod(shape[1:]))
            else:
                reply += 4 * int(np.prod(shape))
        pull.append(reply)
        rows.append(sum(np.size(v) for v in wanted.values()))
        assert any(isinstance(g, RowSparse) for g in grads.values()), grads.keys()
    return {
        "minibatches": len(push),
        "rows_per_minibatch": statistics.median(rows),
        "sparse": {"push": statistics.median(push), "pull": statistics.median(pull)},
        "dense": {"push": dense, "pull": dense},
    }


# -- bytes on the wire: what the scheduler's push handler receives ------------------

_METER = "ftps-bench-push-bytes"


def start_push_meter(dask_scheduler: Any) -> None:
    """On the scheduler: add up the bytes of the gradients every ``ftps_push``
    brings (as received), until :func:`read_push_meter`. Start it after the
    server is registered and before the clock."""
    from dask_ftps._factored import update_nbytes

    read_push_meter(dask_scheduler)
    handler = dask_scheduler.handlers["ftps_push"]
    counts = {"pushes": 0, "bytes": 0}

    def metered(**kwargs: Any) -> Any:
        grads = kwargs.get("grads")
        if isinstance(grads, dict):
            with contextlib.suppress(Exception):
                counts["bytes"] += update_nbytes(grads)
                counts["pushes"] += 1
        return handler(**kwargs)

    dask_scheduler.handlers["ftps_push"] = metered
    dask_scheduler.extensions[_METER] = (handler, metered, counts)


def read_push_meter(dask_scheduler: Any) -> dict[str, int]:
    """On the scheduler: stop :func:`start_push_meter`; its counts."""
    handler, metered, counts = dask_scheduler.extensions.pop(
        _METER, (None, None, {"pushes": 0, "bytes": 0})
    )
    if handler is not None and dask_scheduler.handlers.get("ftps_push") is metered:
        dask_scheduler.handlers["ftps_push"] = handler
    return dict(counts)


# -- part 1: bytes and speed -------------------------------------------------------


def train_once(
    client: Any, model: Any, data: tuple, variant: str, store: Path
) -> dict[str, Any]:
    """One ``train()`` of one epoch of ``data`` on a fresh server and ``store``,
    ``variant``'s update format; its rates, bytes on the wire and store growth."""
    import dask

    import dask_ftps
    from dask_ftps import SGD, ParameterServer

    t0 = time.perf_counter()
    register_fresh(
        client,
        ParameterServer(
            str(store), model=model, optimizer=SGD(lr=LR, momentum=MOMENTUM)
        ),
    )
    register_s = time.perf_counter() - t0
    client.run_on_scheduler(start_push_meter)
    try:
        with dask.config.set({"ftps.update-format": FORMATS[variant]}):
            result, rate = clocked_window(
                client,
                lambda: dask_ftps.train(
                    client,
                    *data,
                    epochs=1,
                    batch_size=BATCH,
                    n_shards=N_WORKERS,
                    progress=False,
                ),
            )
    finally:
        pushed = client.run_on_scheduler(read_push_meter)
    pulls = dask_ftps.status(client)["pulls"]
    client.run_on_scheduler(remove_plugin)
    info = dask_ftps.inspect(str(store))
    replies = pulls["whole"] + pulls["rows"]
    return {
        "variant": variant,
        **rate,
        "minibatches": result.minibatches,
        "register_s": register_s,
        "push_bytes": ratio(pushed["bytes"], pushed["pushes"]),
        "pull_bytes": ratio(pulls["bytes"], replies),
        "pulls": pulls,
        "store_updates": info["updates"],
        # The store keeps the updates since its older kept snapshot (the
        # others go with older snapshots): its growth per update is the
        # payload of those it keeps over their number.
        "retained_updates": info["retained_updates"],
        "sparse_updates": info["sparse_updates"],
        "payload_bytes": info["payload_bytes"],
        "store_bytes_per_update": ratio(
            info["payload_bytes"], info["retained_updates"]
        ),
    }


def _rate(m: dict, before: float = float("nan")) -> float:
    """A run's rate to size the next one from: its warm window's, else the
    larger of its whole call's and ``before``."""
    if not math.isnan(m["updates_per_s"]):
        return m["updates_per_s"]
    return max(m["call_updates_per_s"], before if not math.isnan(before) else 0.0)


def _steps(rate: float, config: Config) -> int:
    """Minibatches (all shards) for a measured run of about ``window_s`` seconds
    of warm window at ``rate`` updates/s; an even number (two shards)."""
    if not rate or math.isnan(rate):
        return config.min_steps
    # The window opens after each shard's warm-up updates and closes when the
    # first shard ends: a few more than the window itself.
    steps = int(rate * config.window_s) + 4 * N_WORKERS
    steps = max(config.min_steps, min(config.max_steps, steps))
    return steps + steps % N_WORKERS


def measure_cell(
    client: Any, n_features: int, n_classes: int, config: Config, stores: Path
) -> dict[str, Any]:
    """One cell: payload bytes, then each variant that fits: warm-up, sizing,
    then the measured runs interleaved."""
    model = _model(n_features, n_classes)
    model_bytes = 4 * model.n_params()
    memory = _memory_bytes()
    skipped = {v: skip_reason(v, model_bytes, memory) for v in VARIANTS}
    run = [v for v in VARIANTS if skipped[v] is None]
    t0 = time.perf_counter()
    n = BATCH * (config.max_steps if run else config.payload_batches)
    X, y = _data(n, n_features, n_classes, seed=0)
    generate_s = time.perf_counter() - t0
    payload = payload_bytes(model, X, y, config.payload_batches)
    row: dict[str, Any] = {
        "n_features": n_features,
        "n_classes": n_classes,
        "n_params": model.n_params(),
        "model_bytes": model_bytes,
        "nnz_per_sample": X.nnz / X.shape[0],
        "generate_s": generate_s,
        "payload": payload,
        "skipped": {v: r for v, r in skipped.items() if r is not None},
        "runs": {v: [] for v in run},
        "warmup": {},
    }
    rates: dict[str, float] = {}
    for variant in run:  # untimed: imports, auto's measurement, first download
        warm = BATCH * config.warm_steps * N_WORKERS
        m = train_once(
            client, model, (X[:warm], y[:warm]), variant, stores / f"warm-{variant}"
        )
        _drop(stores / f"warm-{variant}")
        rates[variant] = _rate(m)
        row["warmup"][variant] = m
    for r in range(config.repeats):
        k = r % max(1, len(run))
        for variant in run[k:] + run[:k]:  # interleaved, rotated
            # Sized from the variant's latest rate (the warm-up's, then the
            # measured runs'): each run's warm window lasts about window_s.
            steps = _steps(rates[variant], config)
            n = BATCH * steps
            store = stores / f"{variant}-{r}"
            m = train_once(client, model, (X[:n], y[:n]), variant, store)
            _drop(store)
            rates[variant] = _rate(m, rates[variant])
            row["runs"][variant].append(m)
            logger.info(
                "%d x %d %s: %.1f updates/s over %.1f s, push %.0f B, pull %.0f B",
                n_features,
                n_classes,
                variant,
                m["updates_per_s"],
                m["seconds"],
                m["push_bytes"],
                m["pull_bytes"],
            )
    for variant in VARIANTS:
        runs = row["runs"].get(variant) or []
        med = {
            key: _median([m[key] for m in runs])
            for key in (
                "updates_per_s",
                "call_updates_per_s",
                "push_bytes",
                "pull_bytes",
                "store_bytes_per_update",
            )
        }
        row[variant] = {
            "push_bytes": payload[variant]["push"],
            "pull_bytes": payload[variant]["pull"],
            "run": variant in run,
            "wire_push_bytes": med["push_bytes"],
            "wire_pull_bytes": med["pull_bytes"],
            "updates_per_s": med["updates_per_s"],
            "call_updates_per_s": med["call_updates_per_s"],
            "store_bytes_per_update": med["store_bytes_per_update"],
        }
    row["push_ratio"] = ratio(row["sparse"]["push_bytes"], row["dense"]["push_bytes"])
    row["pull_ratio"] = ratio(row["sparse"]["pull_bytes"], row["dense"]["pull_bytes"])
    row["speedup"] = _paired(row["runs"])
    return row


def _median(values: list[float]) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(values) if values else float("nan")


def _paired(runs: dict[str, list[dict]]) -> float:
    """Median over repeats of sparse / dense updates/s (NaN: dense not run)."""
    if not runs.get("dense") or not runs.get("sparse"):
        return float("nan")
    return _median(
        [
            ratio(s["updates_per_s"], d["updates_per_s"])
            for s, d in zip(runs["sparse"], runs["dense"], strict=True)
        ]
    )


def _drop(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


# -- part 2: time to accuracy ------------------------------------------------------


def _race_data(race: Race) -> tuple[Any, Any, Any, Any]:
    X, y = _data(
        race.n_train + race.n_test,
        race.n_features,
        race.n_classes,
        noise=race.noise,
        seed=1,
    )
    n = race.n_train
    return X[:n], X[n:], y[:n], y[n:]


def run_sklearn(race: Race, data: tuple) -> dict[str, Any]:
    """``SGDClassifier(loss="log_loss").partial_fit``, an epoch a call, one core."""
    from sklearn.linear_model import SGDClassifier

    X_train, X_test, y_train, y_test = data
    clf = SGDClassifier(loss="log_loss", random_state=0)
    classes = np.arange(race.n_classes)
    curve, clock = [], 0.0
    for epoch in range(race.epochs["sklearn"]):
        t0 = time.perf_counter()
        clf.partial_fit(X_train, y_train, classes=classes)
        clock += time.perf_counter() - t0
        curve.append(
            {"epoch": epoch, "t": clock, "accuracy": clf.score(X_test, y_test)}
        )
    return {"system": "sklearn", "ran": True, "curve": curve}


def run_ftps(client: Any, race: Race, data: tuple, store: Path) -> dict[str, Any]:
    """dask_ftps ``train()``: sparse updates, async, the cluster's 2 workers, a
    local Zarr store; scored after every epoch from a callback (the run waits
    for it: its time is taken off the clock)."""
    import dask_ftps
    from dask_ftps import SGD, ParameterServer

    X_train, X_test, y_train, y_test = data
    model = _model(race.n_features, race.n_classes)
    register_fresh(
        client, ParameterServer(str(store), model=model, optimizer=SGD(lr=race.lr))
    )
    curve: list[dict] = []
    scoring = [0.0]
    t0 = time.perf_counter()

    def score(epoch: int, record: dict) -> None:
        t = time.perf_counter()
        _, params = dask_ftps.get_model(client)
        accuracy = float(np.mean(model.predict(params, X_test) == y_test))
        curve.append(
            {"epoch": epoch, "t": t - t0 - scoring[0], "accuracy": accuracy,
             "train_accuracy": record.get("accuracy")}
        )  # fmt: skip
        scoring[0] += time.perf_counter() - t

    result = dask_ftps.train(
        client,
        X_train,
        y_train,
        epochs=race.epochs["dask_ftps"],
        batch_size=BATCH,
        n_shards=N_WORKERS,
        progress=False,
        callbacks=[score],
    )
    client.run_on_scheduler(remove_plugin)
    _drop(store)
    return {
        "system": "dask_ftps",
        "ran": True,
        "curve": curve,
        "updates": result.minibatches,
        "call_seconds": result.seconds,
    }


def run_dask_ml(client: Any, race: Race, data: tuple) -> dict[str, Any]:
    """dask-ml ``Incremental(SGDClassifier(loss="log_loss"))`` on a dask array of
    sparse (CSR) chunks, ``partial_fit`` an epoch a call, on the cluster."""
    try:
        import dask.array as da
        from dask_ml.wrappers import Incremental
    except Exception as e:  # noqa: BLE001 - recorded: not run
        return {"system": "dask-ml", "ran": False, "reason": f"import failed: {e!r}"}
    from sklearn.linear_model import SGDClassifier

    X_train, X_test, y_train, y_test = data
    classes = np.arange(race.n_classes)
    curve: list[dict] = []
    try:
        with warnings.catch_warnings():
            # Incremental ships its estimator (a dense coef_ of n_classes x
            # n_features) in the graph of every call: distributed warns of it.
            warnings.filterwarnings("ignore", message="Sending large graph")
            t0 = time.perf_counter()
            dX = da.from_array(
                X_train, chunks=(race.chunk, X_train.shape[1]), asarray=False
            )
            dy = da.from_array(y_train, chunks=(race.chunk,))
            dX, dy = client.persist([dX, dy])
            inc = Incremental(
                SGDClassifier(loss="log_loss", random_state=0), random_state=0
            )
            clock = time.perf_counter() - t0
            for epoch in range(race.epochs["dask-ml"]):
                t0 = time.perf_counter()
                inc.partial_fit(dX, dy, classes=classes)
                clock += time.perf_counter() - t0
                accuracy = float(inc.estimator_.score(X_test, y_test))
                curve.append({"epoch": epoch, "t": clock, "accuracy": accuracy})
    except Exception as e:  # recorded: not run
        logger.exception("dask-ml failed")
        return {"system": "dask-ml", "ran": False, "reason": f"failed: {e!r}"}
    return {"system": "dask-ml", "ran": True, "curve": curve, "chunk": race.chunk}


def race(
    client: Any, race: Race, stores: Path, data: tuple | None = None
) -> dict[str, Any]:
    """Every system on the same split, interleaved; the target from
    scikit-learn's best; each one's time to it. ``data`` (``X_train, X_test,
    y_train, y_test``): a user's data instead of :func:`sparse_text`'s."""
    t0 = time.perf_counter()
    if data is None:
        data = _race_data(race)
    generate_s = time.perf_counter() - t0
    systems = {
        "dask_ftps": lambda: run_ftps(client, race, data, stores / "race"),
        "sklearn": lambda: run_sklearn(race, data),
        "dask-ml": lambda: run_dask_ml(client, race, data),
    }
    names = list(systems)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for r in range(race.repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            runs[name].append(systems[name]())
            logger.info("race %s: %s", name, runs[name][-1].get("curve"))
    best = max(p["accuracy"] for run in runs["sklearn"] for p in run["curve"])
    target = TARGET_SHARE * best
    rows = []
    for name in names:
        ran = [run for run in runs[name] if run["ran"]]
        for run in ran:
            hit = next((p for p in run["curve"] if p["accuracy"] >= target), None)
            run["time_to_target_s"] = None if hit is None else hit["t"]
            run["epochs_to_target"] = None if hit is None else hit["epoch"] + 1
        times = [run["time_to_target_s"] for run in ran]
        reached = [t for t in times if t is not None]
        rows.append(
            {
                "system": name,
                "ran": bool(ran),
                "reason": None if ran else runs[name][0].get("reason"),
                "time_to_target_s": _median(reached) if reached else None,
                "reached": f"{len(reached)}/{len(runs[name])}",
                "epochs_to_target": _median(
                    [run["epochs_to_target"] for run in ran if run["epochs_to_target"]]
                )
                if reached
                else None,
                "best_accuracy": max(
                    (p["accuracy"] for run in ran for p in run["curve"]),
                    default=None,
                ),
                "seconds_per_epoch": _median(
                    [run["curve"][-1]["t"] / len(run["curve"]) for run in ran]
                )
                if ran
                else None,
            }
        )
    return {
        "config": asdict(race),
        "generate_s": generate_s,
        "nnz_per_sample": data[0].nnz / data[0].shape[0],
        "target_share": TARGET_SHARE,
        "sklearn_best": best,
        "target": target,
        "results": rows,
        "runs": runs,
    }


# -- part 3: recovery of a sparse store after a scheduler SIGKILL -------------------


def recovery(folder: Path, kill: Kill) -> dict[str, Any]:
    """Train into a store on real processes, SIGKILL the scheduler mid-run,
    restart it with the preload; time it until it serves the model; resume;
    check ``recover(store)`` against the live model and every update once.

    The schedulers keep every snapshot (:data:`KEEP_EVERY_ROW`), so that the
    store's global dataset holds every row of the run: a restarted server holds
    in memory only the rows since the snapshot it was rebuilt from
    (``records(client)`` is checked on those).
    """
    from distributed import Client

    import dask_ftps
    from benchmarks.recovery import _served
    from dask_ftps import SGD, ParameterServer
    from dask_ftps._core import RunSpec
    from dask_ftps._processes import (
        free_port,
        start_scheduler,
        start_workers,
        wait_port,
    )

    store = str(folder / "kill.zarr")
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    model = _model(kill.n_features, kill.n_classes)
    X, y = _data(kill.n_samples, kill.n_features, kill.n_classes, seed=2)
    scheduler = start_scheduler(
        port, folder / "scheduler-1.log", store=store, env=KEEP_EVERY_ROW
    )
    procs = [scheduler]
    client = None

    def train() -> Any:
        return dask_ftps.train(
            client,
            X,
            y,
            epochs=kill.epochs,
            batch_size=BATCH,
            n_shards=N_WORKERS,
            progress=False,
            run_name="sparse-kill",
        )

    try:
        wait_port(port, timeout=120)
        workers = start_workers(address, N_WORKERS, folder / "workers-1.log")
        procs.append(workers)
        client = Client(address, timeout="60s")
        client.wait_for_workers(N_WORKERS, timeout=120)
        client.register_plugin(
            ParameterServer(
                store,
                model=model,
                optimizer=SGD(lr=LR, momentum=MOMENTUM),
                snapshot_every=kill.snapshot_every,
            )
        )
        outcome: dict[str, Any] = {}

        def first_call() -> None:
            try:
                outcome["result"] = train()
            except BaseException as e:  # noqa: BLE001 - expected: the scheduler dies
                outcome["error"] = e

        thread = threading.Thread(target=first_call, daemon=True)
        thread.start()
        seen = 0
        while seen < kill.kill_after:
            if not thread.is_alive():
                raise RuntimeError(f"the run ended before the kill: {outcome}")
            seen = dask_ftps.status(client)["updates"]
            time.sleep(0.01)
        killed = time.perf_counter()
        scheduler.kill(signal.SIGKILL)
        workers.kill_group(signal.SIGKILL)  # Dask workers close with their scheduler
        scheduler.wait(30)  # gone: its port no longer answers
        restarted = start_scheduler(
            port, folder / "scheduler-2.log", store=store, env=KEEP_EVERY_ROW
        )
        procs.append(restarted)
        listening = wait_port(port, timeout=120)
        served_at, reply = asyncio.run(_served(port))
        served = {
            "kill_to_listen_s": listening - killed,
            "kill_to_served_s": served_at - killed,
            "version_served": reply["version"],
            "seen_before_kill": seen,
            "recovery": reply["status_reply"].get("recovery"),
        }
        thread.join(60)
        served["first_call"] = repr(outcome.get("error", outcome.get("result")))
        for proc in (scheduler, workers):
            proc.stop(timeout=5, kill=True)
        served["committed_version"] = dask_ftps.inspect(store)["version"]
        procs.append(start_workers(address, N_WORKERS, folder / "workers-2.log"))
        client.wait_for_workers(N_WORKERS, timeout=120)
        t0 = time.perf_counter()
        result = train()  # the same call: resumes the run
        resume_s = time.perf_counter() - t0
        live_rows = dask_ftps.records(client)["global"]
        version, live = dask_ftps.get_model(client)
        info = dask_ftps.inspect(store)
        offline_version, offline = dask_ftps.recover(store)
    finally:
        if client is not None:
            client.close(timeout=10)
        for proc in reversed(procs):
            proc.stop(timeout=5)
    (spec,) = [r for r in info["runs"] if r["name"] == "sparse-kill"]
    steps = RunSpec(tuple(spec["shard_sizes"]), spec["batch_size"], spec["epochs"])
    expected = {
        f"{result.run}:{e}:{s}:{t}"
        for e in range(kill.epochs)
        for s, n in enumerate(steps.steps)
        for t in range(n)
    }
    stored = [row["update_id"] for row in info["global"]]
    live_ids = [row["update_id"] for row in live_rows]
    exact = version == offline_version and all(
        np.array_equal(live[k], offline[k]) and live[k].dtype == offline[k].dtype
        for k in live
    )
    return {
        "config": asdict(kill),
        "snapshots_kept": int(KEEP_EVERY_ROW["DASK_FTPS__STORE__SNAPSHOTS_KEPT"]),
        "n_params": model.n_params(),
        **served,
        "served_committed": served["version_served"] == served["committed_version"],
        "resume_s": resume_s,
        "first_epoch_resumed": result.first_epoch,
        "updates": result.minibatches,
        "expected": len(expected),
        "final_version": result.version,
        # The store's global dataset: every row of the run (nothing trimmed).
        "first_row": info["first_row"],
        "stored_rows": len(stored),
        "lost": len(expected - set(stored)),
        "twice": len(stored) - len(set(stored)),
        "foreign": len(set(stored) - expected),
        # The live server's rows: those since the snapshot it was rebuilt from.
        "live_rows": len(live_ids),
        "live_twice": len(live_ids) - len(set(live_ids)),
        "live_rows_are_the_stores_last": live_ids
        == stored[len(stored) - len(live_ids) :],
        "store_updates": info["updates"],
        "sparse_updates": info["sparse_updates"],
        "payload_bytes": info["payload_bytes"],
        "snapshots": info["snapshots"],
        "exact": exact,
    }


# -- the benchmark -----------------------------------------------------------------


def run(quick: bool = False, out: str = "bench-results", store_dir=None) -> dict:
    config = Config.make(quick)
    started = time.perf_counter()
    cpu = cpu_snapshot()
    cells: list[dict] = []
    with scratch_dir(store_dir, "ftps-sparse-") as folder:
        with local_cluster(N_WORKERS) as client:
            for n_features in config.features:
                for n_classes in config.classes:
                    t0 = time.perf_counter()
                    cells.append(
                        measure_cell(client, n_features, n_classes, config, folder)
                    )
                    cells[-1]["seconds"] = time.perf_counter() - t0
                    print(_cell_line(cells[-1]), flush=True)
            t0 = time.perf_counter()
            accuracy = race(client, config.race, folder)
            accuracy["seconds"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        kill = recovery(folder, config.kill)
        kill["seconds"] = time.perf_counter() - t0
    doc = {
        "quick": quick,
        "config": {
            "features": list(config.features),
            "classes": list(config.classes),
            "repeats": config.repeats,
            "window_s": config.window_s,
            "warm_steps": config.warm_steps,
            "min_steps": config.min_steps,
            "max_steps": config.max_steps,
            "payload_batches": config.payload_batches,
            "batch": BATCH,
            "draws": DRAWS,
            "n_workers": N_WORKERS,
            "mode": "async",
            "optimizer": {"name": "SGD", "lr": LR, "momentum": MOMENTUM},
            "formats": FORMATS,
            "dense_limit_bytes": DENSE_LIMIT_BYTES,
            "memory_factor": MEMORY_FACTOR,
        },
        "cells": cells,
        "accuracy": accuracy,
        "recovery": kill,
        "seconds": time.perf_counter() - started,
        "cpu": cpu_usage(cpu),
    }
    print(table(cells))
    print(race_table(accuracy))
    print(recovery_line(kill))
    write_json(out, NAME, doc)
    return doc


def _cell_line(c: dict) -> str:
    s, d = c["sparse"], c["dense"]
    return (
        f"  {c['n_features']:>8} x {c['n_classes']:<3} push {s['push_bytes']:,.0f} B "
        f"vs {d['push_bytes']:,.0f} B, sparse {s['updates_per_s']:.1f}/s, dense "
        f"{d['updates_per_s']:.1f}/s ({c['seconds']:.0f} s)"
    )


def _flat(c: dict) -> dict:
    s, d = c["sparse"], c["dense"]
    return {
        "cell": f"2^{int(math.log2(c['n_features']))} x {c['n_classes']}",
        "params": c["n_params"],
        "push_s": s["push_bytes"] / 1024,
        "push_d": d["push_bytes"] / 1024,
        "pull_s": s["pull_bytes"] / 1024,
        "pull_d": d["pull_bytes"] / 1024,
        "rate_s": s["updates_per_s"],
        "rate_d": d["updates_per_s"] if d["run"] else None,
        "store_s": s["store_bytes_per_update"] / 1024,
        "store_d": d["store_bytes_per_update"] / 1024 if d["run"] else None,
        "speedup": c["speedup"] if d["run"] else None,
    }


def table(cells: list[dict]) -> str:
    skipped = [
        f"  not run: 2^{int(math.log2(c['n_features']))} x {c['n_classes']} "
        f"{variant}: {reason}"
        for c in cells
        for variant, reason in c["skipped"].items()
    ]
    return "\n".join([_table(cells), *skipped])


def _table(cells: list[dict]) -> str:
    return format_table(
        "Sparse vs dense updates: KiB per push / pull, train() updates/s (warm "
        "window, 2 workers, async, journal on), store KiB per update",
        [
            Column("cell", "features x classes"),
            Column("params", "params", "{:,}"),
            Column("push_s", "push sp", "{:,.1f}"),
            Column("push_d", "push dense", "{:,.0f}"),
            Column("pull_s", "pull sp", "{:,.1f}"),
            Column("pull_d", "pull dense", "{:,.0f}"),
            Column("rate_s", "upd/s sp", "{:.1f}"),
            Column("rate_d", "upd/s dense", "{:.1f}"),
            Column("speedup", "sp/dense", "{:.1f}"),
            Column("store_s", "store sp", "{:,.1f}"),
            Column("store_d", "store dense", "{:,.0f}"),
        ],
        [_flat(c) for c in cells],
    )


def race_table(accuracy: dict) -> str:
    return format_table(
        f"Time to test accuracy {accuracy['target']:.3f} "
        f"({accuracy['target_share']} x scikit-learn's best "
        f"{accuracy['sklearn_best']:.3f}; clock paused while scoring)",
        [
            Column("system", "system"),
            Column("time_to_target_s", "seconds", "{:.2f}"),
            Column("epochs_to_target", "epochs", "{:.0f}"),
            Column("reached", "reached"),
            Column("seconds_per_epoch", "s/epoch", "{:.2f}"),
            Column("best_accuracy", "best acc", "{:.3f}"),
            Column("reason", "not run because"),
        ],
        accuracy["results"],
    )


def recovery_line(kill: dict) -> str:
    return (
        f"Recovery, 2^{int(math.log2(kill['config']['n_features']))} features sparse "
        f"store: SIGKILL -> served {kill['kill_to_served_s']:.2f} s (listening "
        f"{kill['kill_to_listen_s']:.2f} s), version {kill['version_served']} = "
        f"committed {kill['committed_version']}; {kill['updates']} updates, lost "
        f"{kill['lost']}, twice {kill['twice']} (of {kill['expected']} ids in the store), "
        f"recover() == live: {kill['exact']}"
    )


def race_file(
    path: str, quick: bool = False, out: str = "bench-results", store_dir=None
) -> dict:
    """The time-to-accuracy race on a user's svmlight/libsvm file, read and
    split as ``dask-ftps train`` reads it (max-abs scaled, the same split):
    JSON ``sparse_file``."""
    from dataclasses import replace

    from dask_ftps._data import load

    dataset = load(path)
    race_config = replace(
        Config.make(quick).race,
        n_features=dataset.n_features,
        n_classes=dataset.n_classes,
        n_train=dataset.n_train,
        n_test=dataset.n_test,
        noise=float("nan"),
    )
    started = time.perf_counter()
    with (
        scratch_dir(store_dir, "ftps-sparse-file-") as folder,
        local_cluster(N_WORKERS) as client,
    ):
        accuracy = race(client, race_config, folder, dataset.split)
    doc = {
        "quick": quick,
        "file": str(path),
        "description": dataset.describe(),
        "accuracy": accuracy,
        "seconds": time.perf_counter() - started,
    }
    print(race_table(accuracy))
    write_json(out, f"{NAME}_file", doc)
    return doc


def main(argv: list[str] | None = None) -> None:
    parser = make_parser(NAME, __doc__.splitlines()[0])
    parser.add_argument(
        "--svmlight",
        metavar="FILE",
        help="run only the time-to-accuracy race, on this svmlight/libsvm file "
        "(read and split as `dask-ftps train FILE` does)",
    )
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    print_header(NAME, args.quick)
    if args.svmlight:
        race_file(args.svmlight, args.quick, args.out, args.store_dir)
    else:
        run(args.quick, args.out, args.store_dir)


if __name__ == "__main__":
    main()
