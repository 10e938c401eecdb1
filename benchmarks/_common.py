"""Shared pieces of the benchmarks: arguments, tables, JSON, machine, clusters."""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import logging
import math
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from distributed import Client

    from dask_ftps.models import SoftmaxRegression

logger = logging.getLogger("benchmarks")

DEFAULT_OUT = "bench-results"
REPO_ROOT = Path(__file__).resolve().parent.parent


# -- command line ----------------------------------------------------------------


def make_parser(name: str, description: str) -> argparse.ArgumentParser:
    """The arguments every benchmark takes."""
    parser = argparse.ArgumentParser(
        prog=f"python -m benchmarks.{name}", description=description
    )
    add_common_arguments(parser)
    return parser


def script_main(name: str, doc: str, run: Any, argv: list[str] | None) -> None:
    """A benchmark's command line: parse the common arguments, then ``run``."""
    args = make_parser(name, doc.splitlines()[0]).parse_args(argv)
    setup_logging(args.verbose)
    print_header(name, args.quick)
    run(args.quick, args.out, args.store_dir)


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a small size that finishes in seconds (CI)",
    )
    parser.add_argument(
        "--out",
        default=DEFAULT_OUT,
        help=f"folder for the JSON results (default {DEFAULT_OUT}/)",
    )
    parser.add_argument(
        "--store-dir",
        default=None,
        help="folder for the Zarr stores the benchmark writes (default: the system "
        "temporary folder); put it on the disk you want to measure",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO")


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    logging.getLogger("benchmarks").setLevel(logging.INFO)
    if not verbose:
        # Killed workers and schedulers are the point of some benchmarks: their
        # warnings are expected noise here (and LocalCluster resets log levels).
        for handler in logging.getLogger().handlers:
            handler.addFilter(_quiet)


def _quiet(record: logging.LogRecord) -> bool:
    return record.name.startswith("benchmarks") or record.levelno >= logging.CRITICAL


# -- the warm window: the one timing rule of every throughput variant --------------

#: Minibatches (pushes) per shard left out of the warm window: the first ones pay
#: for imports, connections, caches and the first model download.
WARMUP = 3


def warm_window(stamps: Iterable[tuple[float, Any]], warmup: int = WARMUP) -> dict:
    """The rate over the warm window, from one timestamp per answered update.

    The rule, the same for every variant of every throughput benchmark (bare Dask
    loop, memory-only and journalled parameter server, Ray's actor): each update
    is stamped by its server when the server answers it (one process, one clock),
    tagged with its shard (one stream of pushes, one per worker). The window opens
    when every shard has had ``warmup`` updates answered (the latest of the
    shards' ``warmup``-th stamps) and closes when the first shard is done (the
    earliest of the shards' last stamps); the rate is the updates answered inside
    it, all shards together, over its length. Neither end of a call (starting
    tasks, the first pull, the last shard finishing alone) is in it.

    Parameters
    ----------
    stamps : iterable of (float, hashable)
        ``(time, shard)`` of each answered update, in seconds of one clock.
    warmup : int
        Updates per shard before the window opens (at least 1: the window opens
        at an update).

    Returns
    -------
    dict
        ``updates`` (answered inside the window), ``seconds`` (its length),
        ``updates_per_s`` (NaN when a shard has no update after its warm-up or
        the window is empty), ``shards`` and ``stamped`` (all stamps).
    """
    warmup = max(1, warmup)
    streams: dict[Any, list[float]] = {}
    for t, shard in stamps:
        streams.setdefault(shard, []).append(float(t))
    for times in streams.values():
        times.sort()
    stamped = sum(len(times) for times in streams.values())
    out = {
        "updates": 0,
        "seconds": float("nan"),
        "updates_per_s": float("nan"),
        "shards": len(streams),
        "stamped": stamped,
    }
    if not streams or any(len(times) <= warmup for times in streams.values()):
        return out
    t0 = max(times[warmup - 1] for times in streams.values())
    t1 = min(times[-1] for times in streams.values())
    if t1 <= t0:
        return out
    n = sum(1 for times in streams.values() for t in times if t0 < t <= t1)
    return {**out, "updates": n, "seconds": t1 - t0, "updates_per_s": n / (t1 - t0)}


def with_call_rate(window: dict, updates: int, seconds: float) -> dict:
    """A measurement: the warm window's figures (:func:`warm_window`) and the
    whole call's beside them, ``call_updates`` over ``call_seconds`` (every
    update, its start and end included)."""
    return {
        "updates": window["updates"],
        "seconds": window["seconds"],
        "updates_per_s": window["updates_per_s"],
        "call_updates": updates,
        "call_seconds": seconds,
        "call_updates_per_s": ratio(updates, seconds),
    }


#: The scheduler handlers that answer updates: the parameter server's push and
#: the bare round trip's echo (``benchmarks._endtoend.EchoServer``).
CLOCKED_OPS = ("ftps_push", "ftps_bench_echo")
_CLOCK = "ftps-bench-clock"


def _shard_of(update_id: Any) -> int | None:
    """The shard of an update id ``run:epoch:shard:step`` (None if not one)."""
    parts = str(update_id).split(":")
    return int(parts[2]) if len(parts) == 4 and parts[2].isdigit() else None


def start_clock(dask_scheduler: Any, ops: Sequence[str] = CLOCKED_OPS) -> None:
    """On the scheduler (``client.run_on_scheduler``): stamp every update that
    the handlers ``ops`` answer (``status`` OK) with the time and its shard, until
    :func:`read_clock`. Start it after the server is registered: it wraps the
    handlers registered now."""
    _stop_clock(dask_scheduler)
    stamps: list[tuple[float, int | None]] = []
    wrapped = {}
    for op in ops:
        handler = dask_scheduler.handlers.get(op)
        if handler is not None:
            wrapped[op] = (handler, _stamped(handler, stamps))
            dask_scheduler.handlers[op] = wrapped[op][1]
    dask_scheduler.extensions[_CLOCK] = (wrapped, stamps)


def read_clock(dask_scheduler: Any) -> list[tuple[float, int | None]]:
    """On the scheduler: stop the clock of :func:`start_clock` (the handlers are
    as before) and return its ``(time, shard)`` stamps."""
    return _stop_clock(dask_scheduler)


def _stop_clock(dask_scheduler: Any) -> list[tuple[float, int | None]]:
    wrapped, stamps = dask_scheduler.extensions.pop(_CLOCK, ({}, []))
    for op, (handler, stamped) in wrapped.items():
        if dask_scheduler.handlers.get(op) is stamped:
            dask_scheduler.handlers[op] = handler
    return list(stamps)


def _stamped(handler: Callable, stamps: list) -> Callable:
    clock = time.perf_counter

    async def stamped(**kwargs: Any) -> Any:
        reply = handler(**kwargs)
        if inspect.isawaitable(reply):
            reply = await reply
        if not isinstance(reply, dict) or reply.get("status", "OK") == "OK":
            stamps.append((clock(), _shard_of(kwargs.get("update_id"))))
        return reply

    stamped.__name__ = getattr(handler, "__name__", "stamped")
    return stamped


def clocked_window(
    client: Client, call: Callable[[], Any], warmup: int = WARMUP
) -> tuple[Any, dict]:
    """Run ``call()`` with the scheduler's clock on: its result, and the rate
    over the warm window and the whole call's (:func:`with_call_rate`; the
    call's updates are the stamped ones)."""
    client.run_on_scheduler(start_clock)
    t0 = time.perf_counter()
    try:
        result = call()
    finally:
        seconds = time.perf_counter() - t0
        stamps = client.run_on_scheduler(read_clock)
    return result, with_call_rate(warm_window(stamps, warmup), len(stamps), seconds)


# -- results ---------------------------------------------------------------------


def interleaved_ms(
    kinds: dict[str, Callable[[], Any]], repeats: int, inner: int
) -> dict[str, float]:
    """Each call's median wall time in ms over ``repeats`` rounds, the kinds
    timed in turn in every round (the same warm window), ``inner`` calls a
    round each."""
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(repeats):
        for kind, fn in kinds.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times[kind].append((time.perf_counter() - t0) / inner)
    return {kind: 1e3 * statistics.median(values) for kind, values in times.items()}


def median(values: Iterable[float]) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(values) if values else float("nan")


def ratio(a: float | None, b: float | None) -> float:
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return float("nan")
    return a / b


@dataclass(frozen=True)
class Column:
    """One column of a printed table: the row key, its header and format."""

    key: str
    header: str
    fmt: str = "{}"

    def cell(self, row: dict) -> str:
        value = row.get(self.key)
        if value is None:
            return "-"
        if isinstance(value, float) and math.isnan(value):
            return "n/a"
        try:
            return self.fmt.format(value)
        except (ValueError, TypeError):
            return str(value)


def format_table(title: str, columns: Sequence[Column], rows: Sequence[dict]) -> str:
    """A plain-text table, numbers right-aligned."""
    cells = [[c.cell(r) for c in columns] for r in rows]
    widths = [
        max([len(c.header)] + [len(line[i]) for line in cells])
        for i, c in enumerate(columns)
    ]
    rule = "  ".join("-" * w for w in widths)
    lines = [title, "=" * len(title)]
    lines.append(
        "  ".join(c.header.rjust(w) for c, w in zip(columns, widths, strict=True))
    )
    lines.append(rule)
    for line in cells:
        lines.append("  ".join(v.rjust(w) for v, w in zip(line, widths, strict=True)))
    return "\n".join(lines)


def markdown_table(columns: Sequence[Column], rows: Sequence[dict]) -> str:
    """The same table in Markdown, for docs/benchmarks.md."""
    lines = ["| " + " | ".join(c.header for c in columns) + " |"]
    lines.append("|" + "|".join("---:" for _ in columns) + "|")
    for row in rows:
        lines.append("| " + " | ".join(c.cell(row) for c in columns) + " |")
    return "\n".join(lines)


def write_json(out: str | os.PathLike, name: str, payload: dict[str, Any]) -> Path:
    """Write ``<out>/<name>.json`` with the machine description added."""
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": name,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        **payload,
    }
    target = path / f"{name}.json"
    target.write_text(json.dumps(doc, indent=2, default=_jsonable) + "\n")
    logger.info("Wrote %s", target)
    return target


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    import dask
    import distributed
    import sklearn
    import zarr

    import dask_ftps  # noqa: F401

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = round(int(line.split()[1]) / 2**20, 1)
    from importlib.metadata import version

    return {
        "nproc": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else None,
        "cpu": cpu,
        "memory_gib": memory,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "temp_disk": disk_info(tempfile.gettempdir()),
        "versions": {
            "dask_ftps": version("dask-ftps"),
            "dask": dask.__version__,
            "distributed": distributed.__version__,
            "zarr": zarr.__version__,
            "numpy": np.__version__,
            "scikit-learn": sklearn.__version__,
        },
        "git": _git_commit(),
    }


