"""Factored dense-layer updates (patent claim 11): the fixed-bits product, the
worker's factors, the server's checks and merge, the journal's rows, retention."""

from __future__ import annotations

import functools
from fractions import Fraction

import dask
import numpy as np
import pytest
from distributed.utils_test import gen_cluster
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from threadpoolctl import threadpool_limits

import dask_ftps
from dask_ftps import Factored, InvalidUpdate, ParameterServer
from dask_ftps._core import RunSpec, Update, UpdateKey, WorkerId
from dask_ftps._factored import (
    _slices,
    densify,
    factor_pays,
    product,
    slice_bits,
    to_host,
    update_nbytes,
    use_factors,
)
from dask_ftps._layout import DENSE, Layout
from dask_ftps._state import ParameterServerState
from dask_ftps.models import MLP, SoftmaxRegression
from dask_ftps.optim import SGD, Adam

from .conftest import digits, same_as_offline
from .test_plugin import holder_of, server_id

# W0 is 64 x 128: factored pays for minibatches of fewer than 42 samples.
WIDE = MLP(n_features=64, hidden=(128,), n_classes=10, seed=0)


@pytest.fixture
def slow_network(monkeypatch):
    """Workers measure a network so slow (1 s a byte) that factors win wherever
    they are smaller: ``ftps.update-format: auto`` then follows the size rule
    alone (on loopback it measures the product dearer, and sends dense:
    tests/test_defaults.py). The test cluster's workers run in this process."""
    from dask_ftps.training import _worker

    def measured(shapes, batch, replays=_worker.REPLAYS_WITH_STORE):
        products = {(batch, *shape): 0.0 for shape in shapes}
        return _worker.Costs(1.0, products, replays)

    monkeypatch.setattr(_worker, "measure_costs", measured)


def _factors(draw_seed: int, batch: int, m: int, n: int, spread: int, zeros: float):
    """float32 factors whose rows span ``2 ** spread`` in magnitude, some zero."""
    rng = np.random.default_rng(draw_seed)
    u = rng.standard_normal((batch, m)).astype(np.float32)
    v = rng.standard_normal((batch, n)).astype(np.float32)
    u *= np.exp2(rng.integers(-spread, spread + 1, (batch, 1))).astype(np.float32)
    v *= np.exp2(rng.integers(-spread, spread + 1, (1, n))).astype(np.float32)
    u[rng.random(u.shape) < zeros] = 0
    return u, v


factor_cases = st.tuples(
    st.integers(0, 2**32 - 1),
    st.integers(1, 300),  # batch
    st.integers(1, 40),  # m
    st.integers(1, 40),  # n
    st.integers(0, 60),  # exponent spread
    st.sampled_from([0.0, 0.5, 0.95]),  # share of exact zeros (ReLU inputs)
)


# -- the product -----------------------------------------------------------------


