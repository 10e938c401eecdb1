"""train() on real clusters: accuracy in every mode, and exactly once under worker loss."""

from __future__ import annotations

import asyncio
from collections import Counter, defaultdict

import dask.array as da
import numpy as np
import pytest
from distributed import Nanny
from distributed.utils_test import async_poll_for, gen_cluster

import dask_ftps
from dask_ftps import SGD, ParameterServer
from dask_ftps._core import RunSpec
from dask_ftps._state import ParameterServerState
from dask_ftps.models import MLP, SoftmaxRegression

from .conftest import digits

MLP_SPEC = MLP(n_features=64, hidden=(64,), n_classes=10, seed=0)


def expected_ids(run: int, result, shard_sizes, batch_size: int, epochs: int) -> set:
    steps = [-(-n // batch_size) for n in shard_sizes]
    return {
        f"{run}:{e}:{s}:{t}"
        for e in range(epochs)
        for s, n in enumerate(steps)
        for t in range(n)
    }


def test_accuracy_modes_sync_api(loop):
    """The blocking API on a LocalCluster of processes, all three modes, >= 0.93."""
    from distributed import Client, LocalCluster

    X_train, X_test, y_train, y_test = digits()
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, dashboard_address=":0", loop=loop
        ) as cluster,
        Client(cluster, loop=loop) as client,
    ):
        for mode in ("async", "sync", "ssp"):
            client.register_plugin(
                ParameterServer(
                    model=MLP_SPEC,
                    optimizer=SGD(lr=0.05, momentum=0.5),
                    mode=mode,
                    staleness=2,
                )
            )
            result = dask_ftps.train(
                client,
                X_train,
                y_train,
                epochs=12,
                batch_size=32,
                progress=False,
                validation=(X_test, y_test),
            )
            version, params = dask_ftps.get_model(client)
            accuracy = float((MLP_SPEC.predict(params, X_test) == y_test).mean())
            assert accuracy >= 0.93, (mode, accuracy)
            assert result.history[-1]["val_accuracy"] == pytest.approx(accuracy)
            assert len(result.history) == 12
            assert result.minibatches == 12 * 2 * 22
            status = dask_ftps.status(client)
            assert status["updates"] == result.minibatches
            assert status["mode"] == mode
            if mode == "sync":
                assert version == 12 * 22  # one version per round
            else:
                assert version == result.minibatches


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)], timeout=120)
async def test_sync_with_more_shards_than_threads(c, s, a):
    """Four sync shards on one thread: a waiting shard never starves the others."""
    X_train, _X_test, y_train, _y_test = digits()
    await c.register_plugin(
        ParameterServer(
            model=SoftmaxRegression(64, 10), optimizer=SGD(lr=0.5), mode="sync"
        )
    )
    result = await dask_ftps.train(
        c, X_train, y_train, epochs=3, batch_size=64, n_shards=4, progress=False
    )
    assert result.n_shards == 4
    rounds = max(-(-n // 64) for n in (337, 337, 337, 336))
    assert result.version == 3 * rounds
    rows = (await dask_ftps.records(c))["global"]
    assert len(rows) == result.minibatches


@gen_cluster(client=True, timeout=120)
async def test_dask_array_input_and_new_run(c, s, a, b):
    X_train, _X_test, y_train, _y_test = digits()
    X = da.from_array(X_train, chunks=200)
    y = da.from_array(y_train, chunks=200)
    await c.register_plugin(
        ParameterServer(model=SoftmaxRegression(64, 10), optimizer=SGD(lr=0.5))
    )
    first = await dask_ftps.train(c, X, y, epochs=2, batch_size=64, progress=False)
    again = await dask_ftps.train(c, X, y, epochs=2, batch_size=64, progress=False)
    assert (again.run, again.trained, again.version) == (0, False, first.version)
    assert again.history == first.history  # the same call returns the same run
    second = await dask_ftps.train(
        c, X, y, epochs=2, batch_size=64, progress=False, run_name="more"
    )
    assert (first.run, second.run, second.trained) == (0, 1, True)
    assert second.version == 2 * first.minibatches
    ids = [r["update_id"] for r in (await dask_ftps.records(c))["global"]]
    assert len(ids) == len(set(ids)) == 2 * first.minibatches


@pytest.mark.parametrize("shard_chunks", [True, False])
@gen_cluster(client=True, timeout=120)
async def test_train_leaves_the_callers_persisted_data_alone(c, s, a, b, shard_chunks):
    """train() drops only its own references: persisted input survives two calls."""
    X_train, _X_test, y_train, _y_test = digits()
    # The shards' own chunks make train()'s chunk keys the caller's keys.
    chunks = tuple(map(len, np.array_split(y_train, 2))) if shard_chunks else 200
    X, y = c.persist(
        [
            da.from_array(X_train, chunks=(chunks, -1)),
            da.from_array(y_train, chunks=chunks),
        ]
    )
    held = c.futures_of([X, y])
    await c.register_plugin(
        ParameterServer(model=SoftmaxRegression(64, 10), optimizer=SGD(lr=0.5))
    )
    for name in ("one", "two"):
        result = await dask_ftps.train(
            c, X, y, epochs=1, batch_size=64, n_shards=2, progress=False, run_name=name
        )
        assert result.trained
        assert {f.status for f in held} == {"finished"}
    assert (await c.compute(y.sum())) == y_train.sum()


@pytest.mark.parametrize("mode", ["async", "sync"])
@gen_cluster(
    client=True,
    Worker=Nanny,
    nthreads=[("127.0.0.1", 1), ("127.0.0.1", 1)],
    timeout=180,
)
async def test_worker_killed_mid_training_applies_every_minibatch_once(
    c, s, a, b, mode
):
    X_train, X_test, y_train, y_test = digits()
    epochs, batch_size = 6, 16
    await c.register_plugin(
        ParameterServer(model=MLP_SPEC, optimizer=SGD(lr=0.05, momentum=0.5), mode=mode)
    )
    training = asyncio.ensure_future(
        dask_ftps.train(
            c, X_train, y_train, epochs=epochs, batch_size=batch_size, progress=False
        )
    )
    plugin = s.plugins["ftps"]
    nannies = {a.worker_address: a, b.worker_address: b}
    victim = None

    def mid_task() -> bool:
        """A worker whose current task has pushed some steps and has more to go."""
        nonlocal victim
        state = plugin.state
        if not state.runs or state.runs[0].accepted < 200:
            return False
        run = state.runs[0]
        for update_id, worker, _ in reversed(list(state.global_rows)[-10:]):
            shard = int(update_id.split(":")[2])
            step = run.clocks[shard] % run.spec.rounds_per_epoch
            if worker in nannies and 3 <= step <= run.spec.steps[shard] - 10:
                victim = nannies[worker]
                return True
        return False

    await async_poll_for(mid_task, timeout=60, period=0.001)
    killed_address = victim.worker_address
    killed_at = plugin.state.runs[0].accepted
    await victim.process.process.kill()

    result = await training
    assert killed_at < result.minibatches  # the kill came mid-run
    rows = (await dask_ftps.records(c))["global"]
    ids = [r["update_id"] for r in rows]
    assert not [i for i, n in Counter(ids).items() if n > 1]  # none twice
    shard_sizes = [674, 673]
    assert set(ids) == expected_ids(0, result, shard_sizes, batch_size, epochs)
    assert len(ids) == result.minibatches
    # The killed worker's task went on elsewhere from where it stopped: some
    # (epoch, shard) has rows from the killed worker and from another one.
    workers_of = defaultdict(set)
    for r in rows:
        _run, epoch, shard, _ = r["update_id"].split(":")
        workers_of[epoch, shard].add(r["worker"])
    assert any(killed_address in w and len(w) > 1 for w in workers_of.values()), (
        f"no task resumed on another worker after the kill: {dict(workers_of)} {killed_address}"
    )
    if mode == "async":
        assert result.version == result.minibatches
    _, params = await dask_ftps.get_model(c)
    assert (MLP_SPEC.predict(params, X_test) == y_test).mean() >= 0.9


@gen_cluster(client=True, timeout=120)
async def test_a_new_server_never_serves_the_copies_an_old_one_left(c, s, a, b):
    """Workers cache the model they hold; a new server counting versions from 0
    again must not take an old server's copy of the same version number."""
    X_train, _X_test, y_train, _y_test = digits()
    first = SoftmaxRegression(n_features=64, n_classes=10, seed=0)
    second = SoftmaxRegression(n_features=64, n_classes=10, seed=1)

    async def train(model, epochs: int) -> dict:
        await c.register_plugin(ParameterServer(model=model, mode="sync"))
        await dask_ftps.train(
            c, X_train, y_train, epochs=epochs, batch_size=64, n_shards=2,
            progress=False,
        )  # fmt: skip
        return (await dask_ftps.get_model(c))[1]

    await train(first, epochs=1)  # the workers now hold its copies
    after_another = await train(second, epochs=2)  # meets the versions they hold
    await c.unregister_worker_plugin("ftps")  # workers without copies
    alone = await train(second, epochs=2)
    for name, value in alone.items():
        assert (after_another[name] == value).all(), name


def test_a_run_is_found_by_name_and_settings_whatever_its_shards() -> None:
    """What lets a repeated train() find its run (and its shard count) when the
    cluster has other workers now: the name and the data size and settings."""
    state = ParameterServerState(SoftmaxRegression(64, 10), SGD(lr=0.1))
    assert state.find_run("", 300, 20, 2, 0) is None
    spec = RunSpec((100, 100, 100), batch_size=20, epochs=2, seed=0)
    run = state.begin_run(spec)
    assert state.find_run("", 300, 20, 2, 0) is run
    for other in [(299, 20, 2, 0), (300, 10, 2, 0), (300, 20, 3, 0), (300, 20, 2, 1)]:
        assert state.find_run("", *other) is None, other
    assert state.find_run("more", 300, 20, 2, 0) is None
    assert state.begin_run(spec) is run  # the same call: the same run
    named = state.begin_run(spec, "more")  # another name: another run
    assert named is not run and run.superseded  # (run was unfinished)
    assert state.find_run("", 300, 20, 2, 0) is None
    assert state.find_run("more", 300, 20, 2, 0) is named


def _bad_inputs():
    X, _, y, _ = digits()
    X, y = X[:200], y[:200]
    nan, inf, label, negative = X.copy(), X.copy(), y.copy(), y.copy()
    nan[17, 3] = np.nan
    inf[5, 0] = np.inf
    label[42] = 10  # the model has 10 classes
    negative[0] = -1
    ok = {"epochs": 1, "batch_size": 32}
    return {
        "nan": ((nan, y), ok, ValueError, "NaN or infinite"),
        "inf": ((inf, y), ok, ValueError, "NaN or infinite"),
        "label-too-big": ((X, label), ok, ValueError, "label 10"),
        "label-negative": ((X, negative), ok, ValueError, "label -1"),
        "empty": ((X[:0], y[:0]), ok, ValueError, "no samples"),
        "batch-size-0": ((X, y), {**ok, "batch_size": 0}, ValueError, "batch_size"),
        "batch-size-float": ((X, y), {**ok, "batch_size": 1.5}, TypeError, "batch"),
        "epochs-0": ((X, y), {**ok, "epochs": 0}, ValueError, "epochs"),
        "epochs-str": ((X, y), {**ok, "epochs": "3"}, TypeError, "epochs"),
        "seed-negative": ((X, y), {**ok, "seed": -1}, ValueError, "seed"),
    }


@pytest.mark.parametrize("dask_input", [False, True])
@pytest.mark.parametrize("case", sorted(_bad_inputs()))
@gen_cluster(client=True, timeout=60)
async def test_bad_input_is_refused_on_the_client_before_any_update(
    c, s, a, b, case, dask_input
):
    """Data or settings the run would fail on half-way are refused with a clear
    error before the server sees anything: no run begun, no update applied."""
    (X, y), kwargs, error, match = _bad_inputs()[case]
    if dask_input:
        X, y = da.from_array(X, chunks=(64, -1)), da.from_array(y, chunks=64)
    await c.register_plugin(
        ParameterServer(model=SoftmaxRegression(64, 10), optimizer=SGD(lr=0.5))
    )
    with pytest.raises(error, match=match):
        await dask_ftps.train(c, X, y, progress=False, **kwargs)
    status = await dask_ftps.status(c)
    assert (status["runs"], status["updates"], status["version"]) == (0, 0, 0)


@gen_cluster(client=True, timeout=120)
async def test_runs_snapshots_recoveries_and_refusals_are_events_on_the_ftps_topic(
    c, s, a, b, tmp_path, monkeypatch
):
    import errno

    from dask_ftps._store import _io

    store = str(tmp_path / "run.zarr")
    X_train, _, y_train, _ = digits()
    await c.register_plugin(
        ParameterServer(store, model=SoftmaxRegression(64, 10), snapshot_every=10)
    )
    result = await dask_ftps.train(
        c, X_train, y_train, epochs=1, batch_size=64, progress=False
    )

    def actions():
        return [msg["action"] for _, msg in s.get_events("ftps")]

    await async_poll_for(lambda: "snapshot" in actions(), timeout=10)
    started = [m for _, m in s.get_events("ftps") if m["action"] == "run-started"]
    assert started == [
        {
            "action": "run-started",
            "run": 0,
            "name": "",
            "shards": result.n_shards,
            "epochs": 1,
            "minibatches": result.minibatches,
            "base_version": 0,
        }
    ]
    await c.register_plugin(ParameterServer(store))  # a rebuild from the store
    (recovered,) = [m for _, m in s.get_events("ftps") if m["action"] == "recovered"]
    assert recovered["version"] == result.version
    assert recovered["incarnation"] == 2

    def no_space(path, value, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(_io, "write_file", no_space)
    with pytest.raises(dask_ftps.FTPSError):
        await dask_ftps.train(
            c, X_train, y_train, epochs=1, batch_size=64, progress=False, run_name="x"
        )
    refused = [m for _, m in s.get_events("ftps") if m["action"] == "refused"]
    assert refused and "No space left" in refused[0]["reason"]
    assert [m for _, m in await c.get_events("ftps")]  # the client sees them too