def disk_info(path: str | os.PathLike) -> dict[str, Any]:
    """File system type, device and whether it spins, for the folder ``path``."""
    path = os.path.realpath(path)
    info: dict[str, Any] = {"path": path}
    best = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            device, mount, fstype = line.split()[:3]
            if (path == mount or path.startswith(mount.rstrip("/") + "/")) and len(
                mount
            ) > len(best):
                best = mount
                info.update(mount=mount, device=device, fstype=fstype)
    device = os.path.basename(str(info.get("device", "")))
    for name in (device, device.rstrip("0123456789")):
        rotational = Path(f"/sys/block/{name}/queue/rotational")
        if name and rotational.exists():
            info["rotational"] = rotational.read_text().strip() == "1"
            break
    return info


_CPU_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def cpu_snapshot() -> dict[str, int]:
    """The machine's CPU time counters (Linux ``/proc/stat``; empty elsewhere)."""
    with contextlib.suppress(OSError, ValueError):
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        return dict(zip(_CPU_FIELDS, (int(x) for x in fields), strict=False))
    return {}


def cpu_usage(before: dict[str, int]) -> dict[str, float]:
    """Shares of the machine's CPU time since ``before``: busy, iowait, and steal
    (time the hypervisor gave to other guests: noise no benchmark controls)."""
    after = cpu_snapshot()
    delta = {k: after[k] - before.get(k, 0) for k in after}
    total = sum(delta.values()) or 1
    busy = total - delta.get("idle", 0) - delta.get("iowait", 0) - delta.get("steal", 0)
    return {
        "busy": busy / total,
        "iowait": delta.get("iowait", 0) / total,
        "steal": delta.get("steal", 0) / total,
    }


