"""Recovery inside a live cluster: the patent's path from a worker's model copy,
fencing of old incarnations, and one writer per store."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter

import numpy as np
import pytest
from distributed import Scheduler
from distributed.protocol.serialize import ToPickle
from distributed.utils_test import (
    async_poll_for,
    captured_logger,
    gen_cluster,
    gen_test,
)

import dask_ftps
from dask_ftps import SGD, ParameterServer, SpecMismatch, StaleIncarnation, StoreLocked
from dask_ftps._core import check_reply
from dask_ftps.models import MLP, SoftmaxRegression

from .conftest import digits, same_as_offline
from .test_plugin import holder_of, server_id

MODEL = MLP(n_features=64, hidden=(32,), n_classes=10, seed=0)


async def train(c, epochs=2, **kwargs):
    X_train, _, y_train, _ = digits()
    return await dask_ftps.train(
        c, X_train, y_train, epochs=epochs, batch_size=32, progress=False, **kwargs
    )


@gen_cluster(client=True, timeout=120)
async def test_replaced_server_rebuilds_from_a_workers_copy(c, s, a, b, tmp_path):
    """Plain SGD (no optimizer state): the freshest copy a live worker holds, then
    replay of what came after it; fall back to the next worker, then the snapshot."""
    store = str(tmp_path / "run.zarr")
    await c.register_plugin(
        ParameterServer(store, model=MODEL, optimizer=SGD(lr=0.05), snapshot_every=50)
    )
    await train(c)
    before_version, before = await same_as_offline(c, store)
    held = {w.address: w.plugins["ftps"].latest.version for w in (a, b)}
    rows = {r["worker"]: r["version"] for r in dask_ftps.inspect(store)["download"]}
    assert set(rows) == set(held)  # the download dataset names both workers
    # Tried first: the newest version; of equal ones, the greatest address.
    freshest = max(rows, key=lambda w: (rows[w], w))

    with captured_logger("dask_ftps._recovery", level=logging.INFO) as log:
        await c.register_plugin(ParameterServer(store))
    status = await dask_ftps.status(c)
    assert status["recovery"]["source"] == freshest
    assert status["recovery"]["start_version"] == held[freshest]
    assert status["incarnation"] == 2
    assert f"model copy of worker {freshest}" in log.getvalue()
    version, params = await same_as_offline(c, store)
    assert version == before_version
    for name, value in before.items():
        np.testing.assert_array_equal(params[name], value)

    # The freshest worker fails while it is asked: the other one serves.
    by_address = {a.address: a, b.address: b}

    async def broken():
        raise OSError("worker lost during recovery")

    by_address[freshest].handlers["ftps_model_copy"] = broken
    other = next(w for w in by_address if w != freshest)
    with captured_logger("dask_ftps._recovery", level=logging.INFO) as log:
        await c.register_plugin(ParameterServer(store))
    assert f"Recovery from worker {freshest}'s copy" in log.getvalue()
    status = await dask_ftps.status(c)
    assert status["recovery"]["source"] == other
    await same_as_offline(c, store)

    # Both fail: the store's snapshot serves.
    by_address[other].handlers["ftps_model_copy"] = broken
    await c.register_plugin(ParameterServer(store))
    status = await dask_ftps.status(c)
    assert status["recovery"]["source"] == "snapshot"
    assert status["incarnation"] == 4
    assert (await same_as_offline(c, store))[0] == before_version


@gen_cluster(client=True, timeout=120)
async def test_server_replaced_mid_training_applies_every_minibatch_once(
    c, s, a, b, tmp_path
):
    """The PS state is lost while workers live: tasks meet a new incarnation, ask
    where their shard stands and go on."""
    store = str(tmp_path / "run.zarr")
    # A schedule: the replay must merge each update with its epoch's rate.
    optimizer = SGD(lr=0.05, momentum=0.5, schedule="exponential", decay=0.7)
    await c.register_plugin(ParameterServer(store, model=MODEL, optimizer=optimizer))
    training = asyncio.ensure_future(train(c, epochs=3))
    await async_poll_for(
        lambda: s.plugins["ftps"].state.updates > 60, timeout=30, period=0.001
    )
    await c.register_plugin(ParameterServer(store))
    result = await training
    assert s.plugins["ftps"].state.incarnation == 2
    info = dask_ftps.inspect(store)
    ids = [row["update_id"] for row in info["global"]]
    assert max(Counter(ids).values()) == 1
    assert info["updates"] == len(ids) == result.minibatches == result.version
    await same_as_offline(c, store)


@gen_cluster(client=True)
async def test_push_from_an_old_incarnation_is_refused(c, s, a, b, tmp_path):
    store = str(tmp_path / "run.zarr")
    model = SoftmaxRegression(4, 3)
    await c.register_plugin(ParameterServer(store, model=model))
    spec = {"shard_sizes": [8], "batch_size": 4, "epochs": 1, "seed": 0}
    check_reply(await c.scheduler.ftps_begin_run(spec=spec), "begin")
    await c.register_plugin(ParameterServer(store))  # incarnation 2
    state = s.plugins["ftps"].state
    before = (state.version, state.updates, [list(r.clocks) for r in state.runs])
    grads = {k: np.zeros(v, np.float32) for k, v in model.param_shapes().items()}
    reply = await c.scheduler.ftps_push(
        server_id=await server_id(c),
        holder=holder_of(c),
        worker="tcp://old:1",
        update_id="0:0:0:0",
        grads=ToPickle(grads),
        incarnation=1,
    )
    with pytest.raises(StaleIncarnation, match="incarnation 1"):
        check_reply(reply, "ftps_push")
    assert (
        state.version,
        state.updates,
        [list(r.clocks) for r in state.runs],
    ) == before
    assert dask_ftps.inspect(store)["updates"] == 0


@gen_cluster(client=True)
async def test_another_spec_on_a_stored_run_is_refused(c, s, a, b, tmp_path):
    store = str(tmp_path / "run.zarr")
    await c.register_plugin(ParameterServer(store, model=MODEL))
    with pytest.raises(SpecMismatch, match="model"):
        await c.register_plugin(ParameterServer(store, model=SoftmaxRegression(64, 10)))
    with pytest.raises(SpecMismatch, match="mode"):
        await c.register_plugin(ParameterServer(store, mode="sync"))


@gen_test(timeout=60)
async def test_a_second_live_server_on_the_store_is_refused(tmp_path):
    store = str(tmp_path / "run.zarr")
    async with (
        Scheduler(dashboard_address=":0", port=0) as first,
        Scheduler(dashboard_address=":0", port=0) as second,
    ):
        await first.register_scheduler_plugin(
            ParameterServer(store, model=MODEL), idempotent=False
        )
        with pytest.raises(StoreLocked, match="alive"):
            await second.register_scheduler_plugin(
                ParameterServer(store), idempotent=False
            )
        assert "ftps" not in second.plugins
        assert first.plugins["ftps"].state.incarnation == 1
        await first.plugins["ftps"].close()
    assert dask_ftps.inspect(store)["incarnation"] == 1