def _two_slices(a: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    first, second = np.empty(a.shape), np.empty(a.shape)
    _slices(a.astype(np.float64), bits, first, second)
    return first, second


@settings(max_examples=60, deadline=None)
@given(factor_cases)
def test_slice_products_are_exact_so_no_summation_order_changes_them(case):
    """Each GEMM of slices is a sum of integers below 2**53 in one unit: the float64
    result equals the exact rational one, which no BLAS order can change."""
    seed, batch, m, n, spread, zeros = case
    batch, m, n = min(batch, 64), min(m, 5), min(n, 5)  # exact sums are slow
    u, v = _factors(seed, batch, m, n, spread, zeros)
    bits = slice_bits(batch)
    assert batch * 2 ** (2 * bits) <= 2**53
    u1, u2 = _two_slices(u, bits)
    v1, v2 = _two_slices(v, bits)

    def exact(a, b):  # sum over samples of a[s, i] * b[s, j], as fractions
        return [
            [
                sum(Fraction(a[s, i]) * Fraction(b[s, j]) for s in range(a.shape[0]))
                for j in range(b.shape[1])
            ]
            for i in range(a.shape[1])
        ]

    for a, b in ((u1, v1), (np.concatenate([u1, u2]), np.concatenate([v2, v1]))):
        got = a.T @ b
        want = exact(a, b)
        assert all(
            Fraction(got[i, j]) == want[i][j] for i in range(m) for j in range(n)
        )
    # The slices hold the factors but for what lies 2 * bits below a column's top.
    np.testing.assert_array_equal(u1 + u2 + (u - u1 - u2), u)
    top = np.abs(u).max(axis=0)
    assert (np.abs(u - u1 - u2) <= top * 2.0 ** (1 - 2 * bits)).all()


@settings(max_examples=40, deadline=None)
@given(factor_cases)
def test_product_bits_do_not_depend_on_order_or_threads(case):
    seed, batch, m, n, spread, zeros = case
    u, v = _factors(seed, batch, m, n, spread, zeros)
    c = product(u, v)
    assert c.dtype == np.float32 and c.shape == (m, n)
    # Reordering the samples reorders every sum; one BLAS thread changes its blocking.
    perm = np.random.default_rng(seed).permutation(batch)
    np.testing.assert_array_equal(product(u[perm], v[perm]), c)
    with threadpool_limits(1):
        np.testing.assert_array_equal(product(u, v), c)
    # Accurate to float32 rounding, and then some.
    u64, v64 = u.astype(np.float64), v.astype(np.float64)
    ref = u64.T @ v64
    scale = np.abs(u64).max(axis=0)[:, None] * np.abs(v64).max(axis=0)[None, :]
    err = np.abs(c.astype(np.float64) - ref)
    assert (err <= 2.0**-24 * np.abs(ref) + batch * 2.0**-40 * scale).all()


def test_product_of_a_large_layer_is_the_same_with_one_or_two_threads():
    u, v = _factors(7, 256, 1024, 512, 20, 0.5)
    c = product(u, v)
    with threadpool_limits(1):
        np.testing.assert_array_equal(product(u, v), c)
    ref = u.astype(np.float64).T @ v.astype(np.float64)
    np.testing.assert_allclose(c, ref, rtol=2e-6, atol=1e-6 * np.abs(ref).max())


def test_no_blas_choice_of_the_sign_of_zero_changes_a_bit(monkeypatch):
    """Exact sums leave a BLAS one choice: the sign of a zero (-0 + -0 is -0 if
    it adds the products alone, +0 if it starts from +0, as OpenBLAS does). A
    BLAS that gives -0 for every zero changes no bit of the product."""
    from dask_ftps import _factored

    u, v = _factors(3, 32, 20, 30, 10, 0.5)
    u[:, :5] = -0.0  # dead units: whole columns of zeros
    v[:, :4] = 0.0
    reference = product(u, v)
    zeros = reference == 0
    assert zeros.any() and not np.signbit(reference[zeros]).any()

    def negative_zeros(a, b, out=None):  # as np.matmul, into ``out`` if given
        result = np.matmul(a, b, out=out)
        result[result == 0] = -0.0
        return result

    monkeypatch.setattr(_factored, "_matmul", negative_zeros)
    np.testing.assert_array_equal(product(u, v), reference)
    assert not np.signbit(product(u, v)[zeros]).any()


def test_product_refuses_mismatched_factors():
    with pytest.raises(ValueError, match="float32"):
        product(np.ones((1, 1)), np.ones((1, 1), np.float32))  # 1e-300 would be inf
    with pytest.raises(ValueError, match="factors"):
        product(np.ones((3, 2), np.float32), np.ones((4, 2), np.float32))
    with pytest.raises(ValueError, match="factors"):
        product(np.ones((0, 2), np.float32), np.ones((0, 2), np.float32))


def test_when_factors_pay():
    assert factor_pays(16, (256, 256)) and not factor_pays(128, (256, 256))
    assert factor_pays(127, (256, 256))  # 127 * 512 < 65536
    assert not factor_pays(1, (10,))
    f32 = np.float32
    assert use_factors("auto", 16, (256, 256), f32)
    assert not use_factors("auto", 200, (256, 256), f32)
    assert use_factors("factored", 200, (256, 256), f32)  # even where larger
    assert not use_factors("factored", 2, (256,), f32)  # biases stay dense
    assert not use_factors("factored", 2, (8, 8), np.float64)  # float32 only
    assert not use_factors("dense", 1, (4096, 4096), f32)
    with pytest.raises(ValueError, match="update-format"):
        use_factors("sparse", 1, (4, 4), f32)


# -- the worker's factors -----------------------------------------------------------


@pytest.mark.parametrize("model", [WIDE, SoftmaxRegression(64, 10)])
@pytest.mark.parametrize("fmt", ["auto", "factored"])
def test_factored_gradients_multiply_out_to_the_dense_ones(model, fmt):
    X, _, y, _ = digits()
    params = model.init_params()
    loss, dense, correct = model.loss_and_grad(params, X[:16], y[:16])
    loss2, factored, correct2 = model.loss_and_grad(
        params, X[:16], y[:16], update_format=fmt
    )
    assert (loss, correct) == (loss2, correct2)
    kinds = {k: type(g) for k, g in factored.items()}
    for name, shape in model.param_shapes().items():
        chosen = use_factors(fmt, 16, shape, np.float32)
        assert kinds[name] is (Factored if chosen else np.ndarray)
        if chosen:
            f = factored[name]
            assert f.shape == shape and f.batch == 16
            assert f.u.dtype == f.v.dtype == np.float32
            assert f.size < np.prod(shape) or fmt == "factored"
    assert any(isinstance(g, Factored) for g in factored.values()) == (
        model is WIDE or fmt == "factored"
    )
    for name, g in densify(factored).items():
        np.testing.assert_allclose(g, dense[name], rtol=1e-5, atol=1e-7)
    assert update_nbytes(factored) == sum(
        g.u.nbytes + g.v.nbytes if isinstance(g, Factored) else g.nbytes
        for g in factored.values()
    )
    assert set(to_host(factored)) == set(factored)


def test_a_layer_where_factors_do_not_pay_is_sent_dense():
    X, _, y, _ = digits()
    params = WIDE.init_params()
    _, grads, _ = WIDE.loss_and_grad(params, X[:64], y[:64], update_format="auto")
    assert not any(isinstance(g, Factored) for g in grads.values())  # 64 * 192 > 8192


def test_layout_rows_keep_factored_entries():
    X, _, y, _ = digits()
    params = WIDE.init_params()
    _, grads, _ = WIDE.loss_and_grad(params, X[:9], y[:9], update_format="factored")
    layout = Layout.of(params)
    fmt = layout.row_format(grads)
    assert fmt == (9, (0, 2), ())  # W0 and W1
    flat = layout.flatten(grads)
    assert flat.size == layout.row_size(fmt) < layout.size
    back = layout.unflatten(flat, fmt)
    for name, g in grads.items():
        if isinstance(g, Factored):
            np.testing.assert_array_equal(back[name].u, g.u)
            np.testing.assert_array_equal(back[name].v, g.v)
        else:
            np.testing.assert_array_equal(back[name], g)
    assert layout.row_format(densify(grads)) == DENSE
    for bad in [
        (0, (0,), ()),
        (9, (1,), ()),
        (9, (2, 0), ()),
        (9, (0, 0), ()),
        (9, (7,), ()),
    ]:
        with pytest.raises(ValueError, match="row format"):
            layout.row_size(bad)


# -- the server --------------------------------------------------------------------


def _state(optimizer=None, mode="async", **kwargs) -> ParameterServerState:
    state = ParameterServerState(WIDE, optimizer or SGD(lr=0.1), mode=mode, **kwargs)
    state.begin_run(RunSpec((400, 400), batch_size=16, epochs=2))
    return state


@functools.cache
def _minibatch(shard: int, step: int) -> tuple[np.ndarray, np.ndarray]:
    X, _, y, _ = digits()
    rows = np.random.default_rng([shard, step]).choice(len(X), 16, replace=False)
    return X[rows], y[rows]


def _update(state, shard: int, step: int, fmt: str = "factored") -> Update:
    xb, yb = _minibatch(shard, step)
    _, grads, _ = WIDE.loss_and_grad(state.model.params, xb, yb, update_format=fmt)
    return Update(UpdateKey(0, 0, shard, step), WorkerId(f"w{shard}"), grads)


@pytest.mark.parametrize(
    "optimizer", [SGD(lr=0.1), SGD(lr=0.1, momentum=0.9), Adam(lr=1e-3)]
)
@pytest.mark.parametrize("mode", ["async", "sync"])
def test_every_optimizer_merges_factors_as_their_product(optimizer, mode):
    """The server multiplies factors out and applies the optimizer to the product:
    the same bits as pushing that product dense (momentum and Adam keep their
    state of dense gradients)."""
    factored, dense = _state(optimizer, mode), _state(optimizer, mode)
    for step in range(3):
        for shard in (0, 1):
            update = _update(factored, shard, step)
            factored.push(update)
            dense.push(Update(update.key, update.worker, densify(update.grads)))
    assert factored.version == dense.version == (6 if mode == "async" else 3)
    for name in factored.model.params:
        np.testing.assert_array_equal(
            factored.model.params[name], dense.model.params[name]
        )
    for name in factored.model.opt_state:
        np.testing.assert_array_equal(
            factored.model.opt_state[name], dense.model.opt_state[name]
        )


def _hostile(update: Update, name: str, value) -> Update:
    return Update(update.key, update.worker, {**update.grads, name: value})


def _bare(**fields) -> Factored:
    """A Factored as an unpickled message may hold it: fields unchecked."""
    f = object.__new__(Factored)
    f.__dict__.update(fields)
    return f


class _Sub(Factored):
    pass


def _bad_factors(update: Update) -> list[tuple[str, object, str]]:
    g = update.grads["W0"]
    u, v = g.u, g.v
    big = np.full_like(u, 1e30)
    return [
        ("W0", Factored(u[:, :-1], v), "factors of shapes"),
        ("W0", Factored(u, v[:-1]), "factors of shapes"),
        ("W0", Factored(u.astype(np.float64), v), "2-d float32"),
        ("W0", Factored(u.tolist(), v), "2-d float32"),
        ("W0", Factored(u[None], v), "2-d float32"),
        ("W0", Factored(np.tile(u, (2, 1)), np.tile(v, (2, 1))), "1 to 16"),
        ("W0", Factored(u[:0], v[:0]), "1 to 16"),
        ("W0", Factored(np.where(u > 0.5, np.nan, u), v), "NaN or Inf"),
        ("W0", Factored(u, np.where(v > 0, np.inf, v)), "NaN or Inf"),
        ("W0", Factored(big, np.full_like(v, 1e30)), "overflow"),
        ("W0", _bare(u=u), "2-d float32"),
        ("W0", _bare(), "2-d float32"),
        ("W0", _Sub(u, v), "2-d float32"),
        ("W0", Factored(np.ma.masked_array(u, mask=u > 1), v), "2-d float32"),
        ("b0", Factored(u, v), "not a float32 matrix"),
        ("W1", Factored(np.ones((8, 128), np.float32), v[:8, :10]), "samples"),
    ]


def test_bad_factors_are_refused_and_change_nothing():
    state = _state(SGD(lr=0.1, momentum=0.9))
    state.push(_update(state, 0, 0))
    before = (state.version, state.summary(), dict(state.model.params))
    good = _update(state, 1, 0)
    for name, value, message in _bad_factors(good):
        with pytest.raises(InvalidUpdate, match=message):
            state.push(_hostile(good, name, value))
        assert (state.version, state.summary()) == before[:2]
        assert all(state.model.params[k] is v for k, v in before[2].items())
    state.push(good)  # the good one still goes in
    assert state.version == 2


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=st.integers(-2, 40),
    m=st.integers(0, 70),
    n=st.integers(0, 130),
    dtype=st.sampled_from(["float32", "float64", "float16"]),
    fill=st.sampled_from([0.0, 1.0, 3e3, 1e19, 1e30, float("nan"), float("inf")]),
)
def test_any_malformed_factors_get_a_clear_refusal(batch, m, n, dtype, fill):
    state = _state()
    good = _update(state, 0, 0)
    rows = max(batch, 0)
    with np.errstate(over="ignore"):  # 1e19 is inf in float16: refused too
        value = Factored(
            np.full((rows, m), fill, dtype), np.full((rows, n), fill, dtype)
        )
    ok = (
        (m, n) == (64, 128)
        and dtype == "float32"
        and 1 <= batch <= 16
        and np.isfinite(fill)
        and batch * float(np.float32(fill)) ** 2 <= np.finfo(np.float32).max
    )
    if ok:
        state.push(_hostile(good, "W0", value))
        assert state.version == 1
    else:
        with pytest.raises(InvalidUpdate):
            state.push(_hostile(good, "W0", value))
        assert state.version == 0 and state.updates == 0


