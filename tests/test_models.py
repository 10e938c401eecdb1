from __future__ import annotations

import json

import numpy as np
import pytest

from dask_ftps.models import MLP, Model, SoftmaxRegression, model_from_dict

MODELS = [
    SoftmaxRegression(n_features=6, n_classes=4, seed=3),
    MLP(n_features=6, hidden=(7, 5), n_classes=4, seed=3),
]


def _data(n: int = 20, d: int = 6, k: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)), rng.integers(0, k, size=n)


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.kind)
def test_gradient_matches_finite_differences(model: Model) -> None:
    X, y = _data()
    params = {k: v.astype(np.float64) for k, v in model.init_params().items()}
    _, grads, _ = model.loss_and_grad(params, X, y)
    assert all(grads[k].dtype == np.float64 for k in params)
    rng = np.random.default_rng(1)
    h = 1e-6
    n_checked = 0
    for name, p in params.items():
        for flat in rng.choice(p.size, size=min(p.size, 20), replace=False):
            idx = np.unravel_index(flat, p.shape)
            plus = {k: v.copy() for k, v in params.items()}
            minus = {k: v.copy() for k, v in params.items()}
            plus[name][idx] += h
            minus[name][idx] -= h
            num = (
                model.loss_and_grad(plus, X, y)[0] - model.loss_and_grad(minus, X, y)[0]
            ) / (2 * h)
            ana = grads[name][idx]
            rel = abs(num - ana) / max(abs(num) + abs(ana), 1e-6)
            assert rel < 1e-5, (name, idx, num, ana)
            n_checked += 1
    assert n_checked >= 24


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.kind)
def test_weighted_gradient_matches_finite_differences(model: Model) -> None:
    X, y = _data()
    weight = np.random.default_rng(2).uniform(0.1, 3.0, size=len(y))
    params = {k: v.astype(np.float64) for k, v in model.init_params().items()}
    loss, grads, _ = model.loss_and_grad(params, X, y, sample_weight=weight)
    plain, _, _ = model.loss_and_grad(params, X, y)
    assert loss != pytest.approx(plain)
    h = 1e-6
    for name, p in params.items():
        idx = np.unravel_index(p.size // 2, p.shape)
        plus = {k: v.copy() for k, v in params.items()}
        minus = {k: v.copy() for k, v in params.items()}
        plus[name][idx] += h
        minus[name][idx] -= h
        num = (
            model.loss_and_grad(plus, X, y, sample_weight=weight)[0]
            - model.loss_and_grad(minus, X, y, sample_weight=weight)[0]
        ) / (2 * h)
        ana = grads[name][idx]
        assert abs(num - ana) / max(abs(num) + abs(ana), 1e-6) < 1e-5, name


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.kind)
def test_unit_weights_give_the_unweighted_bits(model: Model) -> None:
    X, y = _data()
    params = model.init_params()
    plain = model.loss_and_grad(params, X, y)
    ones = model.loss_and_grad(params, X, y, sample_weight=np.ones(len(y)))
    assert ones[0] == pytest.approx(plain[0], rel=1e-6)
    for name in params:
        np.testing.assert_allclose(ones[1][name], plain[1][name], rtol=1e-6)
    with pytest.raises(ValueError, match="sample_weight must have shape"):
        model.loss_and_grad(params, X, y, sample_weight=np.ones(3))


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.kind)
def test_loss_and_grad_float32_outputs(model: Model) -> None:
    X, y = _data()
    params = model.init_params()
    loss, grads, n_correct = model.loss_and_grad(params, X, y)
    assert isinstance(loss, float)
    assert np.isfinite(loss)
    assert isinstance(n_correct, int)
    assert 0 <= n_correct <= len(y)
    assert n_correct == int((model.predict(params, X) == y).sum())
    assert list(grads) == list(model.param_shapes())
    for name, g in grads.items():
        assert g.dtype == np.float32
        assert g.shape == params[name].shape


