"""Every way a user's model can misbehave is a :class:`ModelError` naming it
(and the parameter), raised where the model runs before anything it made
reaches the server: the server's state is unchanged.

Each case drives the public path: a :class:`~dask_ftps.models.Model` subclass
of the user's (a small linear softmax model, and subclasses that break one
thing), registered with a :class:`~dask_ftps.ParameterServer` and trained with
:func:`dask_ftps.train`.
"""

from __future__ import annotations

import math
import re
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from distributed import Client, LocalCluster
from distributed.utils_test import gen_cluster, gen_test
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dask_ftps
from dask_ftps import SGD, Factored, ParameterServer
from dask_ftps._core import RunSpec
from dask_ftps._exceptions import ModelError
from dask_ftps.models import Model, check_model
from dask_ftps.models._check import checked_loss_and_grad

from .conftest import digits

# -- a correct model of the user's -------------------------------------------


@dataclass(frozen=True)
class Linear(Model):
    """Softmax regression written as a user would: NumPy only."""

    n_features: int = 64
    n_classes: int = 10
    seed: int = 0

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"W": (self.n_features, self.n_classes), "b": (self.n_classes,)}

    def init_params(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(self.seed)
        W = rng.standard_normal((self.n_features, self.n_classes))
        return {
            "W": (W * 0.01).astype(np.float32),
            "b": np.zeros(self.n_classes, np.float32),
        }

    def predict_proba(self, params: dict[str, Any], X: Any) -> Any:
        z = X @ params["W"] + params["b"]
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    def _error(self, params, X, y, sample_weight):
        """Probabilities and the loss's gradient at the output (n, k)."""
        n = X.shape[0]
        p = self.predict_proba(params, X)
        d = p.copy()
        d[np.arange(n), y] -= 1
        if sample_weight is not None:
            d *= sample_weight[:, None]
        return p, (d / n).astype(np.float32)

    def loss_and_grad(self, params, X, y, sample_weight=None):
        n = X.shape[0]
        p, d = self._error(params, X, y, sample_weight)
        w = np.ones(n, np.float32) if sample_weight is None else sample_weight
        loss = float(-(w * np.log(p[np.arange(n), y] + 1e-12)).sum() / n)
        grads = {"W": (X.T @ d).astype(np.float32), "b": d.sum(axis=0)}
        return loss, grads, int((p.argmax(axis=1) == y).sum())


MODEL = Linear()

# -- the ways loss_and_grad can misbehave --------------------------------------


def _grads(f: Callable[[dict], dict]) -> Callable:
    """A fault that changes the grads only."""
    return lambda loss, grads, correct, n: (loss, f(dict(grads)), correct)


def _set(name: str, value: Callable[[Any], Any]) -> Callable:
    return _grads(lambda g: {**g, name: value(g[name])})


def _poison(name: str, index: tuple[int, ...], value: float) -> Callable:
    def f(a):
        a = a.copy()
        a[index] = value
        return a

    return _set(name, f)


def _raise(loss, grads, correct, n):
    raise RuntimeError("the user's code broke")


def _masked_nan(a):
    a = a.copy()
    a[1, 2] = np.nan
    return np.ma.masked_invalid(a)


#: fault: (what loss_and_grad returns given (loss, grads, n_correct, n), the
#: parameter the message must name or None, a pattern of the message).
FAULTS: dict[str, tuple[Callable, str | None, str]] = {
    "missing": (_grads(lambda g: {"W": g["W"]}), "b", r"missing \['b'\]"),
    "extra": (_grads(lambda g: {**g, "c": g["b"]}), "c", r"extra \['c'\]"),
    "renamed": (
        _grads(lambda g: {"W": g["W"], "bias": g["b"]}),
        "b",
        r"missing \['b'\]; extra \['bias'\]",
    ),
    "shape": (_set("W", lambda a: a.T), "W", r"of shape \(10, 64\)"),
    "shape-1d": (_set("b", lambda a: a[None]), "b", r"of shape \(1, 10\)"),
    "dtype-float64": (_set("W", lambda a: a.astype(np.float64)), "W", "float64"),
    "dtype-float16": (_set("b", lambda a: a.astype(np.float16)), "b", "float16"),
    "dtype-int": (_set("b", lambda a: a.astype(np.int32)), "b", "int32"),
    "nan": (_poison("W", (3, 4), np.nan), "W", "NaN or infinite"),
    "+inf": (_poison("b", (2,), np.inf), "b", "NaN or infinite"),
    "-inf": (_poison("W", (63, 9), -np.inf), "W", "NaN or infinite"),
    "masked-nan": (_set("W", _masked_nan), "W", "NaN or infinite"),
    "list": (_set("W", lambda a: a.tolist()), "W", "list for 'W', not an array"),
    "python-float": (_set("b", lambda a: 0.5), "b", "float for 'b', not an array"),
    "none": (_set("b", lambda a: None), "b", "NoneType for 'b', not an array"),
    "numpy-scalar": (_set("b", lambda a: a[0]), "b", "not an array"),
    "grads-list": (
        lambda loss, g, c, n: (loss, [g["W"], g["b"]], c),
        None,
        "must return a dict",
    ),
    "grads-none": (lambda loss, g, c, n: (loss, None, c), None, "must return a dict"),
    "raises": (_raise, None, "raised RuntimeError: the user's code broke"),
    "loss-nan": (lambda loss, g, c, n: (math.nan, g, c), None, "the loss nan"),
    "loss-inf": (lambda loss, g, c, n: (np.float32("inf"), g, c), None, "loss inf"),
    "loss-str": (lambda loss, g, c, n: ("0.5", g, c), None, "not a number"),
    "loss-none": (lambda loss, g, c, n: (None, g, c), None, "not a number"),
    "loss-array": (lambda loss, g, c, n: (np.ones(2), g, c), None, "not a number"),
    "loss-huge": (lambda loss, g, c, n: (10**400, g, c), None, "loss"),
    "correct-negative": (lambda loss, g, c, n: (loss, g, -1), None, "n_correct -1"),
    "correct-over-n": (lambda loss, g, c, n: (loss, g, n + 1), None, "n_correct"),
    "correct-fraction": (lambda loss, g, c, n: (loss, g, 2.5), None, "n_correct 2.5"),
    "correct-str": (lambda loss, g, c, n: (loss, g, "3"), None, "n_correct '3'"),
    "correct-none": (lambda loss, g, c, n: (loss, g, None), None, "n_correct None"),
    "correct-nan": (lambda loss, g, c, n: (loss, g, math.nan), None, "n_correct nan"),
    "correct-inf": (lambda loss, g, c, n: (loss, g, math.inf), None, "n_correct inf"),
    "factored-undeclared": (
        None,  # made in Faulty.loss_and_grad: the factors of W's gradient
        "W",
        "'W' as factors",
    ),
    "pair": (lambda loss, g, c, n: (loss, g), None, r"\(loss, grads, n_correct\)"),
    "four": (lambda loss, g, c, n: (loss, g, c, 0), None, "got tuple"),
    "list-out": (lambda loss, g, c, n: [loss, g, c], None, "got list"),
    "none-out": (lambda loss, g, c, n: None, None, "got NoneType"),
}


@dataclass(frozen=True)
class Faulty(Linear):
    """:class:`Linear`, its loss_and_grad broken as ``FAULTS[fault]`` says."""

    fault: str = "nan"

    def loss_and_grad(self, params, X, y, sample_weight=None):
        out = super().loss_and_grad(params, X, y, sample_weight)
        if self.fault == "factored-undeclared":
            _, d = self._error(params, X, y, sample_weight)
            loss, grads, correct = out
            return loss, {**grads, "W": Factored(X, d)}, correct
        return FAULTS[self.fault][0](*out, X.shape[0])


def _message(error: BaseException, model: Model, param: str | None, pattern: str):
    """Check that ``error`` names the model, the parameter and what is wrong."""
    text = str(error)
    assert type(model).kind in text, text
    assert type(model).kind == f"{__name__}:{type(model).__qualname__}"
    if param is not None:
        assert repr(param) in text, text
    assert re.search(pattern, text), (pattern, text)


# -- driving train() ------------------------------------------------------------


def _data(n: int = 240) -> tuple[np.ndarray, np.ndarray]:
    X, _, y, _ = digits()
    return X[:n].copy(), y[:n].copy()


async def _untouched(c, model: Model) -> None:
    """The server accepted nothing: version 0, its parameters the first ones."""
    status = await dask_ftps.status(c)
    assert status["version"] == 0
    assert status["updates"] == 0
    assert status["global_rows"] == 0
    assert len((await dask_ftps.records(c))["global"]) == 0
    version, params = await dask_ftps.get_model(c)
    assert version == 0
    _same_bits(params, model.init_params())


def _same_bits(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for name, value in want.items():
        assert got[name].dtype == value.dtype, name
        assert got[name].shape == value.shape, name
        assert got[name].tobytes() == value.tobytes(), name


async def _refused(c, model: Model, *, store=None, mode=None, n_shards=None, **kw):
    """Register ``model``, train it: the ModelError raised."""
    await c.register_plugin(
        ParameterServer(store, model=model, optimizer=SGD(lr=0.1), mode=mode)
    )
    X, y = _data()
    with pytest.raises(ModelError) as info:
        await dask_ftps.train(
            c, X, y, epochs=1, batch_size=40, n_shards=n_shards, progress=False, **kw
        )
    await _untouched(c, model)
    return info.value


@pytest.mark.parametrize("mode", ["async", "sync"])
@gen_cluster(client=True, timeout=60)
async def test_the_correct_model_trains(c, s, a, b, mode):
    """The harness itself: the user's correct model trains on the same path."""
    await c.register_plugin(
        ParameterServer(model=MODEL, optimizer=SGD(lr=0.1), mode=mode)
    )
    X, y = _data()
    result = await dask_ftps.train(c, X, y, epochs=1, batch_size=40, progress=False)
    status = await dask_ftps.status(c)
    assert status["updates"] == result.minibatches == 6
    assert status["version"] == result.version > 0


@pytest.mark.parametrize("mode", ["async", "sync"])
@pytest.mark.parametrize("fault", list(FAULTS))
@gen_cluster(client=True, timeout=60)
async def test_a_misbehaving_loss_and_grad_is_refused_before_any_push(
    c, s, a, b, fault, mode
):
    model = Faulty(fault=fault)
    _, param, pattern = FAULTS[fault]
    error = await _refused(c, model, mode=mode)
    _message(error, model, param, pattern)
    if fault == "raises":  # the user's exception, through the worker and back
        assert isinstance(error.__cause__, RuntimeError)
        assert str(error.__cause__) == "the user's code broke"


@pytest.mark.parametrize("fault", ["missing", "nan", "raises", "correct-over-n"])
@gen_cluster(client=True, timeout=60)
async def test_a_misbehaving_model_leaves_its_store_as_it_began(
    c, s, a, b, tmp_path, fault
):
    """With a store: nothing is journaled, and the store recovers version 0,
    the first parameters bit for bit."""
    model = Faulty(fault=fault)
    _, param, pattern = FAULTS[fault]
    store = str(tmp_path / "run.zarr")
    error = await _refused(c, model, store=store)
    _message(error, model, param, pattern)
    version, params = dask_ftps.recover(store)
    assert version == 0
    _same_bits(params, model.init_params())
    assert dask_ftps.inspect(store)["updates"] == 0


def test_an_exception_in_loss_and_grad_is_chained_as_the_cause():
    X, y = _data(40)
    model = Faulty(fault="raises")
    with pytest.raises(ModelError) as info:
        checked_loss_and_grad(model, model.init_params(), X, y)
    _message(info.value, model, None, "raised RuntimeError: the user's code broke")
    assert isinstance(info.value.__cause__, RuntimeError)
    assert str(info.value.__cause__) == "the user's code broke"


@dataclass(frozen=True)
class Scribbler(Linear):
    """:class:`Linear`, but it writes into the parameters it is given."""

    def loss_and_grad(self, params, X, y, sample_weight=None):
        params["W"][0] = 7.0
        return super().loss_and_grad(params, X, y, sample_weight)


@gen_cluster(client=True, timeout=60)
async def test_a_model_writing_into_its_params_is_refused(c, s, a, b):
    """Over TCP the params are the worker's copy: a write would go unseen, and
    every later gradient of that worker computed from a model nobody served."""
    model = Scribbler()
    error = await _refused(c, model)
    _message(error, model, None, "raised ValueError: .*read-only")


@gen_test(timeout=60)
async def test_a_model_writing_into_its_params_in_an_in_process_cluster():
    """In an in-process cluster (``processes=False``, a notebook's) the params a
    task is given may be the server's own arrays: the write must not reach the
    served model."""
    async with (
        LocalCluster(
            n_workers=1,
            threads_per_worker=2,
            processes=False,
            asynchronous=True,
            dashboard_address=":0",
        ) as cluster,
        Client(cluster, asynchronous=True) as c,
    ):
        model = Scribbler()
        error = await _refused(c, model)
        _message(error, model, None, "raised ValueError: .*read-only")


# -- a model that sends factors ------------------------------------------------


def _nan_at(a, index):
    a = np.array(a, copy=True)
    a[index] = np.nan
    return a


#: fault: (the factors (u, v) made of the minibatch X and the output error d,
#: the parameter they are returned for, a pattern of the message); None: W's
#: gradient as it should be.
FACTOR_FAULTS: dict[str, tuple[Callable, str, str]] = {
    "good": (lambda X, d: (X, d), "W", ""),
    "u-list": (lambda X, d: (X.tolist(), d), "W", "not arrays"),
    "v-none": (lambda X, d: (X, None), "W", "not arrays"),
    "rows": (lambda X, d: (X[:-1], d), "W", "mismatched factors"),
    "u-1d": (lambda X, d: (X[:, 0], d), "W", "mismatched factors"),
    "narrow": (lambda X, d: (X[:, :-1], d), "W", r"of shape \(63, 10\)"),
    "u-float64": (lambda X, d: (X.astype(np.float64), d), "W", "float64"),
    "v-nan": (lambda X, d: (X, _nan_at(d, (0, 1))), "W", "NaN or infinite"),
    "u-inf": (lambda X, d: (X + np.float32(np.inf), d), "W", "NaN or infinite"),
    "b": (lambda X, d: (d[:, :1], d), "b", "'b' as factors"),
    # What the server refuses too: no rows; more rows than samples (here the
    # exact gradient, X twice and d halved twice); a product that may overflow.
    "empty": (lambda X, d: (X[:0], d[:0]), "W", "0 rows"),
    "more-rows": (
        lambda X, d: (np.vstack([X, X]), np.vstack([d, d]) / 2),
        "W",
        "80 rows",
    ),
    "overflow": (
        lambda X, d: (X * np.float32(1e30), d * np.float32(1e30)),
        "W",
        "may overflow float32",
    ),
}


@dataclass(frozen=True)
class Factoring(Linear):
    """:class:`Linear` declaring W factorable: it sends W's gradient as the
    factors ``FACTOR_FAULTS[fault]`` makes when asked for them."""

    fault: str = "good"

    def factorable(self) -> tuple[str, ...]:
        return ("W",)

    def loss_and_grad(self, params, X, y, sample_weight=None, factors=frozenset()):
        loss, grads, correct = super().loss_and_grad(params, X, y, sample_weight)
        if "W" in factors:
            _, d = self._error(params, X, y, sample_weight)
            make, name, _ = FACTOR_FAULTS[self.fault]
            grads = {**grads, name: Factored(*make(X, d))}
            if name != "W":
                grads["W"] = Factored(X, d)
        return loss, grads, correct


@pytest.mark.parametrize("fault", list(FACTOR_FAULTS))
@gen_cluster(client=True, timeout=60, config={"ftps.update-format": "factored"})
async def test_misbehaving_factors_are_refused_before_any_push(c, s, a, b, fault):
    model = Factoring(fault=fault)
    _, param, pattern = FACTOR_FAULTS[fault]
    if fault == "good":  # the control: these factors are W's gradient
        await c.register_plugin(ParameterServer(model=model, optimizer=SGD(lr=0.1)))
        X, y = _data()
        result = await dask_ftps.train(c, X, y, epochs=1, batch_size=40, progress=False)
        assert result.minibatches == (await dask_ftps.status(c))["updates"] == 6
        return
    error = await _refused(c, model)
    _message(error, model, param, pattern)


# -- a NaN after some good steps ---------------------------------------------

K = 3  # the step that goes bad
BATCH = 40


@dataclass(frozen=True)
class GoesBad(Linear):
    """:class:`Linear`, but a NaN in W's gradient of a minibatch holding the
    marked sample (a negative first feature: digits' features are in [0, 1])."""

    def loss_and_grad(self, params, X, y, sample_weight=None):
        loss, grads, correct = super().loss_and_grad(params, X, y, sample_weight)
        if (X[:, 0] < 0).any():
            grads = {**grads, "W": _nan_at(grads["W"], (5, 5))}
        return loss, grads, correct


def _marked() -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """The data with one sample marked, in minibatch K of one shard of one
    epoch (the worker's order: the permutation of ``[seed, epoch, shard]``
    split into the spec's steps); the minibatches."""
    X, y = _data()
    steps = RunSpec((len(y),), BATCH, 1, 0).steps[0]
    order = np.random.default_rng([0, 0, 0]).permutation(len(y))
    batches = np.array_split(order, steps)
    assert len(batches) > K
    X[batches[K][0], 0] = -1.0
    return X, y, batches


@pytest.mark.parametrize("stored", [False, True])
@pytest.mark.parametrize("mode", ["async", "sync"])
@gen_cluster(client=True, timeout=60, config={"ftps.inflight": 1})
async def test_a_nan_at_step_k_leaves_exactly_the_good_steps(
    c, s, a, b, tmp_path, mode, stored
):
    """One shard, one push in flight: the K good pushes were acknowledged
    before step K was computed, and step K was never sent. The server holds
    exactly the K good updates, whatever the timing."""
    X, y, batches = _marked()
    model = GoesBad()
    store = str(tmp_path / "run.zarr") if stored else None
    await c.register_plugin(
        ParameterServer(store, model=model, optimizer=SGD(lr=0.1), mode=mode)
    )
    with pytest.raises(ModelError) as info:
        await dask_ftps.train(
            c, X, y, epochs=1, batch_size=BATCH, n_shards=1, progress=False
        )
    _message(info.value, model, "W", "NaN or infinite")

    status = await dask_ftps.status(c)
    assert status["updates"] == status["version"] == K
    assert status["run"]["accepted"] == K
    run = status["run"]["run"]
    rows = (await dask_ftps.records(c))["global"]
    assert [r["update_id"] for r in rows] == [f"{run}:0:0:{i}" for i in range(K)]

    # What the K good pushes make, replayed here: the same bits.
    optimizer = SGD(lr=0.1)
    params = model.init_params()
    state = optimizer.init_state(params)
    for step in range(K):
        batch = batches[step]
        _, grads, _ = model.loss_and_grad(params, X[batch], y[batch])
        params, state = optimizer.apply(params, state, grads, step=step + 1)
    version, live = await dask_ftps.get_model(c)
    assert version == K
    _same_bits(live, params)
    if stored:
        offline_version, offline = dask_ftps.recover(store)
        assert offline_version == K
        _same_bits(offline, params)


# -- what check_model refuses at registration ---------------------------------


def _init(f: Callable[[dict], Any]) -> Callable:
    return lambda model: f(Linear.init_params(model))


def _init_raises(model):
    raise RuntimeError("no parameters today")


#: fault: (init_params given the model, the parameter the message must name
#: or None, a pattern of the message).
INIT_FAULTS: dict[str, tuple[Callable, str | None, str]] = {
    "missing": (_init(lambda p: {"W": p["W"]}), "b", r"missing \['b'\]"),
    "extra": (_init(lambda p: {**p, "c": p["b"]}), "c", r"extra \['c'\]"),
    "shape": (_init(lambda p: {**p, "W": p["W"].T}), "W", r"of shape \(10, 64\)"),
    "int": (_init(lambda p: {**p, "b": p["b"].astype(np.int32)}), "b", "int32"),
    "float64": (_init(lambda p: {**p, "W": p["W"].astype(np.float64)}), "W", "64"),
    "nan": (_init(lambda p: {**p, "W": _nan_at(p["W"], (1, 1))}), "W", "NaN"),
    "inf": (_init(lambda p: {**p, "b": p["b"] + np.float32(np.inf)}), "b", "NaN"),
    "masked-nan": (
        _init(lambda p: {**p, "W": np.ma.masked_invalid(_nan_at(p["W"], (1, 1)))}),
        "W",
        "NaN",
    ),
    "list": (_init(lambda p: {**p, "W": p["W"].tolist()}), "W", "not an array"),
    "none": (_init(lambda p: {**p, "b": None}), "b", "not an array"),
    "memoryview": (_init(lambda p: {**p, "b": memoryview(p["b"])}), "b", "not an"),
    "not-a-dict": (_init(lambda p: list(p.values())), None, "must return a dict"),
    "raises": (_init_raises, None, "init_params\\(\\) raised RuntimeError"),
}


@dataclass(frozen=True)
class BadInit(Linear):
    """:class:`Linear`, its init_params broken as ``INIT_FAULTS[fault]`` says."""

    fault: str = "nan"

    def init_params(self) -> dict[str, np.ndarray]:
        return INIT_FAULTS[self.fault][0](self)


#: fault: (param_shapes, the parameter the message must name or None, a pattern).
SHAPE_FAULTS: dict[str, tuple[Any, str | None, str]] = {
    "list": ([("W", (64, 10)), ("b", (10,))], None, "must return a non-empty dict"),
    "none": (None, None, "must return a non-empty dict"),
    "empty": ({}, None, "must return a non-empty dict"),
    "negative": ({"W": (64, -10), "b": (10,)}, "W", "tuple of ints >= 1"),
    "zero": ({"W": (0, 10), "b": (10,)}, "W", "tuple of ints >= 1"),
    "list-shape": ({"W": [64, 10], "b": (10,)}, "W", "tuple of ints >= 1"),
    "int-shape": ({"W": (64, 10), "b": 10}, "b", "tuple of ints >= 1"),
    "float-dim": ({"W": (64.0, 10), "b": (10,)}, "W", "tuple of ints >= 1"),
    "bool-dim": ({"W": (64, 10), "b": (True,)}, "b", "tuple of ints >= 1"),
    "slash-name": ({"W/0": (64, 10), "b": (10,)}, "W/0", "without '/'"),
    "empty-name": ({"": (64, 10), "b": (10,)}, "", "non-empty strings"),
    "int-name": ({0: (64, 10), "b": (10,)}, None, "non-empty strings"),
}


@dataclass(frozen=True)
class BadShapes(Linear):
    """:class:`Linear`, its param_shapes as ``SHAPE_FAULTS[fault]`` says."""

    fault: str = "list"

    def param_shapes(self):
        return SHAPE_FAULTS[self.fault][0]


#: fault: (param_dtypes, parameter, pattern).
DTYPE_FAULTS: dict[str, tuple[Any, str | None, str]] = {
    "int": ({"W": np.int32, "b": np.float32}, "W", "'W'"),
    # init_params as declared: only the dtype's own check refuses it
    "int-declared": ({"W": np.float32, "b": np.int32}, "b", "'b'"),
    "not-a-dtype": ({"W": "floaty", "b": np.float32}, "W", "'W'"),
    "missing": ({"W": np.float32}, None, "must name the parameters"),
    "list": ([np.float32, np.float32], None, "must name the parameters"),
}


@dataclass(frozen=True)
class BadDtypes(Linear):
    """:class:`Linear`, its param_dtypes as ``DTYPE_FAULTS[fault]`` says."""

    fault: str = "int"

    def param_dtypes(self):
        return DTYPE_FAULTS[self.fault][0]

    def init_params(self):
        params = super().init_params()
        if self.fault == "int-declared":
            params["b"] = params["b"].astype(np.int32)
        return params


@dataclass(frozen=True)
class BadFactorable(Linear):
    """:class:`Linear` whose factorable() is not a tuple of its parameters."""

    fault: str = "unknown"

    def factorable(self):
        return {"unknown": ("V",), "list": ["W"], "none": None}[self.fault]


@dataclass(frozen=True)
class Classless(Model):
    """A model without ``n_classes``."""

    seed: int = 0

    def param_shapes(self):
        return MODEL.param_shapes()

    def init_params(self):
        return MODEL.init_params()

    def loss_and_grad(self, params, X, y, sample_weight=None):
        return MODEL.loss_and_grad(params, X, y, sample_weight)

    def predict_proba(self, params, X):
        return MODEL.predict_proba(params, X)


@dataclass(frozen=True)
class Tagged(Linear):
    """:class:`Linear` with a field of any value."""

    tag: Any = None


@dataclass(frozen=True)
class Forgetful(Linear):
    """:class:`Linear` whose to_dict leaves out the seed."""

    def to_dict(self):
        d = super().to_dict()
        del d["seed"]
        return d


@dataclass(frozen=True)
class Described(Linear):
    """:class:`Linear` whose to_dict returns what ``how`` says."""

    how: str = "builtin-kind"

    def to_dict(self):
        d = super().to_dict()
        if self.how == "builtin-kind":
            return {**d, "kind": "Linear"}
        if self.how == "extra-field":
            return {**d, "layers": 2}
        if self.how == "not-a-dict":
            return [d]
        if self.how == "other-class":
            return {k: v for k, v in d.items() if k != "how"} | {"kind": Linear.kind}
        raise RuntimeError("no description")


def _bad_models() -> dict[str, tuple[Model, str | None, str]]:
    """name: (a model check_model refuses, the parameter the message names or
    None, a pattern of the message)."""
    cases: dict[str, tuple[Model, str | None, str]] = {}
    for table, cls in (
        (INIT_FAULTS, BadInit),
        (SHAPE_FAULTS, BadShapes),
        (DTYPE_FAULTS, BadDtypes),
    ):
        for fault, (_, param, pattern) in table.items():
            cases[f"{cls.__name__}-{fault}"] = (cls(fault=fault), param, pattern)
    for fault in ("unknown", "list", "none"):
        cases[f"factorable-{fault}"] = (BadFactorable(fault=fault), None, "factorable")
    for name, n_classes in (("1", 1), ("0", 0), ("bool", True), ("float", 10.0)):
        cases[f"n_classes-{name}"] = (Linear(n_classes=n_classes), None, "n_classes")
    cases["n_classes-missing"] = (Classless(), None, "n_classes must be an int")
    for name, n_features in (("0", 0), ("bool", True), ("str", "64")):
        cases[f"n_features-{name}"] = (
            Linear(n_features=n_features),
            None,
            "n_features",
        )
    for name, tag in (
        ("object", object()),
        ("set", {1, 2}),
        ("nan", math.nan),
        ("numpy-int", np.int64(3)),
        ("array", np.zeros(2)),
    ):
        cases[f"field-{name}"] = (Tagged(tag=tag), None, "JSON values")
    cases["field-tuple"] = (Tagged(tag=(1, 2)), None, "does not rebuild")
    cases["field-int-keys"] = (Tagged(tag={1: 2}), None, "does not rebuild")
    cases["to_dict-forgets"] = (Forgetful(seed=3), None, "does not rebuild")
    for how, pattern in (
        ("builtin-kind", "Linear"),
        ("extra-field", "layers"),
        ("not-a-dict", "kind"),
        ("other-class", "does not rebuild"),
        ("raises", r"to_dict\(\) raised RuntimeError"),
    ):
        cases[f"to_dict-{how}"] = (Described(how=how), None, pattern)
    return cases


BAD_MODELS = _bad_models()


@pytest.mark.parametrize("case", list(BAD_MODELS))
def test_check_model_refuses(case):
    model, param, pattern = BAD_MODELS[case]
    with pytest.raises(ModelError) as info:
        check_model(model)
    _message(info.value, model, param, pattern)


@pytest.mark.parametrize("thing", [None, object(), MODEL.to_dict(), Linear])
def test_check_model_refuses_what_is_not_a_model(thing):
    with pytest.raises(ModelError, match=r"must be a dask_ftps\.models\.Model"):
        check_model(thing)


class DeviceArray:
    """An array of a device's array module: shape and dtype, not NumPy."""

    def __init__(self, a: np.ndarray) -> None:
        self.a = a
        self.shape, self.dtype, self.ndim = a.shape, a.dtype, a.ndim

    def sum(self):
        return self.a.sum()


@dataclass(frozen=True)
class OnDevice(Linear):
    """:class:`Linear` whose first parameters are device arrays."""

    def init_params(self):
        return {k: DeviceArray(v) for k, v in super().init_params().items()}


def test_check_model_refuses_first_params_on_a_device(monkeypatch):
    """The server holds and stores NumPy arrays: first parameters in another
    array module (CuPy's, here a stand-in's) are refused."""
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(ndarray=DeviceArray))
    model = OnDevice()
    with pytest.raises(ModelError) as info:
        check_model(model)
    _message(info.value, model, "W", "must return NumPy arrays")


def test_check_model_passes_the_correct_models():
    for model in (MODEL, Factoring(), GoesBad(), Tagged(tag={"a": [1, 2.5]})):
        assert check_model(model) is model


@pytest.mark.parametrize("stored", [False, True])
@pytest.mark.parametrize("case", list(BAD_MODELS))
@gen_cluster(client=True, timeout=60)
async def test_a_misdeclared_model_is_refused_at_registration(
    c, s, a, b, tmp_path, case, stored
):
    """Registering a server of a model check_model refuses raises ModelError
    (where the ParameterServer is made, or when it starts): the server
    registered before serves on, untouched, and no store is made."""
    model, param, pattern = BAD_MODELS[case]
    await c.register_plugin(ParameterServer(model=MODEL, optimizer=SGD(lr=0.1)))
    before = await dask_ftps.status(c)
    store = tmp_path / "run.zarr"
    with pytest.raises(ModelError) as info:
        await c.register_plugin(
            ParameterServer(str(store) if stored else None, model=model)
        )
    _message(info.value, model, param, pattern)
    assert not store.exists()
    after = await dask_ftps.status(c)
    assert after["registration"] == before["registration"]
    assert after["model"] == MODEL.to_dict()
    await _untouched(c, MODEL)


# -- any corruption of a good gradient ---------------------------------------


@dataclass(frozen=True)
class Scripted(Linear):
    """:class:`Linear` whose loss_and_grad returns ``out`` as it is."""

    out: Any = field(default=None, compare=False)

    def loss_and_grad(self, params, X, y, sample_weight=None):
        return self.out


def _reshapes(a: np.ndarray) -> list[np.ndarray]:
    out = [a[None], a[..., None], np.concatenate([a, a], axis=-1), a.reshape(-1)]
    if a.shape[-1] > 1:
        out.append(a[..., :-1])
    if a.ndim == 2:
        out.append(a.T)
    return [r for r in out if r.shape != a.shape]


RETYPES = [np.float64, np.float16, np.int32, np.int64, np.uint8, np.complex64, bool]
NON_ARRAYS: list[Callable[[np.ndarray], Any]] = [
    lambda a: a.tolist(),
    lambda a: float(a.flat[0]),
    lambda a: a.flat[0],  # a NumPy scalar
    lambda a: None,
    lambda a: "grad",
    lambda a: {"data": a},
    lambda a: memoryview(a.copy()),
    lambda a: Factored(a.reshape(1, -1), a.reshape(1, -1)),  # not asked for
]


KINDS = [
    "drop",
    "add",
    "rename",
    "reshape",
    "retype",
    "poison",
    "non-array",
    "loss",
    "n_correct",
]


@st.composite
def corrupted(draw, kind: str):
    """A model, its params, a minibatch, what loss_and_grad returns (a good
    output corrupted in one way), and the parameter it corrupts (or None)."""
    n_features, n_classes = draw(st.integers(1, 6)), draw(st.integers(2, 5))
    n = draw(st.integers(1, 8))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    model = Linear(n_features=n_features, n_classes=n_classes)
    params = model.init_params()
    X = rng.random((n, n_features), dtype=np.float32)
    y = rng.integers(0, n_classes, n)
    loss, grads, correct = model.loss_and_grad(params, X, y)
    name = draw(st.sampled_from(sorted(grads)))
    a = grads[name]
    if kind == "drop":
        del grads[name]
    elif kind == "add":
        name = draw(st.text(max_size=4).filter(lambda s: s not in grads))
        grads[name] = a
    elif kind == "rename":
        new = draw(st.text(min_size=0, max_size=4).filter(lambda s: s not in grads))
        grads[new] = grads.pop(name)
    elif kind == "reshape":
        grads[name] = draw(st.sampled_from(_reshapes(a)))
    elif kind == "retype":
        grads[name] = a.astype(draw(st.sampled_from(RETYPES)))
    elif kind == "poison":
        a = a.copy()
        a.flat[draw(st.integers(0, a.size - 1))] = draw(
            st.sampled_from([np.nan, np.inf, -np.inf])
        )
        # A masked array hides the value from its own sum, not from the push.
        grads[name] = np.ma.masked_invalid(a) if draw(st.booleans()) else a
    elif kind == "non-array":
        grads[name] = draw(st.sampled_from(NON_ARRAYS))(a)
    elif kind == "loss":
        name = None
        loss = draw(
            st.sampled_from(
                [math.nan, math.inf, -math.inf, None, "1", b"1", np.ones(2), 10**400]
            )
        )
    else:
        name = None
        correct = draw(
            st.sampled_from([-1, n + 1, 0.5, math.nan, math.inf, None, "1", 1j])
        )
    return model, params, X, y, (loss, grads, correct), name


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@pytest.mark.parametrize("kind", KINDS)
@given(data=st.data())
def test_any_corruption_of_a_good_output_is_refused(kind, data):
    case = data.draw(corrupted(kind))
    model, params, X, y, out, name = case
    scripted = Scripted(model.n_features, model.n_classes, out=out)
    with pytest.raises(ModelError) as info:
        checked_loss_and_grad(scripted, params, X, y)
    text = str(info.value)
    assert Scripted.kind in text, text
    if name is not None:
        assert repr(name) in text, text


def test_the_uncorrupted_output_passes():
    model = Linear(n_features=3, n_classes=4)
    X, y = np.ones((5, 3), np.float32), np.arange(5) % 4
    params = model.init_params()
    out = model.loss_and_grad(params, X, y)
    loss, grads, correct = checked_loss_and_grad(Scripted(3, 4, out=out), params, X, y)
    assert (loss, correct) == (out[0], out[2])
    assert grads is out[1]
