"""Where a commit's time goes: a diagnostic for the journal overhead.

Runs the server benchmark's loop (``benchmarks/throughput.py``: fixed updates,
2 worker processes, async; the scheduler runs in this process) three ways,
alternating, and prints updates/s:

- (b) ``store=None``;
- (c) the Zarr journal, with every local commit timed in its three parts (build
  the objects, write payload chunk and ``zarr.json``, create the record);
- (c0) the journal's commit replaced by one empty thread hop: the pipeline's
  cost without the commit's work.

``--profile FILE`` instead sums a ``py-spy record --format raw`` file of a
scheduler process by thread kind and by dask_ftps function.

    python -m benchmarks.commit_cost [--size 100000] [--steps 1500] [--out DIR]
    py-spy record -r 100 --format raw -o prof.raw -- python -m benchmarks.commit_cost --e2e
    python -m benchmarks.commit_cost --profile prof.raw
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._common import (
    Column,
    format_table,
    local_cluster,
    median,
    softmax_model,
    write_json,
)

NAME = "commit_cost"


def _timed_commits(totals: collections.Counter) -> Any:
    """Wrap ``LocalIO._commit`` to add the time of its three parts to ``totals``."""
    from dask_ftps._store import _io

    real = _io.LocalIO._commit

    def commit(self: Any, build: Any) -> bool:
        t0 = time.perf_counter()
        objects, key, record = build()
        t1 = time.perf_counter()
        self._write_all(objects)
        t2 = time.perf_counter()
        created = self._create(key, record)
        t3 = time.perf_counter()
        totals["build"] += t1 - t0
        totals["write"] += t2 - t1
        totals["create"] += t3 - t2
        totals["commits"] += 1
        totals["bytes"] += sum(len(memoryview(v).cast("B")) for _, v in objects)
        return created

    _io.LocalIO._commit = commit
    return real


def run(size: int, steps: int, repeats: int, out: str) -> dict[str, Any]:
    from benchmarks.throughput import measure
    from dask_ftps._store import _io, _journal

    real_journal_commit = _journal.Journal.commit

    async def hop_only(self: Any, updates: Any, *args: Any, **kwargs: Any) -> None:
        await asyncio.to_thread(lambda: None)

    totals: collections.Counter = collections.Counter()
    real_commit = _timed_commits(totals)
    rows: dict[str, list[float]] = {"b": [], "c": [], "c0": []}
    try:
        with local_cluster(2) as client, tempfile.TemporaryDirectory() as folder:
            model = softmax_model(size)
            measure(client, "b", model, "async", 20, 3, Path(folder), 2)  # warm up
            for _ in range(repeats):
                for variant in ("b", "c", "c0"):
                    _journal.Journal.commit = (
                        hop_only if variant == "c0" else real_journal_commit
                    )
                    m = measure(
                        client,
                        "c" if variant != "b" else "b",
                        model,
                        "async",
                        steps,
                        3,
                        Path(folder),
                        2,
                    )
                    rows[variant].append(m["updates_per_s"])
    finally:
        _journal.Journal.commit = real_journal_commit
        _io.LocalIO._commit = real_commit
    n = max(1, totals["commits"])
    row = {
        "n_params": size,
        "b": median(rows["b"]),
        "c": median(rows["c"]),
        "c0": median(rows["c0"]),
        "commits": totals["commits"],
        "mb_per_commit": totals["bytes"] / n / 1e6,
        "build_ms": 1e3 * totals["build"] / n,
        "write_ms": 1e3 * totals["write"] / n,
        "create_ms": 1e3 * totals["create"] / n,
    }
    row["c_over_b"] = row["c"] / row["b"]
    row["c0_over_b"] = row["c0"] / row["b"]
    print(format_table(TITLE, COLUMNS, [row]))
    payload = {"results": [row], "repeats": rows, "steps_per_worker": steps}
    write_json(out, NAME, payload)
    return payload


TITLE = "Commit cost (server loop, 2 workers, async; medians)"
COLUMNS = (
    Column("n_params", "params", "{:.0e}"),
    Column("b", "(b) upd/s", "{:.0f}"),
    Column("c", "(c) upd/s", "{:.0f}"),
    Column("c0", "(c0) hop only", "{:.0f}"),
    Column("c_over_b", "c/b", "{:.2f}"),
    Column("c0_over_b", "c0/b", "{:.2f}"),
    Column("mb_per_commit", "MB/commit", "{:.2f}"),
    Column("build_ms", "build ms", "{:.2f}"),
    Column("write_ms", "write ms", "{:.2f}"),
    Column("create_ms", "create ms", "{:.2f}"),
)


def e2e() -> None:
    """A ``train()`` with the journal at 1e5 parameters, for py-spy to sample."""
    from benchmarks._endtoend import digits_data, mlp_for, run_train

    data = digits_data()
    with local_cluster(2) as client, tempfile.TemporaryDirectory() as folder:
        model = mlp_for(100_000)
        run_train(client, model, data, 2, 1, "async", None)
        result = run_train(client, model, data, 2, 4, "async", Path(folder) / "s.zarr")
        print(f"{result['updates_per_s']:.0f} updates/s")


def profile(path: str, top: int = 12) -> None:
    """Sum a py-spy raw file: samples per thread kind and per dask_ftps function."""
    kinds: collections.Counter = collections.Counter()
    functions: collections.Counter = collections.Counter()
    total = 0
    for line in Path(path).read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames, n = stack.split(";"), int(count)
        total += n
        if any("run_forever" in f for f in frames):
            kinds["event loop"] += n
        elif any("concurrent/futures/thread.py" in f for f in frames):
            kinds["threads (offload, store)"] += n
        else:
            kinds["other"] += n
        for name in {re.sub(r":\d+\)", ")", f) for f in frames if "dask_ftps" in f}:
            functions[name] += n
    print(f"{total} samples")
    for kind, n in kinds.most_common():
        print(f"  {kind}: {100 * n / total:.1f} %")
    for name, n in functions.most_common(top):
        print(f"  {100 * n / total:5.1f} %  {name}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.commit_cost")
    parser.add_argument("--size", type=int, default=100_000)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="bench-results")
    parser.add_argument("--e2e", action="store_true", help="a train() to profile")
    parser.add_argument("--profile", help="sum this py-spy raw file")
    args = parser.parse_args(argv)
    if args.profile:
        profile(args.profile)
    elif args.e2e:
        e2e()
    else:
        run(args.size, args.steps, args.repeats, args.out)


if __name__ == "__main__":
    main()