def test_loss_is_numerically_stable() -> None:
    model = SoftmaxRegression(n_features=2, n_classes=3)
    params = {
        "W": np.array([[1e4, 0, -1e4], [0, 1e4, 0]], dtype=np.float32),
        "b": np.zeros(3, dtype=np.float32),
    }
    X = np.array([[1.0, 0.0], [0.0, 1.0]])
    loss, grads, n_correct = model.loss_and_grad(params, X, np.array([2, 1]))
    assert np.isfinite(loss)
    assert loss == pytest.approx(1e4, rel=1e-6)
    assert all(np.isfinite(g).all() for g in grads.values())
    assert n_correct == 1


def test_softmax_regression_learns_digits() -> None:
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = X / 16.0
    model = SoftmaxRegression(n_features=X.shape[1], n_classes=10)
    params = model.init_params()
    for _ in range(300):
        _, grads, n_correct = model.loss_and_grad(params, X, y)
        params = {k: params[k] - 0.5 * grads[k] for k in params}
    assert params["W"].dtype == np.float32
    accuracy = float((model.predict(params, X) == y).mean())
    assert accuracy > 0.9
    assert n_correct / len(y) > 0.9


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.kind)
def test_init_params_deterministic(model: Model) -> None:
    a, b = model.init_params(), model.init_params()
    assert list(a) == list(model.param_shapes())
    for name, shape in model.param_shapes().items():
        assert a[name].shape == shape
        assert a[name].dtype == np.float32
        assert a[name].flags.c_contiguous
        np.testing.assert_array_equal(a[name], b[name])
    assert sum(v.size for v in a.values()) == model.n_params()
    assert all(not v.any() for k, v in a.items() if k.startswith("b"))
    other = model_from_dict({**model.to_dict(), "seed": 4}).init_params()
    first_w = next(iter(a))
    assert not np.array_equal(a[first_w], other[first_w])


def test_mlp_he_init_scale() -> None:
    params = MLP(n_features=400, hidden=(300,), n_classes=3).init_params()
    assert params["W0"].std() == pytest.approx(np.sqrt(2 / 400), rel=0.02)
    assert params["W1"].std() == pytest.approx(np.sqrt(2 / 300), rel=0.1)


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.kind)
def test_predict_proba_and_predict(model: Model) -> None:
    X, _ = _data(n=13)
    params = model.init_params()
    proba = model.predict_proba(params, X)
    assert proba.shape == (13, 4)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
    assert (proba >= 0).all()
    pred = model.predict(params, X)
    assert pred.shape == (13,)
    assert pred.dtype == np.int64
    np.testing.assert_array_equal(pred, proba.argmax(axis=1))


def test_param_shapes_order() -> None:
    assert SoftmaxRegression(5, 3).param_shapes() == {"W": (5, 3), "b": (3,)}
    shapes = MLP(5, hidden=(4, 2), n_classes=3).param_shapes()
    assert list(shapes.items()) == [
        ("W0", (5, 4)),
        ("b0", (4,)),
        ("W1", (4, 2)),
        ("b1", (2,)),
        ("W2", (2, 3)),
        ("b2", (3,)),
    ]
    assert MLP(5, hidden=(4, 2), n_classes=3).n_params() == 20 + 4 + 8 + 2 + 6 + 3


def test_mlp_without_hidden_matches_softmax_regression() -> None:
    X, y = _data()
    sm = SoftmaxRegression(6, 4, seed=0)
    mlp = MLP(6, hidden=(), n_classes=4)
    p = sm.init_params()
    loss_a, grads_a, hits_a = sm.loss_and_grad(p, X, y)
    loss_b, grads_b, hits_b = mlp.loss_and_grad({"W0": p["W"], "b0": p["b"]}, X, y)
    assert (loss_a, hits_a) == (loss_b, hits_b)
    np.testing.assert_array_equal(grads_a["W"], grads_b["W0"])


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.kind)
def test_to_dict_round_trip(model: Model) -> None:
    d = model.to_dict()
    assert d["kind"] == type(model).__name__
    restored = model_from_dict(json.loads(json.dumps(d)))
    assert restored == model
    assert hash(restored) == hash(model)


