"""The chaos harness as a supervisor: it restarts a dead scheduler without
waiting for the interrupted train() to fail, and survives its client closing."""

from __future__ import annotations

import threading
import time

import pytest

import dask_ftps
from dask_ftps import _chaos

pytestmark = pytest.mark.slow


def test_a_slow_train_and_a_closed_client_do_not_stop_the_harness(
    tmp_path, monkeypatch
) -> None:
    """The first restart comes 5 s late and the client gives up after 3 s, so it
    closes; a train() that failed takes 20 s more to return (as one waiting out
    its client's reconnection did). The harness restarts and checks the
    scheduler before that train() returns, makes a new client, and every check
    holds."""
    real_train = dask_ftps.train
    returned: list[float] = []  # when a failed train() returned

    def slow_to_fail(*args, **kwargs):
        try:
            return real_train(*args, **kwargs)
        except BaseException:
            time.sleep(20)
            returned.append(time.monotonic())
            raise

    monkeypatch.setattr(dask_ftps, "train", slow_to_fail)
    monkeypatch.setattr(_chaos, "CLIENT_TIMEOUT", "3s")
    real_start = _chaos._Cluster.start_scheduler
    late = threading.Event()

    def start_scheduler(cluster, aimed_share):
        if cluster.starts == 1 and not late.is_set():  # the first restart only
            late.set()
            time.sleep(5)
        return real_start(cluster, aimed_share)

    monkeypatch.setattr(_chaos._Cluster, "start_scheduler", start_scheduler)
    recovered: list[float] = []  # when a recovery was checked

    def say(line: str) -> None:
        if line.startswith("scheduler died"):
            recovered.append(time.monotonic())

    options = _chaos.ChaosOptions(seconds=15, seed=5, store=str(tmp_path / "run.zarr"))
    report = _chaos.run_chaos(options, say=say)
    assert late.is_set() and recovered and returned, (report.lines(), returned)
    assert recovered[0] < returned[0]  # checked before the old train() returned
    assert report.new_clients >= 1
    assert report.errors == []
    assert report.lost == report.duplicates == 0
    assert all(r.exact for r in report.recoveries) and report.final_exact
