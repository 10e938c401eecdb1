"""The parameter server sharded over Dask workers: exact, exactly once, and
served again when a shard server, a worker or the scheduler dies.

The tests with real processes start a ``dask scheduler`` with the dask_ftps
preload and ``dask worker`` processes with the ``ftps-server`` resource, and
SIGKILL (or SIGSTOP) the very process that serves a shard.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter

import dask
import numpy as np
import pytest
from distributed import Client, LocalCluster
from distributed.utils import open_port
from distributed.utils_test import popen

import dask_ftps
from dask_ftps import Adam, ParameterServer
from dask_ftps._processes import environment, scheduler_args, worker_args
from dask_ftps._shards import ModelShard, assemble, plan, shard_store
from dask_ftps.models import MLP, SoftmaxRegression

from .conftest import digits

MODEL = MLP(n_features=64, hidden=(32,), n_classes=10, seed=0)
EPOCHS, BATCH, DATA_SHARDS = 3, 32, 2
#: No snapshot and no trim: the global dataset keeps every row to count.
KEEP_ALL = {"DASK_FTPS__STORE__REPLAY_BUDGET": "None"}
SERVER = {"ftps-server": 1}


def expected_ids(run: int = 0) -> set[str]:
    X_train = digits()[0]
    sizes = [len(p) for p in np.array_split(np.arange(len(X_train)), DATA_SHARDS)]
    return {
        f"{run}:{e}:{s}:{t}"
        for e in range(EPOCHS)
        for s, n in enumerate(sizes)
        for t in range(-(-n // BATCH))
    }


def train(client: Client, **kwargs):
    X_train, _, y_train, _ = digits()
    return dask_ftps.train(
        client,
        X_train,
        y_train,
        epochs=EPOCHS,
        batch_size=BATCH,
        n_shards=DATA_SHARDS,
        progress=False,
        seed=0,
        **kwargs,
    )


def check_exactly_once(store: str, expected: set[str]) -> dict:
    """Every shard's global dataset holds every update id of the run once."""
    info = dask_ftps.inspect(store)
    assert len(info["shards"]) >= 2
    for shard in info["shards"]:
        ids = [row["update_id"] for row in shard["global"]]
        assert max(Counter(ids).values()) == 1, f"shard {shard['shard']}: twice"
        assert set(ids) == expected, f"shard {shard['shard']}: {len(ids)} ids"
        assert shard["updates"] == len(expected)
    return info


def same_as_offline(client: Client, store: str) -> dict[str, np.ndarray]:
    """The live sharded model equals ``recover(store)``, bit for bit."""
    version, params = dask_ftps.get_model(client)
    offline_version, offline = dask_ftps.recover(store)
    assert version == offline_version
    assert set(offline) == set(MODEL.param_shapes())
    for name, value in params.items():
        np.testing.assert_array_equal(offline[name], value)
    return params


# -- the plan and the shard model ---------------------------------------------------


@pytest.mark.parametrize(
    "model",
    [MODEL, SoftmaxRegression(1000, 100), MLP(4, (3,), 2), MLP(64, (128, 64), 10)],
)
@pytest.mark.parametrize("shards", [1, 2, 3, 4, 8])
def test_the_plan_covers_every_parameter_once(model, shards):
    layout = plan(model.param_shapes(), shards)
    assert len(layout) == shards and all(layout)
    parts = [ModelShard.of(model, shards, k) for k in range(shards)]
    assert sum(p.n_params() for p in parts) == model.n_params()
    whole = assemble([p.init_params() for p in parts], layout)
    for name, value in model.init_params().items():
        np.testing.assert_array_equal(whole[name], value)
    sizes = [p.n_params() for p in parts]
    if model.n_params() >= 1000 * shards:  # large arrays are cut by rows
        assert max(sizes) <= 1.5 * model.n_params() / shards


def test_too_many_shards_for_the_model_is_a_clear_error(tmp_path):
    with pytest.raises(dask_ftps.ModelError, match="cannot fill"):
        plan(MLP(2, (2,), 2).param_shapes(), 64)
    with pytest.raises(ValueError, match="shards must be"):
        ParameterServer(str(tmp_path / "x"), model=MODEL, shards=0)
    with pytest.raises(TypeError, match="path or URL"):
        ParameterServer(None, model=MODEL, shards=2)


