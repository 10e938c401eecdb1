"""dask-jobqueue: the preload in ``scheduler_options``, a job lost and replaced, and
the driver lost and restarted on the same store.

``dask_jobqueue.local.LocalCluster`` is a JobQueueCluster whose jobs are local
``dask worker`` processes (each a nanny and the worker process it starts),
submitted, scaled and cancelled by the same machinery as a Slurm or PBS job. Its
scheduler runs inside the process that builds the cluster, the driver: losing the
driver loses the scheduler and the parameter server with it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections import Counter

import dask
import dask_jobqueue.local as jobqueue  # a test dependency: missing is a failure
import numpy as np
import psutil
import pytest
from distributed import Client
from distributed.core import rpc
from distributed.utils_test import poll_for

import dask_ftps
from dask_ftps import SGD, ParameterServer
from dask_ftps._core import check_reply
from dask_ftps._processes import Process, free_port
from dask_ftps.models import MLP

from .conftest import digits

MODEL = MLP(n_features=64, hidden=(32,), n_classes=10, seed=0)
OPTIMIZER = SGD(lr=0.05, momentum=0.5)
JOBS, EPOCHS, BATCH = 2, 8, 16
SHARDS = (674, 673)  # the digits training split, one shard per job's thread
PER_EPOCH = sum(-(-n // BATCH) for n in SHARDS)
TOTAL = EPOCHS * PER_EPOCH


def expected_ids() -> set[str]:
    """Every minibatch of run 0: ``run:epoch:shard:step``."""
    return {
        f"0:{e}:{s}:{t}"
        for e in range(EPOCHS)
        for s, n in enumerate(SHARDS)
        for t in range(-(-n // BATCH))
    }


def assert_exactly_once(ids: list[str]) -> None:
    twice = sorted(i for i, n in Counter(ids).items() if n > 1)
    assert not twice, f"applied more than once: {twice[:10]}"
    missing = expected_ids() - set(ids)
    assert not missing, f"never applied: {sorted(missing)[:10]}"
    assert len(ids) == TOTAL, set(ids) - expected_ids()


def cluster_options(
    store: str, tmp_path, port: int = 0, snapshot_every: int | None = None
) -> dict:
    """``LocalCluster`` keywords: jobs of one core (one worker process behind a
    nanny); the scheduler on 127.0.0.1 with the dask_ftps preload on ``store``
    (a server at start if the store holds a run). JSON, for the driver script."""
    return {
        "cores": 1,
        "memory": "1GiB",
        "processes": 1,
        "python": sys.executable,
        "local_directory": str(tmp_path / "jobs"),
        "worker_extra_args": ["--host", "127.0.0.1", "--no-dashboard"],
        "scheduler_options": {
            "host": "127.0.0.1",
            "port": port,
            "dashboard": False,
            "dashboard_address": None,
            "preload": ["dask_ftps.preload"],
            "preload_argv": [
                [
                    "--ftps-store",
                    store,
                    "--ftps-mode",
                    "async",
                    *([] if snapshot_every is None else ["--ftps-snapshot-every"]),
                    *([] if snapshot_every is None else [str(snapshot_every)]),
                ]
            ],
        },
    }


def job_processes(job) -> list[psutil.Process]:
    """A job's processes: ``dask worker`` (the nanny; jobqueue's job id is its
    pid) and what it started (the worker process)."""
    root = psutil.Process(int(job.job_id))
    return [root, *root.children(recursive=True)]


def gone(procs: list[psutil.Process]) -> bool:
    """Whether every one has exited (a zombie not reaped yet counts as exited)."""

    def exited(p: psutil.Process) -> bool:
        try:
            return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    return all(exited(p) for p in procs)


def in_thread(func, *args, **kwargs) -> concurrent.futures.Future:
    """``func(*args, **kwargs)`` in a daemon thread (a hung call cannot block the
    test's clean-up)."""
    future: concurrent.futures.Future = concurrent.futures.Future()

    def run() -> None:
        try:
            future.set_result(func(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - re-raised by future.result()
            future.set_exception(e)

    threading.Thread(target=run, daemon=True).start()
    return future


@pytest.fixture
def job_leftovers():
    """Processes of the jobs a test starts in-process: whatever is left of them at
    the end is SIGKILLed. A job's close kills only its first process; its
    worker process is no child of the test, so the test lists it here."""
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    tracked: list[psutil.Process] = []
    yield tracked
    new = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    for p in [*tracked, *new]:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()  # psutil checks the pid was not reused


@pytest.mark.slow
def test_a_lost_job_is_replaced_by_scale_and_every_minibatch_is_applied_once(
    tmp_path, job_leftovers
):
    """SIGKILL every process of a job whose worker runs a shard's task; jobqueue
    drops the lost job and ``cluster.scale`` submits a new one. The run ends with
    every minibatch applied once, and the model is the store's, bit for bit."""
    store = str(tmp_path / "run.zarr")
    X_train, X_test, y_train, y_test = digits()
    with (
        # How long jobqueue keeps a lost job before it drops it (and scale can
        # submit another); 15 s by default.
        dask.config.set({"distributed.deploy.lost-worker-timeout": "100ms"}),
        jobqueue.LocalCluster(**cluster_options(store, tmp_path)) as cluster,
        Client(cluster) as client,
    ):
        # The preload ran at scheduler start, on a store without a run: no server.
        assert [p.name for p in cluster.scheduler.preloads] == ["dask_ftps.preload"]
        assert "ftps" not in cluster.scheduler.plugins
        cluster.scale(JOBS)
        client.wait_for_workers(JOBS, timeout=60)
        jobs = {name: job_processes(job) for name, job in cluster.workers.items()}
        job_leftovers.extend(p for procs in jobs.values() for p in procs)
        first_workers = set(client.scheduler_info()["workers"])
        client.register_plugin(ParameterServer(store, model=MODEL, optimizer=OPTIMIZER))
        training = in_thread(
            dask_ftps.train,
            client, X_train, y_train, epochs=EPOCHS, batch_size=BATCH,
            progress=False,
        )  # fmt: skip

        victim: dict[str, str] = {}

        def a_worker_runs_a_shard() -> bool:
            if training.done():
                training.result()  # its error, if it failed
                pytest.fail("training ended before a job was killed")
            if dask_ftps.status(client)["updates"] < TOTAL // 4:
                return False
            for address, keys in client.processing().items():
                if any(str(k).startswith("ftps-train-") for k in keys):
                    victim["address"] = address
                    return True
            return False

        poll_for(a_worker_runs_a_shard, timeout=60, period=0.01)
        address = victim["address"]
        name = client.scheduler_info()["workers"][address]["name"]
        (worker_pid,) = client.run(os.getpid, workers=[address]).values()
        assert worker_pid in {p.pid for p in jobs[name]}
        for p in jobs[name]:
            p.kill()  # the job is lost: SIGKILL its nanny and its worker
        accepted_at_kill = dask_ftps.status(client)["updates"]
        poll_for(lambda: gone(jobs[name]), timeout=30)

        # jobqueue drops the lost job, then scale submits another in its place.
        poll_for(lambda: name not in cluster.workers, timeout=30)
        assert len(cluster.workers) == JOBS - 1  # not replaced by itself
        assert address not in client.scheduler_info()["workers"]
        cluster.scale(JOBS)
        client.wait_for_workers(JOBS, timeout=60)
        poll_for(lambda: name in cluster.workers, timeout=30)
        replacement = job_processes(cluster.workers[name])
        job_leftovers.extend(replacement)
        assert not {p.pid for p in replacement} & {p.pid for p in jobs[name]}
        (new_worker,) = set(client.scheduler_info()["workers"]) - first_workers

        result = training.result(timeout=120)
        assert accepted_at_kill < TOTAL  # the job was lost mid-run
        assert result.trained and (result.run, result.minibatches) == (0, TOTAL)
        assert result.version == TOTAL  # async: one version per update
        rows = dask_ftps.records(client)["global"]
        assert_exactly_once([r["update_id"] for r in rows])
        assert {r["worker"] for r in rows} <= first_workers | {new_worker}
        status = dask_ftps.status(client)
        assert address not in status["workers"] and new_worker in status["workers"]

        version, params = dask_ftps.get_model(client)
        offline_version, offline = dask_ftps.recover(store)
        assert version == offline_version == TOTAL
        assert set(offline) == set(params)
        for key, value in params.items():
            np.testing.assert_array_equal(offline[key], value)
        assert (MODEL.predict(params, X_test) == y_test).mean() >= 0.9


# -- the driver ---------------------------------------------------------------------

DRIVER = '''\
"""A driver: a jobqueue cluster (its scheduler in this process, with the
dask_ftps preload on the store) of two jobs trains the run and reports."""
import json
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
from dask_jobqueue.local import LocalCluster
from distributed import Client

import dask_ftps
from dask_ftps import ParameterServer
from dask_ftps.models import model_from_dict
from dask_ftps.optim import optimizer_from_dict

settings = json.loads(Path(sys.argv[1]).read_text())
out = Path(sys.argv[2])
data = np.load(settings["data"])


def report(event, **fields):
    print("DRIVER " + json.dumps({"event": event, **fields}), flush=True)


with LocalCluster(**settings["cluster"]) as cluster, Client(cluster) as client:
    preloaded = "ftps" in cluster.scheduler.plugins  # the store held a run
    cluster.scale(settings["jobs"])
    client.wait_for_workers(settings["jobs"], timeout=60)
    if not preloaded:
        client.register_plugin(
            ParameterServer(
                settings["store"],
                model=model_from_dict(settings["model"]),
                optimizer=optimizer_from_dict(settings["optimizer"]),
                snapshot_every=settings["snapshot_every"],
            )
        )
    status = dask_ftps.status(client)
    report(
        "serving",
        address=cluster.scheduler.address,
        preloaded=preloaded,
        **{key: status[key] for key in ("incarnation", "version", "updates")},
    )
    result = dask_ftps.train(client, data["X"], data["y"], **settings["train"])
    version, params = dask_ftps.get_model(client)
    np.savez(out / "model.npz", **params)
    ids = [row["update_id"] for row in dask_ftps.records(client)["global"]]
    report("done", result=asdict(result), version=version, ids=ids)
'''


def reported(driver: Process, event: str) -> dict | None:
    """The driver's ``event`` report, if it printed one."""
    for line in driver.output().splitlines():
        if line.startswith("DRIVER "):
            report = json.loads(line.removeprefix("DRIVER "))
            if report["event"] == event:
                return report
    return None


def served_updates(address: str) -> int:
    """Updates the server at ``address`` has accepted."""

    async def ask() -> dict:
        async with rpc(address, timeout=5) as scheduler:
            return check_reply(await scheduler.ftps_status(), "ftps_status")

    return asyncio.run(ask())["updates"]


@pytest.mark.slow
def test_a_lost_driver_is_restarted_on_the_store_and_resumes_the_run(
    tmp_path, monkeypatch
):
    """SIGKILL the driver (and the scheduler in it) mid-training and whatever it
    leaves of its jobs; a new driver with the same preload and store and the same
    train() call resumes the run: every minibatch applied once, nothing accepted
    lost, and the model the store rebuilds offline, bit for bit."""
    # No snapshot in this run (snapshot_every below): no replay budget either,
    # for the drivers' processes and the jobs they start.
    monkeypatch.setenv("DASK_FTPS__STORE__REPLAY_BUDGET", "None")
    store = str(tmp_path / "run.zarr")
    X_train, X_test, y_train, y_test = digits()
    np.savez(tmp_path / "digits.npz", X=X_train, y=y_train)
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)

    def driver(n: int) -> Process:
        out = tmp_path / f"driver-{n}"
        out.mkdir()
        settings = {
            "store": store,
            "data": str(tmp_path / "digits.npz"),
            "jobs": JOBS,
            # No snapshot but the first, so the store keeps every commit's rows:
            # the first driver's server is told so, and the preload's (the
            # restart's) by its --ftps-snapshot-every.
            "cluster": cluster_options(
                store, tmp_path, free_port(), snapshot_every=2 * TOTAL
            ),
            "snapshot_every": 2 * TOTAL,
            "model": MODEL.to_dict(),
            "optimizer": OPTIMIZER.to_dict(),
            "train": {"epochs": EPOCHS, "batch_size": BATCH, "progress": False},
        }
        (out / "settings.json").write_text(json.dumps(settings))
        args = [sys.executable, str(script), str(out / "settings.json"), str(out)]
        return Process(args, out / "log")

    def serving(proc: Process) -> dict:
        def up() -> bool:
            if not proc.alive:
                pytest.fail(f"the driver exited:\n{proc.output()[-5000:]}")
            return reported(proc, "serving") is not None

        poll_for(up, timeout=90, fail_func=lambda: print(proc.output()[-5000:]))
        return reported(proc, "serving")

    with driver(1) as first:  # its process group: the driver and its jobs
        started = serving(first)
        assert (started["preloaded"], started["incarnation"]) == (False, 1)

        def a_third_accepted() -> bool:
            if not first.alive:
                pytest.fail(f"the driver exited:\n{first.output()[-5000:]}")
            return served_updates(started["address"]) >= TOTAL // 3

        poll_for(a_third_accepted, timeout=60, period=0.02)
        jobs = psutil.Process(first.pid).children(recursive=True)
        assert len(jobs) >= 2 * JOBS  # each job: a nanny and its worker
        first.kill()  # the driver is lost, and the scheduler in it
        assert first.wait(30) == -signal.SIGKILL
        first.kill_group()  # what is left of its jobs belongs to the test
        poll_for(lambda: gone(jobs), timeout=30)
    lost = dask_ftps.inspect(store)
    assert 0 < lost["updates"] < TOTAL  # the driver was lost mid-run
    assert lost["incarnation"] == 1

    with driver(2) as second:
        try:
            code = second.wait(120)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the new driver did not finish:\n{second.output()[-5000:]}")
        assert code == 0, second.output()[-5000:]
        restarted, done = reported(second, "serving"), reported(second, "done")
    # The preload rebuilt the run at scheduler start: nothing accepted was lost.
    assert restarted["preloaded"] and restarted["incarnation"] == 2
    assert (restarted["version"], restarted["updates"]) == (
        lost["version"], lost["updates"],
    )  # fmt: skip
    result = done["result"]
    assert result["trained"] and (result["run"], result["minibatches"]) == (0, TOTAL)
    # It went on from the epoch the lost driver was in, not from the start.
    assert result["first_epoch"] <= lost["updates"] // PER_EPOCH
    # Every epoch has its record, one lost with the driver between an epoch's last
    # commit and its record too (that epoch is recorded again on resume).
    assert len(result["history"]) == EPOCHS
    assert len(dask_ftps.inspect(store)["runs"][0]["history"]) == EPOCHS

    info = dask_ftps.inspect(store)
    assert (info["updates"], info["incarnation"], info["first_row"]) == (TOTAL, 2, 0)
    ids = [row["update_id"] for row in info["global"]]
    assert_exactly_once(ids)
    assert info["global"][: lost["updates"]] == lost["global"]  # kept as it was
    assert done["ids"] == ids  # the live server's global dataset is the store's

    version, params = dask_ftps.recover(store)
    live = np.load(tmp_path / "driver-2" / "model.npz")
    assert version == done["version"] == result["version"] == TOTAL
    assert set(live.files) == set(params)
    for key, value in params.items():
        np.testing.assert_array_equal(live[key], value)
    assert (MODEL.predict(params, X_test) == y_test).mean() >= 0.9
