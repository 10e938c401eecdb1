"""A restarted scheduler's start: what the preload imports before the scheduler
listens, the replay that reads, multiplies out and merges at once, and a real
``dask scheduler --preload`` restart on a store of factored updates."""

from __future__ import annotations

import asyncio
import importlib
import json
import signal
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from distributed import Client
from distributed.core import rpc
from distributed.protocol.serialize import ToPickle
from distributed.utils import open_port
from distributed.utils_test import popen

import dask_ftps
from dask_ftps import SGD, Factored, ParameterServer, StoreCorrupted, _factored
from dask_ftps._core import RunSpec, Update, UpdateKey, WorkerId, check_reply
from dask_ftps._factored import prepare, product, replay_cost, slice_bits
from dask_ftps._processes import environment, scheduler_args
from dask_ftps._state import ParameterServerState
from dask_ftps._store import Journal
from dask_ftps.models import SoftmaxRegression
from dask_ftps.testing import start_preloaded

MODEL = SoftmaxRegression(n_features=40, n_classes=30, seed=0)
OPTIMIZER = SGD(lr=0.01, momentum=0.9)
BATCH = 4
UPDATES, SNAPSHOT_EVERY = 13, 5


def _grads(step: int) -> dict:
    """A different factored update each step (and a dense bias)."""
    rng = np.random.default_rng(step)
    return {
        "W": Factored(
            rng.standard_normal((BATCH, 40), dtype=np.float32),
            rng.standard_normal((BATCH, 30), dtype=np.float32),
        ),
        "b": rng.standard_normal(30, dtype=np.float32),
    }


def _same_bits(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(
        a[k].dtype == b[k].dtype
        and np.array_equal(a[k].view(np.uint8), b[k].view(np.uint8))
        for k in a
    )


# -- what the preload costs before the scheduler listens -------------------------


def test_the_preload_imports_nothing_the_scheduler_does_not_need_to_listen():
    """``dask scheduler`` imports the preload while it parses its command line:
    Zarr, the store, the server and scikit-learn load only when the server
    starts (after the scheduler listens); every public name still resolves."""
    code = """
import sys
import distributed.cli.dask_scheduler
import dask_ftps.preload
heavy = sorted(
    m for m in sys.modules
    if m.split(".")[0] in ("zarr", "sklearn")
    or m in ("dask_ftps._store", "dask_ftps._scheduler_plugin", "dask_ftps._state")
)
print("HEAVY", heavy)
import dask_ftps
missing = [n for n in dask_ftps.__all__ if getattr(dask_ftps, n, None) is None]
print("MISSING", missing)
print("SERVER", dask_ftps.ParameterServer.__module__)
"""
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=environment(),
        capture_output=True,
        timeout=120,
        check=True,
        text=True,
    ).stdout.splitlines()
    assert "HEAVY []" in out
    assert "MISSING []" in out
    assert "SERVER dask_ftps._scheduler_plugin" in out


def test_lazy_names_are_the_modules_objects():
    from dask_ftps import _exceptions, _recovery, _scheduler_plugin

    assert dask_ftps.ParameterServer is _scheduler_plugin.ParameterServer
    assert dask_ftps.recover is _recovery.recover
    assert dask_ftps.StoreCorrupted is _exceptions.StoreCorrupted
    assert set(dask_ftps.__all__) <= set(dir(dask_ftps))
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        dask_ftps.nothing  # noqa: B018


# -- the product, computed ahead -------------------------------------------------


def _reference_product(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The fixed-bits product as first written (one block, fresh arrays): the
    bits every store's replay must reproduce."""
    u, v = u.astype(np.float64), v.astype(np.float64)
    batch = u.shape[0]
    bits = slice_bits(batch)
    left = np.empty((2 * batch, u.shape[1]))
    right = np.empty((2 * batch, v.shape[1]))
    _factored._slices(u, bits, left[:batch], left[batch:])
    _factored._slices(v, bits, right[batch:], right[:batch])
    part = left[:batch].T @ right[batch:]
    part += left.T @ right
    part += 0.0
    return part.astype(np.float32)


def _factor_cases() -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(7)
    cases = [
        (
            rng.standard_normal((b, m), dtype=np.float32),
            rng.standard_normal((b, n), dtype=np.float32),
        )
        for b, m, n in ((1, 1, 1), (3, 7, 5), (16, 200, 150), (65, 33, 700))
    ]
    u = rng.standard_normal((8, 50), dtype=np.float32)
    v = rng.standard_normal((8, 60), dtype=np.float32)
    u[:, :5], u[:, 5:10], v[:, :3] = 0.0, -0.0, -0.0  # signed zeros
    u[:, 10:20] *= np.float32(1e-30)  # columns far apart in magnitude
    v[:, 10:20] *= np.float32(1e30)
    u[0, 20:30] = np.float32(1e-38)
    cases.append((u, v))
    w = rng.standard_normal((4, 30), dtype=np.float32)
    cases.append((np.concatenate([w, -w]), np.concatenate([w[:, :20], w[:, :20]])))
    return cases


@pytest.mark.parametrize("block", [1 << 19, 64, 1])
def test_the_blocked_product_has_the_bits_of_the_first_one(monkeypatch, block):
    monkeypatch.setattr(_factored, "_BLOCK_ELEMENTS", block)
    for u, v in _factor_cases():
        got, want = product(u, v), _reference_product(u, v)
        assert got.dtype == np.float32
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), (
            u.shape,
            v.shape,
        )