def test_shard_stores_live_in_the_runs_store():
    assert shard_store("runs/a.zarr", 3) == "runs/a.zarr/shards/3"
    assert shard_store("s3://b/a.zarr/", 0) == "s3://b/a.zarr/shards/0"


# -- in one process: modes, exactness --------------------------------------------------


@pytest.fixture(scope="module")
def local_cluster():
    with (
        LocalCluster(
            n_workers=3,
            threads_per_worker=1,
            processes=False,
            resources=SERVER,
            dashboard_address=":0",
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


def _run(client: Client, store: str, mode: str, shards: int) -> dict:
    client.register_plugin(
        ParameterServer(
            store,
            model=MODEL,
            optimizer=Adam(lr=0.01),
            mode=mode,
            shards=shards,
            snapshot_every=7,  # snapshots and trims on every shard
        )
    )
    result = train(client)
    assert result.version == len(expected_ids()) // (
        DATA_SHARDS if mode == "sync" else 1
    )
    return same_as_offline(client, store)


def test_sync_with_shards_equals_one_server_bit_for_bit(local_cluster, tmp_path):
    one = _run(local_cluster, str(tmp_path / "one.zarr"), "sync", 1)
    for shards in (2, 3):
        params = _run(local_cluster, str(tmp_path / f"s{shards}.zarr"), "sync", shards)
        for name in one:
            np.testing.assert_array_equal(params[name], one[name])
    status = dask_ftps.status(local_cluster)
    assert len(status["shards"]) == 3
    assert list(status["versions"]) == [status["version"]] * 3
    assert sum(s["params"] for s in status["shards"]) == MODEL.n_params()


@pytest.mark.parametrize("mode", ["async", "ssp"])
def test_async_and_ssp_shards_apply_every_update_once(local_cluster, tmp_path, mode):
    store = str(tmp_path / "run.zarr")
    with dask.config.set({"ftps.store.replay-budget": None}):
        local_cluster.register_plugin(
            ParameterServer(
                store, model=MODEL, mode=mode, shards=2, snapshot_every=10**6
            )
        )
        result = train(local_cluster)
    assert result.version == len(expected_ids())
    same_as_offline(local_cluster, store)
    info = check_exactly_once(store, expected_ids())
    assert info["versions"] == [len(expected_ids())] * 2
    # A second call with the same arguments returns the finished run.
    again = train(local_cluster)
    assert not again.trained and again.version == result.version


def test_a_sharded_store_resumes_with_its_own_settings(local_cluster, tmp_path):
    store = str(tmp_path / "run.zarr")
    local_cluster.register_plugin(ParameterServer(store, model=MODEL, shards=2))
    first = train(local_cluster, run_name="a")
    # Registered again with no model and no shard count: the store's.
    local_cluster.register_plugin(ParameterServer(store))
    status = dask_ftps.status(local_cluster)
    assert len(status["shards"]) == 2
    assert status["version"] == first.version
    # The same run: its shard servers go on serving it (nothing is rebuilt).
    assert all(s["incarnation"] == 1 for s in status["shards"])
    with pytest.raises(dask_ftps.SpecMismatch, match="2 shards"):
        local_cluster.register_plugin(ParameterServer(store, shards=3))
    with pytest.raises(dask_ftps.SpecMismatch):
        local_cluster.register_plugin(ParameterServer(store, model=MLP(64, (8,), 10)))


# -- real processes: a shard server, a worker, the scheduler killed ----------------------


def scheduler(port: int, store: str | None = None, env: dict | None = None):
    return popen(
        scheduler_args(port, store),
        capture_output=True,
        env={**environment(), **KEEP_ALL, **(env or {})},
    )


def workers(address: str, n: int = 2, resources: dict | None = SERVER):
    return popen(
        worker_args(address, n, resources=resources),
        capture_output=True,
        env={**environment(), **KEEP_ALL},
    )


def shard_process(client: Client, k: int) -> tuple[str, int]:
    """The address and pid of the worker process serving shard ``k``."""
    address = dask_ftps.status(client)["shards"][k]["address"]
    return address, client.run(os.getpid, workers=[address])[address]


def when(client: Client, updates: int, action) -> threading.Thread:
    """Call ``action()`` in a thread once every shard holds ``updates`` updates."""

    def wait_then_act() -> None:
        while dask_ftps.status(client)["updates"] < updates:
            time.sleep(0.01)
        action()

    thread = threading.Thread(target=wait_then_act, daemon=True)
    thread.start()
    return thread


def one_server_sync(tmp_path) -> dict[str, np.ndarray]:
    """The same sync run on one server in the scheduler, with nothing killed, on
    the same kind of worker processes (their BLAS computes the same bits)."""
    port = open_port()
    address = f"tcp://127.0.0.1:{port}"
    with (
        scheduler(port),
        workers(address, 2, resources=None),
        Client(address, timeout="60s") as client,
    ):
        client.wait_for_workers(2, timeout=60)
        client.register_plugin(
            ParameterServer(
                str(tmp_path / "one.zarr"),
                model=MODEL,
                mode="sync",
                snapshot_every=10**6,
            )
        )
        train(client)
        return dask_ftps.get_model(client)[1]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["async", "sync", "ssp"])
