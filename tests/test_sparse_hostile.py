"""Row-sparse updates and row pulls against hostile input.

The claim: whatever a push sends as :class:`~dask_ftps.RowSparse`, and whatever
a pull (or a push's ``next_step`` reply) asks for with ``rows=``, a bad one is
refused with an error reply (InvalidUpdate for a push, InvalidRequest for a
pull) before any state changes: in memory and in the store. The positive
controls beside: a valid row-sparse push merges as its dense form does, bit for
bit (SGD without momentum), a pull of rows serves exactly those rows, odd but
valid arrays (read-only, strided, int64) are accepted, and the store rebuilds
the live model bit for bit. Last, the worker-side check of what a user model
returns (``checked_loss_and_grad``) refuses rows its ``sparse_rows()`` did not
name.
"""

from __future__ import annotations

import decimal
import fractions
import re
import types
from dataclasses import dataclass

import numpy as np
import pytest
import scipy.sparse as sp
from distributed import Scheduler
from distributed.protocol.serialize import ToPickle
from distributed.utils import sync
from distributed.utils_test import gen_cluster
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import dask_ftps
from dask_ftps import SGD, ModelError, ParameterServer, RowSparse
from dask_ftps._core import check_reply
from dask_ftps._factored import to_host
from dask_ftps._sparse import sparse_problem
from dask_ftps.models import MLP, SoftmaxRegression
from dask_ftps.models._check import checked_loss_and_grad

from .conftest import same_as_offline
from .test_plugin import holder_of, server_id
from .test_trust import _valid, good_grads, snapshot

pytestmark = pytest.mark.filterwarnings(
    "ignore:the matrix subclass:PendingDeprecationWarning"  # np.asmatrix, sent
)

#: Small models with a wide first layer (the one a sparse input reads rows of).
MODELS = {
    "softmax": SoftmaxRegression(n_features=512, n_classes=3, seed=0),
    "mlp": MLP(n_features=512, hidden=(8,), n_classes=3, seed=0),
}
#: Steps enough for every positive control (2 shards of 100 steps).
SPEC = {"shard_sizes": [400, 400], "batch_size": 4, "epochs": 1, "seed": 0}
LR = 0.1

SWEEP = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@dataclass
class Served:
    loop: object
    plugin: object
    store: str | None
    model: object

    def call(self, op: str, **kwargs) -> dict:
        return sync(self.loop, self.plugin._handlers[f"ftps_{op}"], **kwargs)

    def push_kwargs(self, grads=None, **changes) -> dict:
        kwargs = _valid(self.plugin, "push")
        kwargs["grads"] = good_grads(self.model) if grads is None else grads
        return {**kwargs, **changes}

    def pull_kwargs(self, **changes) -> dict:
        return {**_valid(self.plugin, "pull"), **changes}


def _start(loop, model, store) -> Scheduler:
    async def start():
        s = await Scheduler(port=0, dashboard_address=":0")
        await s.register_scheduler_plugin(
            ParameterServer(store, model=model, optimizer=SGD(lr=LR)),
            name="ftps",
            idempotent=False,
        )
        check_reply(await s.plugins["ftps"].begin_run(spec=SPEC), "begin")
        return s

    return sync(loop, start)


@pytest.fixture(params=sorted(MODELS))
def served(request, loop_in_thread, tmp_path):
    """A scheduler in a loop thread serving a model with a store, a run begun."""
    store = str(tmp_path / "run.zarr")
    model = MODELS[request.param]
    s = _start(loop_in_thread, model, store)
    yield Served(loop_in_thread, s.plugins["ftps"], store, model)
    sync(loop_in_thread, s.close)


def _refused(served: Served, op: str, kwargs: dict, family: str, names) -> dict:
    """Send ``op``; it must be refused as ``family`` (by the check, not by a
    crash the handler turned into an error), its message naming one of
    ``names``, and nothing may change."""
    before = snapshot(served.plugin)
    reply = served.call(op, **kwargs)
    assert isinstance(reply, dict) and reply.get("status") == "error", reply
    text = reply["exception_text"]
    assert text.startswith(f"{family}("), text
    # A crash (an exception no check raised) caught by a safety net is worded
    # "<op>: <repr>" (protocol.replies_errors) or "update <id>: <repr>"
    # (Server._apply): a check's refusal never holds an exception's repr.
    assert not re.match(rf"\w+\(['\"]{op}: ", text), text
    assert not re.search(r"\b\w*(Error|Exception)\(", text), text
    assert any(re.search(rf"\b{re.escape(n)}\b", text) for n in names), (names, text)
    assert snapshot(served.plugin) == before, text
    return reply


def _expect_merge(plugin, dense_grads: dict) -> dict:
    """The model the dense form of an update gives (the server's optimizer on a
    copy of the served model)."""
    model = plugin.state.model
    params, _ = plugin.state.optimizer.apply(
        {k: v.copy() for k, v in model.params.items()},
        {k: v.copy() for k, v in model.opt_state.items()},
        dense_grads,
        step=int(plugin.state.version) + 1,
    )
    return params


