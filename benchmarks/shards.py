"""Shards: the scheduler's load, Dask's responsiveness, throughput, and a shard
server killed.

One cluster of real processes per model size: a ``dask scheduler``, two
training workers, four workers with the ``ftps-server`` resource (they serve
the shards) and one more worker (with a ``tiny`` resource, unused).
For each size the variants are interleaved (``in-scheduler``: the parameter
server in the scheduler; ``S=1, 2, 4``: on shard servers), each a fresh
server and store, each given the same warm-up ``train()`` then the measured
one:

- ``sched_cpu_ms``: the scheduler process's CPU time (user + system, from
  ``/proc``) per update over the measured call; ``servers_cpu_ms`` the shard
  servers' (their worker processes');
- ``updates_s``: updates per second of the measured ``train()`` loop;
- at one size, while a ``train()`` runs: the round trip of a trivial scheduler
  call every 20 ms (``rtt_ms`` p50 and p99) and the time to submit and gather
  1,000 tiny tasks on the threads the training leaves free (``tiny_s``),
  against the same with nothing training (``idle``).

Then ``kill``: a model of two 1e6-parameter shards trains while the worker
process serving shard 0 is SIGKILLed three times; each time, from the kill to
the shard served again (its new incarnation answering ``status``), and the
scheduler's own count from noticing the loss. At the end every shard must hold
every update once (lost 0, twice 0) and ``recover(store)`` must equal the live
model.
"""

from __future__ import annotations

import os
import signal
import statistics
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import (
    Column,
    format_table,
    ratio,
    scratch_dir,
    script_main,
    write_json,
)
from benchmarks._endtoend import BATCH, digits_data, mlp_for

NAME = "shards"
VARIANTS = ("in-scheduler", "S=1", "S=2", "S=4")
SERVER = {"ftps-server": 1}


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _Cluster:
    """The processes of one size's measurements."""

    def __init__(self, folder: Path) -> None:
        from distributed import Client

        from dask_ftps._processes import free_port, start_scheduler, start_workers

        self.folder = folder
        port = free_port()
        self.address = f"tcp://127.0.0.1:{port}"
        self.scheduler = start_scheduler(port, folder / "scheduler.log")
        self.groups = [
            start_workers(self.address, 2, folder / "train.log"),
            start_workers(self.address, 4, folder / "servers.log", resources=SERVER),
            start_workers(self.address, 1, folder / "tiny.log", resources={"tiny": 1}),
        ]
        self.client = Client(self.address, timeout="60s")
        self.client.wait_for_workers(7, timeout=120)
        self.idle_rate, self.idle_servers_rate = self.idle_cpu()

    def idle_cpu(self, seconds: float = 5.0) -> tuple[float, float]:
        """CPU seconds per second of the scheduler, and of the four tagged
        workers together, with nothing to do."""
        time.sleep(1.0)
        servers = self.pids("ftps-server").values()
        before = _cpu_seconds(self.scheduler.pid), sum(map(_cpu_seconds, servers))
        t0 = time.perf_counter()
        time.sleep(seconds)
        wall = time.perf_counter() - t0
        return (
            (_cpu_seconds(self.scheduler.pid) - before[0]) / wall,
            (sum(map(_cpu_seconds, servers)) - before[1]) / wall,
        )

    def pids(self, resource: str) -> dict[str, int]:
        info = self.client.scheduler_info(n_workers=-1)["workers"]
        where = [a for a, w in info.items() if w.get("resources", {}).get(resource)]
        return self.client.run(os.getpid, workers=where) if where else {}

    def close(self) -> None:
        self.client.close()
        for group in self.groups:
            group.stop()
        self.scheduler.stop()


def _register(cluster: _Cluster, store: Path, model: Any, variant: str) -> None:

    from benchmarks._common import register_fresh
    from dask_ftps import SGD, ParameterServer

    shards = None if variant == "in-scheduler" else int(variant.split("=")[1])
    # S=1 on a shard server, not in the scheduler (the scheduler reads this at
    # the plugin's start: set it there).
    cluster.client.run_on_scheduler(_on_workers, shards == 1)
    register_fresh(
        cluster.client,
        ParameterServer(str(store), model=model, optimizer=SGD(lr=0.05), shards=shards),
    )


def _on_workers(value: bool) -> None:
    import dask

    dask.config.set({"ftps.shards.on-workers": value})


