"""A real `dask scheduler` process SIGKILLed mid-training, restarted on the same port."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import threading
import time
from collections import Counter

import dask
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


def scheduler(
    port: int,
    store: str | None = None,
    kill_at: str | None = None,
    *extra: str,
    storage_options: dict | None = None,
    env: dict | None = None,
):
    """A real ``dask scheduler`` process; with ``kill_at`` (``"<regex>:<n>"``) it
    SIGKILLs itself before its n-th matching store file operation."""
    preloads = ("dask_ftps.testing",) if kill_at else ()
    args = scheduler_args(port, store, storage_options, preloads=preloads, extra=extra)
    env = {**environment(), KILL_ENV: kill_at or "", **(env or {})}
    return popen(args, capture_output=True, env=env)


def workers(address: str, env: dict | None = None):
    return popen(
        worker_args(address, 2),
        capture_output=True,
        env={**environment(), **(env or {})},
    )


def wait_for_workers(client: Client, n: int, timeout: float = 60) -> None:
    client.wait_for_workers(n, timeout=timeout)


def train(client: Client):
    X_train, _, y_train, _ = digits()
    return dask_ftps.train(
        client, X_train, y_train, epochs=EPOCHS, batch_size=BATCH, progress=False
    )


def kill_after(client: Client, proc, updates: int) -> None:
    """SIGKILL ``proc`` (a scheduler) once its server holds ``updates`` updates."""

    def kill_later() -> None:
        while dask_ftps.status(client)["updates"] < updates:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)

    threading.Thread(target=kill_later, daemon=True).start()


def train_until_killed(client: Client, proc) -> None:
    """Call train(); it must fail when the scheduler ``proc`` is SIGKILLed."""
    with pytest.raises(Exception):  # noqa: B017 - the scheduler is gone
        train(client)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL


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
    "during-group-commit": (r"ftps/log/\d+$:12", 1000),
    "between-commits": (None, 1000),  # an outside SIGKILL at a random moment
    # after the first chunk of the second snapshot since the start
    "during-snapshot": (r"snapshots/v\d+\.\w+/zarr\.json$:3", 40),
}


@pytest.mark.slow
@pytest.mark.parametrize("inflight", [1, 4])  # a window of unacknowledged pushes
@pytest.mark.parametrize("point", sorted(POINTS))
def test_scheduler_killed_mid_training_resumes_exactly_once(tmp_path, point, inflight):
    killed_and_resumed(tmp_path, point, inflight, MODEL)


#: W0 is 64 x 256: 32-sample minibatches send it as 32 * (64 + 256) numbers.
FACTORED = MLP(n_features=64, hidden=(256,), n_classes=10, seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("point", sorted(POINTS))
def test_scheduler_killed_with_factored_updates_replays_bit_for_bit(tmp_path, point):
    """The journal holds W0's updates as factors; the restart multiplies them out
    again, in the same bits: its model equals what the old server served.
    (``auto`` sends dense updates on a loopback network: factors are asked for.)"""
    with dask.config.set({"ftps.update-format": "factored"}):
        info = killed_and_resumed(tmp_path, point, 1, FACTORED)
    assert info["factored_updates"] == len(info["global"]) > 0


def killed_and_resumed(tmp_path, point: str, inflight: int, model: MLP) -> dict:
    """Train, SIGKILL the scheduler at ``point``, restart it on the same port,
    train again; check exactly once and the same bits; return ``inspect``."""
    crash_at, snapshot_every = POINTS[point]
    total = len(expected_ids())
    window = {"DASK_FTPS__INFLIGHT": str(inflight)}
    if snapshot_every > total:  # no snapshot at all: no replay budget either
        window["DASK_FTPS__STORE__REPLAY_BUDGET"] = "None"
    store = str(tmp_path / "run.zarr")
    port = open_port()
    address = f"tcp://127.0.0.1:{port}"

    with (
        scheduler(port, store, crash_at, env=window) as first,  # no run: no server
        workers(address),
        Client(address, timeout="60s") as client,
    ):
        wait_for_workers(client, 2)
        client.register_plugin(
            ParameterServer(
                store,
                model=model,
                optimizer=SGD(lr=0.05, momentum=0.5),
                snapshot_every=snapshot_every,
            )
        )
        if not crash_at:  # an outside SIGKILL once a third of the run is in
            kill_after(client, first, total // 3)
        train_until_killed(client, first)
        lost = dask_ftps.inspect(store)
        assert 0 < lost["updates"] < total

        with scheduler(port, store=store, env=window), workers(address):
            wait_for_workers(client, 2)
            status = dask_ftps.status(client)
            assert status["inflight"] == inflight
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
            return info


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


def _status(client: Client) -> dict:
    return dask_ftps.status(client)


def _same_model(client: Client, store: str, storage_options=None) -> int:
    version, params = dask_ftps.get_model(client)
    offline_version, offline = dask_ftps.recover(store, storage_options)
    assert version == offline_version
    for name, value in params.items():
        np.testing.assert_array_equal(offline[name], value)
    return version


def _background(func, *args):
    """Run ``func`` in a daemon thread; its result or error lands in the dict."""
    out: dict = {}

    def target():
        try:
            out["result"] = func(*args)
        except BaseException as e:  # noqa: BLE001 - read by the test
            out["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    out["thread"] = thread
    return out


def _poll(predicate, timeout: float = 60, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.mark.slow
def test_a_paused_old_owner_cannot_change_the_new_owners_run(tmp_path):
    """The owning scheduler is paused (SIGSTOP: a hung VM, a long GC pause), a new
    scheduler on another port takes the store over and trains on, then the old
    one is resumed with its workers still pushing. It is fenced off, and the new
    owner's run ends bit-exact, every minibatch once."""
    store = str(tmp_path / "run.zarr")
    old_port, new_port = open_port(), open_port()
    old_address, new_address = (f"tcp://127.0.0.1:{p}" for p in (old_port, new_port))
    fast = {"DASK_FTPS__STORE__OWNER_TIMEOUT": "1s", "DASK_FTPS__WAIT_TIMEOUT": "20s"}
    total = len(expected_ids())
    with (
        scheduler(old_port, store, env=fast) as old,
        workers(old_address, env=fast),
        Client(old_address, timeout="60s") as old_client,
    ):
        wait_for_workers(old_client, 2)
        old_client.register_plugin(
            ParameterServer(
                store, model=MODEL, optimizer=SGD(lr=0.05, momentum=0.5),
                snapshot_every=30,
            )
        )  # fmt: skip
        _background(train, old_client)
        _poll(lambda: _status(old_client)["updates"] >= 80, what="80 updates")
        old.send_signal(signal.SIGSTOP)
        try:
            with (
                scheduler(new_port, store, env=fast),
                workers(new_address, env=fast),
                Client(new_address, timeout="60s") as new_client,
            ):
                wait_for_workers(new_client, 2)
                status = _status(new_client)
                assert status["incarnation"] == 2
                taken_over = status["updates"]
                training = _background(train, new_client)
                _poll(
                    lambda: _status(new_client)["updates"] >= taken_over + 60,
                    what="60 updates of the new owner",
                )
                old.send_signal(signal.SIGCONT)
                # The old owner's workers push on; its next record is refused.
                _poll(
                    lambda: "fenced" in str(_status(old_client).get("failed")),
                    timeout=60,
                    what="the old owner to learn it was fenced",
                )
                training["thread"].join(180)
                assert "error" not in training, training.get("error")
                result = training["result"]
                info = dask_ftps.inspect(store)
                ids = [row["update_id"] for row in info["global"]]
                assert max(Counter(ids).values()) == 1
                assert info["updates"] == result.minibatches == total
                assert info["incarnation"] == 2
                assert _same_model(new_client, store) == total
        finally:
            old.send_signal(signal.SIGCONT)


