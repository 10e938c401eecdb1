"""Defaults that never cost speed: ``ftps.update-format: auto`` factors a layer
only where that is faster on the cluster, and the default push window
(``ftps.inflight``) is what the server reports."""

from __future__ import annotations

import dask
import numpy as np
import pytest
from distributed.utils_test import gen_cluster
from hypothesis import given
from hypothesis import strategies as st

import dask_ftps
from dask_ftps import SGD, Factored, ParameterServer, config
from dask_ftps._factored import factor_pays
from dask_ftps.models import MLP, SoftmaxRegression
from dask_ftps.training import _worker
from dask_ftps.training._worker import Costs, factor_names, factor_wins

from .conftest import digits, same_as_offline

shapes = st.tuples(st.integers(1, 5000), st.integers(1, 5000))
batches = st.integers(1, 2048)
costs = st.floats(0.0, 1.0, allow_nan=False)
replays = st.integers(0, 3)


# -- the decision: a pure function of what was measured -------------------------------


@given(shapes, batches, costs, costs, replays)
def test_factors_are_never_chosen_where_they_are_not_smaller(
    shape, batch, per_byte, product_s, n
):
    if not factor_pays(batch, shape):
        assert not factor_wins(
            shape,
            batch,
            seconds_per_byte=per_byte,
            product_seconds=product_s,
            replays=n,
        )


@given(shapes, batches, costs, costs, costs, replays)
def test_a_dearer_network_never_turns_factors_into_dense(
    shape, batch, per_byte, more, product_s, n
):
    cheap, dear = sorted((per_byte, more))
    kw = {"product_seconds": product_s, "replays": n}
    if factor_wins(shape, batch, seconds_per_byte=cheap, **kw):
        assert factor_wins(shape, batch, seconds_per_byte=dear, **kw)


@given(shapes, batches, costs, costs, costs, replays, replays)
def test_a_dearer_product_or_more_replays_never_turn_dense_into_factors(
    shape, batch, per_byte, product_s, more, n, extra
):
    cheap, dear = sorted((product_s, more))
    if not factor_wins(
        shape, batch, seconds_per_byte=per_byte, product_seconds=cheap, replays=n
    ):
        assert not factor_wins(
            shape, batch, seconds_per_byte=per_byte, product_seconds=dear, replays=n
        )
        assert not factor_wins(
            shape,
            batch,
            seconds_per_byte=per_byte,
            product_seconds=cheap,
            replays=n + extra,
        )


@given(shapes, batches, st.floats(1e-12, 1.0), replays)
def test_a_free_network_sends_dense_and_a_free_product_factors(
    shape, batch, positive, n
):
    assert not factor_wins(
        shape, batch, seconds_per_byte=0.0, product_seconds=positive, replays=n
    )
    free = factor_wins(
        shape, batch, seconds_per_byte=positive, product_seconds=0.0, replays=n
    )
    assert free == factor_pays(batch, shape)


def test_the_weighing_counts_saved_bytes_against_every_product():
    """1024 x 1024 at B = 64 saves 4 * (1048576 - 131072) = 3670016 bytes."""
    saved = 3_670_016
    at = {"seconds_per_byte": 1e-9}
    just_below = saved * 1e-9 / 2 * (1 - 1e-9)  # two products: merge + replay
    assert factor_wins((1024, 1024), 64, product_seconds=just_below, **at)
    assert not factor_wins((1024, 1024), 64, product_seconds=2 * just_below, **at)
    # A memory-only server never replays: one product only.
    assert factor_wins(
        (1024, 1024), 64, product_seconds=1.9 * just_below, replays=0, **at
    )
    assert not factor_wins(
        (1024, 1024), 64, product_seconds=2.1 * just_below, replays=0, **at
    )


def _costs(per_byte: float, product_s: float, batch: int, model) -> Costs:
    shapes = model.param_shapes()
    return Costs(
        per_byte,
        {(batch, *shapes[n]): product_s for n in model.factorable()},
        replays=1,
    )


