"""Row-sparse updates and pulls: wide sparse data trains with only the rows a
minibatch touches, exactly once and bit for bit across kills."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter

import dask
import dask.array as da
import numpy as np
import pytest
import scipy.sparse as sp
from distributed import Client, LocalCluster
from distributed.utils import open_port
from distributed.utils_test import popen

import dask_ftps
from dask_ftps import SGD, Adam, ParameterServer, RowSparse
from dask_ftps._layout import DENSE, Layout
from dask_ftps._processes import environment, scheduler_args, worker_args
from dask_ftps._sparse import (
    apply_rows,
    check_wanted,
    mean_rows,
    rows_of,
    sparse_problem,
)
from dask_ftps._state import _mean
from dask_ftps._store._format import DataRef
from dask_ftps.models import MLP, SoftmaxRegression
from dask_ftps.models._check import checked_loss_and_grad

WIDE = 1 << 16


def data(n: int = 2000, features: int = WIDE, classes: int = 4, nnz: int = 60):
    X, y = dask_ftps.sparse_text(n, features, classes, nnz, informative=256, seed=3)
    cut = n * 3 // 4
    return X[:cut], X[cut:], y[:cut], y[cut:]


# -- the update kind -----------------------------------------------------------------


def random_rows(rng, n_rows: int, width: int, k: int) -> RowSparse:
    idx = np.sort(rng.choice(n_rows, k, replace=False)).astype(np.int32)
    return RowSparse(idx, rng.standard_normal((k, width)).astype(np.float32), n_rows)


def test_rows_round_trip_a_payload_row_beside_dense_and_factored_entries():
    rng = np.random.default_rng(0)
    params = {
        "W": np.zeros((50, 3), np.float32),
        "b": np.zeros(3, np.float32),
        "E": np.zeros((20, 4), np.float32),
    }
    layout = Layout.of(params)
    grads = {
        "W": random_rows(rng, 50, 3, 7),
        "b": rng.standard_normal(3).astype(np.float32),
        "E": random_rows(rng, 20, 4, 0),  # a minibatch that reads no row of E
    }
    fmt = layout.row_format(grads)
    assert fmt == (0, (), ((0, 7), (2, 0)))
    flat = layout.flatten(grads)
    assert flat.size == layout.row_size(fmt) == 7 * 4 + 3 < layout.size
    back = layout.unflatten(flat.copy(), fmt)
    for name in ("W", "E"):
        assert back[name].indices.dtype == np.int32
        np.testing.assert_array_equal(back[name].indices, grads[name].indices)
        np.testing.assert_array_equal(back[name].rows, grads[name].rows)
        assert back[name].n_rows == grads[name].n_rows
    np.testing.assert_array_equal(back["b"], grads["b"])
    # Indices whose bits are NaN patterns as float32 survive the float32 row.
    big = RowSparse(
        np.array([0x7FC00001 % 50, 49], np.int32), np.ones((2, 3), "f4"), 50
    )
    assert layout.unflatten(layout.flatten({**grads, "W": big}), layout.row_format(
        {**grads, "W": big}))["W"].indices.tolist() == big.indices.tolist()  # fmt: skip
    # A record names the format; a reader refuses one that does not fit.
    ref = DataRef("data/x", (1, flat.size), 0, (fmt, DENSE))
    assert DataRef.from_json(ref.to_json()) == ref
    for bad in [
        (0, (), ((1, 2),)),  # b is not a matrix
        (0, (), ((0, 51),)),  # more rows than W has
        (0, (), ((2, 1), (0, 1))),  # not in order
        (0, (), ((0, 1), (0, 2))),  # twice
        (3, (0,), ((0, 1),)),  # factored and rows at once
    ]:
        with pytest.raises(ValueError, match="row format"):
            layout.row_size(bad)


def test_sgd_merges_rows_exactly_as_the_dense_update():
    """SGD without momentum: the row-sparse merge is the dense merge, bit for bit."""
    rng = np.random.default_rng(1)
    p = {"W": rng.standard_normal((300, 5)).astype(np.float32)}
    p["W"][7] = -0.0
    dense, rows = dict(p), dict(p)
    opt = SGD(lr=0.3)
    for step in range(1, 30):
        g = random_rows(rng, 300, 5, int(rng.integers(0, 40)))
        dense, _ = opt.apply(dense, {}, {"W": g.dense()}, step)
        rows, _ = opt.apply(rows, {}, {"W": g}, step)
        assert rows["W"].tobytes() == dense["W"].tobytes()


@pytest.mark.parametrize("opt", [SGD(lr=0.1, momentum=0.9), Adam(lr=0.01)])
def test_momentum_and_adam_are_their_lazy_forms(opt):
    """A row's state advances only when a row-sparse update touches it: the same
    bits as the optimizer run on that row's own updates at their steps."""
    rng = np.random.default_rng(2)
    n_rows, width = 40, 3
    params = {"W": rng.standard_normal((n_rows, width)).astype(np.float32)}
    state = opt.init_state(params)
    history = []
    for step in range(1, 25):
        g = random_rows(rng, n_rows, width, int(rng.integers(1, 10)))
        params, state = opt.apply(params, state, {"W": g}, step)
        history.append((step, g))
    for row in range(n_rows):
        p = {"W": _first(row, rng_seed=2, n_rows=n_rows, width=width)}
        s = opt.init_state(p)
        for step, g in history:
            hit = np.flatnonzero(g.indices == row)
            if hit.size:
                p, s = opt.apply(p, s, {"W": g.rows[hit]}, step)
        assert params["W"][row].tobytes() == p["W"][0].tobytes(), row