def _train(client: Any, data: tuple, name: str, epochs: int = 1) -> Any:
    import dask_ftps

    X, y = data
    return dask_ftps.train(
        client,
        X,
        y,
        epochs=epochs,
        batch_size=BATCH,
        n_shards=2,
        progress=False,
        run_name=name,
    )


def measure(
    cluster: _Cluster, store: Path, model: Any, variant: str, data: tuple
) -> dict:
    """One variant: warm-up train(), then the measured one with CPU counted."""
    _register(cluster, store, model, variant)
    warm = (data[0][: 16 * BATCH], data[1][: 16 * BATCH])
    _train(cluster.client, warm, "warm")
    servers = cluster.pids("ftps-server")
    sched = cluster.scheduler.pid
    before = _cpu_seconds(sched), {a: _cpu_seconds(p) for a, p in servers.items()}
    t0 = time.perf_counter()
    result = _train(cluster.client, data, "measured")
    wall = time.perf_counter() - t0
    after = _cpu_seconds(sched), {a: _cpu_seconds(p) for a, p in servers.items()}
    updates = result.minibatches
    server_cpu = sum(after[1][a] - before[1][a] for a in servers)
    sched_cpu = after[0] - before[0]
    return {
        "variant": variant,
        "updates": updates,
        "updates_s": updates / result.seconds,
        "wall_s": wall,
        "sched_cpu_ms": 1e3 * sched_cpu / updates,
        # Less what the scheduler spends idle in the same time (its system
        # monitor, the workers' heartbeats): what the training costs it.
        "sched_cpu_ms_above_idle": 1e3
        * max(0.0, sched_cpu - cluster.idle_rate * wall)
        / updates,
        "servers_cpu_ms": 1e3 * server_cpu / updates,
        "servers_cpu_ms_above_idle": 1e3
        * max(0.0, server_cpu - cluster.idle_servers_rate * wall)
        / updates,
        "accuracy": result.history[-1]["accuracy"],
    }


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def responsiveness(cluster: _Cluster, training: threading.Thread | None) -> dict:
    """Round trips of a trivial scheduler call and 1,000 tiny tasks, while
    ``training`` runs (None: nothing trains)."""
    client = cluster.client
    rtts: list[float] = []
    tiny: list[float] = []

    def busy() -> bool:
        return training is None or training.is_alive()

    deadline = time.perf_counter() + (6.0 if training is None else 600.0)
    while busy() and time.perf_counter() < deadline:
        t0 = time.perf_counter()
        client.sync(client.scheduler.ncores)
        rtts.append(1e3 * (time.perf_counter() - t0))
        if len(rtts) % 25 == 5:
            t0 = time.perf_counter()
            # Anywhere: the threads the training tasks leave free (the same
            # number in every variant).
            futures = client.map(_tiny, range(1000), pure=False)
            client.gather(futures)
            tiny.append(time.perf_counter() - t0)
            del futures
        time.sleep(0.02)
        if training is None and len(tiny) >= 3 and len(rtts) >= 150:
            break
    return {
        "rtt_ms_p50": _percentile(rtts, 50),
        "rtt_ms_p99": _percentile(rtts, 99),
        "rtt_samples": len(rtts),
        "tiny_s": statistics.median(tiny) if tiny else float("nan"),
        "tiny_samples": len(tiny),
    }


def _tiny(i: int) -> int:
    return i + 1


def responsive(
    cluster: _Cluster, folder: Path, model: Any, data: tuple, epochs: int
) -> list[dict]:
    rows = [{"variant": "idle", **responsiveness(cluster, None)}]
    for variant in ("in-scheduler", "S=2"):
        _register(cluster, folder / f"resp-{variant}.zarr", model, variant)
        _train(cluster.client, (data[0][: 16 * BATCH], data[1][: 16 * BATCH]), "w")
        failed: list[BaseException] = []

        def train_in_thread(failed: list = failed) -> None:
            try:
                _train(cluster.client, data, "r", epochs)
            except BaseException as e:  # noqa: BLE001 - raised below
                failed.append(e)

        thread = threading.Thread(target=train_in_thread, daemon=True)
        thread.start()
        time.sleep(1.0)  # into the run
        rows.append({"variant": variant, **responsiveness(cluster, thread)})
        thread.join()
        if failed:
            raise RuntimeError(f"train() under the probes failed: {failed[0]!r}")
    return rows


