"""The commit pipeline and the window of unacknowledged pushes.

The merger merges a batch while the writer makes the one before it durable;
acknowledgements come in commit order, and a batch that cannot be made durable
takes the batches merged behind it down with it. Shards in async mode may keep
``ftps.inflight`` pushes in flight, which may reach the server out of order.
"""

from __future__ import annotations

import asyncio
import errno
import threading
from collections import Counter

import dask
import numpy as np
import pytest
from distributed import Nanny
from distributed.protocol.serialize import ToPickle
from distributed.utils_test import async_poll_for, gen_cluster

import dask_ftps
from dask_ftps import (
    SGD,
    InvalidUpdate,
    NotDurable,
    ParameterServer,
    StaleIncarnation,
    Voided,
)
from dask_ftps._core import RunSpec, check_reply
from dask_ftps._store import _io
from dask_ftps.models import MLP, SoftmaxRegression

from .conftest import digits
from .test_plugin import holder_of, server_id

MODEL = SoftmaxRegression(n_features=4, n_classes=3, seed=0)
SPEC = {"shard_sizes": [24, 8], "batch_size": 4, "epochs": 1, "seed": 0}  # 6, 2 steps


def grads(scale: float) -> dict[str, np.ndarray]:
    return {
        k: np.full(v, scale, dtype=np.float32) for k, v in MODEL.param_shapes().items()
    }


async def push(c, update_id: str, scale: float = 0.01, **kwargs):
    return await c.scheduler.ftps_push(
        server_id=await server_id(c),
        holder=holder_of(c),
        worker="tcp://w:1",
        update_id=update_id,
        grads=ToPickle(grads(scale)),
        incarnation=1,
        **kwargs,
    )


def reference(ids_scales: list[tuple[str, float]]) -> dict[str, np.ndarray]:
    """The model after these pushes on a fresh server with no store."""
    from dask_ftps._core import Update, UpdateKey, WorkerId
    from dask_ftps._state import ParameterServerState

    state = ParameterServerState(MODEL, SGD(lr=0.1, momentum=0.5))
    state.begin_run(RunSpec.from_dict(SPEC))
    for update_id, scale in ids_scales:
        state.push(Update(UpdateKey.parse(update_id), WorkerId("w"), grads(scale)))
    return state.model.params


@pytest.mark.parametrize("store", [False, True])
@gen_cluster(client=True, config={"ftps.inflight": 4})
async def test_pushes_that_arrive_out_of_order_are_applied_in_order(
    c, s, a, b, tmp_path, store
):
    """A shard's step 2 and 1 reach the server before its step 0 (separate
    connections): each waits for its predecessor, all three are applied in
    step order, and the model is the one of the in-order run."""
    await c.register_plugin(
        ParameterServer(
            str(tmp_path / "run.zarr") if store else None,
            model=MODEL,
            optimizer=SGD(lr=0.1, momentum=0.5),
        )
    )
    check_reply(await c.scheduler.ftps_begin_run(spec=SPEC), "begin")
    server = s.plugins["ftps"].server
    later = [
        asyncio.ensure_future(push(c, "0:0:0:2", 0.03)),
        asyncio.ensure_future(push(c, "0:0:0:1", 0.02)),
    ]
    await async_poll_for(lambda: len(server._turns._waiters) == 2, timeout=10)
    assert server.state.updates == 0  # both wait for step 0
    first = check_reply(await push(c, "0:0:0:0", 0.01), "push")
    versions = [check_reply(await f, "push")["version"] for f in later]
    assert (first["version"], sorted(versions)) == (1, [2, 3])
    assert [r["update_id"] for r in (await dask_ftps.records(c))["global"]] == [
        "0:0:0:0",
        "0:0:0:1",
        "0:0:0:2",
    ]
    expected = reference([("0:0:0:0", 0.01), ("0:0:0:1", 0.02), ("0:0:0:2", 0.03)])
    _, live = await dask_ftps.get_model(c)
    assert all(np.array_equal(live[k], expected[k]) for k in expected)
    if store:
        version, params = dask_ftps.recover(str(tmp_path / "run.zarr"))
        assert version == 3
        assert all(np.array_equal(params[k], expected[k]) for k in expected)


