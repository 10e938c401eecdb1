"""Benchmark 8, the GPU path: CuPy against NumPy, dense and factored updates.

Three parts, each CuPy against NumPy on the same model, data and parameters (an
MLP of 4096-wide layers and minibatches of 1024 by default: enough to keep a
GPU busy; ``--quick`` is small):

1. agreement: the largest difference between the CuPy and the NumPy gradient
   of each parameter, relative to the parameter's largest gradient (float32
   rounding, summed in another order: about ``1e-6``; the check allows
   ``1e-4``), dense and factored;
2. gradient time: one ``loss_and_grad`` plus moving the update to host memory
   (what a worker does before each push), median of a few;
3. whole runs: ``train()`` on a LocalCluster with a local store (the journal
   on), ``ftps.device`` cpu or gpu, ``ftps.update-format`` dense or factored;
   minibatch updates per second over the run.

Without CuPy or a CUDA device only the NumPy half runs (CI runs it ``--quick``);
``benchmarks/gpu_check.sh`` installs CuPy, runs the GPU tests and this.

    python -m benchmarks.gpu [--quick] [--out bench-results] [--store-dir DIR]
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
    scratch_dir,
    script_main,
    write_json,
)

logger = logging.getLogger("benchmarks.gpu")

NAME = "gpu"
FORMATS = ("dense", "factored")
#: The largest gradient difference, relative to the parameter's largest gradient.
AGREEMENT = 1e-4


@dataclass(frozen=True)
class Config:
    width: int  # features and hidden width
    layers: int  # hidden layers
    n_classes: int
    batch: int
    repeats: int  # gradient timings
    run_batches: int  # minibatches per whole run (per worker)
    n_workers: int

    @classmethod
    def make(cls, quick: bool) -> Config:
        if quick:
            return cls(256, 2, 10, 64, 3, 6, 2)
        return cls(4096, 2, 1000, 1024, 5, 6, 2)

    def model(self) -> Any:
        from dask_ftps.models import MLP

        return MLP(
            n_features=self.width,
            hidden=(self.width,) * self.layers,
            n_classes=self.n_classes,
            seed=0,
        )

    def data(self, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(seed)
        X = rng.standard_normal((n, self.width), dtype=np.float32)
        return X, rng.integers(0, self.n_classes, n)


def cupy_or_none() -> Any:
    """CuPy, if it imports and sees a CUDA device."""
    try:
        import cupy

        return cupy if cupy.is_available() else None
    except Exception:  # noqa: BLE001 - not installed, no driver, ...
        return None


def _sync(xp: Any) -> None:
    if xp is not np:
        xp.cuda.Device().synchronize()


def _gradient(model: Any, params: dict, X: Any, y: Any, fmt: str) -> dict:
    """One worker step: the gradient, then the update in host memory."""
    from dask_ftps._factored import to_host

    _, grads, _ = model.loss_and_grad(params, X, y, update_format=fmt)
    return to_host(grads)


def agreement(config: Config, cp: Any) -> list[dict]:
    """Part 1: the CuPy gradient against the NumPy one, per parameter."""
    from dask_ftps._factored import densify
    from dask_ftps._xp import to_namespace

    model = config.model()
    params = model.init_params()
    X, y = config.data(config.batch)
    rows = []
    for fmt in FORMATS:
        ref = densify(_gradient(model, params, X, y, fmt))
        got = densify(
            _gradient(
                model, to_namespace(params, cp), cp.asarray(X), cp.asarray(y), fmt
            )
        )
        worst = max(
            float(np.abs(got[k] - g).max()) / (float(np.abs(g).max()) or 1.0)
            for k, g in ref.items()
        )
        rows.append({"format": fmt, "max_rel_error": worst, "ok": worst < AGREEMENT})
    return rows


def gradient_times(config: Config, cp: Any) -> list[dict]:
    """Part 2: seconds per worker step (gradient and copy home), by device."""
    from dask_ftps._xp import to_namespace

    model = config.model()
    X, y = config.data(config.batch)
    rows = []
    for device, xp in (("cpu", np), ("gpu", cp)):
        if xp is None:
            continue
        params = to_namespace(model.init_params(), xp)
        Xd, yd = (X, y) if xp is np else (xp.asarray(X), xp.asarray(y))
        for fmt in FORMATS:
            _gradient(model, params, Xd, yd, fmt)  # warm up (kernels, BLAS threads)
            times = []
            for _ in range(config.repeats):
                _sync(xp)
                t0 = time.perf_counter()
                _gradient(model, params, Xd, yd, fmt)
                _sync(xp)
                times.append(time.perf_counter() - t0)
            rows.append(
                {"device": device, "format": fmt, "seconds": statistics.median(times)}
            )
    return rows


def whole_runs(config: Config, cp: Any, store_dir: Any) -> list[dict]:
    """Part 3: ``train()`` updates/s by device and update format."""
    import dask

    import dask_ftps
    from dask_ftps import SGD, ParameterServer

    model = config.model()
    n = config.run_batches * config.batch * config.n_workers
    X, y = config.data(n, seed=1)
    devices = ("cpu", "gpu") if cp is not None else ("cpu",)
    rows = []
    with (
        local_cluster(config.n_workers) as client,
        scratch_dir(store_dir, "ftps-gpu-") as stores,
    ):
        for device in devices:
            for fmt in FORMATS:
                store = stores / f"{device}-{fmt}.zarr"
                register_fresh(
                    client,
                    ParameterServer(str(store), model=model, optimizer=SGD(lr=1e-3)),
                )
                settings = {"ftps.device": device, "ftps.update-format": fmt}
                with dask.config.set(settings):
                    t0 = time.perf_counter()
                    result = dask_ftps.train(
                        client,
                        X,
                        y,
                        epochs=1,
                        batch_size=config.batch,
                        n_shards=config.n_workers,
                        progress=False,
                    )
                    seconds = time.perf_counter() - t0
                rows.append(
                    {
                        "device": device,
                        "format": fmt,
                        "updates": result.minibatches,
                        "seconds": seconds,
                        "updates_per_s": result.minibatches / seconds,
                    }
                )
    return rows


def run(quick: bool = False, out: str = "bench-results", store_dir=None) -> dict:
    config = Config.make(quick)
    started = time.perf_counter()
    cpu = cpu_snapshot()
    cp = cupy_or_none()
    device = "none"
    if cp is not None:
        props = cp.cuda.runtime.getDeviceProperties(0)
        device = (
            props["name"].decode()
            if isinstance(props["name"], bytes)
            else str(props["name"])
        )
    doc = {
        "benchmark": NAME,
        "quick": quick,
        "config": config.__dict__,
        "gpu": device,
        "n_params": config.model().n_params(),
        "agreement": [] if cp is None else agreement(config, cp),
        "gradient": gradient_times(config, cp),
        "runs": whole_runs(config, cp, store_dir),
    }
    doc["seconds"] = time.perf_counter() - started
    doc["cpu"] = cpu_usage(cpu)
    write_json(out, NAME, doc)
    print(table(doc))
    return doc


def summary(doc: dict) -> list[dict]:
    """One line per measurement, CuPy next to NumPy."""
    rows = [
        {
            "what": f"agreement, {a['format']}",
            "cpu": "",
            "gpu": f"{a['max_rel_error']:.1e}",
            "note": "ok" if a["ok"] else f"OVER {AGREEMENT:g}",
        }
        for a in doc["agreement"]
    ]
    if not doc["agreement"]:
        rows.append({"what": "agreement", "cpu": "", "gpu": "-", "note": "no GPU"})
    for part, key, unit, scale in (
        ("gradient", "seconds", "ms/step", 1e3),
        ("runs", "updates_per_s", "updates/s", 1.0),
    ):
        for fmt in FORMATS:
            by_device = {
                r["device"]: r[key] * scale for r in doc[part] if r["format"] == fmt
            }
            cpu, gpu = by_device.get("cpu"), by_device.get("gpu")
            ratio = ""
            if cpu and gpu:
                ratio = f"gpu/cpu {cpu / gpu if key == 'seconds' else gpu / cpu:.1f}x"
            rows.append(
                {
                    "what": f"{part}, {fmt} ({unit})",
                    "cpu": "-" if cpu is None else f"{cpu:.1f}",
                    "gpu": "-" if gpu is None else f"{gpu:.1f}",
                    "note": ratio,
                }
            )
    return rows


COLUMNS = (
    Column("what", "measurement"),
    Column("cpu", "NumPy"),
    Column("gpu", "CuPy"),
    Column("note", "note"),
)


def table(doc: dict) -> str:
    c = doc["config"]
    title = (
        f"GPU check: MLP {c['width']}x{c['layers']} hidden, {doc['n_params']:,} "
        f"params, batch {c['batch']}, GPU: {doc['gpu']}"
    )
    return format_table(title, COLUMNS, summary(doc))


def main(argv: list[str] | None = None) -> None:
    script_main(NAME, __doc__, run, argv)


if __name__ == "__main__":
    main()