def kill_shard_server(cluster: _Cluster, folder: Path, kills: int, data: tuple) -> dict:
    """SIGKILL the process serving shard 0 ``kills`` times during a train()."""
    import dask_ftps

    client = cluster.client
    model = mlp_for(2_000_000)  # two shards of 1e6 parameters
    store = folder / "kill.zarr"
    _register(cluster, store, model, "S=2")
    status = dask_ftps.status(client)
    sizes = [s["params"] for s in status["shards"]]
    outcome: dict[str, Any] = {}
    thread = threading.Thread(
        target=lambda: outcome.setdefault("result", _train(client, data, "k", 2)),
        daemon=True,
    )
    thread.start()
    served = []
    for _ in range(kills):
        time.sleep(2.0)
        status = dask_ftps.status(client)
        shard = status["shards"][0]
        address, incarnation = shard["address"], shard["incarnation"]
        pid = client.run(os.getpid, workers=[address])[address]
        killed = time.perf_counter()
        os.kill(pid, signal.SIGKILL)
        while True:  # the new incarnation answers
            status = dask_ftps.status(client)
            if status["shards"][0]["incarnation"] > incarnation:
                break
            time.sleep(0.005)
        back = time.perf_counter() - killed
        event = status["recoveries"][-1]
        served.append(
            {
                "kill_to_served_s": back,
                "noticed_to_served_s": event.get("since_lost_s"),
                "start_s": event.get("start_s"),
                "recovery": event.get("recovery"),
            }
        )
    thread.join()
    result = outcome["result"]
    info = dask_ftps.inspect(str(store))
    total = result.minibatches
    twice = lost = 0
    for shard in info["shards"]:  # one run on a fresh store: every update once
        ids = [row["update_id"] for row in shard["global"]]
        twice += sum(n - 1 for n in Counter(ids).values())
        twice += max(0, shard["updates"] - total)
        lost += max(0, total - shard["updates"])
        assert len(ids) == shard["updates"] - shard["first_row"]
    version, live = dask_ftps.get_model(client)
    offline_version, offline = dask_ftps.recover(str(store))
    exact = version == offline_version and all(
        np.array_equal(live[k], offline[k]) for k in live
    )
    return {
        "shard_params": sizes,
        "kills": served,
        "updates": total,
        "shard_updates": [s["updates"] for s in info["shards"]],
        "lost": lost,
        "twice": twice,
        "exact": exact,
    }


def run(quick: bool = False, out: str = "bench-results", store_dir=None) -> dict:
    t0 = time.perf_counter()
    sizes = (100_000,) if quick else (100_000, 1_000_000, 10_000_000)
    rounds = 1 if quick else 2
    X, y = digits_data()
    rows: list[dict] = []
    with scratch_dir(store_dir, "ftps-shards-") as folder:
        cluster = _Cluster(folder)
        idle = cluster.idle_rate
        try:
            for size in sizes:
                model = mlp_for(size)
                # About 100 measured updates at 1e7, 225 below.
                n = 100 * BATCH if size >= 10_000_000 else len(X) // 8 * 8
                data = (X[:n], y[:n])
                for r in range(rounds):
                    order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]
                    for variant in order:
                        store = folder / f"{size}-{variant}-{r}.zarr"
                        row = measure(cluster, store, model, variant, data)
                        rows.append({"n_params": model.n_params(), "round": r, **row})
                        print(
                            f"  {size:>10,} {variant:<12} {row['updates_s']:7.1f}/s "
                            f"sched {row['sched_cpu_ms']:.3f} ms/update",
                            flush=True,
                        )
            resp_model = mlp_for(1_000_000)
            # About 20 s of training per variant at 1e6 (seconds with --quick).
            resp = responsive(
                cluster,
                folder,
                resp_model,
                (X[: 8 * 225], y[: 8 * 225]) if quick else (X, y),
                1 if quick else 3,
            )
            kill = kill_shard_server(cluster, folder, 1 if quick else 3, (X, y))
        finally:
            cluster.close()
    summary = _summary(rows)
    fit = per_shard_cost(rows)
    doc = {
        "quick": quick,
        "seconds": time.perf_counter() - t0,
        "per_shard_cost": fit,
        "scaling_model": scaling_model(fit),
        "rounds": rounds,
        "idle_sched_cpu_s_per_s": idle,
        "rows": rows,
        "summary": summary,
        "responsiveness": resp,
        "kill": kill,
    }
    print(table(summary))
    write_json(out, NAME, doc)
    return doc


