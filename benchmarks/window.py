"""Benchmark, push window: test accuracy and throughput per ``ftps.inflight``.

In async mode a worker may have ``ftps.inflight`` pushes unacknowledged: it
computes the next gradient from the newest model it received while they are
written, so a larger window is faster but each gradient is staler. This
measures, with ``train()`` on a LocalCluster of 2 worker processes x 1 thread
and a memory-only server (async), for each window and seed:

- ``demo``: the demo's task (``dask-ftps demo`` without the kills): digits plus
  their shifted copies, MLP (256,), SGD(0.05, momentum 0.9), 8 epochs of
  minibatches of 64; test accuracy on the held-out digits;
- ``digits``: scikit-learn's digits alone, MLP (128,), SGD(0.05, momentum 0.9),
  10 epochs of minibatches of 32;
- ``digits16``: the same with minibatches of 16 for 4 epochs: noisier steps at
  the same rate, near the edge of stability, where staleness shows first;
- the training rate (updates/s of each ``train()`` call) of both, and of a
  short run of the throughput benchmark's end-to-end MLP (1e5 parameters, no
  gradient change: the same ``train()``), windows interleaved.

Each window runs with plain steps and with ``ftps.window-scaling`` (an update
computed while ``k`` earlier pushes of its shard were unacknowledged is scaled
by ``1 / (1 + k)``). Reported per variant: the mean test accuracy over the
seeds and its difference from window 1 (the target: within 0.005, on every
task), and the median of the per-seed (per-repeat) rate ratios to window 1.

    python -m benchmarks.window [--quick] [--out bench-results]
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
    write_json,
)

logger = logging.getLogger("benchmarks.window")

NAME = "window"
N_WORKERS = 2
#: The largest loss of mean test accuracy a window may have against window 1.
TOLERANCE = 0.005


@dataclass(frozen=True)
class Task:
    """One training task: data, model, optimizer and schedule."""

    name: str
    shifted: bool
    hidden: tuple[int, ...]
    batch_size: int
    epochs: int
    lr: float = 0.05
    momentum: float = 0.9


TASKS = (
    Task("demo", shifted=True, hidden=(256,), batch_size=64, epochs=8),
    Task("digits", shifted=False, hidden=(128,), batch_size=32, epochs=10),
    # Small minibatches at the same rate: a step near the edge of stability,
    # where staleness shows first.
    Task("digits16", shifted=False, hidden=(128,), batch_size=16, epochs=4),
)


@dataclass(frozen=True)
class Variant:
    """A push window, with or without ``ftps.window-scaling``."""

    window: int
    scaled: bool

    @property
    def name(self) -> str:
        return f"{self.window}{' scaled' if self.scaled and self.window > 1 else ''}"


#: The reference every variant is compared with: a window of 1 (scaling
#: changes nothing there).
BASE = Variant(1, False)


@dataclass(frozen=True)
class Config:
    variants: tuple[Variant, ...]
    seeds: tuple[int, ...]
    epochs_scale: float  # share of each task's epochs (quick: fewer)
    rate_size: int  # parameters of the throughput MLP
    rate_repeats: int

    @classmethod
    def make(cls, quick: bool) -> Config:
        if quick:
            return cls((BASE, Variant(2, True)), (0,), 0.25, 10_000, 1)
        variants = (
            BASE,
            Variant(2, False),
            Variant(2, True),
            Variant(4, False),
            Variant(4, True),
            Variant(8, True),
        )
        return cls(variants, (0, 1, 2, 3, 4), 1.0, 100_000, 5)


def _data(task: Task):
    from dask_ftps._data import load

    return load(shifted=task.shifted)


def train_once(
    client: Any, task: Task, data: Any, variant: Variant, seed: int, epochs: int
):
    """One ``train()`` of ``task`` on a fresh memory-only server with
    ``ftps.inflight`` and ``ftps.window-scaling`` of ``variant``; its test
    accuracy and rate."""
    import dask

    import dask_ftps
    from dask_ftps.models import MLP

    model = MLP(
        n_features=data.n_features,
        hidden=task.hidden,
        n_classes=data.n_classes,
        seed=seed,
    )
    window = variant.window
    settings = {
        "ftps.inflight": window,  # read by the server
        "ftps.window-scaling": variant.scaled,  # read by train()
    }
    with dask.config.set(settings):
        register_fresh(
            client,
            dask_ftps.ParameterServer(
                None,
                model=model,
                optimizer=dask_ftps.SGD(lr=task.lr, momentum=task.momentum),
                mode="async",
            ),
        )
        status = dask_ftps.status(client)
        if status["inflight"] != window:
            raise RuntimeError(
                f"the server runs window {status['inflight']}, not {window}"
            )
        result = dask_ftps.train(
            client,
            data.X_train,
            data.y_train,
            epochs=epochs,
            batch_size=task.batch_size,
            seed=seed,
            progress=False,
        )
    _, params = dask_ftps.get_model(client)
    client.run_on_scheduler(remove_plugin)
    predicted = np.asarray(model.predict(params, data.X_test))
    return {
        "task": task.name,
        "variant": variant.name,
        "window": window,
        "scaled": variant.scaled,
        "seed": seed,
        "epochs": epochs,
        "accuracy": float(np.mean(predicted == data.y_test)),
        "updates": result.minibatches,
        "seconds": result.seconds,
        "updates_per_s": result.minibatches / result.seconds,
    }


def rate_once(client: Any, n_params: int, variant: Variant) -> dict:
    """The throughput benchmark's end-to-end ``train()`` (memory-only, async)
    with ``variant``."""
    import dask

    from benchmarks._endtoend import digits_data, mlp_for, run_train

    settings = {"ftps.inflight": variant.window, "ftps.window-scaling": variant.scaled}
    with dask.config.set(settings):
        return run_train(
            client, mlp_for(n_params), digits_data(), N_WORKERS, 1, "async", None
        )


def run(quick: bool = False, out: str = "bench-results", store_dir=None) -> dict:
    config = Config.make(quick)
    started = time.perf_counter()
    cpu = cpu_snapshot()
    runs: list[dict] = []
    rates: list[dict] = []
    with local_cluster(N_WORKERS) as client:
        for task in TASKS:
            data = _data(task)
            epochs = max(1, round(task.epochs * config.epochs_scale))
            train_once(client, task, data, BASE, 0, 1)  # warm: imports, caches
            for seed in config.seeds:
                k = seed % len(config.variants)
                order = config.variants[k:] + config.variants[:k]  # none always first
                for variant in order:
                    runs.append(train_once(client, task, data, variant, seed, epochs))
                    logger.info("%s", runs[-1])
        rate_once(client, config.rate_size, BASE)  # warm
        for r in range(config.rate_repeats):
            k = r % len(config.variants)
            for variant in config.variants[k:] + config.variants[:k]:
                rate = rate_once(client, config.rate_size, variant)
                rates.append({"variant": variant.name, "repeat": r, **rate})
    rows = summarize(runs, rates, config)
    doc = {
        "quick": quick,
        "config": {
            "variants": [v.name for v in config.variants],
            "seeds": list(config.seeds),
            "tasks": [t.__dict__ for t in TASKS],
            "epochs_scale": config.epochs_scale,
            "rate_size": config.rate_size,
            "rate_repeats": config.rate_repeats,
            "n_workers": N_WORKERS,
            "mode": "async",
            "store": None,
            "tolerance": TOLERANCE,
        },
        "results": rows,
        "runs": runs,
        "rates": rates,
        "seconds": time.perf_counter() - started,
        "cpu": cpu_usage(cpu),
    }
    print(table(rows))
    write_json(out, NAME, doc)
    return doc


def summarize(runs: list[dict], rates: list[dict], config: Config) -> list[dict]:
    """One row per variant: mean accuracy per task, its difference from a
    window of 1, and the median per-seed (per-repeat) rate ratio to it."""

    def at(task: str, variant: Variant) -> dict[int, dict]:
        return {
            r["seed"]: r
            for r in runs
            if r["task"] == task and r["variant"] == variant.name
        }

    def rate_of(variant: Variant) -> dict[int, float]:
        return {
            r["repeat"]: r["updates_per_s"]
            for r in rates
            if r["variant"] == variant.name
        }

    rows = []
    for variant in config.variants:
        row: dict[str, Any] = {
            "variant": variant.name,
            "window": variant.window,
            "scaled": variant.scaled,
        }
        ok = True
        for task in TASKS:
            mine, base = at(task.name, variant), at(task.name, BASE)
            accs = [mine[s]["accuracy"] for s in config.seeds]
            mean = statistics.fmean(accs)
            delta = mean - statistics.fmean(base[s]["accuracy"] for s in config.seeds)
            row[f"{task.name}_accuracy"] = mean
            row[f"{task.name}_accuracies"] = accs
            row[f"{task.name}_delta"] = delta
            row[f"{task.name}_rate_ratio"] = statistics.median(
                mine[s]["updates_per_s"] / base[s]["updates_per_s"]
                for s in config.seeds
            )
            ok = ok and delta >= -TOLERANCE
        mine_rates, base_rates = rate_of(variant), rate_of(BASE)
        row["rate_updates_per_s"] = statistics.median(mine_rates.values())
        row["rate_ratio"] = statistics.median(
            mine_rates[r] / base_rates[r] for r in mine_rates
        )
        row["within_tolerance"] = ok
        rows.append(row)
    return rows


COLUMNS = (
    Column("variant", "window"),
    Column("demo_accuracy", "demo acc", "{:.4f}"),
    Column("demo_delta", "demo - w1", "{:+.4f}"),
    Column("digits_accuracy", "digits acc", "{:.4f}"),
    Column("digits_delta", "digits - w1", "{:+.4f}"),
    Column("digits16_accuracy", "B16 acc", "{:.4f}"),
    Column("digits16_delta", "B16 - w1", "{:+.4f}"),
    Column("demo_rate_ratio", "demo rate / w1", "{:.2f}"),
    Column("digits_rate_ratio", "digits rate / w1", "{:.2f}"),
    Column("rate_updates_per_s", "e2e upd/s", "{:.0f}"),
    Column("rate_ratio", "e2e rate / w1", "{:.2f}"),
    Column("within_tolerance", "within 0.005"),
)


def table(rows: list[dict]) -> str:
    return format_table(
        "Push window (ftps.inflight): mean test accuracy over seeds and training "
        "rate (async, memory-only, 2 workers)",
        COLUMNS,
        rows,
    )


def main(argv: list[str] | None = None) -> None:
    script_main(NAME, __doc__, run, argv)


if __name__ == "__main__":
    main()