def test_a_shard_server_killed_mid_run_is_served_again_exactly(tmp_path, mode):
    """SIGKILL the worker process that serves shard 0 a third of the way in: its
    nanny starts a new one, the shard is served again (there or on the other
    tagged worker), rebuilt from its journal, and the run ends with every update
    applied once on every shard; sync equals one server bit for bit."""
    store = str(tmp_path / "run.zarr")
    total = len(expected_ids())
    port = open_port()
    address = f"tcp://127.0.0.1:{port}"
    with (
        scheduler(port),
        workers(address, 2),
        Client(address, timeout="60s") as client,
    ):
        client.wait_for_workers(2, timeout=60)
        client.register_plugin(
            ParameterServer(
                store, model=MODEL, mode=mode, shards=2, snapshot_every=10**6
            )
        )
        _, pid = shard_process(client, 0)
        steps = total // (DATA_SHARDS if mode == "sync" else 1)
        when(client, steps // 3, lambda: os.kill(pid, signal.SIGKILL))
        result = train(client)
        assert result.version == steps
        status = dask_ftps.status(client)
        lost = [r for r in status["recoveries"] if r["shard"] == 0]
        assert lost, status["recoveries"]
        assert lost[0]["since_lost_s"] < 30
        assert status["shards"][0]["incarnation"] == 2
        assert status["shards"][1]["incarnation"] == 1  # the other never stopped
        params = same_as_offline(client, store)
        check_exactly_once(store, expected_ids())
    if mode == "sync":
        one = one_server_sync(tmp_path)
        for name in one:
            np.testing.assert_array_equal(params[name], one[name])


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["async", "sync"])
def test_the_scheduler_killed_mid_run_resumes_every_shard(tmp_path, mode):
    """SIGKILL the scheduler a third of the way in; a new one with the preload
    on the same port finds the sharded run, new workers serve every shard again,
    and the same train() call resumes it: every update once on every shard; sync
    equals one server bit for bit (every shard was rebuilt, one of them maybe a
    round ahead of the other)."""
    store = str(tmp_path / "run.zarr")
    total = len(expected_ids())
    steps = total // (DATA_SHARDS if mode == "sync" else 1)
    port = open_port()
    address = f"tcp://127.0.0.1:{port}"
    with scheduler(port) as first, workers(address, 2):
        with Client(address, timeout="60s") as client:
            client.wait_for_workers(2, timeout=60)
            client.register_plugin(
                ParameterServer(
                    store, model=MODEL, mode=mode, shards=2, snapshot_every=10**6
                )
            )
            when(client, steps // 3, lambda: first.send_signal(signal.SIGKILL))
            with pytest.raises(Exception):  # noqa: B017 - the scheduler is gone
                train(client)
        first.wait(30)
    lost = dask_ftps.inspect(store)
    assert 0 < lost["updates"] < total
    with (
        scheduler(port, store),
        workers(address, 2),
        Client(address, timeout="60s") as client,
    ):
        client.wait_for_workers(2, timeout=60)
        status = dask_ftps.status(client)
        assert status["version"] == lost["version"]  # nothing accepted is lost
        assert [s["incarnation"] for s in status["shards"]] == [2, 2]
        result = train(client)
        assert result.version == steps
        params = same_as_offline(client, store)
        check_exactly_once(store, expected_ids())
    if mode == "sync":
        one = one_server_sync(tmp_path)
        for name in one:
            np.testing.assert_array_equal(params[name], one[name])


@pytest.mark.slow
def test_a_paused_shard_server_is_replaced_and_cannot_write_after(tmp_path):
    """SIGSTOP the worker serving shard 1: calls to it go unanswered, the
    scheduler finds it does not answer and serves the shard elsewhere; SIGCONT
    it after the run: the store it no longer owns is unchanged by it (the
    next record it would write is taken), and the run is exact."""
    store = str(tmp_path / "run.zarr")
    total = len(expected_ids())
    port = open_port()
    address = f"tcp://127.0.0.1:{port}"
    with (
        scheduler(port),
        workers(address, 2),  # they serve the shards
        workers(address, 2, resources=None),  # they train
        Client(address, timeout="60s") as client,
    ):
        client.wait_for_workers(4, timeout=60)
        client.register_plugin(
            ParameterServer(store, model=MODEL, shards=2, snapshot_every=10**6)
        )
        old_address, pid = shard_process(client, 1)
        when(client, total // 3, lambda: os.kill(pid, signal.SIGSTOP))
        try:
            result = train(client)
        finally:
            os.kill(pid, signal.SIGCONT)
        assert result.version == total
        status = dask_ftps.status(client)
        assert [r["shard"] for r in status["recoveries"]] == [1]
        assert status["shards"][1]["incarnation"] == 2
        assert status["shards"][1]["address"] != old_address
        before = dask_ftps.inspect(store)
        # The old server runs again. Asked to write (a new run), it cannot:
        # the record it would write is the new owner's.
        reply = client.sync(
            _ask,
            old_address,
            "ftps_shard_begin_run",
            ps_shard=1,
            spec={"shard_sizes": [8], "batch_size": 4, "epochs": 1, "seed": 0},
            name="zombie",
            holder="Client-z/1",
            server_id=before["shards"][1]["run_id"],
        )
        assert reply["status"] == "error", reply
        after = dask_ftps.inspect(store)
        assert after["versions"] == before["versions"]
        assert [r["name"] for r in after["shards"][1]["runs"]] == [
            r["name"] for r in before["shards"][1]["runs"]
        ]
        same_as_offline(client, store)
        check_exactly_once(store, expected_ids())


async def _ask(address: str, op: str, **kwargs):
    """``op`` at a worker, on a connection of its own."""
    from distributed.core import rpc

    async with rpc(address) as remote:
        return await getattr(remote, op)(**kwargs)


# -- hostile messages to a shard server and to the coordinator ---------------------------


class _Shard:
    """A shard server seen as test_trust's ``snapshot`` sees a plugin."""

    def __init__(self, host) -> None:
        self.server = host.server
        self.state = host.server.state
        self.journal = host.server.journal


@pytest.fixture(scope="module")
def hostile_target(tmp_path_factory):
    """An in-process sharded server with one run begun, and its shard 0."""
    from distributed.utils import sync

    from dask_ftps._core import check_reply

    store = str(tmp_path_factory.mktemp("hostile") / "run.zarr")
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=False,
            resources=SERVER,
            dashboard_address=":0",
        ) as cluster,
        Client(cluster) as client,
    ):
        client.register_plugin(ParameterServer(store, model=MODEL, shards=2))
        plugin = cluster.scheduler.plugins["ftps"]
        coordinator = plugin.coordinator
        spec = {"shard_sizes": [8, 8], "batch_size": 4, "epochs": 1, "seed": 0}
        check_reply(
            sync(cluster.loop, coordinator.begin_run, spec=spec, holder="Client-a/1"),
            "begin_run",
        )
        address = coordinator.placement[0]
        worker = next(w for w in cluster.workers.values() if w.address == address)
        host = worker.plugins["ftps"].hosts.hosts[0]
        yield cluster, worker, host, coordinator