def _same_bits(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k, value in a.items():
        assert value.dtype == b[k].dtype and value.shape == b[k].shape, k
        assert np.asarray(value).tobytes() == np.asarray(b[k]).tobytes(), k


def _recovers_live(served: Served) -> None:
    version, params = dask_ftps.recover(served.store)
    assert version == served.plugin.state.version
    _same_bits(params, served.plugin.state.model.params)


def _store_holds_nothing(served: Served) -> None:
    """The store, read by another reader, holds no update: what the hostile
    requests before left it."""
    assert served.plugin.state.updates == 0
    assert dask_ftps.inspect(served.store)["updates"] == 0
    version, params = dask_ftps.recover(served.store)
    assert version == 0
    _same_bits(params, served.model.init_params())


# -- building blocks ---------------------------------------------------------------------


def _matrices(shapes: dict) -> list[str]:
    return [k for k, s in shapes.items() if len(s) == 2]


def _vectors(shapes: dict) -> list[str]:
    return [k for k, s in shapes.items() if len(s) != 2]


def _odd_layout(draw, a: np.ndarray) -> np.ndarray:
    """``a`` with the same values in a layout a check must not mind: strided,
    read-only, reversed strides, Fortran order, unaligned (or as it is)."""
    how = draw(
        st.sampled_from(
            ["plain", "strided", "readonly", "reversed", "fortran", "unaligned"]
        )
    )
    if how == "unaligned":  # read-only too: a view of bytes
        raw = b"\0" + np.ascontiguousarray(a).tobytes()
        out = np.frombuffer(raw, a.dtype, count=a.size, offset=1).reshape(a.shape)
        assert a.size == 0 or not out.flags.aligned
        return out
    if how == "strided":
        big = np.zeros((2 * a.shape[0], *a.shape[1:]), a.dtype)
        big[::2] = a
        out = big[::2]
        if a.ndim == 2:
            wide = np.zeros((a.shape[0], 2 * a.shape[1]), a.dtype)
            wide[:, ::2] = a
            out = wide[:, ::2]
        return out
    if how == "readonly":
        out = a.copy()
        out.flags.writeable = False
        return out
    if how == "reversed":
        return a[::-1].copy()[::-1]
    if how == "fortran" and a.ndim == 2:
        return np.asfortranarray(a)
    return a


def _pick(draw, options: dict):
    """One of ``options`` (label to a function that makes it), drawn by label:
    hypothesis hashes what it samples, and not every hostile value hashes."""
    return options[draw(st.sampled_from(sorted(options)))]()


def _indices(draw, m: int, min_k: int = 1, max_k: int = 8) -> np.ndarray:
    """Valid row indices of a matrix of ``m`` rows (int32 or int64)."""
    k = draw(st.integers(min_k, min(max_k, m)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    idx = np.sort(rng.choice(m, size=k, replace=False))
    return idx.astype(draw(st.sampled_from([np.int32, np.int64])))


def _values(draw, k: int, n: int) -> np.ndarray:
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return (rng.standard_normal((k, n)) * 0.01).astype(np.float32)


@st.composite
def valid_rows(draw, shape):
    """A valid RowSparse update of a matrix of ``shape``, its arrays in odd but
    valid layouts: none, some or all of its rows."""
    m, n = shape
    which = draw(st.sampled_from(["some", "some", "some", "none", "all"]))
    if which == "none":
        idx = np.array([], dtype=draw(st.sampled_from([np.int32, np.int64])))
    elif which == "all":
        idx = np.arange(m, dtype=draw(st.sampled_from([np.int32, np.int64])))
    else:
        idx = _indices(draw, m)
    rows = _values(draw, idx.size, n)
    if draw(st.integers(0, 5)) == 0:  # one row repeated: a broadcast view
        rows = np.broadcast_to(rows[:1], rows.shape) if idx.size else rows
    n_rows = draw(st.sampled_from([int, np.int64, np.int32, np.uint64]))(m)
    return RowSparse(_odd_layout(draw, idx), _odd_layout(draw, rows), n_rows)


class Subclassed(RowSparse):
    """A RowSparse subclass: refused even with valid contents (its methods could
    say anything)."""


class ArraySub(np.ndarray):
    """An ndarray subclass (what a masked array is): refused."""


INDEX_DTYPES = [
    np.float16, np.float32, np.float64, np.bool_, np.uint8, np.uint16, np.uint32,
    np.uint64, np.int8, np.int16, np.complex64, object, ">i4", ">i8", "U8",
    "M8[s]", "m8[s]",
]  # fmt: skip
ROWS_DTYPES = [
    np.float64, np.float16, np.int32, np.bool_, np.complex64, ">f4", object,
    np.longdouble, np.int8,
]  # fmt: skip


INDEX_DEFECTS = ["negative", "n_rows", "huge", "repeat", "unsorted", "oversize",
                 "dtype", "ndim", "container"]  # fmt: skip


@st.composite
def bad_indices(draw, m: int, label: str | None = None):
    """``(label, indices, k)``: row indices of a matrix of ``m`` rows that are
    wrong in one way (``label``: which, or drawn), and the number of rows to
    send with them."""
    if label is None:
        label = draw(st.sampled_from(INDEX_DEFECTS))
    idx = _indices(draw, m, min_k=2 if label in ("repeat", "unsorted") else 1)
    k = idx.size
    if label == "negative":
        idx = idx.astype(np.int64)
        idx[0] = draw(st.sampled_from([-1, -2, -m, -(2**31), -(2**63)]))
    elif label == "n_rows":
        idx[-1] = m
    elif label == "huge":
        idx = idx.astype(np.int64)
        idx[-1] = draw(st.sampled_from([m + 1, 2**31 - 1, 2**31, 2**32, 2**63 - 1]))
    elif label == "repeat":
        j = draw(st.integers(0, k - 2))
        idx[j + 1] = idx[j]
    elif label == "unsorted":
        idx = idx[::-1].copy() if draw(st.booleans()) else idx[[1, 0, *range(2, k)]]
    elif label == "oversize":
        extra = draw(st.integers(1, 3))
        idx = (
            np.arange(m + extra, dtype=np.int64)
            if draw(st.booleans())
            else np.concatenate([np.arange(m), np.full(extra, m - 1)])
        )
        k = idx.size
    elif label == "dtype":
        idx = idx.astype(draw(st.sampled_from(INDEX_DTYPES)))
    elif label == "ndim":
        form = draw(st.sampled_from(["column", "row", "scalar", "3-d"]))
        if form == "scalar":
            idx, k = np.array(idx[0]), 1
        else:
            idx = {"column": idx[:, None], "row": idx[None, :],
                   "3-d": idx.reshape(1, 1, k)}[form]  # fmt: skip
    else:
        idx = _pick(draw, {
            "list": lambda: list(idx), "tuple": lambda: tuple(idx),
            "tolist": idx.tolist, "masked": lambda: np.ma.masked_array(idx),
            "subclass": lambda: idx.view(ArraySub), "range": lambda: range(k),
            "none": lambda: None, "int": lambda: int(idx[0]), "str": lambda: str(idx),
            "memoryview": lambda: memoryview(idx.copy()),
            "scipy": lambda: sp.csr_matrix(idx[None, :]),
        })  # fmt: skip
    return label, idx, k


N_ROWS = ["m+1", "m-1", "zero", "-m", "-1", "true", "false", "2**70", "-2**70",
          "float", "np.float64", "np.float32", "str", "none", "np.int64(m+1)",
          "fraction", "decimal", "complex", "np.bool_", "list", "tuple", "m+0.5"]  # fmt: skip


def _n_rows(label: str, m: int):
    return {
        "m+1": m + 1, "m-1": m - 1, "zero": 0, "-m": -m, "-1": -1, "true": True,
        "false": False, "2**70": 2**70, "-2**70": -(2**70), "float": float(m),
        "np.float64": np.float64(m), "np.float32": np.float32(m), "str": str(m),
        "none": None, "np.int64(m+1)": np.int64(m + 1),
        "fraction": fractions.Fraction(m), "decimal": decimal.Decimal(m),
        "complex": complex(m), "np.bool_": np.bool_(True), "list": [m],
        "tuple": (m,), "m+0.5": m + 0.5,
    }[label]  # fmt: skip


ROWS_DEFECTS = ["width", "count", "ndim", "dtype", "nonfinite", "container"]
TYPE_DEFECTS = ["subclass", "duck", "scipy", "dense-float64"]
#: Every way a push's value of a parameter is hostile (a sweep draws one).
UPDATE_DEFECTS = [
    *(f"indices {d}" for d in INDEX_DEFECTS),
    *(f"rows {d}" for d in ROWS_DEFECTS),
    *(f"n_rows {d}" for d in N_ROWS),
    *TYPE_DEFECTS,
    "other shape",
    "1-d param",
    "1-d param",
    "1-d param",
]


@st.composite
def bad_update(draw, shapes: dict, label: str):
    """``(name, value)``: a hostile value of a parameter of the model (of
    ``shapes``) that must be refused, wrong in the way ``label`` names: a
    RowSparse but for the type defects."""
    if label == "1-d param":  # a bias: no RowSparse is valid
        name = draw(st.sampled_from(_vectors(shapes)))
        (c,) = shapes[name]
        if draw(st.booleans()):  # indices of its own length
            idx = _indices(draw, c)
            width = draw(st.sampled_from([1, c]))
            return name, RowSparse(idx, _values(draw, idx.size, width), c)
        return name, draw(valid_rows(shapes[draw(st.sampled_from(_matrices(shapes)))]))
    name = draw(st.sampled_from(_matrices(shapes)))
    m, n = shapes[name]
    kind, _, defect = label.partition(" ")
    if kind == "indices":
        _, idx, k = draw(bad_indices(m, defect))
        return name, RowSparse(idx, _values(draw, k, n), m)
    idx = _odd_layout(draw, _indices(draw, m))
    k = idx.size
    rows = _values(draw, k, n)
    if kind == "rows":
        if defect == "width":
            rows = _values(draw, k, draw(st.sampled_from([n - 1, n + 1, 2 * n, m])))
        elif defect == "count":
            rows = _values(draw, draw(st.sampled_from([k + 1, k - 1, 0, 2 * k])), n)
        elif defect == "ndim":
            rows = _pick(draw, {"1-d": lambda: rows.reshape(-1),
                                "3-d": lambda: rows[None], "3-d'": lambda: rows[..., None]})  # fmt: skip
        elif defect == "dtype":
            rows = rows.astype(draw(st.sampled_from(ROWS_DTYPES)))
        elif defect == "nonfinite":
            rows = rows.copy()
            i, j = draw(st.integers(0, k - 1)), draw(st.integers(0, n - 1))
            rows[i, j] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
            rows = _odd_layout(draw, rows)
        else:
            rows = _pick(draw, {
                "list": rows.tolist, "masked": lambda: np.ma.masked_array(rows),
                "subclass": lambda: rows.view(ArraySub),
                "matrix": lambda: np.asmatrix(rows), "none": lambda: None,
                "float": lambda: 0.0, "np.float32": lambda: np.float32(0),
                "tuple": lambda: tuple(map(tuple, rows)),
            })  # fmt: skip
        return name, RowSparse(idx, rows, m)
    if kind == "n_rows":
        return name, RowSparse(idx, rows, _n_rows(defect, m))
    if label == "subclass":
        return name, Subclassed(idx, rows, m)
    if label == "duck":
        return name, types.SimpleNamespace(
            indices=idx, rows=rows, n_rows=m, shape=(m, n), dtype=np.float32
        )
    if label == "scipy":
        return name, sp.csr_matrix(RowSparse(np.asarray(idx), rows, m).dense())
    if label == "dense-float64":
        return name, RowSparse(np.asarray(idx), rows, m).dense().astype(np.float64)
    assert label == "other shape"  # another matrix's RowSparse, valid for that shape
    others = {shapes[o] for o in _matrices(shapes)} | {(n, m), (m + 1, n), (m, n + 1)}
    others.discard((m, n))
    return name, draw(valid_rows(draw(st.sampled_from(sorted(others)))))


@st.composite
def hostile_pushes(draw, model):
    """``(labels, grads, names)``: the grads of a push with one or two hostile
    parameters (``names``), the others valid, dense or as rows."""
    shapes = model.param_shapes()
    grads = good_grads(model)
    for name in _matrices(shapes):  # the others valid, some as rows
        if draw(st.booleans()):
            grads[name] = draw(valid_rows(shapes[name]))
    labels, names = [], []
    for _ in range(draw(st.sampled_from([1, 1, 1, 2]))):
        label = draw(st.sampled_from(UPDATE_DEFECTS))
        name, value = draw(bad_update(shapes, label))
        grads[name] = value
        labels.append(label)
        names.append(name)
    return labels, grads, names


def _valid_wanted(draw, shapes: dict) -> dict:
    """Valid ``rows=``: some of the model's matrices, each valid indices."""
    names = draw(st.lists(st.sampled_from(_matrices(shapes)), min_size=1, unique=True))
    return {n: _odd_layout(draw, _indices(draw, shapes[n][0])) for n in names}


#: Names of no matrix (those of the model's parameters are left out).
UNKNOWN_NAMES = ["", "nope", "w", " W", "W ", "W\x00", "W/0", "W0 ", "x" * 1000, 1, 0,
                 None, b"W", ("W",), 1.5, True, frozenset({"W"}), "b0 ", "W", "W0",
                 "W1", "W2", "params"]  # fmt: skip


#: Every way a ``rows=`` argument is hostile (a sweep draws one).
WANTED_DEFECTS = ["not-a-dict", "not-a-dict", "empty", "unknown", "unknown", "vector",
                  *(f"indices {d}" for d in INDEX_DEFECTS), "too-many", "mixed",
                  "mixed"]  # fmt: skip


@st.composite
def hostile_wanted(draw, shapes: dict, label: str | None = None):
    """``(label, rows)``: a ``rows=`` argument that must be refused (wrong in
    the way ``label`` names, or one drawn)."""
    if label is None:
        label = draw(st.sampled_from(WANTED_DEFECTS))
    kind, _, defect = label.partition(" ")
    matrix = draw(st.sampled_from(_matrices(shapes)))
    good = _indices(draw, shapes[matrix][0])
    if kind == "not-a-dict":
        value = _pick(draw, {
            "[]": list, "pairs": lambda: [(matrix, good)], "tuple": lambda: (matrix,),
            "set": lambda: {matrix}, "str": lambda: matrix, "bytes": lambda: b"W",
            "1": lambda: 1, "0": lambda: 0, "True": lambda: True, "array": lambda: good,
            "mappingproxy": lambda: types.MappingProxyType({matrix: good}),
            "[array]": lambda: [good], "float": lambda: 1.5, "object": object,
        })  # fmt: skip
        return kind, value
    if kind == "empty":
        return kind, {}
    if kind == "unknown":
        name = draw(st.sampled_from([n for n in UNKNOWN_NAMES if n not in shapes]))
        return kind, {name: good}
    if kind == "vector":
        vector = draw(st.sampled_from(_vectors(shapes)))
        return kind, {vector: _indices(draw, shapes[vector][0])}
    if kind == "indices":
        _, idx, _ = draw(bad_indices(shapes[matrix][0], defect))
        return label, {matrix: idx}
    if kind == "too-many":
        many = draw(st.integers(1, 1000))
        extra = {f"{matrix}{i}": good for i in range(many)}
        return kind, {**{n: good for n in shapes}, **extra}
    # one valid entry beside a hostile one
    inner = [d for d in WANTED_DEFECTS if d not in ("not-a-dict", "empty", "mixed")]
    _, bad = draw(hostile_wanted(shapes, draw(st.sampled_from(inner))))
    return "mixed", {**_valid_wanted(draw, shapes), **bad}


# -- 1. hostile pushes, hostile rows= -----------------------------------------------------


@SWEEP
@given(data=st.data())
def test_hostile_row_sparse_pushes_are_refused_and_change_nothing(served, data):
    labels, grads, names = data.draw(hostile_pushes(served.model), label="push")
    for label in labels:
        event(label)
    _refused(served, "push", served.push_kwargs(grads), "InvalidUpdate", names)


@SWEEP
@given(data=st.data())
def test_hostile_rows_of_a_pull_are_refused_and_change_nothing(served, data):
    label, rows = data.draw(hostile_wanted(served.model.param_shapes()), label="rows")
    event(label)
    _refused(served, "pull", served.pull_kwargs(rows=rows), "InvalidRequest", ["rows"])


@SWEEP
@given(data=st.data())
def test_hostile_rows_of_a_push_reply_are_refused_before_the_push_counts(served, data):
    """A push whose ``rows=`` (the rows its next_step reply is to carry) is bad
    is refused whole: the valid update it carries does not count."""
    shapes = served.model.param_shapes()
    label, rows = data.draw(hostile_wanted(shapes), label="rows")
    event(label)
    kwargs = served.push_kwargs(rows=rows)
    if data.draw(st.booleans(), label="valid rows in the update"):
        kwargs["grads"] = {
            **kwargs["grads"],
            **{n: data.draw(valid_rows(shapes[n])) for n in _matrices(shapes)},
        }
    if data.draw(st.booleans(), label="with next_step"):
        epoch, step = served.plugin.state.runs[-1].next_step(0)
        kwargs["next_step"] = (epoch, step + 1)
    _refused(served, "push", kwargs, "InvalidUpdate", ["rows"])


EVERY_KIND = settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@EVERY_KIND
@given(data=st.data())
def test_every_kind_of_hostile_update_is_refused_and_changes_nothing(served, data):
    """Every kind of hostile value in every example (the sweep above draws
    them at random, and may draw a rare one seldom)."""
    shapes = served.model.param_shapes()
    for label in dict.fromkeys(UPDATE_DEFECTS):
        name, value = data.draw(bad_update(shapes, label), label=label)
        grads = {**good_grads(served.model), name: value}
        _refused(served, "push", served.push_kwargs(grads), "InvalidUpdate", [name])
    _store_holds_nothing(served)


@EVERY_KIND
@given(data=st.data())
def test_every_kind_of_hostile_rows_is_refused_and_changes_nothing(served, data):
    shapes = served.model.param_shapes()
    for label in dict.fromkeys(WANTED_DEFECTS):
        _, rows = data.draw(hostile_wanted(shapes, label), label=label)
        kwargs = served.pull_kwargs(rows=rows)
        _refused(served, "pull", kwargs, "InvalidRequest", ["rows"])
        _refused(
            served, "push", served.push_kwargs(rows=rows), "InvalidUpdate", ["rows"]
        )
    _store_holds_nothing(served)


@pytest.mark.parametrize(
    "n_rows", [True, np.bool_(True), 1.0, np.float32(1), "1", [1], None]
)
def test_a_one_row_matrix_refuses_an_n_rows_that_only_equals_one(n_rows):
    """Where ``n_rows == 1`` is the right count, a bool (or float, str...)
    that equals 1 is still refused: n_rows is an int."""
    g = RowSparse(np.array([0]), np.ones((1, 3), np.float32), n_rows)
    assert "n_rows must be an int" in sparse_problem(
        g, (1, 3), np.dtype(np.float32), "W"
    )
    assert (
        sparse_problem(
            RowSparse(np.array([0]), g.rows, np.int8(1)), (1, 3), np.float32, "W"
        )
        is None
    )


BROKEN = {
    "none": {},
    "no-n_rows": {"indices": "I", "rows": "R"},
    "no-rows": {"indices": "I", "n_rows": "m"},
    "no-indices": {"rows": "R", "n_rows": "m"},
}


def _broken(shape: tuple[int, int], which: str) -> RowSparse:
    """A RowSparse without some of its attributes: what unpickling a crafted
    ``(RowSparse, state)`` gives (a frozen dataclass's state is set as is)."""
    m, n = shape
    values = {"I": np.array([1, 5]), "R": np.ones((2, n), np.float32), "m": m}
    broken = object.__new__(RowSparse)
    broken.__dict__.update({k: values[v] for k, v in BROKEN[which].items()})
    return broken


@pytest.mark.parametrize("which", sorted(BROKEN))
def test_a_row_sparse_missing_an_attribute_is_refused_by_its_check(served, which):
    name = _matrices(served.model.param_shapes())[0]
    broken = _broken(served.model.param_shapes()[name], which)
    grads = {**good_grads(served.model), name: broken}
    _refused(served, "push", served.push_kwargs(grads), "InvalidUpdate", [name])


@pytest.mark.parametrize("which", sorted(BROKEN))
def test_a_row_sparse_missing_an_attribute_is_an_invalid_update_all_the_same(
    served, which
):
    """The safety net under the check above: still an InvalidUpdate that
    changes nothing."""
    name = _matrices(served.model.param_shapes())[0]
    before = snapshot(served.plugin)
    grads = {
        **good_grads(served.model),
        name: _broken(served.model.param_shapes()[name], which),
    }
    reply = served.call("push", **served.push_kwargs(grads))
    assert reply["status"] == "error"
    assert reply["exception_text"].startswith("InvalidUpdate("), reply
    assert snapshot(served.plugin) == before


class Unprintable(str):
    """A name (a str subclass, as a crafted pickle can send) that cannot be
    made a string again."""

    def __str__(self):
        raise RuntimeError("no str")


@pytest.mark.parametrize("op", ["pull", "push"])
def test_a_rows_name_that_cannot_be_printed_is_refused_by_the_check(served, op):
    rows = {Unprintable("zz"): np.array([1])}
    if op == "pull":
        _refused(served, op, served.pull_kwargs(rows=rows), "InvalidRequest", ["rows"])
    else:
        _refused(served, op, served.push_kwargs(rows=rows), "InvalidUpdate", ["rows"])


@pytest.mark.parametrize("op", ["pull", "push"])
def test_a_rows_name_that_cannot_be_printed_changes_nothing(served, op):
    rows = {Unprintable("zz"): np.array([1])}
    kwargs = (
        served.pull_kwargs(rows=rows) if op == "pull" else served.push_kwargs(rows=rows)
    )
    before = snapshot(served.plugin)
    reply = served.call(op, **kwargs)
    assert reply["status"] == "error"
    assert snapshot(served.plugin) == before


WIRE_MODEL = MODELS["mlp"]


def _wire_cases() -> dict:
    """Hostile pushes (grads) and pulls (rows) as a client sends them."""
    rows = np.ones((2, 8), np.float32)
    return {
        "push unsorted": ("push", {"W0": RowSparse(np.array([5, 1]), rows, 512)}),
        "push subclass": ("push", {"W0": Subclassed(np.array([1, 5]), rows, 512)}),
        "push bias": ("push", {"b0": RowSparse(np.array([0]), rows[:1], 8)}),
        "push nan": ("push", {"W0": RowSparse(np.array([1, 5]), rows * np.nan, 512)}),
        "pull negative": ("pull", ToPickle({"W0": np.array([-1, 2])})),
        "pull list": ("pull", {"W0": [1, 2]}),
        "pull names": ("pull", ["W0"]),
        "pull bias": ("pull", ToPickle({"b0": np.array([0])})),
    }


@gen_cluster(client=True)
async def test_hostile_rows_over_the_wire_are_refused_and_change_nothing(
    c, s, a, b, tmp_path
):
    """The same refusals through a real comm (pickled and msgpack'd messages);
    then a valid row-sparse push and row pull go through, and the store
    rebuilds the live model."""
    store = str(tmp_path / "run.zarr")
    await c.register_plugin(ParameterServer(store, model=WIRE_MODEL, optimizer=SGD(LR)))
    check_reply(await c.scheduler.ftps_begin_run(spec=SPEC), "begin")
    plugin = s.plugins["ftps"]
    common = {"server_id": await server_id(c), "holder": holder_of(c),
              "worker": "tcp://w:1"}  # fmt: skip
    pull = {**common, "run": 0, "shard": 0, "epoch": 0, "step": 0}
    push = {**common, "update_id": "0:0:0:0", "incarnation": 1}
    before = snapshot(plugin)
    for case, (op, value) in _wire_cases().items():
        if op == "push":
            grads = ToPickle({**good_grads(WIRE_MODEL), **value})
            reply = await c.scheduler.ftps_push(**push, grads=grads)
            family = dask_ftps.InvalidUpdate
        else:
            reply = await c.scheduler.ftps_pull(**pull, rows=value)
            family = dask_ftps.InvalidRequest
        with pytest.raises(family, match=r"\bb0\b|\bW0\b|rows"):
            check_reply(reply, case)
        assert snapshot(plugin) == before, case
    grads = {**good_grads(WIRE_MODEL),
             "W0": RowSparse(np.array([1, 5]), np.ones((2, 8), np.float32), 512)}  # fmt: skip
    check_reply(await c.scheduler.ftps_push(**push, grads=ToPickle(grads)), "push")
    pull["step"] = 1
    reply = check_reply(
        await c.scheduler.ftps_pull(**pull, rows=ToPickle({"W0": np.array([5, 9])})),
        "pull",
    )
    live = plugin.state.model.params
    got = reply["params"]["W0"]
    assert type(got) is RowSparse
    assert got.rows.tobytes() == live["W0"][[5, 9]].tobytes()
    await same_as_offline(c, store)


@gen_cluster(client=True)
async def test_a_crafted_pickle_of_a_row_sparse_is_an_invalid_update(c, s, a, b):
    """A RowSparse without its attributes does reach the scheduler (pickled as
    its class and an empty state): refused, nothing changed."""
    await c.register_plugin(ParameterServer(model=WIRE_MODEL))
    check_reply(await c.scheduler.ftps_begin_run(spec=SPEC), "begin")
    before = snapshot(s.plugins["ftps"])
    grads = {**good_grads(WIRE_MODEL), "W0": object.__new__(RowSparse)}
    reply = await c.scheduler.ftps_push(
        server_id=await server_id(c), holder=holder_of(c), worker="tcp://w:1",
        update_id="0:0:0:0", incarnation=1, grads=ToPickle(grads),
    )  # fmt: skip
    assert snapshot(s.plugins["ftps"]) == before
    with pytest.raises(dask_ftps.InvalidUpdate):
        check_reply(reply, "push")


# -- 2. positive controls ----------------------------------------------------------------


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_valid_row_sparse_pushes_merge_as_dense_and_the_store_rebuilds_them(
    served, data
):
    """Odd but valid arrays (read-only, strided, int64, no rows, all rows, a
    NumPy n_rows) are accepted; the merge equals the dense update's merge bit
    for bit (SGD without momentum); recover() gives the live model."""
    shapes = served.model.param_shapes()
    grads = good_grads(served.model)
    for name in _matrices(shapes):
        if data.draw(st.booleans()):
            grads[name] = data.draw(valid_rows(shapes[name]), label=name)
    dense = {k: g.dense() if isinstance(g, RowSparse) else g for k, g in grads.items()}
    expected = _expect_merge(served.plugin, dense)
    reply = served.call("push", **served.push_kwargs(grads))
    assert reply["status"] == "OK", reply
    _same_bits(served.plugin.state.model.params, expected)
    _recovers_live(served)


def test_sparse_and_dense_pushes_give_the_same_model_and_pulls_serve_rows(
    served, tmp_path
):
    """Two servers, one sent rows and one their dense form: the same bits after
    every push. Pulls (and next_step replies) with rows= carry exactly those rows
    of the served model and the rest whole. The store rebuilds the model."""
    shapes = served.model.param_shapes()
    matrices = _matrices(shapes)
    other = _start(served.loop, served.model, str(tmp_path / "dense.zarr"))
    dense_server = Served(
        served.loop, other.plugins["ftps"], str(tmp_path / "dense.zarr"), served.model
    )
    rng = np.random.default_rng(1)
    try:
        for i in range(6):
            grads = good_grads(served.model)
            for name in matrices:
                m, n = shapes[name]
                idx = np.sort(rng.choice(m, size=[0, 1, 5, m][i % 4], replace=False))
                rows = (rng.standard_normal((idx.size, n)) * 0.1).astype(np.float32)
                grads[name] = RowSparse(
                    idx.astype([np.int32, np.int64][i % 2]), rows, m
                )
            dense = {
                k: g.dense() if isinstance(g, RowSparse) else g
                for k, g in grads.items()
            }
            wanted = {n: np.sort(rng.choice(shapes[n][0], 3, replace=False))
                      for n in matrices}  # fmt: skip
            epoch, step = served.plugin.state.runs[-1].next_step(0)
            pushed = served.call(
                "push", **served.push_kwargs(grads, next_step=(epoch, step + 1),
                                             rows=wanted)
            )  # fmt: skip
            check_reply(pushed, "push")
            check_reply(dense_server.call("push", **dense_server.push_kwargs(dense)),
                        "push")  # fmt: skip
            live = served.plugin.state.model.params
            _same_bits(live, dense_server.plugin.state.model.params)
            pulled = served.call("pull", **served.pull_kwargs(rows=wanted))
            for reply in (pushed, pulled):
                assert reply["status"] == "OK", reply
                params = reply["params"]
                params = params.data if isinstance(params, ToPickle) else params
                assert set(params) == set(shapes)
                for name, value in params.items():
                    if name in wanted:
                        assert type(value) is RowSparse
                        assert value.n_rows == shapes[name][0]
                        np.testing.assert_array_equal(value.indices, wanted[name])
                        assert (
                            value.rows.tobytes() == live[name][wanted[name]].tobytes()
                        )
                    else:
                        assert value.tobytes() == live[name].tobytes()
    finally:
        sync(served.loop, other.close)
    assert served.plugin.state.version == dense_server.plugin.state.version == 6
    _recovers_live(served)
    _same_bits(
        dask_ftps.recover(dense_server.store)[1], served.plugin.state.model.params
    )


@pytest.mark.parametrize(
    "layout", ["plain", "int64", "readonly", "strided", "reversed", "none", "all"]
)
def test_a_pull_of_rows_in_an_odd_but_valid_layout_is_served(served, layout):
    shapes = served.model.param_shapes()
    name = _matrices(shapes)[0]
    m = shapes[name][0]
    idx = np.array([0, 3, 17, m - 1], np.int32)
    if layout == "int64":
        idx = idx.astype(np.int64)
    elif layout == "readonly":
        idx.flags.writeable = False
    elif layout == "strided":
        idx = np.repeat(idx, 2)[::2]
    elif layout == "reversed":
        idx = idx[::-1].copy()[::-1]
    elif layout == "none":
        idx = np.array([], np.int32)
    elif layout == "all":
        idx = np.arange(m)
    reply = served.call("pull", **served.pull_kwargs(rows={name: idx}))
    assert reply["status"] == "OK", reply
    got = reply["params"].data[name]
    live = served.plugin.state.model.params[name]
    assert type(got) is RowSparse and got.shape == live.shape
    np.testing.assert_array_equal(got.indices, idx)
    assert got.rows.tobytes() == live[idx].tobytes()


# -- 3. the worker's check of what a model returns ---------------------------------------


@dataclass(frozen=True)
class RowsModel(SoftmaxRegression):
    """A user model that returns its weight's gradient as rows, wrong in the way
    ``case`` names (``"honest"``: right)."""

    case: str = "honest"

    def sparse_rows(self, X):
        named = super().sparse_rows(X)
        if self.case == "unnamed":
            return {}
        if self.case == "bias-named":
            return {**named, "b": np.arange(self.n_classes)}
        return named

    def loss_and_grad(self, params, X, y, sample_weight=None, **kwargs):
        loss, grads, n = super().loss_and_grad(params, X, y, sample_weight, **kwargs)
        W = grads["W"]
        assert type(W) is RowSparse  # the honest form, for a sparse minibatch
        idx, rows, m = W.indices, W.rows, W.n_rows
        named = set(idx.tolist())
        outside = next(i for i in range(m) if i not in named)
        case = self.case
        if case in ("unnamed", "honest"):
            return loss, grads, n
        if case in ("bias-as-rows", "bias-named"):
            b = RowSparse(np.array([0]), grads["b"][None, :1].copy(), self.n_classes)
            return loss, {**grads, "b": b}, n
        if case == "outside":
            idx2 = np.sort(np.append(idx, outside))
            rows2 = np.zeros((idx2.size, rows.shape[1]), np.float32)
            return loss, {**grads, "W": RowSparse(idx2, rows2, m)}, n
        lenient = {  # not what the server takes, but what to_host() makes so
            "list-indices": lambda: RowSparse(idx.tolist(), rows, m),
            "list-rows": lambda: RowSparse(idx, list(rows), m),
            "subclass": lambda: Subclassed(idx, rows, m),
            "numpy-n_rows": lambda: RowSparse(idx.astype(np.int64), rows, np.int64(m)),
        }
        if case in lenient:
            return loss, {**grads, "W": lenient[case]()}, n
        bad = {
            "unsorted": lambda: RowSparse(idx[::-1].copy(), rows, m),
            "repeated": lambda: RowSparse(np.repeat(idx[:1], 2), rows[:2], m),
            "negative": lambda: RowSparse(np.concatenate([[-1], idx[1:]]), rows, m),
            "n_rows-index": lambda: RowSparse(np.concatenate([idx[:-1], [m]]), rows, m),
            "float-indices": lambda: RowSparse(idx.astype(np.float64), rows, m),
            "uint64-indices": lambda: RowSparse(idx.astype(np.uint64), rows, m),
            "2-d-indices": lambda: RowSparse(idx[:, None], rows, m),
            "oversize": lambda: RowSparse(
                np.arange(m + 1), np.zeros((m + 1, rows.shape[1]), np.float32), m
            ),
            "wrong-n_rows": lambda: RowSparse(idx, rows, m + 1),
            "bool-n_rows": lambda: RowSparse(idx, rows, True),
            "float64-rows": lambda: RowSparse(idx, rows.astype(np.float64), m),
            "nan-rows": lambda: RowSparse(idx, rows * np.float32(np.nan), m),
            "wide-rows": lambda: RowSparse(idx, np.zeros((idx.size, 4), np.float32), m),
            "missing-attribute": lambda: object.__new__(RowSparse),
        }[case]()
        return loss, {**grads, "W": bad}, n


def _sparse_minibatch(n_features=512, n=6, seed=0):
    rng = np.random.default_rng(seed)
    X = sp.random(n, n_features, density=0.01, format="csr", random_state=rng)
    X = X.astype(np.float32)
    X.data[:] = 1.0
    return X, rng.integers(0, 3, n).astype(np.int64)


MODEL_CASES = [
    "unnamed", "bias-as-rows", "bias-named", "outside", "unsorted", "repeated",
    "negative", "n_rows-index", "float-indices", "uint64-indices", "2-d-indices",
    "oversize", "wrong-n_rows", "bool-n_rows", "float64-rows", "nan-rows",
    "wide-rows", "missing-attribute",
]  # fmt: skip


@pytest.mark.parametrize("case", MODEL_CASES)
def test_a_model_returning_rows_it_did_not_name_raises_model_error(case):
    model = RowsModel(n_features=512, n_classes=3, case=case)
    X, y = _sparse_minibatch()
    with pytest.raises(ModelError, match="RowsModel"):
        checked_loss_and_grad(model, model.init_params(), X, y)


def test_rows_named_explicitly_are_the_ones_checked():
    """``rows=`` given (the worker's cache of sparse_rows) is what the check
    holds the returned rows to: fewer named rows, the same gradient refused."""
    model = RowsModel(n_features=512, n_classes=3)
    X, y = _sparse_minibatch()
    named = model.sparse_rows(X)["W"]
    checked_loss_and_grad(model, model.init_params(), X, y, rows={"W": named})
    with pytest.raises(ModelError, match="did not name"):
        checked_loss_and_grad(model, model.init_params(), X, y, rows={"W": named[1:]})
    with pytest.raises(ModelError, match="only a weight named"):
        checked_loss_and_grad(model, model.init_params(), X, y, rows={})


def test_an_honest_sparse_model_passes_and_what_it_sends_passes_the_server():
    model = RowsModel(n_features=512, n_classes=3)
    X, y = _sparse_minibatch()
    _, grads, _ = checked_loss_and_grad(model, model.init_params(), X, y)
    W = grads["W"]
    assert type(W) is RowSparse
    np.testing.assert_array_equal(W.indices, dask_ftps.rows_of(X))
    shapes, dtypes = model.param_shapes(), model.param_dtypes()
    assert sparse_problem(W.to_host(), shapes["W"], dtypes["W"], "W") is None
    dense_model = SoftmaxRegression(n_features=512, n_classes=3)
    _, dense, _ = dense_model.loss_and_grad(model.init_params(), X.toarray(), y)
    np.testing.assert_allclose(W.dense(), dense["W"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "case", ["honest", "list-indices", "list-rows", "subclass", "numpy-n_rows"]
)
def test_what_passes_the_model_check_is_pushed_in_a_form_the_server_takes(case):
    """The model check takes rows as the host sees them (lists, a subclass, a
    NumPy n_rows); the worker pushes their to_host() form, which the server's
    check must take: nothing that passed is refused at the server."""
    model = RowsModel(n_features=512, n_classes=3, case=case)
    X, y = _sparse_minibatch()
    _, grads, _ = checked_loss_and_grad(model, model.init_params(), X, y)
    pushed = to_host(grads)["W"]
    assert type(pushed) is RowSparse
    assert sparse_problem(pushed, (512, 3), np.dtype(np.float32), "W") is None