def _summary(rows: list[dict]) -> list[dict]:
    """Medians over rounds, and each variant's scheduler CPU per update as a
    share of the in-scheduler server's at that size."""
    out = []
    for n in sorted({r["n_params"] for r in rows}):
        here = [r for r in rows if r["n_params"] == n]
        base = statistics.median(
            r["sched_cpu_ms"] for r in here if r["variant"] == "in-scheduler"
        )
        base_above = statistics.median(
            r["sched_cpu_ms_above_idle"] for r in here if r["variant"] == "in-scheduler"
        )
        for variant in VARIANTS:
            mine = [r for r in rows if r["n_params"] == n and r["variant"] == variant]
            cpu = statistics.median(r["sched_cpu_ms"] for r in mine)
            out.append(
                {
                    "n_params": n,
                    "variant": variant,
                    "updates_s": statistics.median(r["updates_s"] for r in mine),
                    "sched_cpu_ms": cpu,
                    "sched_share": ratio(cpu, base),
                    "sched_cpu_ms_above_idle": statistics.median(
                        r["sched_cpu_ms_above_idle"] for r in mine
                    ),
                    "sched_share_above_idle": ratio(
                        statistics.median(r["sched_cpu_ms_above_idle"] for r in mine),
                        base_above,
                    ),
                    "servers_cpu_ms": statistics.median(
                        r["servers_cpu_ms"] for r in mine
                    ),
                }
            )
    return out


def per_shard_cost(rows: list[dict]) -> dict:
    """Fit one shard server's CPU per update, ``a + b * p`` (``p`` the shard's
    parameters), to the measured shard-server rows (above idle)."""
    points = [
        (
            r["n_params"] / int(r["variant"][2:]),
            r["servers_cpu_ms_above_idle"] / int(r["variant"][2:]),
        )
        for r in rows
        if r["variant"].startswith("S=")
    ]
    p = np.array([x for x, _ in points])
    ms = np.array([y for _, y in points])
    b, a = np.polyfit(p, ms, 1)
    return {
        "a_ms": float(a),
        "b_ms_per_param": float(b),
        "points": [{"shard_params": x, "ms_per_update": y} for x, y in points],
    }


#: The scaling model's network: 10 Gb/s per host, full duplex.
NIC_BYTES_S = 10e9 / 8


def scaling_model(fit: dict) -> list[dict]:
    """Updates per second a sharded server can take, from the measured
    per-shard cost, for S shard servers each on its own core and host:

    - every update passes every shard: ``X <= 1 / (a + b * P / S)``;
    - each shard's host receives a 4-byte slice of P/S parameters per update,
      and sends as much back: ``X <= NIC / (4 * P / S)``;
    - workers are assumed enough to push that many (their own cost is not
      modelled), and the scheduler is not in the path (it coordinates).
    """
    a = max(fit["a_ms"], 1e-3) / 1e3
    b = max(fit["b_ms_per_param"], 0.0) / 1e3
    out = []
    for n_params in (1_000_000, 10_000_000, 100_000_000):
        for shards in (1, 2, 4, 8, 16, 32, 64):
            cpu = 1.0 / (a + b * n_params / shards)
            net = NIC_BYTES_S / (4.0 * n_params / shards)
            out.append(
                {
                    "n_params": n_params,
                    "shards": shards,
                    "cpu_bound_s": cpu,
                    "network_bound_s": net,
                    "updates_s": min(cpu, net),
                    "bound": "shard CPU" if cpu < net else "network",
                }
            )
    return out


def table(summary: list[dict]) -> str:
    return format_table(
        "Scheduler CPU per update and throughput, PS in the scheduler vs on shard servers",
        [
            Column("n_params", "params", "{:,}"),
            Column("variant", "variant", "{}"),
            Column("updates_s", "updates/s", "{:.1f}"),
            Column("sched_cpu_ms", "sched ms/upd", "{:.3f}"),
            Column("sched_share", "share", "{:.3f}"),
            Column("sched_cpu_ms_above_idle", "above idle", "{:.3f}"),
            Column("sched_share_above_idle", "share", "{:.3f}"),
            Column("servers_cpu_ms", "servers ms/upd", "{:.3f}"),
        ],
        summary,
    )


def main(argv: list[str] | None = None) -> None:
    script_main(NAME, __doc__, run, argv)


if __name__ == "__main__":
    main()
