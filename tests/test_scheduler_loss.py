"""A real `dask scheduler` process SIGKILLed mid-training, restarted on the same port."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections import Counter

import numpy as np
import pytest
from distributed import Client
from distributed.utils import open_port
from distributed.utils_test import popen

import dask_ftps
from dask_ftps import SGD, ParameterServer
from dask_ftps._processes import environment, scheduler_args, worker_args
from dask_ftps.models import MLP
from dask_ftps.testing import KILL_ENV

from .conftest import digits

MODEL = MLP(n_features=64, hidden=(32,), n_classes=10, seed=0)
EPOCHS, BATCH = 4, 32


def scheduler(port: int, store: str | None = None, kill_at: str | None = None, *extra):
    """A real ``dask scheduler`` process; with ``kill_at`` (``"<regex>:<n>"``) it
    SIGKILLs itself before its n-th matching store file operation."""
    preloads = ("dask_ftps.testing",) if kill_at else ()
    args = scheduler_args(port, store, preloads=preloads, extra=extra)
    env = {**environment(), KILL_ENV: kill_at or ""}
    return popen(args, capture_output=True, env=env)


def workers(address: str):
    return popen(worker_args(address, 2), capture_output=True)


def wait_for_workers(client: Client, n: int, timeout: float = 60) -> None:
    client.wait_for_workers(n, timeout=timeout)


def train(client: Client):
    X_train, _, y_train, _ = digits()
    return dask_ftps.train(
        client, X_train, y_train, epochs=EPOCHS, batch_size=BATCH, progress=False
    )


def expected_ids() -> set[str]:
    steps = [-(-n // BATCH) for n in (674, 673)]
    return {
        f"0:{e}:{s}:{t}"
        for e in range(EPOCHS)
        for s, n in enumerate(steps)
        for t in range(n)
    }


POINTS = {
    # where the scheduler dies -> (kill before the n-th matching file, snapshot_every)
    # after a commit's payload array, before its record (the restart adopts it)
    "during-group-commit": (r"ftps/log/\d+$:90", 1000),
    "between-commits": (None, 1000),  # an outside SIGKILL at a random moment
    # after the first chunk of the second snapshot since the start
    "during-snapshot": (r"snapshots/v\d+\.\w+/zarr\.json$:3", 40),
}


@pytest.mark.slow
@pytest.mark.parametrize("point", sorted(POINTS))
def test_scheduler_killed_mid_training_resumes_exactly_once(tmp_path, point):
    crash_at, snapshot_every = POINTS[point]
    store = str(tmp_path / "run.zarr")
    port = open_port()
    address = f"tcp://127.0.0.1:{port}"
    total = len(expected_ids())

    with (
        scheduler(port, store, crash_at) as first,  # no run yet: no server
        workers(address),
        Client(address, timeout="60s") as client,
    ):
        wait_for_workers(client, 2)
        client.register_plugin(
            ParameterServer(
                store,
                model=MODEL,
                optimizer=SGD(lr=0.05, momentum=0.5),
                snapshot_every=snapshot_every,
            )
        )
        if not crash_at:  # an outside SIGKILL once a third of the run is in

            def kill_later() -> None:
                while dask_ftps.status(client)["updates"] < total // 3:
                    time.sleep(0.01)
                first.send_signal(signal.SIGKILL)

            threading.Thread(target=kill_later, daemon=True).start()
        with pytest.raises(Exception):  # noqa: B017 - the scheduler is gone
            train(client)
        first.wait(30)
        assert first.returncode == -signal.SIGKILL
        lost = dask_ftps.inspect(store)
        assert 0 < lost["updates"] < total

        with scheduler(port, store=store), workers(address):
            wait_for_workers(client, 2)
            status = dask_ftps.status(client)
            assert status["incarnation"] == 2
            assert status["version"] == lost["version"]  # nothing accepted is lost
            assert status["recovery"]["source"] == "snapshot"
            result = train(client)  # the same call resumes the run

            info = dask_ftps.inspect(store)
            assert info["updates"] == result.minibatches == total
            assert result.version == total  # async: one version per update
            ids = [row["update_id"] for row in info["global"]]
            assert max(Counter(ids).values()) == 1  # none twice
            assert set(ids) <= expected_ids()
            assert len(ids) == total - info["first_row"]
            if snapshot_every > total:
                assert set(ids) == expected_ids()  # every minibatch, once
            version, params = dask_ftps.get_model(client)
            offline_version, offline = dask_ftps.recover(store)
            assert version == offline_version == total
            for name, value in params.items():
                np.testing.assert_array_equal(offline[name], value)


def test_preload_requiring_a_run_refuses_to_start_without_one(tmp_path):
    port = open_port()
    empty = str(tmp_path / "empty.zarr")
    with scheduler(port, empty, None, "--ftps-require-run") as proc:
        try:
            out, _ = proc.communicate(timeout=60)  # popen sends stderr to stdout
        except subprocess.TimeoutExpired:
            pytest.fail("the scheduler started without a run to resume")
    assert proc.returncode != 0
    assert b"holds no run to resume" in out