def _store_with_a_run(tmp_path, port: int) -> tuple[str, int, int]:
    """A store left by a scheduler SIGKILLed mid-run: (path, version, updates)."""
    store = str(tmp_path / "run.zarr")
    address = f"tcp://127.0.0.1:{port}"
    with (
        scheduler(port, store) as first,
        workers(address),
        Client(address, timeout="60s") as client,
    ):
        wait_for_workers(client, 2)
        client.register_plugin(ParameterServer(store, model=MODEL, snapshot_every=40))
        _background(train, client)
        _poll(lambda: _status(client)["updates"] >= 100, what="100 updates")
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    info = dask_ftps.inspect(store)
    return store, info["version"], info["updates"]


def _served(port: int, proc, timeout: float = 60) -> dict | None:
    """The status a scheduler's server answers, or None if the process died."""
    from distributed.core import rpc

    from dask_ftps._core import check_reply

    async def ask():
        async with rpc(f"tcp://127.0.0.1:{port}", timeout=5) as s:
            return check_reply(await s.ftps_status(), "status")

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return None
        try:
            return asyncio.run(ask())
        except Exception:  # noqa: BLE001 - not serving yet
            time.sleep(0.05)
    pytest.fail("the scheduler neither served nor died")


def _start_finished(port: int, proc, timeout: float = 60) -> bool:
    """Whether a serving scheduler outlived its start's last file operation (its
    clean-up task, the start's last writer of files, is done), or False once it
    died: the condition, not a timer, that tells "past its last one"."""

    def cleaning() -> bool:
        return any(
            t.get_name() == "ftps-cleanup" and not t.done() for t in asyncio.all_tasks()
        )

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with Client(f"tcp://127.0.0.1:{port}", timeout=5) as client:
                while client.run_on_scheduler(cleaning):
                    time.sleep(0.05)
        except Exception:  # noqa: BLE001 - it died meanwhile, or not yet answering
            time.sleep(0.05)
            continue
        return proc.poll() is None
    pytest.fail("the scheduler neither finished its start nor died")


