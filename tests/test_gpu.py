"""The GPU path: workers compute with CuPy, keep the model on the device, and send
only the update to host memory; the scheduler stays NumPy.

The tests not marked ``gpu`` run that path on NumPy, through the same functions,
with a stand-in CuPy module (``tests/_fakecupy.py``) whose arrays are a NumPy
subclass; those marked ``gpu`` need CuPy and a CUDA device and skip otherwise.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
from distributed.utils_test import gen_cluster

import dask_ftps
from dask_ftps import SGD, Factored, FTPSError, ParameterServer
from dask_ftps._factored import densify, product, to_host
from dask_ftps._xp import array_namespace, gpu_available, to_namespace, to_numpy
from dask_ftps.models import MLP

from . import _fakecupy
from .conftest import digits, same_as_offline

WIDE = MLP(n_features=64, hidden=(128,), n_classes=10, seed=0)


@pytest.fixture
def fake_cupy(monkeypatch):
    fake = _fakecupy.module()
    fake.calls.clear()
    monkeypatch.setitem(sys.modules, "cupy", fake)
    return fake


def _host_only(grads: dict) -> bool:
    """Every array plain NumPy (not a device array), factors included."""
    arrays = [
        part
        for g in grads.values()
        for part in ((g.u, g.v) if isinstance(g, Factored) else (g,))
    ]
    return all(type(a) is np.ndarray for a in arrays)


# -- the device code path, on NumPy --------------------------------------------------


@pytest.mark.parametrize("update_format", ["dense", "factored"])
def test_gradients_computed_on_the_device_come_home_for_the_push(
    fake_cupy, update_format
):
    X, _, y, _ = digits()
    params = WIDE.init_params()
    on_device = to_namespace(params, fake_cupy)
    assert array_namespace(*on_device.values()) is fake_cupy
    assert gpu_available()
    loss, grads, hits = WIDE.loss_and_grad(
        on_device,
        fake_cupy.asarray(X[:16]),
        fake_cupy.asarray(y[:16]),
        update_format=update_format,
    )
    assert not _host_only(grads)  # computed on the device
    home = to_host(grads)
    assert _host_only(home)
    ref_loss, ref, ref_hits = WIDE.loss_and_grad(
        params, X[:16], y[:16], update_format=update_format
    )
    assert (loss, hits) == (ref_loss, ref_hits)
    assert [type(g) for g in home.values()] == [type(g) for g in ref.values()]
    for name, g in densify(home).items():
        np.testing.assert_array_equal(g, densify(ref)[name])
    # The server's product takes device factors too (it moves them first).
    w0 = grads["W0"]
    if isinstance(w0, Factored):
        np.testing.assert_array_equal(product(w0.u, w0.v), densify(ref)["W0"])


def test_training_on_the_device_pushes_host_arrays_and_replays(fake_cupy, tmp_path):
    # Factors asked for (auto sends dense on a loopback network): W0 goes as two.
    config = {"ftps.device": "gpu", "ftps.update-format": "factored"}

    @gen_cluster(client=True, timeout=120, config=config)
    async def run(c, s, a, b):
        store = str(tmp_path / "run.zarr")
        await c.register_plugin(
            ParameterServer(store, model=WIDE, optimizer=SGD(lr=0.05))
        )
        X_train, _, y_train, _ = digits()
        result = await dask_ftps.train(
            c, X_train, y_train, epochs=1, batch_size=16, progress=False
        )
        state = s.plugins["ftps"].server.state
        entries = [e for d in state.gradients.values() for e in d]
        assert entries and all(_host_only(grads) for _, grads, _ in entries)
        assert state.summary()["updates"] == result.minibatches
        # Each push brought its update home: W0's two factors and three arrays.
        assert fake_cupy.calls["get"] >= 5 * result.minibatches
        # The model went to the device once per version it was given, not per
        # array use; the shard's data once per task.
        assert fake_cupy.calls["asarray"] <= 4 * (result.minibatches + 2) + 4
        _, params = await same_as_offline(c, store)
        assert all(type(p) is np.ndarray for p in params.values())

    run()


def test_device_gpu_without_cupy_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy: ImportError

    @gen_cluster(client=True, timeout=60, config={"ftps.device": "gpu"})
    async def run(c, s, a, b):
        await c.register_plugin(ParameterServer(None, model=WIDE, optimizer=SGD(0.1)))
        X_train, _, y_train, _ = digits()
        with pytest.raises(FTPSError, match=r"ftps\.device is 'gpu' but CuPy"):
            await dask_ftps.train(
                c, X_train, y_train, epochs=1, batch_size=16, progress=False
            )
        assert (await dask_ftps.status(c))["updates"] == 0

    run()


def test_device_auto_without_a_gpu_computes_with_numpy(monkeypatch):
    from dask_ftps.training._worker import _namespace

    monkeypatch.setitem(sys.modules, "cupy", None)
    assert not gpu_available()
    assert _namespace("auto") is np and _namespace("cpu") is np


# -- on a GPU ---------------------------------------------------------------------------


@pytest.fixture
def cupy():
    cp = pytest.importorskip("cupy")
    if not cp.is_available():
        pytest.skip("no CUDA device")
    return cp


@pytest.mark.gpu
@pytest.mark.parametrize("update_format", ["dense", "factored"])
def test_cupy_gradients_agree_with_numpy(cupy, update_format):
    model = MLP(n_features=512, hidden=(1024, 1024), n_classes=10, seed=0)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((256, 512), dtype=np.float32)
    y = rng.integers(0, 10, 256)
    params = model.init_params()
    loss, grads, _ = model.loss_and_grad(params, X, y, update_format=update_format)
    gloss, ggrads, _ = model.loss_and_grad(
        to_namespace(params, cupy),
        cupy.asarray(X),
        cupy.asarray(y),
        update_format=update_format,
    )
    assert gloss == pytest.approx(loss, rel=1e-5)
    home = densify(to_host(ggrads))
    for name, g in densify(grads).items():
        scale = float(np.abs(g).max()) or 1.0
        err = float(np.abs(home[name] - g).max()) / scale
        assert err < 1e-4, (name, err)  # float32 rounding, summed differently


@pytest.mark.gpu
def test_training_on_a_gpu_replays_bit_for_bit(cupy, tmp_path):
    @gen_cluster(client=True, timeout=300, config={"ftps.device": "gpu"})
    async def run(c, s, a, b):
        store = str(tmp_path / "run.zarr")
        await c.register_plugin(
            ParameterServer(store, model=WIDE, optimizer=SGD(lr=0.05, momentum=0.9))
        )
        X_train, _, y_train, _ = digits()
        result = await dask_ftps.train(
            c, X_train, y_train, epochs=2, batch_size=16, progress=False
        )
        assert result.history[-1]["accuracy"] > 0.5
        state = s.plugins["ftps"].server.state
        assert all(
            _host_only(grads) for d in state.gradients.values() for _, grads, _ in d
        )
        await same_as_offline(c, store)

    run()


def test_to_numpy_of_host_arrays_copies_nothing():
    a = np.ones(3, np.float32)
    assert to_numpy(a) is a
    f = to_host({"W": Factored(a[None], a[None])})["W"]
    assert f.u.base is a and f.v.base is a