def _first(row: int, rng_seed: int, n_rows: int, width: int) -> np.ndarray:
    rng = np.random.default_rng(rng_seed)
    return rng.standard_normal((n_rows, width)).astype(np.float32)[row : row + 1]


def test_a_sync_rounds_mean_of_rows_is_the_dense_mean_on_their_union():
    rng = np.random.default_rng(3)
    parts = [random_rows(rng, 100, 4, k) for k in (5, 0, 17, 9)]
    mean = mean_rows(parts)
    dense = _mean([{"W": g.dense()} for g in parts])["W"]
    np.testing.assert_array_equal(mean.dense(), dense)
    assert mean.dense().tobytes() == dense.tobytes()
    # Some workers dense, some rows: made whole, the dense mean.
    mixed = _mean([{"W": parts[0]}, {"W": parts[2].dense()}])["W"]
    assert (
        mixed.tobytes()
        == _mean([{"W": parts[0].dense()}, {"W": parts[2].dense()}])["W"].tobytes()
    )


def test_apply_rows_never_writes_the_served_arrays():
    p = np.arange(12, dtype=np.float32).reshape(6, 2)
    p.flags.writeable = False
    g = RowSparse(np.array([1, 4]), np.ones((2, 2), np.float32), 6)
    new, _ = apply_rows(SGD(lr=1.0)._update, p, g, [], 1, 1.0, inplace=False)
    assert new is not p and p[1, 0] == 2 and new[1, 0] == 1


def test_wanted_rows_are_checked():
    shapes = {"W": (10, 3), "b": (3,)}
    assert check_wanted({"W": np.array([0, 9])}, shapes)["W"].tolist() == [0, 9]
    for bad, match in [
        ({"W": np.array([3, 3])}, "increasing"),
        ({"W": np.array([10])}, "outside"),
        ({"b": np.array([0])}, "not a matrix"),
        ({"V": np.array([0])}, "not a matrix"),
        ({"W": [0, 1]}, "NumPy"),
        ({"W": np.array([0.0])}, "int32 or int64"),
        ({}, "non-empty"),
    ]:
        with pytest.raises(ValueError, match=match):
            check_wanted(bad, shapes)