@pytest.mark.slow
def test_a_preload_start_killed_anywhere_never_locks_the_store(tmp_path):
    """SIGKILL a restarting preload scheduler before each file its start writes or
    deletes (claim, clean-up), and at random moments; every next start serves the
    same run."""
    port = open_port()
    store, version, updates = _store_with_a_run(tmp_path, port)
    rng = np.random.default_rng(0)
    killed, k = 0, 0
    while True:
        k += 1
        # Leftovers for the clean-up to remove: an old payload array, a stray file.
        (tmp_path / "run.zarr" / "data" / "0000000000000001.00000000dead").mkdir(
            exist_ok=True
        )
        (tmp_path / "run.zarr" / "ftps" / "log" / "x.1.partial").write_bytes(b"x")
        with scheduler(port, store, f".*:{k}") as proc:
            # It may serve before its clean-up is done.
            if _served(port, proc) is not None and _start_finished(port, proc):
                proc.send_signal(signal.SIGKILL)
                break  # past its last one
            proc.wait(30)  # died at its k-th file operation
            killed += 1
        for delay in [None, *rng.uniform(0.2, 1.5, size=1)]:
            with scheduler(port, store) as proc:
                if delay is not None:  # a SIGKILL at a random moment of a start
                    time.sleep(delay)
                    proc.send_signal(signal.SIGKILL)
                    proc.wait(30)
                    continue
                status = _served(port, proc)
                assert status is not None, proc.stdout.read().decode()[-3000:]
                assert (status["version"], status["updates"]) == (version, updates)
                proc.send_signal(signal.SIGKILL)
    assert killed >= 3, killed  # the claim and the clean-up's deletions were hit


