"""Benchmark 2, recovery: how long until a new scheduler serves the exact model.

For each model size and ``snapshot_every``: a real ``dask scheduler`` process
hosts a :class:`dask_ftps.ParameterServer` on a local Zarr store; a driver pushes
``U`` updates (SGD with momentum, so snapshots hold the optimizer state too);
the scheduler is SIGKILLed right after the U-th update is accepted. A new
``dask scheduler --preload dask_ftps.preload --ftps-store STORE`` starts on the
same port, and the time from its start to ``ftps_get_model`` answering is
measured, several restarts each, alternately on a new port (the dead owner's
address is another one, as on a batch system) and on the port of the last one. The served model is compared with
``dask_ftps.recover(STORE)`` bit for bit.

Beside it the lower bound: the time to read the snapshot and the replayed
update payloads once (plain file reads of the store's chunks, warm page cache as
for the restart), and the time to apply the replayed updates with the optimizer
in NumPy.

    python -m benchmarks.recovery [--quick] [--out bench-results] [--store-dir DIR]
"""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import (
    Column,
    cpu_snapshot,
    cpu_usage,
    fixed_grads,
    format_table,
    median,
    ratio,
    scratch_dir,
    script_main,
    softmax_model,
    write_json,
)
from dask_ftps._processes import free_port, start_scheduler, wait_port

logger = logging.getLogger("benchmarks.recovery")

NAME = "recovery"
LR, MOMENTUM = 1e-3, 0.9


@dataclass(frozen=True)
class Point:
    n_params: int
    snapshot_every: int
    updates: int  # accepted before the SIGKILL
    label: str = ""


