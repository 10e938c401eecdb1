"""What a commit costs the scheduler, against the physical cost of its bytes.

The default run (in this process, no cluster) times, in CPU seconds of the
whole process (event loop and store thread together), the journal's
``commit()`` of a batch of dense updates as the server calls it, and beside it
the physical cost of the same bytes on the same disk: one copy of the payload
bytes into the page cache (a new file written with them) plus one small file
created exclusively (the size of a commit record); and the strictest bound, the
payload bytes appended to an open file (no file of their own) plus the same
small file. The three take turns in blocks
over the same warm window, repeated; the ratio is the median of the paired
blocks' ratios. Sizes 1e4, 1e5 and 1e6 parameters, batches of 1 and 4 updates.

``--loop`` instead runs the server benchmark's loop (``benchmarks/throughput.py``:
fixed updates, 2 worker processes, async; the scheduler in this process) three
ways, alternating, and prints updates/s: (b) ``store=None``; (c) the journal,
every local commit timed in its parts (build the objects, write the payload
array, create the record); (c0) the journal's commit replaced by one empty
thread hop; (cp) replaced by the physical cost of its bytes in one hop (the
payload into a new file, one small exclusive create): cp/b is what any durable
commit could reach on this disk, c/cp how close the journal comes to it. ``--profile FILE`` sums a ``py-spy record --format raw`` file of a
scheduler process by thread kind and by dask_ftps function.

    python -m benchmarks.commit_cost [--quick] [--out DIR] [--store-dir DIR]
    python -m benchmarks.commit_cost --loop [--size 100000] [--steps 1500]
    py-spy record -r 100 --format raw -o prof.raw -- python -m benchmarks.commit_cost --e2e
    python -m benchmarks.commit_cost --profile prof.raw
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import (
    Column,
    disk_info,
    fixed_grads,
    format_table,
    local_cluster,
    make_parser,
    median,
    print_header,
    scratch_dir,
    setup_logging,
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
        self._write_fresh(objects)
        t2 = time.perf_counter()
        created = self._create(key, record)
        t3 = time.perf_counter()
        totals["build"] += t1 - t0
        totals["write"] += t2 - t1
        totals["create"] += t3 - t2
        totals["commits"] += 1
        totals["bytes"] += sum(
            len(memoryview(p).cast("B"))
            for _, v in objects
            for p in (v if isinstance(v, list) else [v])
        )
        return created

    _io.LocalIO._commit = commit
    return real


def run(size: int, steps: int, repeats: int, out: str) -> dict[str, Any]:
    from benchmarks.throughput import measure
    from dask_ftps._store import _io, _journal

    real_journal_commit = _journal.Journal.commit

    async def hop_only(self: Any, updates: Any, *args: Any, **kwargs: Any) -> None:
        await asyncio.to_thread(lambda: None)

    counter = itertools.count()

    async def physical_only(self: Any, updates: Any, *args: Any, **kwargs: Any) -> None:
        # What any durable commit must do: its bytes into a new file, and one
        # small file created exclusively (next to the store, in one hop).
        parts = [
            memoryview(np.ascontiguousarray(g)).cast("B")
            for u in updates
            for g in u.grads.values()
        ]
        folder = self.io.root.parent / f"{self.io.root.name}.physical"

        def work() -> None:
            i = next(counter)
            folder.mkdir(exist_ok=True)
            fd = os.open(folder / f"p{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.writev(fd, parts)
            os.close(fd)
            fd = os.open(folder / f"r{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.write(fd, b"r" * RECORD_BYTES)
            os.close(fd)

        await asyncio.to_thread(work)

    commits = {"c": real_journal_commit, "c0": hop_only, "cp": physical_only}
    totals: collections.Counter = collections.Counter()
    real_commit = _timed_commits(totals)
    rows: dict[str, list[float]] = {"b": [], "c": [], "c0": [], "cp": []}
    try:
        with local_cluster(2) as client, tempfile.TemporaryDirectory() as folder:
            model = softmax_model(size)
            measure(client, "b", model, "async", 20, 3, Path(folder), 2)  # warm up
            for _ in range(repeats):
                for variant in ("b", "c", "c0", "cp"):
                    _journal.Journal.commit = commits.get(variant, real_journal_commit)
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
        "cp": median(rows["cp"]),
        "commits": totals["commits"],
        "mb_per_commit": totals["bytes"] / n / 1e6,
        "build_ms": 1e3 * totals["build"] / n,
        "write_ms": 1e3 * totals["write"] / n,
        "create_ms": 1e3 * totals["create"] / n,
    }
    row["c_over_b"] = row["c"] / row["b"]
    row["c0_over_b"] = row["c0"] / row["b"]
    row["cp_over_b"] = row["cp"] / row["b"]
    row["c_over_cp"] = row["c"] / row["cp"]
    print(format_table(TITLE, COLUMNS, [row]))
    payload = {"results": [row], "repeats": rows, "steps_per_worker": steps}
    write_json(out, f"{NAME}_loop", payload)
    return payload


# -- the physical bound ----------------------------------------------------------------

#: What a commit's record takes on disk (about; a batch of a few rows).
RECORD_BYTES = 600
#: The target: the journal's CPU per commit within this factor of the physical cost.
TARGET = 1.5


def _physical(
    folder: Path, payload: np.ndarray, n: int, start: int, append: int | None
) -> None:
    """``n`` times: the payload bytes into the page cache, and a small file
    created exclusively (what a commit cannot do without). The bytes go into a
    new file each time, or, with ``append`` (an open file's descriptor), at the
    end of that file: the strictest bound (no file of their own)."""
    record = b"r" * RECORD_BYTES
    for i in range(start, start + n):
        if append is None:
            fd = os.open(folder / f"p{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.write(fd, payload)
            os.close(fd)
        else:
            os.write(append, payload)
        fd = os.open(folder / f"r{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, record)
        os.close(fd)


async def _journal_for(path: Path, n_params: int) -> tuple[Any, dict, Any]:
    from dask_ftps._core import ModelVersion, Version
    from dask_ftps._store._format import RunMeta
    from dask_ftps._store._journal import Journal
    from dask_ftps.optim import SGD

    model = softmax_model(n_params)
    optimizer = SGD(lr=0.1)
    params = model.init_params()
    initial = ModelVersion(Version(0), params, optimizer.init_state(params))
    journal = await Journal.create(
        str(path), RunMeta(model, optimizer, "async", 0), initial
    )
    await journal.claim("tcp://127.0.0.1:1")
    return journal, params, model


def _updates(model: Any, batch: int, step: int) -> list:
    from dask_ftps._core import Update, UpdateKey, WorkerId

    grads = fixed_grads(model)
    return [
        Update(UpdateKey(0, 0, shard, step), WorkerId(f"tcp://10.0.0.{shard}:1"), grads)
        for shard in range(batch)
    ]


def physical_point(
    n_params: int, batch: int, commits: int, repeats: int, folder: Path
) -> dict[str, Any]:
    """CPU ms per commit of the journal and of the physical bound, paired blocks."""

    async def main() -> dict[str, Any]:
        journal, params, model = await _journal_for(folder / "store.zarr", n_params)
        updates = _updates(model, batch, 0)
        payload = np.concatenate(
            [np.concatenate([g.reshape(-1) for g in u.grads.values()]) for u in updates]
        )
        phys = folder / "physical"
        phys.mkdir()
        step = 0

        async def commit_block() -> float:
            nonlocal step
            t0 = time.process_time()
            for _ in range(commits):
                step += 1
                await journal.commit(
                    updates,
                    range(step * batch, (step + 1) * batch),
                    step,
                    params,
                    [(str(updates[0].worker), step)],
                )
            return (time.process_time() - t0) / commits

        segment = os.open(phys / "segment", os.O_WRONLY | os.O_CREAT | os.O_APPEND)

        def physical_block(start: int, append: bool) -> float:
            t0 = time.process_time()
            _physical(phys, payload, commits, start, segment if append else None)
            return (time.process_time() - t0) / commits

        await commit_block()  # warm: caches, the first folders, the thread pool
        physical_block(10**6, False)
        physical_block(2 * 10**6, True)
        journal_ms: list[float] = []
        file_ms: list[float] = []
        append_ms: list[float] = []
        for r in range(repeats):  # rotate which goes first
            blocks = [
                lambda r=r: file_ms.append(
                    1e3 * physical_block(2 * r * commits, False)
                ),
                lambda r=r: append_ms.append(
                    1e3 * physical_block((2 * r + 1) * commits, True)
                ),
            ]
            journal_first = r % 3 == 0
            if journal_first:
                journal_ms.append(1e3 * await commit_block())
            for block in blocks if r % 2 else blocks[::-1]:
                block()
            if not journal_first:
                journal_ms.append(1e3 * await commit_block())
        os.close(segment)
        await journal.close()
        ratios = [j / p for j, p in zip(journal_ms, file_ms, strict=True)]
        strict = [j / p for j, p in zip(journal_ms, append_ms, strict=True)]
        return {
            "n_params": n_params,
            "batch": batch,
            "payload_mb": payload.nbytes / 1e6,
            "journal_ms": median(journal_ms),
            "physical_ms": median(file_ms),
            "ratio": median(ratios),
            "met": median(ratios) <= TARGET,
            "append_ms": median(append_ms),
            "ratio_append": median(strict),
            "blocks": {
                "journal_ms": journal_ms,
                "physical_ms": file_ms,
                "append_ms": append_ms,
            },
        }

    return asyncio.run(main())


PHYSICAL_TITLE = (
    "CPU per commit: the journal against the physical cost of its bytes "
    f"(medians of paired blocks; target ratio <= {TARGET})"
)
PHYSICAL_COLUMNS = (
    Column("n_params", "params", "{:.0e}"),
    Column("batch", "updates/commit", "{}"),
    Column("payload_mb", "MB", "{:.2f}"),
    Column("journal_ms", "journal ms", "{:.3f}"),
    Column("physical_ms", "physical ms", "{:.3f}"),
    Column("ratio", "ratio", "{:.2f}"),
    Column("met", "met", "{}"),
    Column("append_ms", "append ms", "{:.3f}"),
    Column("ratio_append", "ratio to append", "{:.2f}"),
)


def run_physical(
    quick: bool = False, out: str = "bench-results", store_dir: str | None = None
) -> dict[str, Any]:
    sizes = (10_000, 100_000) if quick else (10_000, 100_000, 1_000_000)
    batches = (1,) if quick else (1, 4)
    rows = []
    for n_params in sizes:
        for batch in batches:
            commits = max(10, min(200, int(2e7 / (4 * n_params * batch))))
            with scratch_dir(store_dir, NAME) as folder:
                row = physical_point(
                    n_params, batch, 20 if quick else commits, 3 if quick else 7, folder
                )
            rows.append(row)
            print(format_table(PHYSICAL_TITLE, PHYSICAL_COLUMNS, [row]), flush=True)
    print(format_table(PHYSICAL_TITLE, PHYSICAL_COLUMNS, rows))
    payload = {"results": rows, "target": TARGET, "disk": disk_info(store_dir or ".")}
    write_json(out, NAME, payload)
    return payload


TITLE = "Commit cost (server loop, 2 workers, async; medians)"
COLUMNS = (
    Column("n_params", "params", "{:.0e}"),
    Column("b", "(b) upd/s", "{:.0f}"),
    Column("c", "(c) upd/s", "{:.0f}"),
    Column("c0", "(c0) hop only", "{:.0f}"),
    Column("cp", "(cp) physical", "{:.0f}"),
    Column("c_over_b", "c/b", "{:.2f}"),
    Column("c0_over_b", "c0/b", "{:.2f}"),
    Column("cp_over_b", "cp/b", "{:.2f}"),
    Column("c_over_cp", "c/cp", "{:.2f}"),
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
    parser = make_parser(NAME, "What a commit costs the scheduler.")
    parser.add_argument(
        "--loop", action="store_true", help="the server-loop diagnostic"
    )
    parser.add_argument("--size", type=int, default=100_000)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--e2e", action="store_true", help="a train() to profile")
    parser.add_argument("--profile", help="sum this py-spy raw file")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    if args.profile:
        profile(args.profile)
    elif args.e2e:
        e2e()
    elif args.loop:
        run(args.size, args.steps, args.repeats, args.out)
    else:
        print_header(NAME, args.quick)
        run_physical(args.quick, args.out, args.store_dir)


if __name__ == "__main__":
    main()
