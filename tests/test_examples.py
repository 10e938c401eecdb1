"""The models of docs/examples: exact gradients, the interface's checks, training
through dask_ftps, and the description a store records."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from distributed.utils_test import gen_cluster

import dask_ftps
from dask_ftps import SGD, ParameterServer
from dask_ftps.models import check_model, model_from_dict

from . import _fakecupy
from .conftest import digits

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

from cnn_digits import ConvNet
from cnn_digits import optimizer as cnn_optimizer
from linear_l2 import LinearL2

SMALL = {"conv": ConvNet(channels=3, hidden=8, seed=1), "linear": LinearL2(alpha=0.3)}


def _float64(model) -> dict[str, np.ndarray]:
    """The first parameters in float64, the biases moved off zero (no ReLU sits
    on its kink)."""
    rng = np.random.default_rng(7)
    return {
        name: p.astype(np.float64) + 0.05 * rng.standard_normal(p.shape)
        for name, p in model.init_params().items()
    }


def _batch(n: int = 6):
    X, _, y, _ = digits()
    rng = np.random.default_rng(3)
    # Digits plus noise: no patch is all zeros, so no ReLU input is exactly 0.
    X = X[:n].astype(np.float64) + 0.1 * rng.random((n, 64))
    return X, y[:n], rng.uniform(0.2, 3.0, n)


@pytest.mark.parametrize("name", SMALL)
@pytest.mark.parametrize("weighted", [False, True])
def test_gradient_matches_finite_differences(name, weighted):
    """Every parameter's gradient, entry by entry, against central differences
    of the loss, in float64 (the models compute in the parameters' dtype)."""
    model = SMALL[name]
    params = _float64(model)
    X, y, w = _batch()
    weight = w if weighted else None
    loss, grads, n_correct = model.loss_and_grad(params, X, y, weight)
    assert isinstance(loss, float) and 0 <= n_correct <= len(y)
    assert {k: g.dtype for k, g in grads.items()} == {k: np.float64 for k in params}
    assert {k: g.shape for k, g in grads.items()} == model.param_shapes()
    eps = 1e-6
    for key, p in params.items():
        numeric = np.empty_like(p)
        for i in range(p.size):
            old = p.flat[i]
            p.flat[i] = old + eps
            up = model.loss_and_grad(params, X, y, weight)[0]
            p.flat[i] = old - eps
            down = model.loss_and_grad(params, X, y, weight)[0]
            p.flat[i] = old
            numeric.flat[i] = (up - down) / (2 * eps)
        np.testing.assert_allclose(grads[key], numeric, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("name", SMALL)
def test_sample_weight_scales_each_sample_loss(name):
    """``sum(w * sample_loss) / n``: the weighted loss is the weighted sum of
    one-sample losses (the data term; the L2 penalty is added once)."""
    model = SMALL[name]
    params = _float64(model)
    X, y, w = _batch()
    penalty = 0.0
    if name == "linear":
        penalty = model.alpha / 2 * float((params["W"] ** 2).sum())
    single = [
        model.loss_and_grad(params, X[i : i + 1], y[i : i + 1])[0] - penalty
        for i in range(len(y))
    ]
    weighted = model.loss_and_grad(params, X, y, w)[0] - penalty
    assert weighted == pytest.approx(float(np.dot(w, single)) / len(y), rel=1e-12)


@pytest.mark.parametrize("model", [ConvNet(), LinearL2()], ids=["conv", "linear"])
def test_examples_pass_the_models_checks(model):
    assert check_model(model) is model
    proba = model.predict_proba(model.init_params(), digits()[1])
    assert proba.shape == (450, 10) and proba.dtype == np.float32
    np.testing.assert_allclose(proba.sum(axis=1), 1, rtol=1e-5)


@pytest.mark.parametrize(
    ("model", "kind"),
    [
        (ConvNet(channels=8, seed=3), "cnn_digits:ConvNet"),
        (LinearL2(alpha=0.01, seed=2), "linear_l2:LinearL2"),
    ],
)
def test_a_store_records_them_by_import_path(model, kind):
    d = model.to_dict()
    assert d["kind"] == kind
    assert model_from_dict(d) == model
    assert model_from_dict(d) != type(model)()


@pytest.mark.parametrize("model", [ConvNet(), LinearL2()], ids=["conv", "linear"])
def test_the_same_code_runs_on_the_device_namespace(monkeypatch, model):
    """On arrays of a stand-in CuPy (tests/_fakecupy.py) the gradients are its
    arrays, equal to NumPy's."""
    fake = _fakecupy.module()
    monkeypatch.setitem(sys.modules, "cupy", fake)
    X, _, y, _ = digits()
    params = model.init_params()
    on_device = {k: fake.asarray(v) for k, v in params.items()}
    loss, grads, hits = model.loss_and_grad(
        on_device, fake.asarray(X[:32]), fake.asarray(y[:32])
    )
    ref_loss, ref, ref_hits = model.loss_and_grad(params, X[:32], y[:32])
    assert (loss, hits) == (ref_loss, ref_hits)
    for key, g in grads.items():
        assert isinstance(g, fake.ndarray), key
        np.testing.assert_array_equal(g.view(np.ndarray), ref[key])
    proba = model.predict_proba(on_device, fake.asarray(X[:5]))
    assert isinstance(proba, fake.ndarray)


@pytest.mark.parametrize(
    ("model", "optimizer", "epochs", "floor"),
    [
        (ConvNet(), cnn_optimizer(), 10, 0.96),
        (LinearL2(), SGD(lr=0.1, momentum=0.9), 5, 0.93),
    ],
    ids=["conv", "linear"],
)
@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)] * 2, timeout=120)
async def test_they_train_through_dask_ftps(
    c, s, a, b, model, optimizer, epochs, floor
):
    X_train, X_test, y_train, y_test = digits()
    await c.register_plugin(ParameterServer(model=model, optimizer=optimizer))
    result = await dask_ftps.train(
        c, X_train, y_train, epochs=epochs, batch_size=32, seed=0, progress=False
    )
    assert result.minibatches == epochs * 2 * 22
    _, params = await dask_ftps.get_model(c)
    accuracy = float((model.predict(params, X_test) == y_test).mean())
    print(type(model).__name__, accuracy, result.history[-1])
    assert accuracy >= floor, accuracy


def test_the_examples_run_on_worker_processes(capsys):
    """Both scripts' ``main`` on a LocalCluster of worker processes, which import
    the models from docs/examples (``sys.path`` travels to them)."""
    import cnn_digits
    import linear_l2

    results = cnn_digits.main(["--quick"])
    assert set(results) == {"ConvNet", "MLP", "LogisticRegression"}
    assert results["ConvNet"]["accuracy"] >= 0.85, results
    assert linear_l2.main(["--epochs", "3"]) >= 0.9
    out = capsys.readouterr().out
    assert "ConvNet" in out and "LogisticRegression (C=1)" in out