@gen_cluster(client=True, config={"ftps.inflight": 4, "ftps.reorder-timeout": "200ms"})
async def test_a_push_whose_predecessor_never_comes_is_refused_and_changes_nothing(
    c, s, a, b
):
    await c.register_plugin(ParameterServer(model=MODEL))
    check_reply(await c.scheduler.ftps_begin_run(spec=SPEC), "begin")
    with pytest.raises(InvalidUpdate, match="out of order"):
        check_reply(await push(c, "0:0:0:1"), "push")
    with pytest.raises(InvalidUpdate, match="out of order"):  # beyond the window:
        check_reply(await push(c, "0:0:0:5"), "push")  # refused without waiting
    status = await dask_ftps.status(c)
    assert (status["updates"], status["version"]) == (0, 0)
    check_reply(await push(c, "0:0:0:0"), "push")  # the shard goes on from step 0
    check_reply(await push(c, "0:0:0:1"), "push")
    assert (await dask_ftps.status(c))["updates"] == 2


def blocking_writes(monkeypatch, then_raise: bool):
    """Make the next payload write (a commit's shard, or the first file of its
    own array: both created in place) wait for ``release``; then fail it with
    ENOSPC (``then_raise``) or let it through."""
    real_create = _io.create_file
    entered, release = threading.Event(), threading.Event()

    def blocked(path, value, **kwargs):
        if "/data/" in str(path) and not entered.is_set():
            entered.set()
            release.wait(30)
            if then_raise:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_create(path, value, **kwargs)

    monkeypatch.setattr(_io, "create_file", blocked)
    return entered, release


@pytest.mark.parametrize("memory_rows", [100_000, 2])  # 2: rows trimmed meanwhile
@gen_cluster(client=True, timeout=60)
async def test_a_batch_refused_while_the_next_is_merged_takes_the_next_down_too(
    c, s, a, b, tmp_path, monkeypatch, memory_rows
):
    """Batch k's write fails (ENOSPC) while batch k+1 is merged behind it: both
    are refused (k+1 as Voided: push it again), the state and the records are as
    before k, nothing of either is in the store, and the same pushes go in once
    there is room."""
    where = str(tmp_path / "run.zarr")
    from dask_ftps import config

    retention = {**config.get("retention"), "memory-rows": memory_rows}
    with dask.config.set({"ftps.retention": retention}):
        await c.register_plugin(
            ParameterServer(where, model=MODEL, optimizer=SGD(lr=0.1, momentum=0.5))
        )
    check_reply(await c.scheduler.ftps_begin_run(spec=SPEC), "begin")
    server = s.plugins["ftps"].server
    done = [("0:0:0:0", 0.01), ("0:0:0:1", 0.02), ("0:0:0:2", 0.03)]
    for update_id, scale in done:
        check_reply(await push(c, update_id, scale), "push")
    rows_before = (await dask_ftps.records(c))["global"]
    assert rows_before[-1]["update_id"] == "0:0:0:2"
    real_create = _io.create_file
    entered, release = blocking_writes(monkeypatch, then_raise=True)
    k = asyncio.ensure_future(push(c, "0:0:0:3", 0.04))
    await async_poll_for(entered.is_set, timeout=10)
    k1 = asyncio.ensure_future(push(c, "0:0:1:0", 0.05))  # merged behind it
    await async_poll_for(lambda: server.state.updates == 5, timeout=10)
    assert server.published.version == 3  # nothing more is durable: not served
    release.set()
    with pytest.raises(NotDurable, match="No space left"):
        check_reply(await k, "push")
    with pytest.raises(Voided, match="earlier batch"):
        check_reply(await k1, "push")
    status = await dask_ftps.status(c)
    assert (status["updates"], status["version"]) == (3, 3)
    assert server.state.runs[0].clocks == [3, 0]
    # No row of a refused update; with 2 rows kept in memory, older ones go.
    rows = (await dask_ftps.records(c))["global"]
    assert rows and rows == rows_before[-len(rows) :]
    assert dask_ftps.inspect(where)["updates"] == 3
    monkeypatch.setattr(_io, "create_file", real_create)
    for update_id, scale in (("0:0:0:3", 0.04), ("0:0:1:0", 0.05)):
        check_reply(await push(c, update_id, scale), "push")
    expected = reference([*done, ("0:0:0:3", 0.04), ("0:0:1:0", 0.05)])
    version, params = dask_ftps.recover(where)
    assert version == 5
    assert all(np.array_equal(params[k], expected[k]) for k in expected)


