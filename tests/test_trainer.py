"""What people expect of a trainer: early stopping, callbacks, class weights,
a progress bar by epoch, and the inputs they bring (pandas, sparse, Dask
DataFrames, Dask arrays of unknown chunks, large NumPy arrays)."""

from __future__ import annotations

import logging

import dask.array as da
import numpy as np
import pytest
from distributed.protocol.serialize import ToPickle
from distributed.utils_test import captured_logger, gen_cluster

import dask_ftps
from dask_ftps import (
    SGD,
    DuplicateUpdate,
    InvalidRequest,
    InvalidUpdate,
    ParameterServer,
)
from dask_ftps._core import check_reply
from dask_ftps._server import Server
from dask_ftps.models import SoftmaxRegression
from dask_ftps.training._task import _class_weights

from .conftest import digits
from .test_plugin import holder_of, server_id

MODEL = SoftmaxRegression(n_features=64, n_classes=10, seed=0)


async def register(c, **kwargs):
    await c.register_plugin(
        ParameterServer(model=MODEL, optimizer=SGD(lr=0.2, momentum=0.5), **kwargs)
    )


def accuracy(params, X, y) -> float:
    return float((MODEL.predict(params, X) == y).mean())


def run_ids(rows: list[dict]) -> set[int]:
    return {int(r["update_id"].split(":")[1]) for r in rows}


@gen_cluster(client=True, timeout=120)
async def test_early_stopping_ends_the_run_and_the_same_call_returns_it(c, s, a, b):
    X, Xv, y, yv = digits()
    await register(c)
    # No improvement can beat tol=10: the second and third epochs do not count.
    kwargs = {
        "epochs": 10,
        "batch_size": 64,
        "validation": (Xv, yv),
        "early_stopping": 2,
        "tol": 10.0,
    }
    result = await dask_ftps.train(c, X, y, progress=False, **kwargs)
    assert result.stopped_early
    assert len(result.history) == 3
    assert result.history[-1]["stopped"] == 1.0
    assert not any("stopped" in r for r in result.history[:-1])
    rows = (await dask_ftps.records(c))["global"]
    assert run_ids(rows) == {0, 1, 2}  # no update of a later epoch
    assert result.version == len(rows) < result.minibatches
    status = await dask_ftps.status(c)
    assert status["run"]["finished"]

    # A push of a later epoch is refused; one accepted before is a duplicate.
    grads = {k: np.zeros(v, np.float32) for k, v in MODEL.param_shapes().items()}
    for update_id, refusal in [
        ("0:3:0:0", InvalidUpdate),
        ("0:0:0:0", DuplicateUpdate),
    ]:
        reply = await c.scheduler.ftps_push(
            server_id=await server_id(c),
            holder=holder_of(c),
            worker="tcp://test:1",
            update_id=update_id,
            grads=ToPickle(grads),
            incarnation=1,
        )
        with pytest.raises(refusal, match=r"stopped early|already accepted"):
            check_reply(reply, "ftps_push")
    assert (await dask_ftps.status(c))["version"] == result.version

    again = await dask_ftps.train(c, X, y, progress=False, **kwargs)
    assert not again.trained and again.stopped_early
    assert again.version == result.version
    assert [r["val_loss"] for r in again.history] == pytest.approx(
        [r["val_loss"] for r in result.history]
    )


@gen_cluster(client=True, timeout=120)
async def test_early_stopping_keeps_going_while_val_loss_improves(c, s, a, b):
    X, Xv, y, yv = digits()
    await register(c)
    result = await dask_ftps.train(
        c,
        X,
        y,
        epochs=4,
        batch_size=64,
        validation=(Xv, yv),
        early_stopping=3,
        progress=False,
    )
    assert not result.stopped_early
    assert len(result.history) == 4
    losses = [r["val_loss"] for r in result.history]
    assert losses[-1] < losses[0]


@gen_cluster(client=True, timeout=120)
async def test_a_callback_sees_every_epoch_and_may_stop_the_run(c, s, a, b):
    X, Xv, y, yv = digits()
    await register(c)
    seen = []

    def stop_after_second(epoch, record):
        seen.append((epoch, sorted(record)))
        record["loss"] = -1.0  # a copy: the history is not changed
        return epoch == 1

    result = await dask_ftps.train(
        c,
        X,
        y,
        epochs=5,
        batch_size=64,
        validation=(Xv, yv),
        callbacks=[stop_after_second],
        progress=False,
    )
    keys = ["accuracy", "loss", "seconds", "val_accuracy", "val_loss"]
    assert seen == [(0, keys), (1, keys)]
    assert result.stopped_early and len(result.history) == 2
    assert all(r["loss"] > 0 for r in result.history)
    assert run_ids((await dask_ftps.records(c))["global"]) == {0, 1}