def test_a_prepared_product_is_the_product_and_used_once():
    u, v = _factor_cases()[2]
    g = Factored(u, v)
    with ThreadPoolExecutor(2) as pool:
        assert prepare({"W": g, "b": np.zeros(3, np.float32)}, pool.submit) == 1
        assert prepare({"W": g}, pool.submit) == 0  # already under way
        first = g.dense()
    assert np.array_equal(first.view(np.uint32), product(u, v).view(np.uint32))
    assert g not in _factored._prepared  # taken: the next call computes again
    assert np.array_equal(g.dense().view(np.uint32), first.view(np.uint32))


def test_a_cancelled_prepared_product_is_computed_when_asked():
    """A replay that ends with a sync round still open cancels the products it
    started and no merge took: the live server's merge computes them."""
    u, v = _factor_cases()[2]
    g = Factored(u, v)
    pool = ThreadPoolExecutor(1)
    blocker = pool.submit(time.sleep, 0.2)
    prepare({"W": g}, pool.submit)
    pool.shutdown(wait=True, cancel_futures=True)
    assert blocker.done()
    assert np.array_equal(g.dense().view(np.uint32), product(u, v).view(np.uint32))


def test_replay_cost_counts_the_product():
    u = np.ones((48, 100), np.float32)
    v = np.ones((48, 10), np.float32)
    dense = replay_cost({"W": np.ones((100, 10), np.float32), "b": np.ones(10)})
    assert dense == 1010
    factored = replay_cost({"W": Factored(u, v)})
    assert factored == 1000 * (1 + 48 / _factored._PRODUCT_SAMPLES_PER_MERGE)
    assert factored > replay_cost({"W": Factored(u[:1], v[:1])}) > 1000


# -- a real restart on a store of factored updates ------------------------------


async def _push(address: str, store: str) -> int:
    async with Client(address, asynchronous=True, timeout="60s") as client:
        await client.register_plugin(
            ParameterServer(
                store, model=MODEL, optimizer=OPTIMIZER, snapshot_every=SNAPSHOT_EVERY
            )
        )
        holder = f"{client.id}/{uuid.uuid4().hex[:16]}"
        spec = RunSpec((UPDATES * BATCH,), batch_size=BATCH, epochs=1)
        begun = check_reply(
            await client.scheduler.ftps_begin_run(
                spec=spec.to_dict(), holder=holder, live=[holder]
            ),
            "begin_run",
        )
        for step in range(UPDATES):
            check_reply(
                await client.scheduler.ftps_push(
                    server_id=begun["server_id"],
                    holder=holder,
                    worker="test-driver",
                    update_id=f"{begun['run']}:0:0:{step}",
                    grads=ToPickle(_grads(step)),
                    incarnation=begun["incarnation"],
                ),
                "push",
            )
        # The snapshot due before the last updates is on disk before the kill.
        due = UPDATES - UPDATES % SNAPSHOT_EVERY
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            journal = await Journal.open(store, read_only=True)
            await journal.close()
            if max(r.body.version for r in journal.snapshots()) >= due:
                break
            await asyncio.sleep(0.05)
    return UPDATES


def _reference() -> dict:
    state = ParameterServerState(MODEL, OPTIMIZER, mode="async")
    run = state.begin_run(RunSpec((UPDATES * BATCH,), batch_size=BATCH, epochs=1))
    for step in range(UPDATES):
        state.push(
            Update(UpdateKey(int(run.run), 0, 0, step), WorkerId("ref"), _grads(step))
        )
    return state.model.params


async def _served(port: int, proc, timeout: float = 60) -> tuple[dict, dict]:
    deadline = time.monotonic() + timeout
    async with rpc(f"tcp://127.0.0.1:{port}", timeout=timeout) as scheduler:
        while time.monotonic() < deadline:
            assert proc.poll() is None, "the scheduler exited"
            try:
                status = await scheduler.ftps_status()
            except OSError:
                status = None
            except Exception:  # noqa: BLE001 - no handler yet
                status = None
            if isinstance(status, dict) and status.get("status") == "OK":
                model = check_reply(await scheduler.ftps_get_model(), "get_model")
                return status, model
            await asyncio.sleep(0.02)
    raise TimeoutError("no model served")


