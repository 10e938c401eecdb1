"""Benchmark 1, throughput: what the parameter server costs when nothing fails.

Each worker process runs one task that loops pull+push of a fixed random float32
update for a model of 1e4, 1e5 or 1e6 parameters, exactly as
``dask_ftps.training._worker._train_shard`` does (a push that also asks for the model of
the next step, one round trip per update), so that gradient compute is left out.
Three servers run on the same cluster, interleaved, several repeats each:

- (a) a bare Dask round trip: a scheduler handler that receives the same update
  payload and answers with a same-size array (the ceiling);
- (b) the parameter server with ``store=None`` (no journal);
- (c) the parameter server with the Zarr journal on a local store (default
  settings: ``snapshot_every=100``, group commit).

Reports updates/s, payload bytes/s (update up plus model down), and the medians
of b/a and c/b.

    python -m benchmarks.throughput [--quick] [--out bench-results] [--store-dir DIR]
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distributed import get_worker
from distributed.protocol.serialize import ToPickle

from benchmarks._common import (
    Column,
    cpu_snapshot,
    cpu_usage,
    fixed_grads,
    format_table,
    local_cluster,
    median,
    ratio,
    register_fresh,
    remove_plugin,
    scratch_dir,
    script_main,
    softmax_model,
    worker_addresses,
    write_json,
)
from benchmarks._endtoend import (
    BATCH,
    COPIES,
    LR,
    EchoServer,
    digits_data,
    mlp_for,
    ray_peer,
    ray_version,
    run_echo,
    run_train,
)

logger = logging.getLogger("benchmarks.throughput")

NAME = "throughput"
VARIANTS = ("a", "b", "c")
VARIANT_NAMES = {
    "a": "bare Dask round trip",
    "b": "PS, store=None",
    "c": "PS, Zarr journal",
}


@dataclass(frozen=True)
class Config:
    sizes: tuple[int, ...]
    workers: tuple[int, ...]
    modes: tuple[str, ...]
    repeats: int
    seconds: float  # aimed length of one measurement
    warmup: int  # steps per worker left out of the timing

    @classmethod
    def make(cls, quick: bool) -> Config:
        if quick:
            return cls((10_000, 100_000), (2,), ("async",), 1, 0.3, 2)
        return cls((10_000, 100_000, 1_000_000), (2, 4), ("async", "sync"), 3, 1.0, 3)


# -- the bare round trip (a) ---------------------------------------------------------


def _windowed(send: Any, n_steps: int, warmup: int, inflight: int) -> dict:
    """Send ``n_steps`` pushes with at most ``inflight`` unanswered, through the
    worker loop's own :class:`~dask_ftps.training._worker.PushWindow`;
    ``send(step)`` returns a future of the reply."""
    from dask_ftps.training._worker import PushWindow

    window = PushWindow()
    t0 = time.time()
    for step in range(n_steps):
        if step == warmup:
            t0 = time.time()
        _, refusal = window.settle(inflight - 1)
        if refusal is not None:
            raise refusal
        window.add(send(step))
    _, refusal = window.settle(0)
    if refusal is not None:
        raise refusal
    return {"t0": t0, "t1": time.time(), "n": n_steps - warmup}


def _echo_loop(
    model: Any, shard: int, n_steps: int, warmup: int, inflight: int = 1
) -> dict:
    """(a) on a worker: the same messages as a push with ``next_step``."""
    worker = get_worker()
    grads = fixed_grads(model, seed=shard)

    async def echo(step: int) -> None:
        reply = await worker.scheduler.ftps_bench_echo(
            worker=worker.address,
            update_id=f"0:0:{shard}:{step}",
            grads=ToPickle(grads),
            incarnation=1,
            next_step=(0, step + 1),
            have_version=step,
            have_server="echo",
        )
        if reply.get("status") != "OK" or reply["params"] is None:
            raise RuntimeError(f"echo failed: {reply!r}")

    def send(step: int) -> Any:
        return asyncio.run_coroutine_threadsafe(echo(step), worker.loop.asyncio_loop)

    return _windowed(send, n_steps, warmup, inflight)


# -- the parameter server (b, c) -------------------------------------------------------


def _ps_loop(
    model: Any,
    run: tuple[str, int, str],
    shard: int,
    n_steps: int,
    warmup: int,
    inflight: int = 1,
    grads: dict | None = None,
) -> dict:
    """(b), (c) on a worker: pull once, then push with ``next_step`` like
    ``_train_shard`` (the same window of unacknowledged pushes), with a fixed
    update instead of a computed gradient (``grads``, default
    ``fixed_grads(model)``)."""
    from dask_ftps import UpdateKey
    from dask_ftps._worker_plugin import get_worker_plugin

    plugin = get_worker_plugin()
    if grads is None:
        grads = fixed_grads(model, seed=shard)
    server, run, holder = run  # every message of a run names its server, holder
    incarnation = plugin.pull(
        run, shard, 0, 0, server=server, holder=holder
    ).incarnation

    def send(step: int) -> Any:
        nxt = (0, step + 1) if step + 1 < n_steps else None
        return plugin.push_async(
            UpdateKey(run, 0, shard, step),
            grads,
            incarnation,
            nxt,
            server=server,
            holder=holder,
        )

    return _windowed(send, n_steps, warmup, inflight)


def _begin_run(
    client: Any, n_workers: int, n_steps: int, name: str = ""
) -> tuple[str, int, str]:
    """A run of ``n_steps`` per worker, as ``(server id, run, holder)`` (every
    push and pull names the holder that began the run); runs are known by name
    and spec, so one more of the same spec needs another ``name``."""
    from dask_ftps._core import RunSpec, check_reply

    spec = RunSpec((n_steps,) * n_workers, batch_size=1, epochs=1, seed=0)
    holder = f"{client.id}/{uuid.uuid4().hex[:16]}"
    reply = client.sync(
        client.scheduler.ftps_begin_run,
        spec=spec.to_dict(),
        name=name,
        holder=holder,
        live=[holder],
    )
    begun = check_reply(reply, "ftps_begin_run")
    return begun["server_id"], begun["run"], holder


def measure(
    client: Any,
    variant: str,
    model: Any,
    mode: str,
    n_steps: int,
    warmup: int,
    store_dir: Path,
    n_workers: int,
) -> dict[str, Any]:
    """One timed round of ``variant`` on every worker; updates/s and bytes/s."""
    import dask_ftps
    from dask_ftps import SGD, ParameterServer
    from dask_ftps import config as ftps_config

    # A worker can be away for a moment (a nanny restarting it): wait for all.
    client.wait_for_workers(n_workers, timeout=120)
    workers = worker_addresses(client)
    store = None
    # The window train() uses in this mode (the server tells it; the same here).
    inflight = ftps_config.get("inflight") if mode == "async" else 1
    if variant == "a":
        client.run_on_scheduler(remove_plugin, name=EchoServer.name)
        client.register_plugin(EchoServer(model))
        futures = [
            client.submit(
                _echo_loop, model, s, n_steps, warmup, inflight, workers=[w], pure=False
            )
            for s, w in enumerate(workers)
        ]
    else:
        if variant == "c":
            store = store_dir / f"run-{time.monotonic_ns()}.zarr"
        register_fresh(
            client,
            ParameterServer(
                store=None if store is None else str(store),
                model=model,
                optimizer=SGD(lr=1e-3),
                mode=mode,
            ),
        )
        run = _begin_run(client, len(workers), n_steps)
        assert dask_ftps.status(client)["inflight"] == inflight
        futures = [
            client.submit(
                _ps_loop,
                model,
                run,
                s,
                n_steps,
                warmup,
                inflight,
                workers=[w],
                pure=False,
            )
            for s, w in enumerate(workers)
        ]
    t0 = time.time()
    parts = client.gather(futures)
    wall = time.time() - t0
    if variant != "a":
        client.run_on_scheduler(remove_plugin)
    if store is not None:
        import shutil

        shutil.rmtree(store, ignore_errors=True)
    updates = sum(p["n"] for p in parts)
    seconds = max(p["t1"] for p in parts) - min(p["t0"] for p in parts)
    per_update = 2 * 4 * model.n_params()  # float32 update up, model down
    return {
        "updates": updates,
        "seconds": seconds,
        "wall": wall,
        "updates_per_s": updates / seconds,
        "bytes_per_s": updates * per_update / seconds,
    }


def _steps_for(rate: float, n_workers: int, seconds: float, warmup: int) -> int:
    return max(warmup + 5, int(rate * seconds / n_workers) + warmup)


def run(
    quick: bool = False, out: str = "bench-results", store_dir: str | None = None
) -> dict[str, Any]:
    config = Config.make(quick)
    cpu = cpu_snapshot()
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    with scratch_dir(store_dir, NAME) as stores:
        for n_workers in config.workers:
            with local_cluster(n_workers) as client:
                for size in config.sizes:
                    model = softmax_model(size)
                    for mode in config.modes:
                        rows.append(
                            _measure_point(
                                client, model, mode, n_workers, config, stores
                            )
                        )
                        _print_row(rows[-1])
    e2e = []
    with scratch_dir(store_dir, NAME) as stores:
        for n_workers in config.workers:
            e2e.extend(_endtoend_rows(config, n_workers, stores))
    elapsed = time.perf_counter() - started
    summary = _summary(rows)
    print()
    print(table(rows))
    print()
    print(summary_table(summary))
    print()
    print(format_table(E2E_TITLE, E2E_COLUMNS, e2e))
    e2e_summary = _e2e_summary(e2e)
    print()
    print(format_table("End-to-end targets", E2E_SUMMARY_COLUMNS, e2e_summary))
    payload = {
        "quick": quick,
        "cpu": cpu_usage(cpu),
        "config": {
            **config.__dict__,
            "model": "SoftmaxRegression(n_features=n/10-1, n_classes=10)",
            "optimizer": "SGD(lr=1e-3)",
            "cluster": "LocalCluster(processes=True, threads_per_worker=1)",
            "store_dir": str(stores.parent),
            "variants": VARIANT_NAMES,
            "bytes_per_update": "2 * 4 * n_params (update up, model down)",
        },
        "results": rows,
        "summary": summary,
        "endtoend": {
            "model": "MLP(64, (h,), 10), h = (n_params - 10) // 75",
            "data": f"scikit-learn digits / 16, {COPIES} copies",
            "batch_size": BATCH,
            "optimizer": f"SGD(lr={LR})",
            "variants": E2E_VARIANTS,
            "ray": ray_version(),
            "results": e2e,
            "summary": e2e_summary,
        },
        "seconds": elapsed,
    }
    write_json(out, NAME, payload)
    return payload


# -- end to end: train() ----------------------------------------------------------

E2E_VARIANTS = {
    "a": "bare Dask round trip, the same worker loop",
    "b": "train(), store=None",
    "c": "train(), Zarr journal",
    "r": "Ray actor parameter server (keeps nothing)",
}
E2E_TITLE = (
    "End to end: train() updates/s (MLP on digits, batch 64, one shard per worker; "
    "medians; ratios: median of per-repeat ratios)"
)


def _e2e_modes(config: Config) -> list[tuple[str, int]]:
    """Each mode at the default window; async also with a window of 4."""
    from dask_ftps import config as ftps_config

    default = ftps_config.get("inflight")
    out = []
    for mode in config.modes:
        out.append((mode, default if mode == "async" else 1))
        if mode == "async" and default != 4:
            out.append((mode, 4))
    return out


def _endtoend_rows(config: Config, n_workers: int, stores: Path) -> list[dict]:
    data = digits_data()
    rows = []
    peer = ray_peer(n_workers)
    try:
        with local_cluster(n_workers) as client:
            for size in config.sizes:
                model = mlp_for(size)
                for mode, window in _e2e_modes(config):
                    rows.append(
                        _endtoend_point(
                            client,
                            peer,
                            model,
                            data,
                            mode,
                            window,
                            n_workers,
                            config,
                            stores,
                        )
                    )
                    row = rows[-1]
                    logger.info(
                        "end to end %g params, %d workers, %s: %s",
                        size,
                        n_workers,
                        mode,
                        ", ".join(
                            f"{v} {row[f'{v}_updates_per_s']:.0f}"
                            for v in E2E_VARIANTS
                            if f"{v}_updates_per_s" in row
                        ),
                    )
    finally:
        if peer is not None:
            peer.close()
    return rows


def _endtoend_point(
    client: Any,
    peer: Any,
    model: Any,
    data: tuple,
    mode: str,
    inflight: int,
    n_workers: int,
    config: Config,
    stores: Path,
) -> dict[str, Any]:
    from dask import config as dask_config

    def once(variant: str, epochs: int) -> dict:
        if variant == "a":
            return run_echo(client, model, data, n_workers, epochs, inflight)
        if variant == "r":
            return peer.run(model, data, n_workers, epochs, inflight)
        store = None
        if variant == "c":
            store = stores / f"e2e-{time.monotonic_ns()}.zarr"
        with dask_config.set({"ftps.inflight": inflight}):  # read by the server
            return run_train(client, model, data, n_workers, epochs, mode, store)

    # Ray's parameter server is asynchronous: no sync column for it.
    variants = [v for v in E2E_VARIANTS if v != "r" or (peer and mode == "async")]
    # One epoch of each first: starts Ray's worker processes, warms caches, and
    # sizes the runs so each lasts about 2 * config.seconds.
    per_epoch = {v: once(v, 1)["seconds"] for v in variants}["b"]
    epochs = max(1, round(2 * config.seconds / per_epoch))
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for r in range(config.repeats):
        k = r % len(variants)
        for variant in variants[k:] + variants[:k]:  # rotated: none always first
            runs[variant].append(once(variant, epochs))
    row: dict[str, Any] = {
        "n_params": model.n_params(),
        "workers": n_workers,
        "mode": mode,
        "epochs": epochs,
        "inflight": inflight,
        "repeats": runs,
    }
    for v in variants:
        row[f"{v}_updates_per_s"] = median(m["updates_per_s"] for m in runs[v])

    def paired(top: str, bottom: str) -> float:
        if top not in runs or bottom not in runs:
            return float("nan")
        return median(
            ratio(t["updates_per_s"], b["updates_per_s"])
            for t, b in zip(runs[top], runs[bottom], strict=True)
        )

    row["c_over_b"] = paired("c", "b")
    row["b_over_a"] = paired("b", "a")
    row["c_over_r"] = paired("c", "r")
    return row


E2E_COLUMNS = (
    Column("n_params", "params", "{:.0e}"),
    Column("workers", "workers"),
    Column("mode", "mode"),
    Column("inflight", "window"),
    Column("a_updates_per_s", "(a) bare", "{:.0f}"),
    Column("b_updates_per_s", "(b) memory", "{:.0f}"),
    Column("c_updates_per_s", "(c) journal", "{:.0f}"),
    Column("r_updates_per_s", "(r) Ray", "{:.0f}"),
    Column("c_over_b", "c/b", "{:.2f}"),
    Column("c_over_r", "c/Ray", "{:.2f}"),
    Column("b_over_a", "b/a", "{:.2f}"),
)

E2E_SUMMARY_COLUMNS = (
    Column("n_params", "params", "{:.0e}"),
    Column("workers", "workers"),
    Column("mode", "mode"),
    Column("inflight", "window"),
    Column("c_over_b", "c/b", "{:.2f}"),
    Column("c_over_b_met", ">= 0.95"),
    Column("c_over_r", "c/Ray", "{:.2f}"),
    Column("c_over_r_met", ">= 1.0"),
    Column("b_over_a", "b/a", "{:.2f}"),
    Column("b_over_a_met", ">= 0.8"),
)


def _e2e_summary(rows: list[dict]) -> list[dict]:
    def met(value: float, target: float) -> bool | None:
        return None if math.isnan(value) else bool(value >= target)

    return [
        {
            "n_params": r["n_params"],
            "workers": r["workers"],
            "mode": r["mode"],
            "inflight": r["inflight"],
            "c_over_b": r["c_over_b"],
            "c_over_b_met": met(r["c_over_b"], 0.95),
            "c_over_r": r["c_over_r"],
            "c_over_r_met": met(r["c_over_r"], 1.0),
            "b_over_a": r["b_over_a"],
            "b_over_a_met": met(r["b_over_a"], 0.8),
        }
        for r in rows
    ]


def _measure_point(
    client: Any, model: Any, mode: str, n_workers: int, config: Config, stores: Path
) -> dict[str, Any]:
    """All repeats of (a), (b), (c) for one size/workers/mode, interleaved."""
    size = model.n_params()
    # A short pilot of (a) sizes the runs so each lasts about config.seconds.
    pilot = measure(
        client, "a", model, mode, config.warmup + 5, config.warmup, stores, n_workers
    )
    n_steps = _steps_for(
        pilot["updates_per_s"], n_workers, config.seconds, config.warmup
    )
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for r in range(config.repeats):
        order = VARIANTS[r % 3 :] + VARIANTS[: r % 3]  # rotate: no variant always first
        for variant in order:
            runs[variant].append(
                measure(
                    client,
                    variant,
                    model,
                    mode,
                    n_steps,
                    config.warmup,
                    stores,
                    n_workers,
                )
            )
    row: dict[str, Any] = {
        "n_params": size,
        "workers": n_workers,
        "mode": mode,
        "steps_per_worker": n_steps,
        "repeats": runs,
    }
    for v in VARIANTS:
        row[f"{v}_updates_per_s"] = median(m["updates_per_s"] for m in runs[v])
        row[f"{v}_mb_per_s"] = median(m["bytes_per_s"] for m in runs[v]) / 1e6
    # Ratios per repeat (measured back to back), then their median.
    row["b_over_a"] = median(
        ratio(b["updates_per_s"], a["updates_per_s"])
        for a, b in zip(runs["a"], runs["b"], strict=True)
    )
    row["c_over_b"] = median(
        ratio(c["updates_per_s"], b["updates_per_s"])
        for b, c in zip(runs["b"], runs["c"], strict=True)
    )
    return row


COLUMNS = (
    Column("n_params", "params", "{:.0e}"),
    Column("workers", "workers"),
    Column("mode", "mode"),
    Column("a_updates_per_s", "(a) upd/s", "{:.0f}"),
    Column("b_updates_per_s", "(b) upd/s", "{:.0f}"),
    Column("c_updates_per_s", "(c) upd/s", "{:.0f}"),
    Column("a_mb_per_s", "(a) MB/s", "{:.0f}"),
    Column("b_mb_per_s", "(b) MB/s", "{:.0f}"),
    Column("c_mb_per_s", "(c) MB/s", "{:.0f}"),
    Column("b_over_a", "b/a", "{:.2f}"),
    Column("c_over_b", "c/b", "{:.2f}"),
)


def table(rows: list[dict]) -> str:
    return format_table(
        "Throughput: pull+push updates/s and payload MB/s (medians; ratios: median "
        "of per-repeat ratios)",
        COLUMNS,
        rows,
    )


def _print_row(row: dict) -> None:
    logger.info(
        "%g params, %d workers, %s: a %.0f, b %.0f, c %.0f upd/s; b/a %.2f c/b %.2f",
        row["n_params"],
        row["workers"],
        row["mode"],
        row["a_updates_per_s"],
        row["b_updates_per_s"],
        row["c_updates_per_s"],
        row["b_over_a"],
        row["c_over_b"],
    )


def _summary(rows: list[dict]) -> list[dict]:
    """The targets: c/b >= 0.95 and b/a >= 0.8 at 1e5 and 1e6 parameters (async)."""
    out = []
    for row in rows:
        if row["n_params"] < 100_000 or row["mode"] != "async":
            continue
        out.append(
            {
                "n_params": row["n_params"],
                "workers": row["workers"],
                "b_over_a": row["b_over_a"],
                "b_over_a_target": 0.8,
                "b_over_a_met": bool(row["b_over_a"] >= 0.8),
                "c_over_b": row["c_over_b"],
                "c_over_b_target": 0.95,
                "c_over_b_met": bool(row["c_over_b"] >= 0.95),
            }
        )
    return out


def summary_table(summary: list[dict]) -> str:
    columns = (
        Column("n_params", "params", "{:.0e}"),
        Column("workers", "workers"),
        Column("b_over_a", "b/a", "{:.2f}"),
        Column("b_over_a_met", "b/a >= 0.8"),
        Column("c_over_b", "c/b", "{:.2f}"),
        Column("c_over_b_met", "c/b >= 0.95"),
    )
    return format_table("Throughput targets (async)", columns, summary)


def main(argv: list[str] | None = None) -> None:
    script_main(NAME, __doc__, run, argv)


if __name__ == "__main__":
    main()