@gen_cluster(client=True, timeout=120)
async def test_a_failing_callback_leaves_the_run_to_resume(c, s, a, b):
    X, _, y, _ = digits()
    await register(c)

    def broken(epoch, record):
        if epoch == 1:
            raise RuntimeError("the callback broke")

    with pytest.raises(RuntimeError, match="the callback broke"):
        await dask_ftps.train(
            c, X, y, epochs=3, batch_size=64, callbacks=[broken], progress=False
        )
    result = await dask_ftps.train(c, X, y, epochs=3, batch_size=64, progress=False)
    assert result.first_epoch == 1  # epoch 1's record was never made: run again
    assert len(result.history) == 3 and not result.stopped_early
    rows = (await dask_ftps.records(c))["global"]
    assert len(rows) == len({r["update_id"] for r in rows}) == result.minibatches


@gen_cluster(client=True, timeout=120)
async def test_an_epoch_committed_but_not_recorded_is_recorded_on_resume(
    c, s, a, b, tmp_path
):
    """The driver dies between an epoch's last commit and its record: the
    resumed call records that epoch instead of skipping it."""
    X, Xv, y, yv = digits()
    store = str(tmp_path / "run.zarr")
    await c.register_plugin(
        ParameterServer(store, model=MODEL, optimizer=SGD(lr=0.2, momentum=0.5))
    )
    original = Server.end_epoch

    async def dies_at_epoch_1(self, run, epoch, values):
        if epoch == 1:
            raise RuntimeError("the driver died here")
        return await original(self, run, epoch, values)

    kwargs = {"epochs": 4, "batch_size": 64, "validation": (Xv, yv), "progress": False}
    Server.end_epoch = dies_at_epoch_1
    try:
        with pytest.raises(InvalidRequest, match="the driver died here"):
            await dask_ftps.train(c, X, y, **kwargs)
    finally:
        Server.end_epoch = original
    await c.register_plugin(ParameterServer(store))  # rebuilt from the store
    result = await dask_ftps.train(c, X, y, **kwargs)
    assert result.first_epoch == 1
    assert len(result.history) == 4
    assert result.history[1]["val_accuracy"] > 0.5
    assert len(dask_ftps.inspect(store)["runs"][0]["history"]) == 4


@gen_cluster(client=True, timeout=120)
async def test_class_weights_change_what_is_learned(c, s, a, b):
    X, Xv, y, yv = digits()
    await register(c)
    await dask_ftps.train(c, X, y, epochs=3, batch_size=64, progress=False)
    _, plain = await dask_ftps.get_model(c)
    assert (MODEL.predict(plain, Xv[yv == 3]) == 3).mean() > 0.8

    # Class 3 weighs nothing: nothing pulls its score up, everything else down.
    await register(c)
    await dask_ftps.train(
        c, X, y, epochs=3, batch_size=64, class_weight={3: 0.0}, progress=False
    )
    _, weighted = await dask_ftps.get_model(c)
    assert (MODEL.predict(weighted, Xv[yv == 3]) == 3).mean() < 0.2
    others = yv != 3
    assert accuracy(weighted, Xv[others], yv[others]) > 0.8


