"""Benchmark, update format: ``ftps.update-format`` auto vs dense (and factored)
end to end.

``auto`` must never cost speed (target: auto >= 0.97 x dense). Each worker
decides per layer from what it measures on the cluster (see
:func:`dask_ftps.training._worker.factor_wins`): the bytes factors would save
at its push cost per byte, against the server's fixed-bits product (paid again
at replay when there is a store). This measures, for models whose layers the
old rule (factors wherever smaller) sent factored, ``train()`` updates/s with a
memory-only server, 2 worker processes x 1 thread, async, formats interleaved
and rotated over repeats; and what ``auto`` chose on each worker, with the
costs it measured.

    python -m benchmarks.update_format [--quick] [--out bench-results]
"""

from __future__ import annotations

import logging
import statistics
import time
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
    remove_plugin,
    script_main,
    worker_addresses,
    write_json,
)

logger = logging.getLogger("benchmarks.update_format")

NAME = "update_format"
N_WORKERS = 2
FORMATS = ("dense", "auto", "factored")
#: The least auto / dense rate the target allows.
TARGET = 0.97


@dataclass(frozen=True)
class Case:
    """A model, its minibatch size and its data size."""

    name: str
    n_features: int
    hidden: tuple[int, ...]
    n_classes: int
    batch: int
    minibatches: int  # per epoch, all shards together

    def model(self) -> Any:
        from dask_ftps.models import MLP, SoftmaxRegression

        if not self.hidden:
            return SoftmaxRegression(
                n_features=self.n_features, n_classes=self.n_classes, seed=0
            )
        return MLP(
            n_features=self.n_features,
            hidden=self.hidden,
            n_classes=self.n_classes,
            seed=0,
        )

    def data(self) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(0)
        n = self.batch * self.minibatches
        X = rng.standard_normal((n, self.n_features), dtype=np.float32)
        return X, rng.integers(0, self.n_classes, n)


@dataclass(frozen=True)
class Config:
    cases: tuple[Case, ...]
    repeats: int
    epochs: int

    @classmethod
    def make(cls, quick: bool) -> Config:
        mlp = Case("MLP 1e6", 1024, (960,), 10, 64, 40)
        wide = Case("softmax 1024x1024", 1024, (), 1024, 8, 40)
        if quick:
            return cls((Case("MLP 1e5", 256, (384,), 10, 32, 20),), 1, 1)
        return cls((mlp, wide), 7, 1)


def decide(model: Any, batch: int, replays: int) -> dict:
    """On a worker: what ``auto`` sends factored, and the costs it measured."""
    from dask_ftps.training._worker import _costs, factor_names

    t0 = time.perf_counter()
    costs = _costs(model, "auto", batch, replays)
    seconds = time.perf_counter() - t0
    chosen = factor_names(model, "auto", batch, costs)
    return {
        "factored": sorted(chosen),
        "measure_seconds": seconds,  # once per worker process (cached after)
        "seconds_per_byte": None if costs is None else costs.seconds_per_byte,
        "product_seconds": None
        if costs is None
        else {"x".join(map(str, k)): v for k, v in costs.product_seconds.items()},
        "replays": None if costs is None else costs.replays,
    }


def train_once(client: Any, case: Case, data: tuple, fmt: str, epochs: int) -> dict:
    """One ``train()`` on a fresh memory-only server with ``fmt``."""
    import dask

    import dask_ftps

    register_fresh(
        client,
        dask_ftps.ParameterServer(
            None, model=case.model(), optimizer=dask_ftps.SGD(lr=0.01)
        ),
    )
    with dask.config.set({"ftps.update-format": fmt}):  # read by train()
        result = dask_ftps.train(
            client,
            *data,
            epochs=epochs,
            batch_size=case.batch,
            n_shards=N_WORKERS,
            progress=False,
        )
    client.run_on_scheduler(remove_plugin)
    return {
        "format": fmt,
        "updates": result.minibatches,
        "seconds": result.seconds,
        "updates_per_s": result.minibatches / result.seconds,
    }


def run(quick: bool = False, out: str = "bench-results", store_dir=None) -> dict:
    config = Config.make(quick)
    started = time.perf_counter()
    cpu = cpu_snapshot()
    rows = []
    with local_cluster(N_WORKERS) as client:
        for case in config.cases:
            data = case.data()
            model = case.model()
            decisions = {
                w: client.submit(
                    decide, model, case.batch, 0, workers=[w], pure=False
                ).result()
                for w in worker_addresses(client)
            }
            train_once(client, case, data, "dense", 1)  # warm
            runs: dict[str, list[dict]] = {f: [] for f in FORMATS}
            for r in range(config.repeats):
                k = r % len(FORMATS)
                for fmt in FORMATS[k:] + FORMATS[:k]:  # rotated: none always first
                    runs[fmt].append(train_once(client, case, data, fmt, config.epochs))
                    logger.info("%s %s: %s", case.name, fmt, runs[fmt][-1])
            rows.append(_row(case, model, decisions, runs))
    doc = {
        "quick": quick,
        "config": {
            "cases": [c.__dict__ for c in config.cases],
            "repeats": config.repeats,
            "epochs": config.epochs,
            "n_workers": N_WORKERS,
            "mode": "async",
            "store": None,
            "target": TARGET,
        },
        "results": rows,
        "seconds": time.perf_counter() - started,
        "cpu": cpu_usage(cpu),
    }
    print(table(rows))
    write_json(out, NAME, doc)
    return doc


def _row(case: Case, model: Any, decisions: dict, runs: dict) -> dict:
    from dask_ftps._factored import use_factors

    shapes, dtypes = model.param_shapes(), model.param_dtypes()
    smaller = sorted(
        n
        for n in model.factorable()
        if use_factors("auto", case.batch, shapes[n], dtypes[n])
    )
    rates = {f: statistics.median(r["updates_per_s"] for r in runs[f]) for f in FORMATS}

    def paired(top: str) -> float:
        return statistics.median(
            a["updates_per_s"] / b["updates_per_s"]
            for a, b in zip(runs[top], runs["dense"], strict=True)
        )

    chosen = sorted({n for d in decisions.values() for n in d["factored"]})
    return {
        "case": case.name,
        "n_params": model.n_params(),
        "batch": case.batch,
        "smaller_as_factors": smaller,
        "auto_factors": chosen,
        "auto_sends": "factored " + ",".join(chosen) if chosen else "dense",
        "decisions": decisions,
        "dense_rate": rates["dense"],
        "auto_rate": rates["auto"],
        "factored_rate": rates["factored"],
        "auto_ratio": paired("auto"),
        "factored_ratio": paired("factored"),
        "meets_target": paired("auto") >= TARGET,
        "runs": runs,
    }


COLUMNS = (
    Column("case", "model"),
    Column("n_params", "params", "{:,}"),
    Column("batch", "B"),
    Column("auto_sends", "auto sends"),
    Column("dense_rate", "dense upd/s", "{:.1f}"),
    Column("auto_rate", "auto upd/s", "{:.1f}"),
    Column("factored_rate", "factored upd/s", "{:.1f}"),
    Column("auto_ratio", "auto/dense", "{:.2f}"),
    Column("factored_ratio", "factored/dense", "{:.2f}"),
)


def table(rows: list[dict]) -> str:
    return format_table(
        "update-format: train() updates/s by format (memory-only, async, 2 workers; "
        "medians, ratios: median of per-repeat ratios)",
        COLUMNS,
        rows,
    )


def main(argv: list[str] | None = None) -> None:
    script_main(NAME, __doc__, run, argv)


if __name__ == "__main__":
    main()