def _valid_shard_request(host, op: str) -> dict:
    state = host.server.state
    run = state.runs[-1]
    epoch, step = run.next_step(0)
    server_id = host.server.server_id
    grads = {
        k: np.full(v, 0.01, dtype=np.float32)
        for k, v in state.model_spec.param_shapes().items()
    }
    common = {"server_id": server_id, "holder": "Client-a/1"}
    return {
        "begin_run": {"spec": dict(run.spec.to_dict()), "name": "", **common},
        "find_run": {"name": "", "n_samples": 16, "batch_size": 4, "epochs": 1, "seed": 0},
        "end_epoch": {"run": 0, "epoch": 0, "values": {"loss": 1.0}, "server_id": server_id},
        "end_run": {"run": 0, **common},
        "next_step": {"run": 0, "shard": 0, **common},
        "pull": {
            "worker": "tcp://w:1", "run": 0, "shard": 0, "epoch": epoch, "step": step,
            **common,
        },
        "push": {
            "worker": "tcp://w:1", "update_id": f"0:{epoch}:0:{step}", "grads": grads,
            "incarnation": state.incarnation, "next_step": None, **common,
        },
        "status": {},
        "get_model": {},
        "model_spec": {},
        "records": {},
    }[op]  # fmt: skip


@pytest.mark.slow
def test_hostile_fields_to_a_shard_server_are_refused_and_change_nothing(
    hostile_target,
):
    """Every op of a shard server's endpoint with hostile fields (test_trust's
    values): an error reply, never a crash, and nothing of the shard changed."""
    from distributed.utils import sync
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from dask_ftps.protocol import SERVER_OPS

    from .test_trust import HOSTILE, snapshot

    cluster, worker, host, _ = hostile_target
    shard = _Shard(host)

    @settings(
        max_examples=200,
        deadline=None,
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
        ],
    )
    @given(data=st.data())
    def sweep(data):
        op = data.draw(st.sampled_from(SERVER_OPS))
        kwargs = _valid_shard_request(host, op)
        fields = sorted(kwargs)
        bad = (
            data.draw(st.lists(st.sampled_from(fields), unique=True)) if fields else []
        )
        for field in bad:
            kwargs[field] = data.draw(HOSTILE)
        if not bad or data.draw(st.booleans()):
            kwargs[data.draw(st.sampled_from(["extra", "x"]))] = data.draw(HOSTILE)
        target = data.draw(st.one_of(st.just(0), HOSTILE))
        before = snapshot(shard)
        handler = worker.handlers[f"ftps_shard_{op}"]
        reply = sync(cluster.loop, handler, ps_shard=target, **kwargs)
        assert isinstance(reply, dict) and reply.get("status") in ("OK", "error"), reply
        if reply["status"] != "OK":
            assert snapshot(shard) == before, (op, kwargs)

    sweep()


