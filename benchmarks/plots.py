"""Plots of the benchmark results: reads the JSON files, writes PNGs.

    python -m benchmarks.plots [--results bench-results] [--img DIR]

``--img`` defaults to ``<results>/img``; the figures in ``docs/benchmarks.md``
were made with ``--img docs/img``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import DEFAULT_OUT, setup_logging

logger = logging.getLogger("benchmarks.plots")

COLORS = {"a": "#4c72b0", "b": "#55a868", "c": "#c44e52"}
LABELS = {
    "a": "(a) bare Dask round trip",
    "b": "(b) PS, store=None",
    "c": "(c) PS, Zarr journal",
}


def _load(results: Path, name: str) -> dict | None:
    path = results / f"{name}.json"
    if not path.exists():
        logger.info("No %s: skipping its plot", path)
        return None
    return json.loads(path.read_text())


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, img: Path, name: str) -> Path:
    img.mkdir(parents=True, exist_ok=True)
    path = img / name
    fig.savefig(path, dpi=90, bbox_inches="tight")
    _pyplot().close(fig)
    logger.info("Wrote %s", path)
    return path


def plot_throughput(doc: dict, img: Path) -> Path:
    plt = _pyplot()
    rows = doc["results"]
    panels = sorted({(r["workers"], r["mode"]) for r in rows})
    fig, axes = plt.subplots(
        1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False, sharey=True
    )
    for ax, (workers, mode) in zip(axes[0], panels, strict=True):
        sel = sorted(
            (r for r in rows if (r["workers"], r["mode"]) == (workers, mode)),
            key=lambda r: r["n_params"],
        )
        x = [r["n_params"] for r in sel]
        for v in ("a", "b", "c"):
            ax.plot(
                x,
                [r[f"{v}_updates_per_s"] for r in sel],
                "o-",
                color=COLORS[v],
                label=LABELS[v],
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{workers} workers, {mode}")
        ax.set_xlabel("model parameters")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("pull+push updates / s")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Throughput vs model size (medians)")
    return _save(fig, img, "throughput_vs_size.png")


def plot_recovery(doc: dict, img: Path) -> Path:
    plt = _pyplot()
    rows = [r for r in doc["results"] if r["case"] == "mid-interval"]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    everies = sorted({r["snapshot_every"] for r in rows})
    markers = "osD^v<>"
    for i, every in enumerate(everies):
        sel = sorted(
            (r for r in rows if r["snapshot_every"] == every),
            key=lambda r: r["n_params"],
        )
        x = [r["n_params"] for r in sel]
        m = markers[i % len(markers)]
        ax.plot(
            x,
            [r["after_listen_s"] for r in sel],
            m + "-",
            color="#c44e52",
            label=f"listen→served, every {every}",
        )
        ax.plot(
            x,
            [r["lower_bound_s"] for r in sel],
            m + "--",
            color="#4c72b0",
            label=f"lower bound (read), every {every}",
        )
    spawn = sorted(rows, key=lambda r: r["n_params"])
    ax.plot(
        [r["n_params"] for r in spawn],
        [r["served_s"] for r in spawn],
        "k.",
        label="process spawn→served (all)",
    )
    ax.axhline(2.0, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("model parameters")
    ax.set_ylabel("seconds")
    ax.set_title("Recovery time vs model size (kill half way between snapshots)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, img, "recovery_vs_size.png")


def plot_failures(doc: dict, img: Path) -> Path:
    plt = _pyplot()
    runs = doc["runs"]
    problems = list(dict.fromkeys(r["problem"] for r in runs))
    fig, axes = plt.subplots(
        1, len(problems), figsize=(6.5 * len(problems), 4.2), squeeze=False
    )
    styles = {
        ("ftps", "none"): ("#55a868", "-", "ftps, no failure"),
        ("checkpoint", "none"): ("#8172b2", "-", "checkpoint, no failure"),
        ("ftps", "worker-kills"): ("#dd8452", "-", "ftps, worker killed every T s"),
        ("ftps", "scheduler-loss"): ("#c44e52", "-", "ftps, scheduler killed"),
        ("checkpoint", "scheduler-loss"): (
            "#4c72b0",
            "--",
            "checkpoint, scheduler killed",
        ),
    }
    for ax, problem in zip(axes[0], problems, strict=True):
        shown = set()
        target = doc["config"]["problems"][problem]["target"]
        for r in runs:
            if r["problem"] != problem:
                continue
            key = (r["system"], r["scenario"])
            if key in shown or key not in styles:
                continue  # one run of each kind: the first
            shown.add(key)
            color, ls, label = styles[key]
            t = [0.0] + [p["t"] for p in r["timeline"]]
            acc = [None] + [p["accuracy"] for p in r["timeline"]]
            ax.plot(t[1:], acc[1:], ls, marker=".", color=color, label=label)
            for e in r["events"]:
                if e["kind"] == "worker":
                    ax.axvline(e["t"], color=color, lw=0.6, ls=":")
                else:
                    ax.axvspan(e["t"], e["back_at"], color=color, alpha=0.12)
                    ax.axvline(e["t"], color=color, lw=1.2)
        ax.axhline(target, color="grey", lw=0.8, ls=":")
        ax.set_title(f"{problem}: test accuracy vs time (target {target})")
        ax.set_xlabel("seconds since training started")
        ax.set_ylabel("test accuracy")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(
        "Failures marked: dotted = worker SIGKILL, solid line + band = scheduler "
        "SIGKILL until back",
        fontsize=9,
    )
    return _save(fig, img, "accuracy_vs_time.png")


def plot_storage(doc: dict, img: Path) -> Path:
    plt = _pyplot()
    rows = doc["results"]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for r in rows:
        xs = [s["updates"] for s in r["samples"]]
        ys = [s["allocated"] / 1e6 for s in r["samples"]]
        label = (
            f"{r['n_params']:.0e} params, retention {'on' if r['retention'] else 'off'}"
        )
        ax.plot(xs, ys, "-" if r["retention"] else "--", label=label)
    ax.set_xlabel("accepted updates")
    ax.set_ylabel("store on disk (MB, du)")
    ax.set_yscale("log")
    ax.set_title("Store size over a long run")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, img, "storage_size.png")


def plot_factored(doc: dict, img: Path) -> Path:
    """Bytes per update and updates/s against the batch, per layer size."""
    plt = _pyplot()
    rows = doc["results"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for i, m in enumerate(sorted({r["m"] for r in rows})):
        mine = sorted((r for r in rows if r["m"] == m), key=lambda r: r["batch"])
        xs = [r["batch"] for r in mine]
        for fmt, style in (("dense", "--"), ("factored", "-")):
            label = f"{m}x{m} {fmt}"
            left.plot(
                xs, [r[fmt]["bytes_per_update"] / 2**20 for r in mine], style,
                color=f"C{i}", marker="o", label=label,
            )  # fmt: skip
            right.plot(
                xs, [r[fmt]["updates_per_s"] for r in mine], style, color=f"C{i}",
                marker="o", label=label,
            )  # fmt: skip
    for ax, ylabel in ((left, "MiB per update"), (right, "updates/s (2 workers)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("minibatch size B")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    left.set_title("Payload: B(m+n) vs m x n numbers")
    right.set_title("Push throughput, journal on")
    handles, labels = left.get_legend_handles_labels()
    fig.legend(
        handles, labels, fontsize=8, ncol=3, loc="lower center",
        bbox_to_anchor=(0.5, -0.12),
    )  # fmt: skip
    return _save(fig, img, "factored.png")


def plot_shards(doc: dict, img: Path) -> Path:
    """The scheduler's CPU per update (above idle) and updates/s by model size,
    the server in the scheduler against 1, 2 and 4 shard servers; and the
    scaling model's updates/s against the number of shards."""
    plt = _pyplot()
    rows = doc["summary"]
    sizes = sorted({r["n_params"] for r in rows})
    variants = ["in-scheduler", "S=1", "S=2", "S=4"]
    colors = ["#c44e52", "#4c72b0", "#55a868", "#8172b2"]
    fig, axes = plt.subplots(1, 3, figsize=(13.5, 3.8))
    width = 0.2
    for i, (variant, color) in enumerate(zip(variants, colors, strict=True)):
        mine = {r["n_params"]: r for r in rows if r["variant"] == variant}
        xs = [j + (i - 1.5) * width for j in range(len(sizes))]
        label = "in the scheduler" if variant == "in-scheduler" else variant
        axes[0].bar(
            xs,
            [mine[n]["sched_cpu_ms_above_idle"] for n in sizes],
            width,
            color=color,
            label=label,
        )
        axes[1].bar(
            xs, [mine[n]["updates_s"] for n in sizes], width, color=color, label=label
        )
    for ax, title in (
        (axes[0], "scheduler CPU per update, ms (above idle)"),
        (axes[1], "updates/s, 2-core VM"),
    ):
        ax.set_xticks(range(len(sizes)), [f"{n:.0e}" for n in sizes])
        ax.set_xlabel("parameters")
        ax.set_title(title, fontsize=10)
        ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    for n_params in sorted({r["n_params"] for r in doc["scaling_model"]}):
        mine = [r for r in doc["scaling_model"] if r["n_params"] == n_params]
        axes[2].plot(
            [r["shards"] for r in mine],
            [r["updates_s"] for r in mine],
            marker="o",
            label=f"{n_params:.0e} parameters",
        )
    axes[2].set_xscale("log", base=2)
    axes[2].set_yscale("log")
    axes[2].set_xlabel("shard servers (one core and host each)")
    axes[2].set_title("model: updates/s from the per-shard cost", fontsize=10)
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, img, "shards.png")