def test_gradient_datasets_count_factored_payloads_by_their_size():
    """Claim 9's gradient entries are a byte budget of that many dense payloads:
    a worker keeps as many smaller factored payloads as fit in it."""
    dense_bytes = WIDE.n_params() * 4
    state = _state(gradient_entries=2)
    for step in range(20):
        state.push(_update(state, 0, step, fmt="auto"))
    kept = state.gradients["w0"]
    size = kept[-1][2]
    assert size == update_nbytes(kept[-1][1]) < dense_bytes / 2
    assert len(kept) == (2 * dense_bytes) // size > 2  # as many as fit
    assert [e[0] for e in kept] == [f"0:0:0:{s}" for s in range(20 - len(kept), 20)]
    assert state.summary()["gradient_bytes"] == len(kept) * size <= 2 * dense_bytes
    # Dense payloads of the same worker: two of them.
    for step in range(20, 23):
        state.push(_update(state, 0, step, fmt="dense"))
    assert [e[0] for e in state.gradients["w0"]] == ["0:0:0:21", "0:0:0:22"]
    assert state.summary()["gradient_bytes"] == 2 * dense_bytes


# -- in a cluster: the journal keeps factors, replay gives the same bits ------------


async def _train(c, epochs=2, batch_size=16, **kwargs):
    X_train, _, y_train, _ = digits()
    return await dask_ftps.train(
        c,
        X_train,
        y_train,
        epochs=epochs,
        batch_size=batch_size,
        progress=False,
        **kwargs,
    )