@pytest.mark.slow
def test_hostile_requests_to_the_coordinator_get_an_error_reply(hostile_target):
    """The scheduler's ops of a sharded server, and a worker's shard start, with
    hostile fields: an error (or OK) reply, never a crash; shards keep serving."""
    from distributed.utils import sync
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from .test_trust import HOSTILE

    cluster, worker, host, coordinator = hostile_target
    ops = sorted(coordinator.handlers())
    version = host.server.published.version

    @settings(
        max_examples=150,
        deadline=None,
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
        ],
    )
    @given(data=st.data())
    def sweep(data):
        op = data.draw(
            st.sampled_from([*ops, "ftps_shard_start", "ftps_shard_clients"])
        )
        keys = data.draw(
            st.lists(
                st.sampled_from(
                    ["spec", "server_id", "holder", "run", "shard", "suspect",
                     "address", "clients", "worker", "grads", "name"]
                ),
                unique=True,
                max_size=4,
            )
        )  # fmt: skip
        kwargs = {k: data.draw(HOSTILE) for k in keys}
        if op.startswith("ftps_shard_"):
            handler = worker.handlers[op]
            loop = cluster.loop
        else:
            handler = coordinator.handlers()[op]
            loop = cluster.loop
        reply = sync(loop, handler, **kwargs)
        assert isinstance(reply, dict) and reply.get("status") in ("OK", "error"), reply

    sweep()
    assert host.server.published.version == version
    assert not host.server.stopped
    assert len(coordinator.placement) == 2


def test_the_command_line_reads_a_sharded_store(local_cluster, tmp_path):
    """``dask-ftps inspect`` and ``recover`` on a sharded store: every shard,
    and the model put together."""
    from click.testing import CliRunner

    from dask_ftps.cli import main

    store = str(tmp_path / "run.zarr")
    local_cluster.register_plugin(ParameterServer(store, model=MODEL, shards=2))
    result = train(local_cluster)
    runner = CliRunner()
    shown = runner.invoke(main, ["inspect", store, "--rows", "1"])
    assert shown.exit_code == 0, shown.output
    assert f"({2} shards)" in shown.output
    assert f"version        {result.version} (the lowest shard's" in shown.output
    assert "shard 0:" in shown.output and "shard 1:" in shown.output
    rebuilt = runner.invoke(main, ["recover", store])
    assert rebuilt.exit_code == 0, rebuilt.output
    assert f"model version {result.version}" in rebuilt.output
    for name, shape in MODEL.param_shapes().items():
        assert f"{name}" in rebuilt.output and str(shape) in rebuilt.output