WIDE = MLP(n_features=64, hidden=(128,), n_classes=10, seed=0)  # W0 64 x 128


@pytest.mark.parametrize(
    ("fmt", "per_byte", "product_s", "expected"),
    [
        ("auto", 1.0, 0.0, {"W0"}),  # smaller and faster
        ("auto", 0.0, 1.0, set()),  # smaller, not faster
        ("factored", 0.0, 1.0, {"W0", "W1"}),  # forced: every float32 matrix
        ("dense", 1.0, 0.0, set()),  # never
    ],
)
def test_factor_names_follow_the_format_and_the_costs(
    fmt, per_byte, product_s, expected
):
    chosen = factor_names(WIDE, fmt, 16, _costs(per_byte, product_s, 16, WIDE))
    assert chosen == expected


def test_auto_measures_nothing_where_no_layer_is_smaller(monkeypatch):
    """The demo's MLP (64-256-10, B = 64): nothing is smaller as factors, so
    nothing is measured and the update goes dense."""

    def measured(*args, **kwargs):
        raise AssertionError("measured although no factors are smaller")

    monkeypatch.setattr(_worker, "measure_costs", measured)
    demo = MLP(n_features=64, hidden=(256,), n_classes=10, seed=0)
    assert factor_names(demo, "auto", 64) == frozenset()
    assert _worker._costs(demo, "auto", 64, 1) is None


# -- measured on a (loopback) cluster -------------------------------------------------


def _decide(model, batch: int) -> tuple[list[str], float, dict]:
    costs = _worker._costs(model, "auto", batch, 0)
    return (
        sorted(factor_names(model, "auto", batch, costs)),
        costs.seconds_per_byte,
        dict(costs.product_seconds),
    )


@gen_cluster(client=True, timeout=120)
async def test_auto_sends_dense_on_loopback_where_factors_are_smaller(c, s, a, b):
    """Measured on a worker: on loopback the bytes factors save take less time
    than the server's product, for the benchmarks' 1e6-parameter MLP (1024 x
    960 at B = 64) and the tests' WIDE MLP at B = 16, memory-only (no
    replay) and all."""
    cases = [
        (MLP(n_features=1024, hidden=(960,), n_classes=10, seed=0), 64, "W0"),
        (WIDE, 16, "W0"),
    ]
    for model, batch, name in cases:
        assert factor_pays(batch, model.param_shapes()[name])  # old auto factored
        chosen, per_byte, products = await c.submit(
            _decide, model, batch, workers=[a.address], pure=False
        )
        assert chosen == [], (model, batch, per_byte, products)
        assert per_byte >= 0 and all(p > 0 for p in products.values())


@gen_cluster(client=True, timeout=120)
async def test_auto_trains_dense_on_loopback(c, s, a, b, tmp_path):
    """The whole path: train() with the default update-format sends the WIDE
    MLP's W0 dense (smaller as factors at B = 16, but not faster here)."""
    assert config.get("update-format") == "auto"
    store = str(tmp_path / "run.zarr")
    await c.register_plugin(ParameterServer(store, model=WIDE, optimizer=SGD(0.05)))
    X, _, y, _ = digits()
    result = await dask_ftps.train(c, X, y, epochs=1, batch_size=16, progress=False)
    info = dask_ftps.inspect(store)
    assert info["updates"] == result.minibatches > 0
    assert info["factored_updates"] == 0
    assert info["payload_bytes"] == 4 * WIDE.n_params() * info["updates"]


# -- the push window ------------------------------------------------------------------


def test_the_default_window_is_1():
    """A window of 2 with scaled steps kept the demo's and the digits' MLPs within
    0.005 of a window of 1, but not the ConvNet example: the default stays 1."""
    assert config.get("inflight") == 1


@pytest.mark.parametrize(("mode", "window"), [("async", 1), ("sync", 1), ("ssp", 1)])
def test_status_reports_the_default_window(mode, window):
    """Async mode runs the default window; sync and ssp compute nothing ahead of
    what was acknowledged."""

    @gen_cluster(client=True, timeout=60)
    async def run(c, s, a, b):
        model = SoftmaxRegression(n_features=4, n_classes=3, seed=0)
        await c.register_plugin(ParameterServer(None, model=model, mode=mode))
        assert (await dask_ftps.status(c))["inflight"] == window

    run()