@pytest.mark.parametrize(
    "optimizer", [SGD(lr=0.05), SGD(lr=0.05, momentum=0.9), Adam(lr=1e-3)]
)
@pytest.mark.parametrize("mode", ["async", "sync"])
def test_factored_runs_replay_bit_for_bit(tmp_path, mode, optimizer, slow_network):
    @gen_cluster(client=True, timeout=120, config={"ftps.update-format": "auto"})
    async def run(c, s, a, b):
        store = str(tmp_path / "run.zarr")
        await c.register_plugin(
            ParameterServer(
                store, model=WIDE, optimizer=optimizer, mode=mode, snapshot_every=30
            )
        )
        result = await _train(c)
        info = dask_ftps.inspect(store)
        # Every update's W0 went factored (16 * 192 < 64 * 128), W1 dense.
        assert info["factored_updates"] == len(info["global"]) > 0
        assert info["updates"] == result.minibatches
        version, params = await same_as_offline(c, store)
        # A new server rebuilds from a worker's copy or the snapshot plus the
        # factored payloads: the same model.
        await c.register_plugin(ParameterServer(store))
        again, rebuilt = await dask_ftps.get_model(c)
        assert again == version
        for name, value in params.items():
            np.testing.assert_array_equal(rebuilt[name], value)
        status = await dask_ftps.status(c)
        assert (
            status["recovery"]["replayed"] > 0
            or status["recovery"]["source"] != "snapshot"
        )
        # It learns (chance: 0.1); momentum 0.9 with the default window swings in
        # 2 short epochs (0.43 seen), so the bar is well above chance, not high.
        assert result.history[-1]["accuracy"] > 0.25

    run()


