"""Benchmark 7, factored updates: dense vs factored dense-layer updates (claim 11).

One ``m x m`` dense layer (a :class:`SoftmaxRegression` with ``m`` features and
``m`` classes) and minibatches of ``B`` samples. Each worker computes a real
gradient of a random minibatch once, dense or factored (``update_format``), and
pushes it again and again to a parameter server with a local Zarr journal (the
throughput benchmark's loop, the same window). Measured per point: the bytes of
one update's payload, updates/s over the whole push loop (the server multiplies
factors out before it merges them: that cost is in it), the bytes the journal
wrote per update (its payload arrays), the store's size, and the time of one
fixed-bits product on the server. Dense and factored alternate, repeated, in
one run; the ratios are of the medians.

    python -m benchmarks.factored [--quick] [--out bench-results] [--store-dir DIR]
"""

from __future__ import annotations

import logging
import statistics
import time
import uuid
from dataclasses import dataclass
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
    worker_addresses,
    write_json,
)
from benchmarks.storage import measure_store
from benchmarks.throughput import _ps_loop

logger = logging.getLogger("benchmarks.factored")

NAME = "factored"
N_WORKERS = 2
FORMATS = ("dense", "factored")


@dataclass(frozen=True)
class Config:
    layers: tuple[int, ...]  # m: the layer is m x m
    batches: tuple[int, ...]  # B
    steps: dict[int, int]  # pushes per worker, by m
    repeats: int

    @classmethod
    def make(cls, quick: bool) -> Config:
        if quick:
            return cls((256,), (16, 64), {256: 12}, 1)
        return cls((256, 1024, 4096), (16, 64, 256), {256: 120, 1024: 40, 4096: 8}, 2)


def _model(m: int) -> Any:
    from dask_ftps.models import SoftmaxRegression

    return SoftmaxRegression(n_features=m, n_classes=m, seed=0)


def _gradient(model: Any, batch: int, update_format: str, seed: int) -> dict:
    """A real minibatch gradient (random inputs and labels) in ``update_format``."""
    from dask_ftps._factored import to_host

    rng = np.random.default_rng(seed)
    X = rng.standard_normal((batch, model.n_features), dtype=np.float32)
    y = rng.integers(0, model.n_classes, batch)
    _, grads, _ = model.loss_and_grad(
        model.init_params(), X, y, update_format=update_format
    )
    return to_host(grads)


def _push_loop(
    model: Any,
    run: tuple[str, int, str],
    shard: int,
    batch: int,
    update_format: str,
    n_steps: int,
) -> dict:
    """On a worker: pull once, then push one gradient ``n_steps`` times (the
    throughput benchmark's loop, with this gradient)."""
    from dask_ftps._factored import update_nbytes

    grads = _gradient(model, batch, update_format, seed=shard)
    timed = _ps_loop(model, run, shard, n_steps, 0, 1, grads=grads)
    return {**timed, "nbytes": update_nbytes(grads)}


def _product_seconds(model: Any, batch: int) -> float:
    """Median time of the server's fixed-bits product for one factored update."""
    from dask_ftps._factored import densify

    grads = _gradient(model, batch, "factored", seed=0)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        densify(grads)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(
    client: Any, m: int, batch: int, update_format: str, n_steps: int, stores: Any
) -> dict[str, Any]:
    """One point: a fresh server and store, ``n_steps`` pushes per worker."""
    from dask_ftps import SGD, ParameterServer
    from dask_ftps._core import RunSpec, check_reply

    model = _model(m)
    client.wait_for_workers(N_WORKERS, timeout=120)
    workers = worker_addresses(client)
    store = stores / f"m{m}-b{batch}-{update_format}-{time.monotonic_ns()}.zarr"
    register_fresh(
        client,
        ParameterServer(str(store), model=model, optimizer=SGD(lr=1e-3)),
    )
    spec = RunSpec((n_steps * batch,) * len(workers), batch_size=batch, epochs=1)
    holder = f"{client.id}/{uuid.uuid4().hex[:16]}"  # every push names it
    reply = client.sync(
        client.scheduler.ftps_begin_run,
        spec=spec.to_dict(),
        name="",
        holder=holder,
        live=[holder],
    )
    begun = check_reply(reply, "ftps_begin_run")
    run = (begun["server_id"], begun["run"], holder)
    before = cpu_snapshot()
    t0 = time.perf_counter()
    futures = [
        client.submit(
            _push_loop,
            model,
            run,
            shard,
            batch,
            update_format,
            n_steps,
            workers=[w],
            pure=False,
        )
        for shard, w in enumerate(workers)
    ]
    results = client.gather(futures)
    wall = time.perf_counter() - t0
    updates = sum(r["n"] for r in results)
    size = measure_store(store)
    return {
        "m": m,
        "batch": batch,
        "format": update_format,
        "updates": updates,
        "bytes_per_update": results[0]["nbytes"],
        "updates_per_s": updates / wall,
        "journal_bytes_per_update": size["parts"]["data"]["apparent"] / updates,
        "store_bytes": size["apparent"],
        "cpu": cpu_usage(before),
    }


