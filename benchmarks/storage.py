"""Benchmark 5, storage: journal bytes per update and store size over a long run.

Workers push fixed updates (as in the throughput benchmark) to a parameter server
with a local Zarr store, one run of ``chunk`` steps per worker after another, and
the store is measured after each run: bytes (apparent, and allocated on disk
with directories, as ``du`` counts them), files, and what each part holds.
Twice per model size: with retention on (the defaults: a snapshot every 100
versions, 2 snapshots kept, older payloads and rows deleted) and with retention
off (``ftps.store.snapshots-kept`` huge: nothing is deleted, so the store size is
what was written).

    python -m benchmarks.storage [--quick] [--out bench-results] [--store-dir DIR]
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask

from benchmarks._common import (
    Column,
    cpu_snapshot,
    cpu_usage,
    format_table,
    local_cluster,
    register_fresh,
    remove_plugin,
    scratch_dir,
    script_main,
    softmax_model,
    worker_addresses,
    write_json,
)
from benchmarks.throughput import _begin_run, _ps_loop

logger = logging.getLogger("benchmarks.storage")

NAME = "storage"
N_WORKERS = 2
LR, MOMENTUM = 1e-3, 0.9
PARTS = ("data", "snapshots", "ftps")  # payload arrays, snapshots, log records


@dataclass(frozen=True)
class Config:
    sizes: tuple[tuple[int, int], ...]  # (n_params, updates)
    chunk: int  # steps per worker per run

    @classmethod
    def make(cls, quick: bool) -> Config:
        if quick:
            return cls(((10_000, 240),), 60)
        return cls(((10_000, 4_000), (100_000, 2_000), (1_000_000, 450)), 75)


def measure_store(path: Path) -> dict[str, Any]:
    """Apparent bytes, allocated bytes (files and folders) and files, per part."""
    out: dict[str, Any] = {"apparent": 0, "allocated": 0, "files": 0, "dirs": 0}
    parts = {p: {"apparent": 0, "allocated": 0, "files": 0} for p in (*PARTS, "other")}
    for dirpath, dirnames, filenames in os.walk(path):
        rel = os.path.relpath(dirpath, path)
        part = rel.split(os.sep)[0] if rel != "." else "other"
        part = part if part in parts else "other"
        for name in dirnames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except FileNotFoundError:  # deleted by a trim meanwhile
                continue
            out["allocated"] += st.st_blocks * 512
            parts[part]["allocated"] += st.st_blocks * 512
            out["dirs"] += 1
        for name in filenames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except FileNotFoundError:  # deleted by a trim meanwhile
                continue
            for target in (out, parts[part]):
                target["apparent"] += st.st_size
                target["allocated"] += st.st_blocks * 512
                target["files"] += 1
    out["parts"] = parts
    return out


class StallProbe(threading.Thread):
    """Asks the scheduler for the server's status every ``interval`` s and keeps
    the reply times: a stalled event loop shows as a long one."""

    def __init__(self, client: Any, interval: float = 0.02) -> None:
        super().__init__(name="bench-stall-probe", daemon=True)
        self.client = client
        self.interval = interval
        self.latencies: list[float] = []
        self._halt = threading.Event()

    def run(self) -> None:
        from dask_ftps import status

        while not self._halt.wait(self.interval):
            t0 = time.perf_counter()
            try:
                status(self.client)
            except Exception:  # between two servers
                logger.debug("status probe failed", exc_info=True)
                continue
            self.latencies.append(time.perf_counter() - t0)

    def stop(self) -> dict[str, float]:
        self._halt.set()
        self.join()
        lat = sorted(self.latencies) or [float("nan")]
        return {
            "probes": len(self.latencies),
            "median_ms": 1e3 * lat[len(lat) // 2],
            "p99_ms": 1e3 * lat[min(len(lat) - 1, int(0.99 * len(lat)))],
            "max_ms": 1e3 * lat[-1],
        }


def _log_summary(store: Path) -> tuple[int, int, float]:
    """Records the log ever held (they are written once, never replaced), commit
    records among those kept, and the mean size of a kept record."""
    from dask_ftps._store._format import parse_log_key

    files = [p for p in (store / "ftps" / "log").iterdir() if p.is_file()]
    serials = [
        s for s in (parse_log_key(f"ftps/log/{p.name}") for p in files) if s is not None
    ]
    sizes = [p.stat().st_size for p in files]
    commits = sum(1 for p in files if b'"kind":"commit"' in p.read_bytes())
    return max(serials) + 1, commits, sum(sizes) / max(1, len(sizes))


def long_run(
    client: Any, n_params: int, updates: int, chunk: int, store: Path, retention: bool
) -> dict[str, Any]:
    from dask_ftps import SGD, ParameterServer, status

    model = softmax_model(n_params)
    kept = 2 if retention else 10**9
    with dask.config.set({"ftps.store.snapshots-kept": kept}):  # the scheduler is here
        register_fresh(
            client,
            ParameterServer(
                str(store), model=model, optimizer=SGD(lr=LR, momentum=MOMENTUM)
            ),
        )
        initial = measure_store(store)
        samples = [{"updates": 0, "t": 0.0, **_flat(initial)}]
        workers = worker_addresses(client)
        probe = StallProbe(client)
        probe.start()
        t0 = time.perf_counter()
        done = 0
        while done < updates:
            run = _begin_run(client, len(workers), chunk, name=f"chunk-{done}")
            futures = [
                client.submit(
                    _ps_loop, model, run, s, chunk, 0, workers=[w], pure=False
                )
                for s, w in enumerate(workers)
            ]
            client.gather(futures)
            done = status(client)["updates"]
            samples.append(
                {
                    "updates": done,
                    "t": time.perf_counter() - t0,
                    **_flat(measure_store(store)),
                }
            )
        seconds = time.perf_counter() - t0
        time.sleep(0.5)  # let a snapshot in flight finish before the last look
        stalls = probe.stop()
        final = measure_store(store)
        info = status(client)
        client.run_on_scheduler(remove_plugin)
    records, kept_commits, record_size = _log_summary(store)
    grown = final["apparent"] - initial["apparent"]
    per_update = {
        part: (final["parts"][part]["apparent"] - initial["parts"][part]["apparent"])
        / done
        for part in PARTS
    }
    # Log records are written once; trims delete old ones, so count them by serial.
    records_written = records * record_size
    row = {
        "n_params": n_params,
        "retention": retention,
        "updates": done,
        "seconds": seconds,
        "update_bytes": 4 * n_params,
        "snapshots": info["snapshots"],
        "records": records,
        "updates_per_record": done / max(1, records),
        "final_apparent_mb": final["apparent"] / 1e6,
        "final_allocated_mb": final["allocated"] / 1e6,
        "max_apparent_mb": max(s["apparent"] for s in samples) / 1e6,
        "max_allocated_mb": max(s["allocated"] for s in samples) / 1e6,
        "final_files": final["files"],
        "record_bytes": record_size,
        "kept_commit_records": kept_commits,
        "status_latency": stalls,
        "status_p99_ms": stalls["p99_ms"],
        "status_max_ms": stalls["max_ms"],
        "samples": samples,
        "final": final,
    }
    if not retention:  # with retention, the growth says nothing per update
        row.update(
            {
                "bytes_per_update": grown / done,
                "allocated_per_update": (final["allocated"] - initial["allocated"])
                / done,
                "parts_per_update": per_update,
                "record_bytes_per_update": records_written / done,
                "written_per_update": grown / done,
            }
        )
    logger.info(
        "%g params, retention %s: %d updates, %.1f MB on disk (max %.1f), "
        "%s bytes/update",
        n_params,
        retention,
        done,
        row["final_allocated_mb"],
        row["max_allocated_mb"],
        row.get("bytes_per_update"),
    )
    return row


def _flat(m: dict) -> dict:
    return {k: m[k] for k in ("apparent", "allocated", "files", "dirs")}


def run(
    quick: bool = False, out: str = "bench-results", store_dir: str | None = None
) -> dict[str, Any]:
    config = Config.make(quick)
    cpu = cpu_snapshot()
    rows = []
    started = time.perf_counter()
    with scratch_dir(store_dir, NAME) as folder, local_cluster(N_WORKERS) as client:
        for n_params, updates in config.sizes:
            for retention in (False, True):
                store = folder / f"n{n_params}-{'on' if retention else 'off'}.zarr"
                rows.append(
                    long_run(client, n_params, updates, config.chunk, store, retention)
                )
                import shutil

                shutil.rmtree(store, ignore_errors=True)
    print()
    print(table(rows))
    payload = {
        "quick": quick,
        "cpu": cpu_usage(cpu),
        "config": {
            "sizes": config.sizes,
            "chunk": config.chunk,
            "workers": N_WORKERS,
            "model": "SoftmaxRegression(n_features=n/10-1, n_classes=10)",
            "optimizer": f"SGD(lr={LR}, momentum={MOMENTUM}): snapshots hold 2n floats",
            "settings": "defaults: snapshot_every=100, snapshots-kept=2 (retention "
            "on) or 10**9 (off)",
            "store_dir": str(folder.parent),
            "bytes_per_update": "growth of the store's apparent size / updates "
            "(retention off: everything written but replaced commit documents)",
            "written_per_update": "bytes_per_update + commit documents written",
        },
        "results": rows,
        "seconds": time.perf_counter() - started,
    }
    write_json(out, NAME, payload)
    return payload


COLUMNS = (
    Column("n_params", "params", "{:.0e}"),
    Column("retention", "retention"),
    Column("updates", "updates"),
    Column("update_bytes", "update B"),
    Column("bytes_per_update", "store B/update", "{:.0f}"),
    Column("written_per_update", "written B/update", "{:.0f}"),
    Column("allocated_per_update", "on disk B/update", "{:.0f}"),
    Column("updates_per_record", "upd/log record", "{:.2f}"),
    Column("max_allocated_mb", "max on disk MB", "{:.1f}"),
    Column("final_allocated_mb", "final on disk MB", "{:.1f}"),
    Column("final_files", "files"),
    Column("status_p99_ms", "status p99 ms", "{:.0f}"),
    Column("status_max_ms", "status max ms", "{:.0f}"),
)


def table(rows: list[dict]) -> str:
    return format_table(
        "Storage: journal bytes per update and store size", COLUMNS, rows
    )


def main(argv: list[str] | None = None) -> None:
    script_main(NAME, __doc__, run, argv)


if __name__ == "__main__":
    main()
