"""Benchmark 6, versus: this code against another checkout of dask_ftps, end to end.

Each measurement process imports one of the two versions of ``dask_ftps`` (the
other checkout through ``PYTHONPATH``; the benchmark scripts are this
checkout's), starts a ``LocalCluster`` of two worker processes and times
``train()`` on the MLP of ``benchmarks/_endtoend.py``, memory-only (b) and with
the Zarr journal (c) alternately. Processes alternate between the versions,
and the order flips every round, so that drift on a noisy machine falls on both.
Each ``train()`` is timed as in the throughput benchmark
(``benchmarks._common.warm_window``): updates/s over the warm window (from the
moment every shard has had its warm-up updates answered to the moment the first
shard is done, stamped on the scheduler) and, beside it, over the whole call.

    python -m benchmarks.versus --old /path/to/old/checkout [--quick] [--out DIR]

(``git worktree add /tmp/old <commit>`` makes such a checkout.)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._common import (
    REPO_ROOT,
    Column,
    format_table,
    median,
    print_header,
    ratio,
    setup_logging,
    write_json,
)

NAME = "versus"


def _measure(sizes_epochs: list[tuple[int, int]], repeats: int) -> list[dict]:
    """In a measurement process: b and c alternately, ``repeats`` times each."""
    from benchmarks._common import local_cluster
    from benchmarks._endtoend import digits_data, mlp_for, run_train

    data = digits_data()
    out = []
    with local_cluster(2) as client, tempfile.TemporaryDirectory() as folder:
        for size, epochs in sizes_epochs:
            model = mlp_for(size)
            run_train(client, model, data, 2, 1, "async", None)  # warm up
            for r in range(repeats):
                for variant in "bc" if r % 2 == 0 else "cb":
                    store = None
                    if variant == "c":
                        store = Path(folder) / f"s{time.monotonic_ns()}.zarr"
                    res = run_train(client, model, data, 2, epochs, "async", store)
                    out.append({"size": size, "variant": variant, "rep": r, **res})
    return out


def _child(old: Path | None, sizes_epochs: list[tuple[int, int]], repeats: int):
    """Run :func:`_measure` in a fresh process importing the old or this code."""
    code = old if old is not None else REPO_ROOT
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(code)])}
    if old is not None:  # this checkout's benchmarks, the old checkout's library
        bench = Path(tempfile.mkdtemp(prefix="ftps-versus-"))
        (bench / "benchmarks").symlink_to(REPO_ROOT / "benchmarks")
        env["PYTHONPATH"] = os.pathsep.join([str(bench), str(code)])
    script = (
        "import json, sys; from benchmarks.versus import _measure; "
        "print('RESULT ' + json.dumps(_measure(json.loads(sys.argv[1]), "
        "int(sys.argv[2]))))"
    )
    try:
        proc = subprocess.run(
            [sys.executable, "-c", script, json.dumps(sizes_epochs), str(repeats)],
            env=env,
            cwd=tempfile.gettempdir(),  # not a checkout: only PYTHONPATH decides
            capture_output=True,
            text=True,
            timeout=1800,
            check=True,
        )
    finally:
        if old is not None:
            shutil.rmtree(bench, ignore_errors=True)
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def run(old: Path, quick: bool, out: str) -> dict[str, Any]:
    sizes_epochs = (
        [(10_000, 1)] if quick else [(10_000, 3), (100_000, 2), (1_000_000, 1)]
    )
    rounds, repeats = (1, 1) if quick else (2, 2)
    started = time.perf_counter()
    runs = []
    for r in range(rounds):
        for which in ("old", "new") if r % 2 == 0 else ("new", "old"):
            for res in _child(old if which == "old" else None, sizes_epochs, repeats):
                runs.append({**res, "code": which, "round": r})
    rows = []
    for size, _ in sizes_epochs:
        row: dict[str, Any] = {"n_params": size}
        # The warm window's rates (no suffix), then the whole call's ("_call").
        for key, suffix in (("updates_per_s", ""), ("call_updates_per_s", "_call")):
            for which in ("old", "new"):
                for v in "bc":
                    row[f"{which}_{v}{suffix}"] = median(
                        x[key]
                        for x in runs
                        if (x["size"], x["code"], x["variant"]) == (size, which, v)
                    )
                row[f"{which}_c_over_b{suffix}"] = ratio(
                    row[f"{which}_c{suffix}"], row[f"{which}_b{suffix}"]
                )
            for v in "bc":
                row[f"new_over_old_{v}{suffix}"] = ratio(
                    row[f"new_{v}{suffix}"], row[f"old_{v}{suffix}"]
                )
        rows.append(row)
    print(format_table(TITLE, COLUMNS, rows))
    print()
    print(format_table(CALL_TITLE, CALL_COLUMNS, rows))
    payload = {
        "quick": quick,
        "timing": "updates_per_s over the warm window (benchmarks._common."
        "warm_window); *_call: over the whole train() call",
        "old": str(old),
        "old_commit": _commit(old),
        "new_commit": _commit(REPO_ROOT),
        "config": {"rounds": rounds, "repeats_per_process": repeats},
        "results": rows,
        "runs": runs,
        "seconds": time.perf_counter() - started,
    }
    write_json(out, NAME, payload)
    return payload


def _commit(path: Path) -> str | None:
    try:
        return subprocess.run(
            ["git", "-C", str(path), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


TITLE = (
    "train() updates/s over the warm window, this code against the old one "
    "(medians; 2 workers, async)"
)
CALL_TITLE = "train() updates/s over the whole call (medians; 2 workers, async)"


def _columns(suffix: str) -> tuple[Column, ...]:
    return (
        Column("n_params", "params", "{:.0e}"),
        Column(f"old_b{suffix}", "old memory", "{:.0f}"),
        Column(f"old_c{suffix}", "old journal", "{:.0f}"),
        Column(f"old_c_over_b{suffix}", "old c/b", "{:.2f}"),
        Column(f"new_b{suffix}", "new memory", "{:.0f}"),
        Column(f"new_c{suffix}", "new journal", "{:.0f}"),
        Column(f"new_c_over_b{suffix}", "new c/b", "{:.2f}"),
        Column(f"new_over_old_b{suffix}", "new/old b", "{:.2f}"),
        Column(f"new_over_old_c{suffix}", "new/old c", "{:.2f}"),
    )


COLUMNS = _columns("")
CALL_COLUMNS = _columns("_call")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.versus")
    parser.add_argument("--old", required=True, type=Path, help="the other checkout")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="bench-results")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    print_header(NAME, args.quick)
    run(args.old.resolve(), args.quick, args.out)


if __name__ == "__main__":
    main()