# -- the models ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model",
    [
        SoftmaxRegression(n_features=WIDE, n_classes=4),
        MLP(n_features=WIDE, hidden=(16,), n_classes=4),
    ],
)
def test_a_sparse_minibatch_sends_the_rows_it_reads_and_the_same_gradient(model):
    X, _, y, _ = data()
    xb, yb = X[:32], y[:32]
    params = model.init_params()
    first = next(iter(model.param_shapes()))
    wanted = model.sparse_rows(xb)
    assert list(wanted) == [first]
    np.testing.assert_array_equal(wanted[first], rows_of(xb))
    assert 0 < wanted[first].size < 32 * 30 + 1
    loss, grads, correct = checked_loss_and_grad(model, params, xb, yb)
    loss_d, dense, correct_d = checked_loss_and_grad(model, params, xb.toarray(), yb)
    assert isinstance(grads[first], RowSparse)
    np.testing.assert_array_equal(grads[first].indices, wanted[first])
    np.testing.assert_allclose(grads[first].dense(), dense[first], atol=1e-7)
    for name in grads:
        if name != first:
            np.testing.assert_allclose(grads[name], dense[name], atol=1e-6)
    assert loss == pytest.approx(loss_d) and correct == correct_d
    # Only the rows it named are read: the others may hold anything.
    stale = {k: v.copy() for k, v in params.items()}
    others = np.setdiff1d(np.arange(WIDE), wanted[first])
    stale[first][others] = 1e6
    again = checked_loss_and_grad(model, stale, xb, yb)
    assert again[0] == loss
    np.testing.assert_array_equal(again[1][first].rows, grads[first].rows)
    proba = model.predict_proba(params, xb)
    np.testing.assert_allclose(proba, model.predict_proba(params, xb.toarray()), 1e-6)


# -- train(): in process -------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster():
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


def run(client, store, mode="async", X=None, **kwargs):
    X_train, X_test, y_train, y_test = data()
    model = SoftmaxRegression(n_features=WIDE, n_classes=4)
    client.register_plugin(
        ParameterServer(
            store,
            model=model,
            optimizer=SGD(lr=0.1, momentum=0.9),
            mode=mode,
            snapshot_every=25,
        )
    )
    result = dask_ftps.train(
        client,
        X_train if X is None else X,
        y_train,
        epochs=3,
        batch_size=32,
        progress=False,
        validation=(X_test, y_test),
        **kwargs,
    )
    return result, model


@pytest.mark.parametrize("mode", ["async", "sync", "ssp"])
def test_sparse_data_trains_with_rows_both_ways_and_replays_bit_for_bit(
    cluster, tmp_path, mode
):
    store = str(tmp_path / "run.zarr")
    result, _ = run(cluster, store, mode)
    status = dask_ftps.status(cluster)
    info = dask_ftps.inspect(store)
    assert info["updates"] == result.minibatches == status["updates"]
    # every update kept in the store was sent as rows (older ones are in snapshots)
    assert info["sparse_updates"] == info["retained_updates"] > 0
    pulls = status["pulls"]
    assert pulls["rows"] >= result.minibatches and pulls["whole"] == 0, pulls
    # A row-sparse payload is a sliver of the 262,144-value model.
    assert info["payload_bytes"] / info["retained_updates"] < 0.05 * 4 * (WIDE * 4 + 4)
    # 4 classes, the largest 32 %; plain SGD on one core reaches 0.68
    assert result.history[-1]["val_accuracy"] > 0.45
    version, live = dask_ftps.get_model(cluster)
    offline_version, offline = dask_ftps.recover(store)
    assert version == offline_version
    for name in live:
        assert live[name].tobytes() == offline[name].tobytes()


def test_dense_update_format_sends_the_whole_model_as_before(cluster, tmp_path):
    store = str(tmp_path / "run.zarr")
    with dask.config.set({"ftps.update-format": "dense"}):
        result, _ = run(cluster, store)
    info = dask_ftps.inspect(store)
    assert info["sparse_updates"] == 0 and info["updates"] == result.minibatches
    assert dask_ftps.status(cluster)["pulls"]["rows"] == 0


def test_a_dask_array_of_sparse_chunks_trains_sparse(cluster, tmp_path):
    X_train = data()[0]
    X = da.from_array(X_train, chunks=(150, -1), asarray=False)
    assert sp.issparse(X.blocks[0].compute())
    store = str(tmp_path / "run.zarr")
    result, _ = run(cluster, store, X=X)
    info = dask_ftps.inspect(store)
    assert info["updates"] == result.minibatches
    assert info["sparse_updates"] == info["retained_updates"] > 0


