"""Benchmark 6, damage: every kind of stored object, by bit flip, truncation and deletion.

A store is made by real processes under real kills (``dask-ftps chaos`` for a
while: claims, adopted commits, snapshots and trims all happen), then each of
its objects is damaged in turn, each way, in a fresh copy, and rebuilt by
``dask_ftps.recover`` and by a starting server. Each case is *detected* (a
named error, and the refusing start changed no file), *harmless* (the same
model, bit for bit) or *silent* (anything else). Silent must be 0.

    python -m benchmarks.damage [--quick] [--out bench-results] [--store-dir DIR]
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from benchmarks._common import (
    Column,
    cpu_snapshot,
    cpu_usage,
    format_table,
    scratch_dir,
    script_main,
    write_json,
)

NAME = "damage"
OUTCOMES = ("detected", "harmless", "silent")


def run(
    quick: bool = False, out: str = "bench-results", store_dir: str | None = None
) -> dict[str, Any]:
    from dask_ftps._chaos import ChaosOptions, run_chaos
    from dask_ftps.testing import DAMAGES, damage_sweep

    cpu = cpu_snapshot()
    started = time.perf_counter()
    seconds = 12 if quick else 45
    with scratch_dir(store_dir, NAME) as folder:
        store = str(folder / "chaos.zarr")
        chaos = run_chaos(ChaosOptions(seconds=seconds, seed=3, store=store), say=print)
        print("\n".join(chaos.lines()))
        # quick: the oldest, newest and one other object of each kind
        cases = damage_sweep(store, folder, seed=0, per_kind=3 if quick else None)
    by_kind: dict[str, Counter] = {}
    for case in cases:
        by_kind.setdefault(case["kind"], Counter())[case["how"], case["outcome"]] += 1
    rows = []
    for kind, counts in sorted(by_kind.items()):
        row: dict[str, Any] = {
            "kind": kind,
            "objects": sum(counts[DAMAGES[0], o] for o in OUTCOMES),  # damaged
        }
        for how in DAMAGES:
            row[how] = " / ".join(str(counts[how, o]) for o in OUTCOMES)
        row["silent"] = sum(counts[h, "silent"] for h in DAMAGES)
        rows.append(row)
    print()
    print(table(rows))
    totals = Counter(c["outcome"] for c in cases)
    print(f"\n{len(cases)} cases: " + ", ".join(f"{o} {totals[o]}" for o in OUTCOMES))
    payload = {
        "quick": quick,
        "per_kind": 3 if quick else "all",
        "cpu": cpu_usage(cpu),
        "chaos": {
            "seconds": seconds,
            "kills": dict(chaos.kills),
            "recoveries": len(chaos.recoveries),
            "lost": chaos.lost,
            "updates": chaos.updates,
        },
        "totals": dict(totals),
        "rows": rows,
        "cases": cases,
        "seconds": time.perf_counter() - started,
    }
    write_json(out, NAME, payload)
    return payload


COLUMNS = (
    Column("kind", "object kind"),
    Column("objects", "objects"),
    Column("flip", "bit flip: det / harmless / silent"),
    Column("truncate", "truncation: det / harmless / silent"),
    Column("delete", "deletion: det / harmless / silent"),
    Column("silent", "silent"),
)


def table(rows: list[dict]) -> str:
    return format_table("Damage: every object of a store, three ways", COLUMNS, rows)


def main(argv: list[str] | None = None) -> None:
    script_main(NAME, __doc__, run, argv)


if __name__ == "__main__":
    main()