def run(quick: bool = False, out: str = "bench-results", store_dir=None) -> dict:
    config = Config.make(quick)
    started = time.perf_counter()
    cpu = cpu_snapshot()
    rows: list[dict] = []
    with local_cluster(N_WORKERS) as client:
        for m in config.layers:
            for batch in config.batches:
                points: dict[str, list[dict]] = {f: [] for f in FORMATS}
                for _ in range(config.repeats):
                    for update_format in FORMATS:  # interleaved
                        with scratch_dir(store_dir, "ftps-factored-") as stores:
                            points[update_format].append(
                                measure(
                                    client,
                                    m,
                                    batch,
                                    update_format,
                                    config.steps[m],
                                    stores,
                                )
                            )
                product = _product_seconds(_model(m), batch)
                rows.append(_row(m, batch, points, product))
    doc = {
        "benchmark": NAME,
        "quick": quick,
        "config": {
            "layers": list(config.layers),
            "batches": list(config.batches),
            "steps": {str(k): v for k, v in config.steps.items()},
            "repeats": config.repeats,
            "n_workers": N_WORKERS,
        },
        "results": rows,
        "seconds": time.perf_counter() - started,
        "cpu": cpu_usage(cpu),
    }
    print(table(rows))
    write_json(out, NAME, doc)
    return doc


def _row(m: int, batch: int, points: dict[str, list[dict]], product: float) -> dict:
    med = {
        f: {
            key: statistics.median(p[key] for p in points[f])
            for key in (
                "bytes_per_update",
                "updates_per_s",
                "journal_bytes_per_update",
                "store_bytes",
            )
        }
        for f in FORMATS
    }
    dense, factored = med["dense"], med["factored"]
    pays = batch * 2 * m < m * m
    return {
        "m": m,
        "batch": batch,
        "layer": f"{m}x{m}",
        "pays": pays,
        "auto": "factored" if pays else "dense",
        "dense_kib": dense["bytes_per_update"] / 1024,
        "factored_kib": factored["bytes_per_update"] / 1024,
        "dense_rate": dense["updates_per_s"],
        "factored_rate": factored["updates_per_s"],
        "product_ms": 1e3 * product,
        "dense": dense,
        "factored": factored,
        "points": points,
        "product_s": product,
        "bytes_ratio": factored["bytes_per_update"] / dense["bytes_per_update"],
        "journal_ratio": factored["journal_bytes_per_update"]
        / dense["journal_bytes_per_update"],
        "speed_ratio": factored["updates_per_s"] / dense["updates_per_s"],
    }


COLUMNS = (
    Column("layer", "layer"),
    Column("batch", "B"),
    Column("auto", "auto sends"),
    Column("dense_kib", "dense KiB/upd", "{:.0f}"),
    Column("factored_kib", "factored KiB/upd", "{:.0f}"),
    Column("bytes_ratio", "bytes f/d", "{:.3f}"),
    Column("journal_ratio", "journal f/d", "{:.3f}"),
    Column("dense_rate", "dense upd/s", "{:.1f}"),
    Column("factored_rate", "factored upd/s", "{:.1f}"),
    Column("speed_ratio", "speed f/d", "{:.2f}"),
    Column("product_ms", "product ms", "{:.1f}"),
)


def table(rows: list[dict]) -> str:
    return format_table(
        "Factored vs dense updates of one m x m layer (journal on, 2 workers, async)",
        COLUMNS,
        rows,
    )


def main(argv: list[str] | None = None) -> None:
    script_main(NAME, __doc__, run, argv)


if __name__ == "__main__":
    main()