@gen_cluster(client=True, timeout=120, config={"ftps.inflight": 2})
async def test_a_window_of_2_trains_every_minibatch_once(c, s, a, b):
    model = SoftmaxRegression(n_features=64, n_classes=10, seed=0)
    await c.register_plugin(ParameterServer(None, model=model, optimizer=SGD(0.05)))
    assert (await dask_ftps.status(c))["inflight"] == 2
    X, X_test, y, y_test = digits()
    result = await dask_ftps.train(c, X, y, epochs=3, batch_size=32, progress=False)
    status = await dask_ftps.status(c)
    assert status["version"] == result.minibatches
    _, params = await dask_ftps.get_model(c)
    assert np.mean(model.predict(params, X_test) == y_test) > 0.8  # chance: 0.1


def test_a_window_set_by_the_user_wins():
    with dask.config.set({"ftps.inflight": 2}):
        assert config.get("inflight") == 2


# -- steps scaled by the window ------------------------------------------------------


def test_stale_scale_changes_nothing_at_a_window_of_1():
    assert _worker.stale_scale(0) == 1.0
    assert [_worker.stale_scale(k) for k in (1, 2, 3)] == [0.5, 1 / 3, 0.25]
    with pytest.raises(ValueError, match="outstanding"):
        _worker.stale_scale(-1)


def test_scaled_updates_keep_their_kind_and_dtype():
    rng = np.random.default_rng(0)
    u = rng.standard_normal((4, 3), dtype=np.float32)
    v = rng.standard_normal((4, 5), dtype=np.float32)
    b = rng.standard_normal(5, dtype=np.float32)
    grads = {"W": Factored(u, v), "b": b}
    assert _worker.scaled(grads, 1.0) is grads
    half = _worker.scaled(grads, 0.5)
    assert isinstance(half["W"], Factored) and half["W"].u is u
    assert half["W"].v.dtype == half["b"].dtype == np.float32
    np.testing.assert_array_equal(half["W"].v, v * np.float32(0.5))
    np.testing.assert_array_equal(half["b"], b * np.float32(0.5))
    np.testing.assert_array_equal(grads["b"], b)  # not modified


@gen_cluster(client=True, timeout=120, config={"ftps.inflight": 4})
async def test_scaled_steps_replay_bit_for_bit(c, s, a, b, tmp_path):
    """The worker scales the update it pushes: the store records the scaled
    one, so recover() rebuilds the live model bit for bit."""
    assert config.get("window-scaling") is True
    store = str(tmp_path / "run.zarr")
    model = SoftmaxRegression(n_features=64, n_classes=10, seed=0)
    optimizer = SGD(0.05, momentum=0.9)
    await c.register_plugin(ParameterServer(store, model=model, optimizer=optimizer))
    assert (await dask_ftps.status(c))["inflight"] == 4
    X, _, y, _ = digits()
    result = await dask_ftps.train(c, X, y, epochs=2, batch_size=16, progress=False)
    version, _ = await same_as_offline(c, store)
    assert version == result.minibatches


@gen_cluster(client=True, timeout=60)
async def test_a_bad_window_scaling_is_refused_before_anything_is_sent(c, s, a, b):
    model = SoftmaxRegression(n_features=64, n_classes=10, seed=0)
    await c.register_plugin(ParameterServer(None, model=model, optimizer=SGD(0.05)))
    X, _, y, _ = digits()
    for bad in ("yes", 1, None):
        with (
            dask.config.set({"ftps.window-scaling": bad}),
            pytest.raises(dask_ftps.InvalidRequest, match="window-scaling"),
        ):
            await dask_ftps.train(c, X, y, epochs=1, batch_size=32, progress=False)
    assert (await dask_ftps.status(c))["version"] == 0