def points(quick: bool) -> tuple[list[Point], int]:
    """The measured configurations and the restarts per configuration."""
    if quick:
        return [Point(100_000, 20, 30, "mid-interval")], 1
    pts = []
    for n, everies in ((100_000, (25, 100, 400)), (1_000_000, (25, 100, 400))):
        for every in everies:
            pts.append(Point(n, every, every + every // 2, "mid-interval"))
    # The default settings (snapshot_every=100) at 1e6: best and worst case too.
    pts.append(Point(1_000_000, 100, 101, "just after a snapshot"))
    pts.append(Point(1_000_000, 100, 199, "just before a snapshot"))
    # 1e7: 40 MB per update; small intervals keep the run in the time budget.
    for every in (4, 20):
        pts.append(Point(10_000_000, every, every + every // 2, "mid-interval"))
    return pts, 3


# -- the run that is killed -----------------------------------------------------------


async def _push_updates(address: str, model: Any, store: str, point: Point) -> dict:
    """Register a server on ``store`` and push ``point.updates`` updates to it."""
    from distributed import Client
    from distributed.protocol.serialize import ToPickle

    from dask_ftps import SGD, ParameterServer
    from dask_ftps._core import RunSpec, check_reply

    async with Client(address, asynchronous=True, timeout="60s") as client:
        await client.register_plugin(
            ParameterServer(
                store,
                model=model,
                optimizer=SGD(lr=LR, momentum=MOMENTUM),
                mode="async",
                snapshot_every=point.snapshot_every,
            )
        )
        spec = RunSpec((point.updates,), batch_size=1, epochs=1)
        holder = f"{client.id}/{uuid.uuid4().hex[:16]}"  # every push names it
        begun = check_reply(
            await client.scheduler.ftps_begin_run(
                spec=spec.to_dict(), holder=holder, live=[holder]
            ),
            "begin_run",
        )
        grads = ToPickle(fixed_grads(model))
        t0 = time.perf_counter()
        for step in range(point.updates):
            check_reply(
                await client.scheduler.ftps_push(
                    server_id=begun["server_id"],
                    holder=holder,
                    worker="bench-driver",
                    update_id=f"{begun['run']}:0:0:{step}",
                    grads=grads,
                    incarnation=begun["incarnation"],
                ),
                "push",
            )
        seconds = time.perf_counter() - t0
        # Snapshots are written in the background: kill once the one due at
        # version U - U % S is complete, so that each point measures what it names.
        # The status lists a snapshot as soon as the server adds it to its commit
        # document in memory, before that document is written: wait for the store.
        due = point.updates - point.updates % point.snapshot_every
        deadline = time.monotonic() + 120
        while True:
            status = check_reply(await client.scheduler.ftps_status(), "status")
            on_disk = await _stored_snapshots(store)
            if (
                max(status["snapshots"]) >= due and max(on_disk, default=-1) >= due
            ) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.01)
    return {
        "push_seconds": seconds,
        "version": status["version"],
        "snapshots_before_kill": status["snapshots"],
    }


async def _stored_snapshots(store: str) -> list[int]:
    """The snapshot versions the store's log lists."""
    from dask_ftps._store import Journal

    journal = await Journal.open(store, read_only=True)
    if journal is None:
        return []
    await journal.close()
    return [r.body.version for r in journal.snapshots()]


async def _served(port: int, timeout: float = 120.0) -> tuple[float, dict]:
    """Ask the scheduler on ``port`` for the model until it answers it."""
    from distributed.core import rpc

    from dask_ftps._core import check_reply

    deadline = time.perf_counter() + timeout
    address = f"tcp://127.0.0.1:{port}"
    while True:
        try:
            async with rpc(address, timeout=timeout) as scheduler:
                reply = await scheduler.ftps_get_model()
                t = time.perf_counter()
                reply = check_reply(reply, "ftps_get_model")
                status = check_reply(await scheduler.ftps_status(), "ftps_status")
                return t, {**reply, "status_reply": status}
        except OSError:
            if time.perf_counter() > deadline:
                raise
            await asyncio.sleep(0.005)


def _restart(port: int, store: str, log: Path) -> dict[str, Any]:
    """Start a scheduler that resumes ``store``; time it until the model is served,
    then SIGKILL it (the next restart rebuilds from the same store)."""
    t_spawn = time.perf_counter()
    proc = start_scheduler(port, log, store=store)
    try:
        t_listen = wait_port(port, timeout=120)
        t_served, reply = asyncio.run(_served(port))
        recovery = reply["status_reply"]["recovery"] or {}
        return {
            "served_s": t_served - t_spawn,
            "listen_s": t_listen - t_spawn,
            "after_listen_s": t_served - t_listen,
            "rebuild_s": recovery.get("seconds"),
            "replayed": recovery.get("replayed"),
            "start_version": recovery.get("start_version"),
            "source": recovery.get("source"),
            "version": reply["version"],
            "incarnation": reply["status_reply"]["incarnation"],
            "params": reply["params"],
            "log_line": _recovered_line(proc.output()),
        }
    finally:
        proc.kill(signal.SIGKILL)
        proc.stop()


def plain_listen(folder: Path, repeats: int) -> float:
    """Median time from spawning a ``dask scheduler`` without the preload to its
    port accepting connections: the part of a restart no parameter server adds."""
    times = []
    for i in range(repeats):
        port = free_port()
        t0 = time.perf_counter()
        proc = start_scheduler(port, folder / f"plain-{i}.log")
        try:
            times.append(wait_port(port, timeout=120) - t0)
        finally:
            proc.kill(signal.SIGKILL)
            proc.stop()
    return median(times)


def _recovered_line(output: str) -> str | None:
    match = re.search(r"Recovered .*", output)
    return match.group(0) if match else None


# -- the lower bound ------------------------------------------------------------------


def _replay_files(store: Path) -> tuple[dict, list[Path], list[Path]]:
    """The newest snapshot's record, its chunk files and the replayed payload
    chunk files (one per commit after it)."""
    import asyncio

    from dask_ftps._store import Journal
    from dask_ftps._store._format import COMMIT_CHUNK_KEY

    async def read():
        journal = await Journal.open(str(store), read_only=True)
        await journal.close()
        return journal

    journal = asyncio.run(read())
    start = journal.snapshots()[0]
    snap = start.body
    snapshot = [store / snap.array.key / f"c.{i}" for i in range(len(snap.array.crcs))]
    payloads = [
        store / r.body.data.key / COMMIT_CHUNK_KEY
        for r in journal.commits()
        if r.serial >= snap.first_serial and r.body.stop > snap.replay_from
    ]
    return {"version": snap.version}, snapshot, payloads


def lower_bound(store: Path, model: Any, repeats: int = 3) -> dict[str, Any]:
    """Time to read the snapshot plus the replayed payloads once (plain reads),
    and to apply the replayed updates with the optimizer in NumPy."""
    from dask_ftps import SGD
    from dask_ftps._layout import Layout

    ref, snapshot_files, payload_files = _replay_files(store)
    reads = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        # Each chunk ends in its 4-byte CRC-32C.
        snapshot = np.concatenate(
            [np.frombuffer(p.read_bytes()[:-4], dtype="<f4") for p in snapshot_files]
        )
        payloads = [
            row
            for p in payload_files
            for row in np.frombuffer(p.read_bytes()[:-4], dtype="<f4").reshape(
                -1, model.n_params()
            )
        ]
        reads.append(time.perf_counter() - t0)
    n_bytes = snapshot.nbytes + sum(p.nbytes for p in payloads)
    # Applying the replayed updates: what any exact rebuild must compute.
    params = model.init_params()
    layout = Layout.of(params)
    optimizer = SGD(lr=LR, momentum=MOMENTUM)
    n = layout.size
    current = {k: v.copy() for k, v in layout.unflatten(snapshot[:n]).items()}
    state_layout = Layout.of(optimizer.init_state(params))
    state = {k: v.copy() for k, v in state_layout.unflatten(snapshot[n:]).items()}
    t0 = time.perf_counter()
    for i, flat in enumerate(payloads):
        current, state = optimizer.apply(
            current, state, layout.unflatten(flat), step=ref["version"] + i + 1
        )
    apply_s = time.perf_counter() - t0
    return {
        "read_s": median(reads),
        "read_bytes": n_bytes,
        "snapshot_bytes": snapshot.nbytes,
        "replayed_bytes": n_bytes - snapshot.nbytes,
        "replayed": len(payloads),
        "snapshot_version": ref["version"],
        "apply_s": apply_s,
    }


def _same_bits(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return set(a) == set(b) and all(
        a[k].dtype == b[k].dtype
        and np.array_equal(a[k].view(np.uint8), b[k].view(np.uint8))
        for k in a
    )


def reference(model: Any, updates: int) -> tuple[int, dict[str, np.ndarray]]:
    """The model after the same ``updates`` pushes with no failure: a state with
    no store, in a fresh process (run with :func:`_in_fresh_process`)."""
    from dask_ftps import SGD, UpdateKey
    from dask_ftps._core import RunSpec, Update, WorkerId
    from dask_ftps._state import ParameterServerState

    state = ParameterServerState(model, SGD(lr=LR, momentum=MOMENTUM), mode="async")
    run = state.begin_run(RunSpec((updates,), batch_size=1, epochs=1))
    grads = fixed_grads(model)
    for step in range(updates):
        state.push(Update(UpdateKey(int(run.run), 0, 0, step), WorkerId("ref"), grads))
    return int(state.version), state.model.params


def _in_fresh_process(func: Any, *args: Any) -> Any:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as ex:
        return ex.submit(func, *args).result()


# -- one configuration ----------------------------------------------------------------


def measure(point: Point, restarts: int, folder: Path) -> dict[str, Any]:
    import dask_ftps

    model = softmax_model(point.n_params)
    store = folder / f"n{point.n_params}-s{point.snapshot_every}-u{point.updates}.zarr"
    port = free_port()
    first = start_scheduler(port, folder / f"{store.stem}-first.log")
    try:
        wait_port(port, timeout=120)
        pushed = asyncio.run(
            _push_updates(f"tcp://127.0.0.1:{port}", model, str(store), point)
        )
    finally:
        first.kill(signal.SIGKILL)  # right after the U-th accepted update
        first.stop()
    committed = dask_ftps.inspect(str(store))
    # Alternately on a new port (the dead owner's address is another one, as on
    # a batch system) and again on that port (the same address).
    runs = []
    for i in range(restarts):
        for where in ("new", "same"):
            if where == "new":
                port = free_port()
            r = _restart(port, str(store), folder / f"{store.stem}-{where}{i}.log")
            runs.append({**r, "where": where})
    offline_version, offline = dask_ftps.recover(str(store))
    # The independent check: the committed pushes applied in a fresh process that
    # never failed (recover() runs the server's own rebuild code).
    ref_version, ref = _in_fresh_process(reference, model, committed["version"])
    exact = all(
        r["version"] == ref_version and _same_bits(r["params"], ref) for r in runs
    )
    recover_exact = offline_version == ref_version and _same_bits(offline, ref)
    bound = lower_bound(store, model)
    for r in runs:
        r.pop("params")
    same = [r for r in runs if r["where"] == "same"]
    served = median(r["served_s"] for r in same)
    served_new = median(r["served_s"] for r in runs if r["where"] == "new")
    rebuild = median(r["rebuild_s"] for r in runs)
    after_listen = median(r["after_listen_s"] for r in same)
    read_apply = bound["read_s"] + bound["apply_s"]
    row = {
        "n_params": point.n_params,
        "snapshot_every": point.snapshot_every,
        "updates": point.updates,
        "case": point.label,
        "accepted_before_kill": pushed["version"],
        "committed": committed["version"],
        "lost": pushed["version"] - committed["version"],
        "version_served": runs[0]["version"],
        "versions_served": sorted({r["version"] for r in runs}),
        "reference_version": ref_version,
        "exact": exact,
        "recover_exact": recover_exact,
        "replayed": runs[0]["replayed"],
        "snapshot_version": bound["snapshot_version"],
        "served_s": served,
        "served_new_s": served_new,
        "listen_s": median(r["listen_s"] for r in runs),
        "after_listen_s": after_listen,
        "rebuild_s": rebuild,
        "lower_bound_s": bound["read_s"],
        "apply_s": bound["apply_s"],
        "read_mb": bound["read_bytes"] / 1e6,
        "rebuild_over_bound": ratio(rebuild, bound["read_s"]),
        "after_listen_over_bound": ratio(after_listen, bound["read_s"]),
        "served_over_bound": ratio(served, bound["read_s"]),
        "rebuild_over_read_apply": ratio(rebuild, read_apply),
        "after_listen_over_read_apply": ratio(after_listen, read_apply),
        "push_seconds": pushed["push_seconds"],
        "restarts": runs,
        "lower_bound": bound,
    }
    logger.info(
        "%g params, snapshot_every %d, U=%d: served in %.3fs (rebuild %.3fs, "
        "bound %.3fs), %d replayed, exact %s",
        point.n_params,
        point.snapshot_every,
        point.updates,
        served,
        rebuild,
        bound["read_s"],
        row["replayed"],
        exact,
    )
    return row


def run(
    quick: bool = False, out: str = "bench-results", store_dir: str | None = None
) -> dict[str, Any]:
    pts, restarts = points(quick)
    cpu = cpu_snapshot()
    rows = []
    started = time.perf_counter()
    with scratch_dir(store_dir, NAME) as folder:
        plain = plain_listen(folder, restarts)
        for point in pts:
            rows.append(measure(point, restarts, folder))
            import shutil

            for path in folder.glob("*.zarr"):
                shutil.rmtree(path, ignore_errors=True)
    print()
    print(table(rows))
    print(
        f"A plain dask scheduler (no preload) listens {plain:.2f} s after its "
        "spawn on this machine."
    )
    summary = _summary(rows)
    print()
    print(
        format_table(
            "Recovery targets (1e6 parameters, snapshot_every=100)",
            SUMMARY_COLUMNS,
            summary,
        )
    )
    payload = {
        "quick": quick,
        "cpu": cpu_usage(cpu),
        "config": {
            "model": "SoftmaxRegression(n_features=n/10-1, n_classes=10)",
            "optimizer": f"SGD(lr={LR}, momentum={MOMENTUM})",
            "restarts_per_point": restarts,
            "store_dir": str(folder.parent),
            "served_s": "scheduler process spawn -> ftps_get_model answered",
            "listen_s": "scheduler process spawn -> port accepts connections "
            "(interpreter, imports, scheduler set-up; no parameter-server work)",
            "after_listen_s": "port open -> model served (Journal.open, claim, "
            "rebuild, worker-plugin registration)",
            "rebuild_s": "status()['recovery']['seconds']: snapshot read + replay",
            "lower_bound_s": "plain file reads of the snapshot and the replayed "
            "payload chunks (warm page cache)",
            "apply_s": "applying the replayed updates with the optimizer in NumPy",
        },
        "results": rows,
        "summary": summary,
        "plain_scheduler_listen_s": plain,
        "seconds": time.perf_counter() - started,
    }
    write_json(out, NAME, payload)
    return payload


COLUMNS = (
    Column("n_params", "params", "{:.0e}"),
    Column("snapshot_every", "snap every"),
    Column("updates", "U"),
    Column("replayed", "replayed"),
    Column("read_mb", "read MB", "{:.0f}"),
    Column("served_s", "spawn->served s", "{:.2f}"),
    Column("served_new_s", "new address s", "{:.2f}"),
    Column("listen_s", "spawn->listen s", "{:.2f}"),
    Column("after_listen_s", "listen->served s", "{:.3f}"),
    Column("rebuild_s", "rebuild s", "{:.3f}"),
    Column("lower_bound_s", "bound s", "{:.3f}"),
    Column("apply_s", "apply s", "{:.3f}"),
    Column("rebuild_over_bound", "rebuild/bound", "{:.1f}"),
    Column("after_listen_over_bound", "listen->served/bound", "{:.1f}"),
    Column("lost", "lost"),
    Column("version_served", "served v"),
    Column("reference_version", "reference v"),
    Column("exact", "exact"),
)

SUMMARY_COLUMNS = (
    Column("case", "case"),
    Column("replayed", "replayed"),
    Column("served_s", "spawn->served s", "{:.2f}"),
    Column("served_new_s", "new address s", "{:.2f}"),
    Column("served_met", "both <= 1 s"),
    Column("after_listen_s", "listen->served s", "{:.3f}"),
    Column("after_listen_over_read_apply", "listen->served/(read+apply)", "{:.2f}"),
    Column("bound_met", "<= 1.5x"),
)


def table(rows: list[dict]) -> str:
    return format_table(
        "Recovery: SIGKILLed scheduler -> new scheduler serving the exact model "
        "(medians of restarts)",
        COLUMNS,
        rows,
    )


def _summary(rows: list[dict]) -> list[dict]:
    out = []
    for row in rows:
        if row["n_params"] != 1_000_000 or row["snapshot_every"] != 100:
            continue
        out.append(
            {
                "case": row["case"],
                "replayed": row["replayed"],
                "served_s": row["served_s"],
                "served_new_s": row["served_new_s"],
                "served_met": bool(max(row["served_s"], row["served_new_s"]) <= 1.0),
                "after_listen_s": row["after_listen_s"],
                "after_listen_over_read_apply": row["after_listen_over_read_apply"],
                "bound_met": bool(row["after_listen_over_read_apply"] <= 1.5),
            }
        )
    return out


def main(argv: list[str] | None = None) -> None:
    script_main(NAME, __doc__, run, argv)


if __name__ == "__main__":
    main()
