"""The chaos harness as a supervisor: it restarts a dead scheduler without
waiting for the interrupted train() to fail, and survives its client closing."""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest

import dask_ftps
from dask_ftps import _chaos

pytestmark = pytest.mark.slow

#: How long the test waits for what it forces (the client to close, the recovery
#: to be checked) before it gives up and lets the assertions fail.
PATIENCE = 60.0


def test_a_slow_train_and_a_closed_client_do_not_stop_the_harness(
    tmp_path, monkeypatch
) -> None:
    """One kill, and it is the scheduler's (no worker kills, no armed schedulers,
    ``kills=1``). The client gives up after 3 s, and the restart waits until it
    has closed, so the harness must make a new client. A train() that failed
    returns only once the recovery was checked (or after ``PATIENCE``, as one
    waiting out its client's reconnection did): a harness that waited for it
    before checking would check after it returned. Every check holds."""
    real_train = dask_ftps.train
    checked = threading.Event()  # the first recovery was checked
    returned: list[float] = []  # when a failed train() returned

    def slow_to_fail(*args, **kwargs):
        try:
            return real_train(*args, **kwargs)
        except BaseException:
            checked.wait(PATIENCE)
            returned.append(time.monotonic())
            raise

    monkeypatch.setattr(dask_ftps, "train", slow_to_fail)
    monkeypatch.setattr(_chaos, "CLIENT_TIMEOUT", "3s")
    harnesses: list[_chaos._Harness] = []
    real_init = _chaos._Harness.__init__

    def init(harness, *args, **kwargs):
        real_init(harness, *args, **kwargs)
        harnesses.append(harness)

    monkeypatch.setattr(_chaos._Harness, "__init__", init)
    real_start = _chaos._Cluster.start_scheduler
    closed_first: list[str] = []  # the client's status when the restart began

    def start_scheduler(cluster, aimed_share):
        if cluster.starts == 1:  # the first restart: once the client has closed
            client, t_end = harnesses[0].client, time.monotonic() + PATIENCE
            while client.status != "closed" and time.monotonic() < t_end:
                time.sleep(0.05)
            closed_first.append(client.status)
        return real_start(cluster, aimed_share)

    monkeypatch.setattr(_chaos._Cluster, "start_scheduler", start_scheduler)
    recovered: list[float] = []  # when a recovery was checked

    def say(line: str) -> None:
        if line.startswith("scheduler died"):
            recovered.append(time.monotonic())
            checked.set()

    options = _chaos.ChaosOptions(
        seconds=600, seed=5, store=str(tmp_path / "run.zarr"), interval=(0.5, 0.5),
        worker_share=0.0, aimed_share=0.0, kills=1,
    )  # fmt: skip
    report = _chaos.run_chaos(options, say=say)
    lines = report.lines()
    # The scenario: one SIGKILLed scheduler, restarted after its client closed.
    assert report.kills == Counter(scheduler=1), lines
    assert [r.kind for r in report.recoveries] == ["scheduler"], lines
    assert closed_first == ["closed"], (closed_first, lines)
    assert report.new_clients == 1, lines
    assert recovered and returned, (lines, recovered, returned)
    assert recovered[0] < returned[0]  # checked before the old train() returned
    assert report.errors == []
    assert report.lost == report.duplicates == 0
    assert all(r.exact for r in report.recoveries) and report.final_exact


def test_a_sharded_report_counts_shard_recoveries_and_one_server_lines_stay() -> None:
    """The report's accounting, without processes: a shard served again with
    fewer updates than it held is a loss, ids held twice are duplicates, and
    the sharded lines appear only with shards."""
    sharded = _chaos.ChaosOptions(shards=2)

    def shard(shard: int, **counts: int) -> _chaos.ShardRecovery:
        fields = {"acknowledged": 10, "stored": 11, "recovered": 11, "duplicates": 0}
        fields.update(counts)
        return _chaos.ShardRecovery(
            shard, "tcp://a", "tcp://b", 2, served_seconds=0.5 + shard,
            since_lost_s=0.1, **fields,
        )  # fmt: skip

    report = _chaos.ChaosReport(sharded, accuracy=0.95, final_exact=True)
    report.kills.update({"shard-server": 2, "worker": 1})
    report.shard_recoveries = [shard(0), shard(1)]
    assert report.ok, report.failures()
    assert report.shard_served() == (1.5, 1.5)
    lines = "\n".join(report.lines())
    assert "shard-server kills                  2" in lines
    assert "kills by kind                       shard-server 2, worker 1" in lines
    assert "kill -> shard served (median, max)  1.50 s, 1.50 s" in lines
    report.shard_recoveries.append(shard(1, acknowledged=12, recovered=9, duplicates=1))
    assert report.lost == 2 + 3 and report.duplicates == 1
    assert len(report.failures()) == 2
    # A scheduler loss of a sharded server: each shard counted.
    counts = [_chaos.ShardCount(0, 5, 6, 6), _chaos.ShardCount(1, 7, 7, 6)]
    recovery = _chaos.Recovery("scheduler", 5, 6, 6, 6, 6, 1.0, True, 0, counts)
    assert recovery.lost == 2
    one = _chaos.ChaosReport(_chaos.ChaosOptions(), accuracy=0.95, final_exact=True)
    assert not any("shard" in line for line in one.lines())
    assert _chaos.Recovery("scheduler", 5, 6, 4, 6, 4, 1.0, True, 0).lost == 3