@pytest.mark.slow
@pytest.mark.parametrize("where", ["same", "new"])
def test_a_factored_store_recovers_bit_exact_through_a_real_preload_restart(
    tmp_path, where
):
    """SIGKILLed right after its last update; a ``dask scheduler --preload``
    process on the dead owner's port or another serves the model the same
    pushes give a state that never failed, bit for bit, and recover() agrees."""
    import dask_ftps._store

    store = str(tmp_path / "run.zarr")
    port = open_port()
    with popen(scheduler_args(port), capture_output=True, env=environment()) as first:
        deadline = time.monotonic() + 60
        while True:
            try:
                asyncio.run(_push(f"tcp://127.0.0.1:{port}", store))
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        first.send_signal(signal.SIGKILL)
    info = dask_ftps.inspect(store)
    assert info["version"] == UPDATES
    assert info["factored_updates"] > 0
    assert max(info["snapshots"]) < UPDATES  # the restart replays factored updates

    restart_port = port if where == "same" else open_port()
    with popen(
        scheduler_args(restart_port, store), capture_output=True, env=environment()
    ) as proc:
        try:
            status, model = asyncio.run(_served(restart_port, proc))
        finally:
            proc.send_signal(signal.SIGKILL)
    assert status["version"] == model["version"] == UPDATES
    assert status["recovery"]["replayed"] == UPDATES - max(info["snapshots"])
    reference = _reference()
    assert _same_bits(model["params"], reference)
    version, offline = dask_ftps.recover(store)
    assert version == UPDATES and _same_bits(offline, reference)


def test_the_rebuild_counts_what_its_replay_cost(tmp_path):
    """What a server that snapshots by cost starts counting from."""
    from dask_ftps._recovery import rebuild

    store = _store_of_factored_updates(tmp_path)
    newest = max(dask_ftps.inspect(store)["snapshots"])

    async def rebuilt():
        journal = await Journal.open(store, read_only=True)
        try:
            return await rebuild(journal)
        finally:
            await journal.close()

    done = asyncio.run(rebuilt())
    assert done.replayed == UPDATES - newest > 0
    per_update = replay_cost(_grads(0))
    assert done.cost == pytest.approx(done.replayed * per_update)
    assert per_update > MODEL.n_params()  # the product counts


# -- what the preload refuses ------------------------------------------------------


def _store_of_factored_updates(tmp_path) -> str:
    store = str(tmp_path / "run.zarr")

    async def make() -> None:
        from distributed import Scheduler

        async with Scheduler(host="127.0.0.1", port=0, dashboard_address=":0") as s:
            await _push(s.address, store)

    asyncio.run(make())
    return store


@pytest.mark.slow
def test_a_damaged_payload_in_the_replay_stops_the_preload_start(tmp_path):
    """The replay reads ahead of its merges: a damaged payload is still raised,
    named, and the scheduler with the preload does not start; nothing is
    written."""
    store = _store_of_factored_updates(tmp_path)
    info = dask_ftps.inspect(store)
    newest = max(info["snapshots"])
    assert info["version"] > newest
    # The payload array of the newest commit (inside the replay range): its
    # folder's name begins with the commit's serial.
    payloads = sorted((tmp_path / "run.zarr" / "data").glob("*/c*"))
    assert payloads, "no payload chunk found"
    damaged = payloads[-1]
    raw = bytearray(damaged.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    damaged.write_bytes(bytes(raw))
    log = sorted(p.name for p in (tmp_path / "run.zarr" / "ftps" / "log").iterdir())
    with pytest.raises(StoreCorrupted):
        dask_ftps.recover(store)
    with pytest.raises(StoreCorrupted):
        start_preloaded(store)
    assert (
        sorted(p.name for p in (tmp_path / "run.zarr" / "ftps" / "log").iterdir())
        == log
    )


def test_an_undamaged_store_of_factored_updates_starts_in_process(tmp_path):
    store = _store_of_factored_updates(tmp_path)
    incarnation, version, params = start_preloaded(store)
    assert version == UPDATES and incarnation >= 2
    assert _same_bits(params, _reference())
    assert json.dumps(dask_ftps.inspect(store)["factored_updates"])


def test_overlapping_replays_give_the_blas_its_threads_back(monkeypatch):
    """Two replays in one process (a scheduler's and a client's recover()) that
    overlap and end in either order: the first sets the BLAS to one thread,
    the last gives it its threads back, once."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    # The module as imported now (a test above imports dask_ftps afresh).
    _recovery = importlib.import_module("dask_ftps._recovery")
    # No replay of an earlier test (one whose event loop closed under it) counts.
    monkeypatch.setattr(_recovery, "_blas_users", 0)
    monkeypatch.setattr(_recovery, "_blas_limits", None)
    calls = []

    class Limits:  # threadpoolctl's, recorded (a real BLAS's count can stick)
        def __init__(self, limits, user_api):
            calls.append(("limit", limits, user_api))

        def restore_original_limits(self):
            calls.append(("restore",))

    monkeypatch.setattr(threadpoolctl, "threadpool_limits", Limits)
    first, second = _recovery._one_blas_thread(), _recovery._one_blas_thread()
    first.__enter__()
    second.__enter__()
    assert calls == [("limit", 1, "blas")]
    first.__exit__(None, None, None)  # the first to begin ends first
    assert calls == [("limit", 1, "blas")]  # the other replay still runs
    second.__exit__(None, None, None)
    assert calls == [("limit", 1, "blas"), ("restore",)]
    with _recovery._one_blas_thread():  # and the next replay limits it again
        assert calls[-1] == ("limit", 1, "blas")
    assert calls[-1] == ("restore",)