def test_ftps_classifier_fits_sparse_input_with_row_updates(cluster, tmp_path):
    from dask_ftps import FTPSClassifier

    X_train, X_test, y_train, y_test = data()
    store = str(tmp_path / "clf.zarr")
    clf = FTPSClassifier(
        hidden_layer_sizes=(),
        lr=0.1,
        epochs=3,
        batch_size=32,
        store=store,
        client=cluster,
        random_state=0,
    )
    clf.fit(sp.csc_matrix(X_train), y_train)  # CSC as users may have it
    assert clf.score(X_test, y_test) > 0.45
    assert dask_ftps.inspect(store)["sparse_updates"] > 0


# -- real processes: a worker and the scheduler SIGKILLed ----------------------------

HUGE = 1 << 20
KEEP_ALL = {"DASK_FTPS__STORE__REPLAY_BUDGET": "None"}


def huge_data():
    X, y = dask_ftps.sparse_text(1200, HUGE, 10, 40, seed=5)
    return X, y


def expected_ids(steps: list[int], epochs: int) -> set[str]:
    return {
        f"0:{e}:{s}:{t}"
        for e in range(epochs)
        for s, n in enumerate(steps)
        for t in range(n)
    }


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["async", "sync"])
def test_a_wide_sparse_run_survives_worker_and_scheduler_sigkills(tmp_path, mode):
    """A 2**20-feature linear model trains with row pushes and pulls; a worker
    process is SIGKILLed a quarter of the way in and the scheduler halfway; a
    new scheduler with the preload resumes the run: every update once, sent as
    rows, and the served model equals the store's replay bit for bit."""
    X, y = huge_data()
    epochs, batch = 2, 32
    steps = [-(-600 // batch)] * 2  # two data shards of 600 samples
    total = sum(steps) * epochs
    rounds = total // 2 if mode == "sync" else total
    store = str(tmp_path / "run.zarr")
    port = open_port()
    address = f"tcp://127.0.0.1:{port}"
    model = SoftmaxRegression(n_features=HUGE, n_classes=10)

    def train(client):
        return dask_ftps.train(
            client, X, y, epochs=epochs, batch_size=batch, progress=False, seed=0
        )

    def when(client, updates, action):
        def wait_then_act():
            while dask_ftps.status(client)["updates"] < updates:
                time.sleep(0.01)
            action()

        threading.Thread(target=wait_then_act, daemon=True).start()

    env = {**environment(), **KEEP_ALL}
    with (
        popen(scheduler_args(port, store), capture_output=True, env=env) as first,
        # A short death timeout: once the scheduler is gone these workers (and
        # the one the nanny restarts) stop by themselves.
        popen(worker_args(address, 2, death_timeout=10), capture_output=True, env=env),
    ):
        with Client(address, timeout="60s") as client:
            client.wait_for_workers(2, timeout=60)
            client.register_plugin(
                ParameterServer(
                    store,
                    model=model,
                    optimizer=SGD(lr=0.1, momentum=0.9),
                    mode=mode,
                    snapshot_every=30,
                )
            )
            victim = next(iter(client.scheduler_info()["workers"]))
            pid = client.run(os.getpid, workers=[victim])[victim]
            when(client, total // 5, lambda: os.kill(pid, signal.SIGKILL))
            seen: dict = {}

            def kill_scheduler() -> None:
                seen["workers"] = set(client.run(os.getpid))  # the live ones
                first.send_signal(signal.SIGKILL)

            when(client, total * 3 // 5, kill_scheduler)
            with pytest.raises(Exception):  # noqa: B017 - the scheduler is gone
                train(client)
        first.wait(30)
        assert first.returncode == -signal.SIGKILL
    assert victim not in seen["workers"]  # the worker was gone before
    lost = dask_ftps.inspect(store)
    assert total * 3 // 5 <= lost["updates"] < total
    with (
        popen(scheduler_args(port, store), capture_output=True, env=env),
        popen(worker_args(address, 2), capture_output=True, env=env),
        Client(address, timeout="60s") as client,
    ):
        client.wait_for_workers(2, timeout=60)
        status = dask_ftps.status(client)
        assert status["incarnation"] == 2
        assert status["version"] == lost["version"]  # nothing accepted is lost
        result = train(client)
        assert result.version == rounds
        info = dask_ftps.inspect(store)
        assert info["updates"] == total
        assert info["sparse_updates"] == info["retained_updates"] > 0
        ids = Counter(r["update_id"] for r in info["global"])
        assert max(ids.values()) == 1
        assert set(ids) == expected_ids(steps, epochs)
        assert dask_ftps.status(client)["pulls"]["whole"] == 0
        version, live = dask_ftps.get_model(client)
        offline_version, offline = dask_ftps.recover(store)
        assert version == offline_version == rounds
        for name in live:
            assert live[name].tobytes() == offline[name].tobytes(), name


# -- edges a review found ------------------------------------------------------------


def test_indices_that_wrap_in_arithmetic_are_refused():
    """Not increasing, yet every difference is positive in int64 (int32)."""
    for dtype, top in ((np.int64, 2**63), (np.int32, 2**31)):
        idx = np.array([0, top - 1, -top, -1, 3], dtype)
        with pytest.raises(ValueError, match="outside"):
            check_wanted({"W": idx}, {"W": (8, 3)})
        g = RowSparse(idx, np.ones((5, 3), np.float32), 8)
        assert "outside" in sparse_problem(g, (8, 3), np.float32, "W")


def test_a_stored_row_entry_with_bad_indices_is_corrupt_not_merged():
    """A row entry whose checksum holds but whose indices are not row numbers
    (written by other code) is refused when read, not written elsewhere."""
    layout = Layout.of({"W": np.zeros((8, 2), np.float32)})
    g = RowSparse(np.array([1, 5]), np.ones((2, 2), np.float32), 8)
    fmt = layout.row_format({"W": g})
    for bad in ([5, 1], [-1, 2], [3, 8], [4, 4]):
        flat = layout.flatten({"W": g})
        flat[:2] = np.array(bad, "<i4").view("<f4")
        with pytest.raises(ValueError, match="the rows of W"):
            layout.unflatten(flat, fmt)


def test_the_mean_of_rows_keeps_the_dense_means_signed_zeros():
    a = RowSparse(np.array([0, 2]), np.array([[-0.0], [1.0]], np.float32), 4)
    b = RowSparse(np.array([2, 3]), np.array([[1.0], [-0.0]], np.float32), 4)
    mean = mean_rows([a, b])
    dense = _mean([{"W": a.dense()}, {"W": b.dense()}])["W"]
    assert mean.dense().tobytes() == dense.tobytes()
    assert np.signbit(dense[0, 0]) == np.signbit(mean.dense()[0, 0]) == False


def test_rows_of_leaves_its_argument_alone():
    X = sp.csr_matrix(np.array([[0.0, 1.0, 2.0], [3.0, 0.0, 0.0]], np.float32))
    X.data[1] = 0.0  # an explicit zero: not a row read
    nnz = X.nnz
    assert rows_of(X).tolist() == [0, 1]
    assert X.nnz == nnz


def test_a_window_pulls_whole_what_one_of_its_steps_reads_whole():
    """With two pushes in flight a pull serves two steps: a matrix one of them
    reads more than half of is pulled whole, not as the other step's rows."""
    from dask_ftps.training._worker import _Rows

    model = SoftmaxRegression(n_features=8, n_classes=2)
    X = sp.csr_matrix(np.array([[1] * 8, [0] * 6 + [1, 1]], np.float32))
    rows = _Rows(model, X, [np.array([0]), np.array([1])], inflight=2)
    assert rows.of(0) == {}  # step 0 reads all 8 rows: whole
    assert rows.of(1)["W"].tolist() == [6, 7]
    assert rows.wanted(0) is None  # so the window's pull is whole
    assert rows.wanted(1)["W"].tolist() == [6, 7]


def test_a_model_whose_sparse_rows_are_wrong_is_a_model_error():
    from dask_ftps import ModelError
    from dask_ftps.models._check import checked_sparse_rows

    class Bad(SoftmaxRegression):
        def sparse_rows(self, X):
            return {"b": np.array([0])}  # a bias is not a matrix

    with pytest.raises(ModelError, match="sparse_rows"):
        checked_sparse_rows(Bad(n_features=8, n_classes=2), sp.csr_matrix((1, 8)))