def plot_sparse(doc: dict, img: Path) -> Path:
    """Row-sparse against dense updates: bytes per push and per pull and
    updates/s against ``n_features``, one colour per ``n_classes`` (dense
    dashed, where it ran); and the test accuracy against time of dask_ftps,
    scikit-learn and dask-ml (the first repeat of each), the target dotted."""
    plt = _pyplot()
    cells = doc["cells"]
    fig, axes = plt.subplots(1, 4, figsize=(18, 3.9))
    for i, n_classes in enumerate(sorted({c["n_classes"] for c in cells})):
        mine = sorted(
            (c for c in cells if c["n_classes"] == n_classes),
            key=lambda c: c["n_features"],
        )
        xs = [c["n_features"] for c in mine]
        for variant, style in (("sparse", "o-"), ("dense", "s--")):
            label = f"{n_classes} classes, {variant}"
            for ax, key in ((axes[0], "push_bytes"), (axes[1], "pull_bytes")):
                ax.plot(
                    xs, [c[variant][key] for c in mine], style, color=f"C{i}",
                    mfc="none" if variant == "dense" else None, label=label,
                )  # fmt: skip
            ran = [c for c in mine if c[variant]["run"]]
            axes[2].plot(
                [c["n_features"] for c in ran],
                [c[variant]["updates_per_s"] for c in ran],
                style, color=f"C{i}", mfc="none" if variant == "dense" else None,
                label=label,
            )  # fmt: skip
    for ax, title in (
        (axes[0], "bytes per push"),
        (axes[1], "bytes per pull"),
        (axes[2], "train() updates/s (2 workers, store)"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("n_features")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    race = doc["accuracy"]
    colors = {"dask_ftps": "#c44e52", "sklearn": "#4c72b0", "dask-ml": "#55a868"}
    ax = axes[3]
    for system, runs in race["runs"].items():
        ran = [r for r in runs if r.get("ran")]
        if not ran:
            continue
        curve = ran[0]["curve"]
        ax.plot(
            [p["t"] for p in curve], [p["accuracy"] for p in curve], "o-",
            color=colors.get(system), ms=3, label=system,
        )  # fmt: skip
    ax.axhline(race["target"], color="grey", lw=0.8, ls=":", label="target")
    ax.set_xscale("log")
    ax.set_xlabel("seconds (scoring excluded)")
    ax.set_ylabel("test accuracy")
    config = race["config"]
    ax.set_title(
        f"2^{int(np.log2(config['n_features']))} features, "
        f"{config['n_classes']} classes: accuracy vs time",
        fontsize=10,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return _save(fig, img, "sparse.png")


PLOTS = {
    "throughput": plot_throughput,
    "recovery": plot_recovery,
    "failures": plot_failures,
    "storage": plot_storage,
    "factored": plot_factored,
    "shards": plot_shards,
    "sparse": plot_sparse,
}


def make_plots(
    results: str | Path = DEFAULT_OUT, img: str | Path | None = None
) -> list[Path]:
    results = Path(results)
    img = Path(img) if img is not None else results / "img"
    written = []
    for name, plot in PLOTS.items():
        doc = _load(results, name)
        if doc is not None:
            written.append(plot(doc, img))
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.plots", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--results", default=DEFAULT_OUT, help="folder of the JSON files"
    )
    parser.add_argument("--img", default=None, help="folder for the PNGs")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    for path in make_plots(args.results, args.img):
        print(path)


if __name__ == "__main__":
    main()
