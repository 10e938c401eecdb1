"""Benchmarks of dask_ftps: what fault tolerance costs when nothing fails, and what
it saves when something does.

Each module runs alone (``python -m benchmarks.throughput`` ...), prints a table,
and writes a JSON file into ``--out`` (default ``bench-results/``);
``python -m benchmarks`` runs them all. ``--quick`` is a small size for CI.
See ``docs/benchmarks.md`` for the measured results and how to read them.
"""

from __future__ import annotations

#: What ``python -m benchmarks`` runs: each module's
#: ``run(quick=..., out=..., store_dir=...)``.
BENCHMARKS = (
    "throughput",
    "recovery",
    "failures",
    "peers",
    "storage",
    "damage",
    "factored",
    "gpu",
    "models",
    "shards",
    "sparse",
)

#: Kernel timings in one process (seconds, no cluster, no ``--quick`` size):
#: ``python -m benchmarks`` runs their command line, ``main(["--out", out])``.
KERNELS = ("model_checks", "digest_cost")