@pytest.mark.slow
def test_train_again_after_a_crash_past_the_last_commit_returns_the_run(tmp_path):
    """The reported case: "call train() again with the same arguments" after a
    crash that came after the run's last commit trained a whole second run."""
    store = str(tmp_path / "run.zarr")
    port = open_port()
    address = f"tcp://127.0.0.1:{port}"
    with scheduler(port, store) as first, workers(address):
        with Client(address, timeout="60s") as client:
            wait_for_workers(client, 2)
            client.register_plugin(ParameterServer(store, model=MODEL))
            done = train(client)
            assert done.trained
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    with (
        scheduler(port, store),
        workers(address),
        Client(address, timeout="60s") as client,
    ):
        wait_for_workers(client, 2)
        again = train(client)
        assert not again.trained
        assert (again.run, again.version, again.history) == (
            done.run, done.version, done.history,
        )  # fmt: skip
        assert dask_ftps.inspect(store)["updates"] == done.minibatches
        more = dask_ftps.train(
            client, *digits()[::2], epochs=1, batch_size=BATCH, progress=False,
            run_name="more",
        )  # fmt: skip
        assert more.trained and more.run == done.run + 1


def test_a_damaged_store_stops_the_preload_scheduler_from_starting(tmp_path):
    """Damage no exact rebuild can get past must not leave a scheduler up without a
    parameter server (a supervisor would read it as healthy): it refuses to start
    and names the object."""
    port = open_port()
    store, _, _ = _store_with_a_run(tmp_path, port)
    with scheduler(port, store) as proc:  # a restart: its claim is the newest record
        assert _served(port, proc) is not None
        proc.send_signal(signal.SIGKILL)
    log = tmp_path / "run.zarr" / "ftps" / "log"
    newest = max(log.iterdir(), key=lambda p: p.name if p.name.isdigit() else "")
    newest.write_bytes(newest.read_bytes()[:20])  # truncated
    with scheduler(port, store) as proc:
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("the scheduler started on a damaged store")
    assert proc.returncode != 0
    assert b"StoreCorrupted" in out and newest.name.encode() in out


@pytest.mark.slow
def test_train_raises_scheduler_lost_at_once_when_it_dies_inside_a_call(tmp_path):
    """A callback SIGKILLs the scheduler; train()'s next call (the epoch's record)
    would wait out the client's 60 s to connect, and the client's reconnection
    window with it. train() raises SchedulerLost after its 10 s grace instead; a
    scheduler started again on the port serves, and the same call resumes the
    run."""
    store = str(tmp_path / "run.zarr")
    port = open_port()
    address = f"tcp://127.0.0.1:{port}"
    X_train, _, y_train, _ = digits()
    killed: dict[str, float] = {}

    with (
        scheduler(port, store) as first,
        workers(address),
        Client(address, timeout="60s") as client,
    ):
        wait_for_workers(client, 2)
        client.register_plugin(
            ParameterServer(store, model=MODEL, optimizer=SGD(lr=0.05))
        )

        def kill(epoch: int, record: dict) -> None:
            first.send_signal(signal.SIGKILL)
            first.wait(30)
            killed["at"] = time.monotonic()

        with pytest.raises(dask_ftps.SchedulerLost, match="call train\\(\\) again"):
            dask_ftps.train(
                client, X_train, y_train, epochs=2, batch_size=BATCH,
                progress=False, callbacks=[kill],
            )  # fmt: skip
        assert time.monotonic() - killed["at"] < 40  # not the client's 60 s
        lost = dask_ftps.inspect(store)
        with scheduler(port, store=store), workers(address):
            wait_for_workers(client, 2)  # the client reconnected in its window
            result = dask_ftps.train(
                client, X_train, y_train, epochs=2, batch_size=BATCH, progress=False
            )
            assert (
                result.first_epoch <= 1
                and result.minibatches == len(expected_ids()) // EPOCHS * 2
            )
            assert dask_ftps.inspect(store)["updates"] >= lost["updates"]
            _same_model(client, store)