def _git_commit() -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
        if out.returncode == 0:
            return out.stdout.strip()
    return None


# -- models and data -------------------------------------------------------------


def softmax_model(n_params: int, n_classes: int = 10) -> SoftmaxRegression:
    """A :class:`SoftmaxRegression` with exactly ``n_params`` parameters when
    ``n_params`` is a multiple of ``n_classes`` (1e4, 1e5, 1e6, 1e7 with 10)."""
    from dask_ftps.models import SoftmaxRegression

    n_features = max(1, n_params // n_classes - 1)
    return SoftmaxRegression(n_features=n_features, n_classes=n_classes, seed=0)


def fixed_grads(
    model: Any, seed: int = 0, scale: float = 1e-3
) -> dict[str, np.ndarray]:
    """A finite float32 update of the model's shapes (the same every step)."""
    rng = np.random.default_rng(seed)
    return {
        name: (rng.standard_normal(shape, dtype=np.float32) * np.float32(scale))
        for name, shape in model.param_shapes().items()
    }


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits, X/16, a stratified 75/25 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X = (X / 16).astype(np.float32)
    return tuple(train_test_split(X, y, test_size=0.25, random_state=0, stratify=y))


def generated_split(
    n_samples: int = 20_000, n_features: int = 100, n_classes: int = 10, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A larger generated problem: ``make_classification``, standardised, 80/20."""
    from sklearn.datasets import make_classification
    from sklearn.model_selection import train_test_split

    X, y = make_classification(
        n_samples=n_samples,
        n_features=n_features,
        n_informative=n_features // 2,
        n_redundant=n_features // 5,
        n_classes=n_classes,
        n_clusters_per_class=2,
        class_sep=1.5,
        random_state=seed,
    )
    X = ((X - X.mean(axis=0)) / X.std(axis=0)).astype(np.float32)
    return tuple(train_test_split(X, y, test_size=0.2, random_state=seed, stratify=y))


# -- clusters --------------------------------------------------------------------


@contextlib.contextmanager
def local_cluster(n_workers: int) -> Iterator[Client]:
    """A client of ``LocalCluster(n_workers, threads_per_worker=1, processes=True)``."""
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=n_workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.CRITICAL,
            worker_dashboard_address=None,
        ) as cluster,
        Client(cluster) as client,
    ):
        client.wait_for_workers(n_workers, timeout=120)
        yield client


def worker_addresses(client: Client) -> list[str]:
    """The workers' addresses, asked of the scheduler. Not
    ``client.scheduler_info(n_workers=-1)["workers"]``: the client's periodic
    refresh (totals only, no workers) can replace that answer before it is read."""
    return sorted(client.sync(client.scheduler.identity, n_workers=-1)["workers"])


async def remove_plugin(dask_scheduler: Any, name: str = "ftps") -> None:
    """Remove a scheduler plugin and close it: registering another one under the
    same name would leave the old one running (its journal included)."""
    plugin = dask_scheduler.plugins.pop(name, None)
    if plugin is not None:
        await plugin.close()


def register_fresh(client: Client, plugin: Any) -> None:
    """Register ``plugin`` (a :class:`dask_ftps.ParameterServer`) as if the
    cluster had never run another: the old server is removed and closed, and the
    workers' plugin, with its cached model copy, is dropped, so that no
    measurement starts with state a previous one left behind.
    """
    client.run_on_scheduler(remove_plugin)
    with contextlib.suppress(Exception):  # none registered yet
        client.unregister_worker_plugin("ftps")
    client.register_plugin(plugin)


@contextlib.contextmanager
def scratch_dir(parent: str | None, prefix: str) -> Iterator[Path]:
    """A fresh folder for stores, removed afterwards."""
    if parent is not None:
        os.makedirs(parent, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f"ftps-bench-{prefix}-", dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def timed(func: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    value = func()
    return time.perf_counter() - t0, value


def print_header(name: str, quick: bool) -> None:
    info = machine_info()
    print(
        f"# benchmarks.{name}{' --quick' if quick else ''}: {info['nproc']} cores "
        f"({info['cpu']}), {info['memory_gib']} GiB, {info['platform']}",
        flush=True,
    )