@pytest.mark.usefixtures("slow_network")
@gen_cluster(client=True, timeout=120)
async def test_factored_payloads_take_their_size_in_the_store(c, s, a, b, tmp_path):
    sizes = {}
    for fmt in ("dense", "auto"):
        store = str(tmp_path / f"{fmt}.zarr")
        await c.register_plugin(
            ParameterServer(
                store, model=WIDE, optimizer=SGD(lr=0.05), snapshot_every=10**6
            )
        )
        with dask.config.set({"ftps.update-format": fmt}):
            await _train(c, epochs=1)
        info = dask_ftps.inspect(store)
        sizes[fmt] = info["payload_bytes"] / info["updates"]
        assert (info["factored_updates"] > 0) == (fmt == "auto")
    dense_row = 4 * WIDE.n_params()
    assert sizes["dense"] == dense_row
    # 16-sample minibatches (a few of 15): W0 as 16 * (64 + 128) numbers.
    factored_row = 4 * (16 * (64 + 128) + WIDE.n_params() - 64 * 128)
    assert factored_row - 4 * 192 <= sizes["auto"] <= factored_row


@gen_cluster(client=True, timeout=60)
async def test_a_bad_update_format_is_refused_before_anything_is_sent(c, s, a, b):
    await c.register_plugin(ParameterServer(None, model=WIDE, optimizer=SGD(lr=0.05)))
    for key, value in (("update-format", "sparse"), ("device", "tpu")):
        with (
            dask.config.set({f"ftps.{key}": value}),
            pytest.raises(dask_ftps.InvalidRequest, match=f"ftps.{key}"),
        ):
            await _train(c, epochs=1)
    assert (await dask_ftps.status(c))["updates"] == 0