def test_balanced_class_weights() -> None:
    counts = np.array([10, 30, 0, 60])
    weights = _class_weights("balanced", counts)
    # n / (present classes * count); an absent class weighs 1
    np.testing.assert_allclose(weights, [100 / 30, 100 / 90, 1.0, 100 / 180])
    assert _class_weights(None, counts) is None
    np.testing.assert_array_equal(_class_weights({1: 2.5}, counts), [1, 2.5, 1, 1])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"class_weight": "auto"}, "class_weight must be"),
        ({"class_weight": [1.0] * 10}, "class_weight must be"),
        ({"class_weight": {10: 1.0}}, "names the class 10"),
        ({"class_weight": {1: -1.0}}, r"class_weight\[1\] must be"),
        ({"class_weight": {1: float("nan")}}, r"class_weight\[1\] must be"),
        ({"early_stopping": 2}, "give validation"),
        ({"early_stopping": 0, "validation": True}, "early_stopping must be"),
        ({"tol": -1.0}, "tol must be"),
        ({"callbacks": [1]}, "callbacks must be callables"),
        ({"n_shards": True}, "n_shards"),
        (
            {"validation": (np.zeros((4, 3)), np.zeros(4, int))},
            "validation X has 3 features",
        ),
        (
            {"validation": (np.zeros((4, 64)), np.full(4, 11))},
            "validation y holds the label 11",
        ),
    ],
)
@gen_cluster(client=True)
async def test_bad_settings_fail_before_any_update(c, s, a, b, kwargs, match):
    X, Xv, y, yv = digits()
    await register(c)
    if kwargs.get("validation") is True:
        kwargs["validation"] = (Xv, yv)
    with pytest.raises((InvalidRequest, TypeError), match=match):
        await dask_ftps.train(
            c, X, y, epochs=2, batch_size=64, progress=False, **kwargs
        )
    state = s.plugins["ftps"].state
    assert state.runs == [] and state.version == 0


@gen_cluster(client=True, timeout=120)
async def test_the_progress_bar_shows_the_epoch(c, s, a, b, capsys, monkeypatch):
    import tqdm

    monkeypatch.setattr(tqdm.tqdm, "monitor_interval", 0)  # no thread left behind
    X, _, y, _ = digits()
    await register(c)
    await dask_ftps.train(c, X, y, epochs=3, batch_size=64, progress=True)
    err = capsys.readouterr().err
    assert "epoch 1/3" in err and "epoch 3/3" in err


@gen_cluster(client=True, timeout=120)
async def test_pandas_sparse_and_dask_dataframe_input(c, s, a, b):
    pd = pytest.importorskip("pandas")
    dd = pytest.importorskip("dask.dataframe")
    sparse = pytest.importorskip("scipy.sparse")
    X, Xv, y, yv = digits()
    columns = [f"pixel{i}" for i in range(64)]
    frame, labels = pd.DataFrame(X, columns=columns), pd.Series(y, name="digit")
    inputs = {
        "pandas": (frame, labels),
        "sparse": (sparse.csr_matrix(X), y),
        "dask dataframe": (
            dd.from_pandas(frame, npartitions=3),
            dd.from_pandas(labels, npartitions=3),
        ),
    }
    for name, (X_in, y_in) in inputs.items():
        await register(c)
        # 5 epochs: the default window's scaled steps learn a little less per
        # epoch than a window of 1, and 0.85 must hold on every interleaving.
        result = await dask_ftps.train(
            c, X_in, y_in, epochs=5, batch_size=64, progress=False
        )
        _, params = await dask_ftps.get_model(c)
        assert result.version == result.minibatches, name
        assert accuracy(params, Xv, yv) > 0.85, name


@gen_cluster(client=True, timeout=120)
async def test_dask_arrays_of_unknown_chunk_sizes(c, s, a, b):
    X, Xv, y, yv = digits()
    Xd, yd = da.from_array(X, chunks=(500, 64)), da.from_array(y, chunks=500)
    keep = yd >= 0  # all rows, but Dask does not know how many per chunk
    Xu, yu = Xd[keep], yd[keep]
    assert np.isnan(Xu.chunks[0]).any()
    await register(c)
    result = await dask_ftps.train(c, Xu, yu, epochs=5, batch_size=64, progress=False)
    _, params = await dask_ftps.get_model(c)
    assert result.version == result.minibatches
    assert accuracy(params, Xv, yv) > 0.85


@gen_cluster(client=True, timeout=120)
async def test_large_numpy_input_is_scattered_not_put_in_the_graph(c, s, a, b):
    X, _, y, _ = digits()
    X_big, y_big = np.tile(X, (16, 1)).astype(np.float64), np.tile(y, 16)
    assert X_big.nbytes > 10e6  # distributed warns of graphs above 10 MB
    await register(c)
    with captured_logger("distributed.client", level=logging.WARNING) as log:
        result = await dask_ftps.train(
            c, X_big, y_big, epochs=1, batch_size=256, progress=False
        )
    assert "large graph" not in log.getvalue()
    assert result.version == result.minibatches