@gen_cluster(client=True, timeout=60)
async def test_a_fenced_batch_refuses_the_batch_behind_it_as_stale(
    c, s, a, b, tmp_path, monkeypatch
):
    """Another server claims the store while batch k is being written and k+1
    is merged behind it: both get StaleIncarnation (their tasks wait for the
    new server), and so does everything after."""
    from dask_ftps._store import Journal

    where = str(tmp_path / "run.zarr")
    await c.register_plugin(ParameterServer(where, model=MODEL))
    check_reply(await c.scheduler.ftps_begin_run(spec=SPEC), "begin")
    server = s.plugins["ftps"].server
    entered, release = blocking_writes(monkeypatch, then_raise=False)
    k = asyncio.ensure_future(push(c, "0:0:0:0"))
    await async_poll_for(entered.is_set, timeout=10)
    k1 = asyncio.ensure_future(push(c, "0:0:1:0"))
    await async_poll_for(lambda: server.state.updates == 2, timeout=10)
    other = await Journal.open(where)
    await other.claim("tcp://10.255.255.1:1")
    await other.close()
    release.set()
    for pushed in (k, k1):
        with pytest.raises(StaleIncarnation):
            check_reply(await pushed, "push")
    with pytest.raises(StaleIncarnation):
        check_reply(await push(c, "0:0:0:0"), "push")
    assert dask_ftps.inspect(where)["updates"] == 0


@gen_cluster(client=True, timeout=120, config={"ftps.inflight": 4})
async def test_train_with_a_window_applies_every_minibatch_once(c, s, a, b, tmp_path):
    X_train, X_test, y_train, y_test = digits()
    store = str(tmp_path / "run.zarr")
    await c.register_plugin(
        ParameterServer(store, model=MLP(64, (32,), 10), optimizer=SGD(lr=0.1))
    )
    assert (await dask_ftps.status(c))["inflight"] == 4
    result = await dask_ftps.train(
        c,
        X_train,
        y_train,
        epochs=12,
        batch_size=32,
        progress=False,
        validation=(X_test, y_test),
    )
    ids = [r["update_id"] for r in (await dask_ftps.records(c))["global"]]
    assert len(ids) == len(set(ids)) == result.minibatches == result.version
    # Each shard's updates are in step order.
    for shard in range(result.n_shards):
        mine = [i for i in ids if i.split(":")[2] == str(shard)]
        keys = [tuple(map(int, i.split(":"))) for i in mine]
        assert keys == sorted(keys)
    # Staler gradients than with a window of 1, and still a model that learned.
    assert result.history[-1]["val_accuracy"] > 0.8
    version, params = dask_ftps.recover(store)
    _, live = await dask_ftps.get_model(c)
    assert version == result.version
    assert all(np.array_equal(live[k], params[k]) for k in params)


@gen_cluster(
    client=True,
    timeout=120,
    config={"ftps.inflight": 4, "ftps.reorder-timeout": "5ms"},
)
async def test_a_push_delayed_past_the_reorder_timeout_only_costs_a_resume(c, s, a, b):
    """Every 7th push reaches the server only once a later push of its shard has
    been answered, which the server can only have refused (as OutOfOrder, after
    its 5 ms reorder timeout): the task resumes where the server says its shard
    stands, and every minibatch is applied once. A held push with none behind it
    (its shard's last) goes on after a second."""
    X_train, _, y_train, _ = digits()
    await c.register_plugin(ParameterServer(model=MLP(64, (16,), 10)))
    sent = Counter()
    held: dict[str, tuple[tuple[int, int], asyncio.Event]] = {}  # shard: push held

    def where(update_id: str) -> tuple[str, tuple[int, int]]:
        run, epoch, shard, step = update_id.split(":")  # ordered per run and shard
        return f"{run}:{shard}", (int(epoch), int(step))

    for worker in (a, b):
        plugin = worker.plugins["ftps"]

        async def late(op, _send=plugin._send, **kwargs):
            if op != "ftps_push":
                return await _send(op, **kwargs)
            sent["pushes"] += 1
            shard, position = where(kwargs["update_id"])
            if sent["pushes"] % 7 == 0 and shard not in held:
                sent["late"] += 1
                behind = asyncio.Event()
                held[shard] = position, behind
                try:
                    await asyncio.wait_for(behind.wait(), timeout=1)
                except TimeoutError:
                    sent["none behind"] += 1
                del held[shard]
                return await _send(op, **kwargs)
            try:
                return await _send(op, **kwargs)
            finally:
                if shard in held and held[shard][0] < position:
                    sent["answered while held"] += 1
                    held[shard][1].set()

        plugin._send = late
    result = await dask_ftps.train(
        c, X_train, y_train, epochs=2, batch_size=32, progress=False
    )
    ids = [r["update_id"] for r in (await dask_ftps.records(c))["global"]]
    assert sent["late"] > 3
    assert sent["answered while held"] > 0, sent  # refused: nothing may pass a gap
    assert sent["pushes"] > result.minibatches  # some were refused and sent again
    assert len(ids) == len(set(ids)) == result.minibatches == result.version