@gen_cluster(client=True, timeout=60)
async def test_hostile_factored_pushes_over_the_wire_change_nothing(c, s, a, b):
    """Pickled factors through the scheduler's ftps_push handler: every bad one
    is refused with InvalidUpdate and leaves the server as it was; a good one
    after them is accepted."""
    from distributed.protocol.serialize import ToPickle

    from dask_ftps._core import check_reply

    await c.register_plugin(ParameterServer(None, model=WIDE, optimizer=SGD(0.1)))
    spec = RunSpec((400, 400), batch_size=16, epochs=2)
    check_reply(await c.scheduler.ftps_begin_run(spec=spec.to_dict()), "begin")
    state = s.plugins["ftps"].server.state
    good = _update(state, 0, 0)

    async def push(grads):
        reply = await c.scheduler.ftps_push(
            server_id=await server_id(c),
            holder=holder_of(c),
            worker="tcp://w:1", update_id="0:0:0:0", grads=ToPickle(grads),
            incarnation=state.incarnation,
        )  # fmt: skip
        return check_reply(reply, "ftps_push")

    before = state.summary()
    for name, value, message in _bad_factors(good):
        with pytest.raises(InvalidUpdate, match=message):
            await push({**good.grads, name: value})
        assert state.summary() == before
    assert (await push(good.grads))["version"] == 1


@pytest.mark.usefixtures("slow_network")
@gen_cluster(client=True, timeout=120)
async def test_auto_weighs_the_runs_batch_size_not_each_minibatchs(
    c, s, a, b, tmp_path
):
    """W0 is 64 x 128: factors pay below 8192 / 192 = 42.7 samples. A run of
    batch_size 43 sends it dense throughout, though its minibatches hold 42 or
    43 samples (the shards split evenly); batch_size 42 factored throughout."""
    X_train, _, y_train, _ = digits()
    for batch_size, factored in ((43, False), (42, True)):
        store = str(tmp_path / f"b{batch_size}.zarr")
        await c.register_plugin(
            ParameterServer(store, model=WIDE, optimizer=SGD(lr=0.05))
        )
        result = await dask_ftps.train(
            c, X_train, y_train, epochs=1, batch_size=batch_size, progress=False
        )
        info = dask_ftps.inspect(store)
        assert info["updates"] == result.minibatches
        assert info["factored_updates"] == (result.minibatches if factored else 0)


def test_a_masked_dense_gradient_is_refused():
    """A NumPy subclass could hide values from the checks (a masked NaN)."""
    state = _state()
    good = _update(state, 0, 0, fmt="dense")
    w1 = good.grads["W1"].copy()
    w1[0, 0] = np.nan
    with pytest.raises(InvalidUpdate, match="not a NumPy array"):
        state.push(_hostile(good, "W1", np.ma.masked_array(w1, mask=np.isnan(w1))))
    assert state.version == 0 and state.updates == 0


def test_updates_that_overflow_only_together_are_refused_in_sync_mode():
    """Each product fits float32 (the admission bound), their round's mean does
    not: the update that completes the round is refused and nothing changes."""
    state = _state(mode="sync")
    updates = []
    for shard in (0, 1):
        update = _update(state, shard, 0)
        w0 = update.grads["W0"]
        u, v = w0.u.copy(), w0.v.copy()
        u[:, 0] = v[:, 0] = np.float32(4.3e18)  # 16 * 4.3e18 ** 2 < 3.4e38
        updates.append(_hostile(update, "W0", Factored(u, v)))
    state.push(updates[0])  # waits for its round
    before = (state.version, state.summary())
    with pytest.raises(InvalidUpdate, match="Inf or NaN"):
        state.push(updates[1])
    assert (state.version, state.summary()) == before


def test_the_gradient_budget_must_be_a_positive_integer():
    for bad in (0, -1, 1.5, "2", True):
        with pytest.raises(dask_ftps.InvalidRequest, match="gradient-entries"):
            ParameterServerState(WIDE, SGD(lr=0.1), gradient_entries=bad)


def test_factored_updates_compare_by_identity():
    f = Factored(np.ones((2, 3), np.float32), np.ones((2, 4), np.float32))
    same = f
    assert f == same and f != Factored(f.u, f.v)
    assert len({f, Factored(f.u, f.v)}) == 2