def test_hidden_list_normalised() -> None:
    a = MLP(3, hidden=[4, 2], n_classes=2)
    assert a.hidden == (4, 2)
    assert a == MLP(3, hidden=(4, 2), n_classes=2)
    assert hash(a) == hash(MLP(3, hidden=(4, 2), n_classes=2))


@pytest.mark.parametrize(
    "make",
    [
        lambda: SoftmaxRegression(0, 3),
        lambda: SoftmaxRegression(3, 1),
        lambda: SoftmaxRegression(3.0, 3),
        lambda: SoftmaxRegression(True, 3),
        lambda: SoftmaxRegression(3, 3, seed=-1),
        lambda: MLP(3, hidden=(4, 0)),
        lambda: MLP(3, hidden=(4, -2)),
        lambda: MLP(3, hidden="12"),
        lambda: MLP(3, hidden=5),
        lambda: MLP(3, n_classes=1),
        lambda: MLP(-1),
    ],
)
def test_bad_specs_raise(make) -> None:
    with pytest.raises(ValueError, match="must"):
        make()


@pytest.mark.parametrize(
    "d",
    [
        {"kind": "Nope", "n_features": 3},
        {"n_features": 3},
        {"kind": "MLP", "n_features": 3, "bogus": 1},
        {"kind": "SoftmaxRegression"},
    ],
)
def test_model_from_dict_rejects_bad_input(d) -> None:
    with pytest.raises(ValueError, match=r"kind|fields"):
        model_from_dict(d)


def test_loss_and_grad_rejects_bad_inputs() -> None:
    model = SoftmaxRegression(6, 4)
    params = model.init_params()
    X, y = _data()
    with pytest.raises(ValueError, match="labels"):
        model.loss_and_grad(params, X, np.full_like(y, 4))
    with pytest.raises(ValueError, match="X must have shape"):
        model.loss_and_grad(params, X[:, :5], y)
    with pytest.raises(ValueError, match="y must have shape"):
        model.loss_and_grad(params, X, y[:-1])
    with pytest.raises(ValueError, match="non-empty"):
        model.loss_and_grad(params, X[:0], y[:0])
    with pytest.raises(ValueError, match="params keys"):
        model.loss_and_grad({"W": params["W"]}, X, y)


@pytest.mark.gpu
@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.kind)
def test_loss_and_grad_cupy_matches_numpy(model: Model) -> None:
    cupy = pytest.importorskip("cupy")
    if not cupy.is_available():
        pytest.skip("no CUDA device")
    from dask_ftps._xp import array_namespace, to_namespace, to_numpy

    X, y = _data(n=64)
    params = model.init_params()
    loss, grads, hits = model.loss_and_grad(params, X, y)
    gparams = to_namespace(params, cupy)
    gloss, ggrads, ghits = model.loss_and_grad(
        gparams, cupy.asarray(X), cupy.asarray(y)
    )
    assert array_namespace(*ggrads.values()) is cupy
    assert ghits == hits
    assert gloss == pytest.approx(loss, rel=1e-5)
    for name, g in grads.items():
        assert ggrads[name].dtype == np.float32
        np.testing.assert_allclose(to_numpy(ggrads[name]), g, rtol=1e-4, atol=1e-6)
    proba = to_numpy(model.predict_proba(gparams, cupy.asarray(X)))
    np.testing.assert_allclose(proba, model.predict_proba(params, X), rtol=1e-4)


def test_xp_numpy_fallback() -> None:
    from dask_ftps._xp import array_namespace, gpu_available, to_namespace, to_numpy

    a = np.arange(3.0)
    assert array_namespace(a, [1, 2], 3.0) is np
    assert array_namespace() is np
    assert to_numpy(a) is a
    moved = to_namespace({"a": a}, np)
    assert moved["a"] is a
    assert isinstance(gpu_available(), bool)