@gen_cluster(
    client=True,
    Worker=Nanny,
    nthreads=[("127.0.0.1", 1)] * 2,
    timeout=180,
    config={"ftps.inflight": 4},
)
async def test_a_worker_killed_with_pushes_in_flight_loses_and_repeats_nothing(
    c, s, a, b
):
    """SIGKILL a worker process while its shard has pushes in flight: its task
    runs again elsewhere from the shard's last committed step."""
    X_train, _, y_train, _ = digits()
    await c.register_plugin(
        ParameterServer(model=MLP(64, (32,), 10), optimizer=SGD(lr=0.1))
    )
    training = asyncio.ensure_future(
        dask_ftps.train(c, X_train, y_train, epochs=4, batch_size=16, progress=False)
    )
    await async_poll_for(
        lambda: s.plugins["ftps"].server.state.updates > 60, timeout=60
    )
    a.process.process.kill()
    result = await training
    ids = [r["update_id"] for r in (await dask_ftps.records(c))["global"]]
    assert Counter(ids).most_common(1)[0][1] == 1
    assert len(ids) == result.minibatches == result.version


@pytest.mark.parametrize("inflight", [0, -1, "4", True])
@gen_cluster(client=True, nthreads=[])
async def test_a_bad_window_setting_is_a_clear_error(c, s, inflight):
    with (
        dask.config.set({"ftps.inflight": inflight}),
        pytest.raises(Exception, match=r"ftps\.inflight must be a positive integer"),
    ):
        await c.register_plugin(ParameterServer(model=MODEL))


@gen_cluster(
    client=True,
    timeout=60,
    config={"ftps.store.replay-budget": 2.5, "ftps.store.snapshot-every": 1000},
)
async def test_a_snapshot_bounds_the_replay_work_not_only_the_versions(
    c, s, a, b, tmp_path
):
    """With ``replay-budget`` 2.5 (dense updates of the model) and no snapshot due
    by versions, a snapshot follows every third dense update: what a restart
    replays stays within the budget, and the store rebuilds the same model."""
    where = str(tmp_path / "run.zarr")
    optimizer = SGD(lr=0.1, momentum=0.5)  # as reference() merges
    await c.register_plugin(ParameterServer(where, model=MODEL, optimizer=optimizer))
    check_reply(await c.scheduler.ftps_begin_run(spec=SPEC), "begin")
    server = s.plugins["ftps"].server
    pushed = [(f"0:0:0:{i}", 0.01 * (i + 1)) for i in range(6)]

    journal = server.journal
    write_snapshot = journal.write_snapshot

    async def slow_snapshot(model):  # still written when the next falls due
        await asyncio.sleep(0.5)
        return await write_snapshot(model)

    journal.write_snapshot = slow_snapshot
    for update_id, scale in pushed:  # no waiting: a snapshot that falls due
        # while the one before is written is taken when that one is done, even
        # with no push after it
        check_reply(await push(c, update_id, scale), "push")
    assert [r.body.version for r in journal.snapshots()][:1] != [6]  # not yet
    await async_poll_for(
        lambda: [r.body.version for r in server.journal.snapshots()][:1] == [6],
        timeout=30,
    )
    versions = sorted(r.body.version for r in server.journal.snapshots())
    assert versions[-2:] == [3, 6]  # by cost: 3 x 1.0 >= 2.5, not by versions
    info = dask_ftps.inspect(where)
    assert info["updates"] == 6
    version, params = dask_ftps.recover(where)
    expected = reference(pushed)
    assert version == 6
    for name, value in expected.items():
        np.testing.assert_array_equal(params[name], value)
