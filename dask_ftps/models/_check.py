"""Checks that a model does what it declares: one home for every model check.

A model is the user's code: what it returns is checked where it runs, and a
model that misbehaves is named (with the parameter) before anything it made is
pushed or served.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Iterable
from typing import Any

import numpy as np

from dask_ftps._core import field_int
from dask_ftps._exceptions import ModelError
from dask_ftps._factored import Factored, may_overflow
from dask_ftps._sparse import RowSparse, check_wanted, sparse_problem
from dask_ftps._xp import array_namespace, to_numpy

from ._base import Model, model_from_dict


def model_name(model: Model) -> str:
    """How messages name a model: its kind."""
    return type(model).kind or type(model).__qualname__


def check_model(model: Any) -> Model:
    """Check a model before a server is made of it: its declared attributes,
    its parameters' shapes and dtypes, its first parameters, its description.

    Returns
    -------
    Model
        ``model``.

    Raises
    ------
    ModelError
        Naming the model and what it declares wrong.
    """
    if not isinstance(model, Model):
        raise ModelError(
            "model must be a dask_ftps.models.Model (MLP(...), or a subclass of your "
            f"own), got {type(model).__name__}"
        )
    name = model_name(model)
    # n_classes is required (a field or property), n_features optional.
    field_int(
        f"model {name}: n_classes", getattr(model, "n_classes", None), ModelError, 2
    )
    if getattr(model, "n_features", None) is not None:
        field_int(f"model {name}: n_features", model.n_features, ModelError, 1)
    shapes = _call(model, "param_shapes")
    if not isinstance(shapes, dict) or not shapes:
        raise ModelError(
            f"model {name}: param_shapes() must return a non-empty dict of name to "
            f"shape, got {shapes!r:.80}"
        )
    for param, shape in shapes.items():
        if not isinstance(param, str) or not param or "/" in param:
            raise ModelError(
                f"model {name}: parameter names must be non-empty strings without "
                f"'/', got {param!r:.60}"
            )
        if not isinstance(shape, tuple) or not all(
            isinstance(d, numbers.Integral) and not isinstance(d, bool) and d >= 1
            for d in shape
        ):
            raise ModelError(
                f"model {name}: the shape of {param!r} must be a tuple of ints >= 1, "
                f"got {shape!r:.60}"
            )
    dtypes = _call(model, "param_dtypes")
    if not isinstance(dtypes, dict) or set(dtypes) != set(shapes):
        raise ModelError(
            f"model {name}: param_dtypes() must name the parameters of param_shapes()"
        )
    for param, dtype in dtypes.items():
        try:
            ok = np.dtype(dtype) == np.float32
        except TypeError:
            ok = False
        if not ok:
            raise ModelError(
                f"model {name}: parameter {param!r} is {dtype!r:.40}: dask_ftps "
                "merges and stores float32 parameters (other dtypes are not "
                "supported yet)"
            )
    factorable = _call(model, "factorable")
    if not isinstance(factorable, tuple) or not set(factorable) <= set(shapes):
        raise ModelError(
            f"model {name}: factorable() must return a tuple of parameter names, got "
            f"{factorable!r:.80}"
        )
    params = _call(model, "init_params")
    check_arrays(model, params, "init_params()", host=True)
    description = _call(model, "to_dict")
    try:
        recorded = json.dumps(description, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ModelError(
            f"model {name}: its fields must be JSON values (numbers, strings, "
            f"lists, dicts), to be recorded in the store: {e}"
        ) from e
    try:
        # What the store records is read back: rebuilt as a restart would.
        rebuilt = model_from_dict(json.loads(recorded))
    except (TypeError, ValueError) as e:
        raise ModelError(
            f"model {name}: {description!r:.120} does not rebuild it: {e}"
        ) from e
    # The same kind with the same fields: a class made twice under one name (a
    # factory function called twice) rebuilds as the newest, an equal spec.
    if type(rebuilt).kind != type(model).kind or rebuilt.to_dict() != description:
        raise ModelError(
            f"model {name}: {description!r:.120} does not rebuild the same model: its "
            "fields must be all of its hyper-parameters"
        )
    if type(rebuilt) is type(model) and rebuilt != model:
        tuples = [k for k, v in vars(model).items() if isinstance(v, tuple)]
        raise ModelError(
            f"model {name}: {description!r:.120} does not rebuild the same model: "
            + (
                f"its tuple fields {tuples} come back as lists: make them tuples in "
                "__post_init__ (as MLP does with hidden)"
                if tuples
                else "its fields must be all of its hyper-parameters"
            )
        )
    return model


def _call(model: Model, method: str, *args: Any, **kwargs: Any) -> Any:
    """``model.<method>(...)``, its exception a :class:`ModelError` naming it."""
    try:
        return getattr(model, method)(*args, **kwargs)
    except ModelError:
        raise
    except Exception as e:
        raise ModelError(
            f"model {model_name(model)}: {method}() raised {type(e).__name__}: {e}"
        ) from e


def _finite(a: Any) -> bool:
    """Whether every value of ``a`` is finite: one summing pass, and a precise
    look only when the sum is not (a sum may overflow)."""
    with np.errstate(over="ignore", invalid="ignore"):  # what is checked here
        if type(a) is np.ndarray:  # the common case, without the dispatch
            if math.isfinite(np.add.reduce(a, axis=None)):
                return True
            return bool(np.isfinite(a).all())
        xp = array_namespace(a)
        if bool(xp.isfinite(a.sum())):
            return True
        return bool(xp.isfinite(a).all())


def _is_array(a: Any) -> bool:
    return isinstance(a, np.ndarray) or (
        array_namespace(a) is not np and hasattr(a, "shape") and hasattr(a, "dtype")
    )


def check_arrays(
    model: Model,
    arrays: Any,
    source: str,
    *,
    expected: dict[str, Any] | None = None,
    factors: Iterable[str] = (),
    host: bool = False,
    batch: int | None = None,
    sparse: dict[str, Any] | None = None,
) -> None:
    """Check arrays a model made: the names of :meth:`Model.param_shapes`, each
    an array of its shape and dtype with finite values.

    A weight sent as rows (:class:`~dask_ftps.RowSparse`) is one that ``sparse``
    (:meth:`Model.sparse_rows` of the minibatch) names, with indices among
    those, and passes the server's checks.

    A weight sent as factors ``(B, m)`` and ``(B, n)`` has ``1 <= B <= batch``
    (one row per sample of the minibatch, or fewer), the same ``B`` as any other
    factored weight, and a product that cannot overflow: what the server
    accepts.

    Parameters
    ----------
    model
        The model that made them.
    arrays
        What it returned.
    source
        What made them, for messages (``"loss_and_grad()"``).
    expected
        The dtype each must have (default: :meth:`Model.param_dtypes`).
    factors
        Names that may be a :class:`~dask_ftps.Factored` of the parameter's shape.
    batch
        The minibatch's number of samples (the most rows factors may have).
    host
        Whether they must be NumPy arrays (the first parameters).

    Raises
    ------
    ModelError
        Naming the model, the parameter and what is wrong.
    """
    name = model_name(model)
    if not isinstance(arrays, dict):
        raise ModelError(
            f"model {name}: {source} must return a dict of parameter name to array, "
            f"got {type(arrays).__name__}"
        )
    shapes = model.param_shapes()
    missing, extra = set(shapes) - set(arrays), set(arrays) - set(shapes)
    if missing or extra:
        raise ModelError(
            f"model {name}: {source} returned the parameters {sorted(map(str, arrays))}"
            f", not those of param_shapes() {sorted(shapes)}: "
            + "; ".join(
                part
                for part in (
                    missing and f"missing {sorted(missing)}",
                    extra and f"extra {sorted(map(str, extra))}",
                )
                if part
            )
        )
    dtypes = expected if expected is not None else model.param_dtypes()
    factored = set(factors)
    rows: set[int] = set()
    for param, shape in shapes.items():
        value = arrays[param]
        parts = [value]
        if isinstance(value, RowSparse):
            _check_rows(name, source, param, value, shape, dtypes[param], sparse or {})
            continue
        if isinstance(value, Factored):
            if param not in factored:
                raise ModelError(
                    f"model {name}: {source} returned {param!r} as factors, which "
                    "only a weight named by factorable() and asked for may be"
                )
            parts = [value.u, value.v]
            if not all(_is_array(p) for p in parts):
                raise ModelError(
                    f"model {name}: {source} returned {param!r} as factors that are "
                    f"not arrays ({type(value.u).__name__}, {type(value.v).__name__})"
                )
            got_shape = (
                (value.u.shape[1:2] + value.v.shape[1:2])
                if (
                    value.u.ndim == value.v.ndim == 2
                    and value.u.shape[0] == value.v.shape[0]
                )
                else None
            )
        elif _is_array(value):
            got_shape = tuple(value.shape)
        else:
            raise ModelError(
                f"model {name}: {source} returned {type(value).__name__} for "
                f"{param!r}, not an array"
            )
        if host and not all(isinstance(p, np.ndarray) for p in parts):
            raise ModelError(
                f"model {name}: {source} must return NumPy arrays; {param!r} is a "
                f"{type(value).__name__}"
            )
        if got_shape is None or tuple(got_shape) != tuple(shape):
            raise ModelError(
                f"model {name}: {source} returned {param!r} of shape "
                f"{got_shape if got_shape is not None else 'mismatched factors'}, "
                f"expected {tuple(shape)}"
            )
        want = np.dtype(dtypes[param])
        for part in parts:
            if isinstance(part, np.ndarray):
                # What is pushed: a subclass's data as NumPy sees it (a masked
                # array's sum leaves out the values it masks).
                part = np.asarray(part)
            if np.dtype(part.dtype) != want:
                raise ModelError(
                    f"model {name}: {source} returned {param!r} as {part.dtype}, "
                    f"expected {want}"
                )
            if not _finite(part):
                raise ModelError(
                    f"model {name}: {source} returned NaN or infinite values in "
                    f"{param!r}"
                )
        if isinstance(value, Factored):
            rows.add(_check_factor_rows(name, source, param, value, batch))
    if len(rows) > 1:
        raise ModelError(
            f"model {name}: {source} returned factors with {sorted(rows)} rows: every "
            "factored weight of a minibatch has one row count"
        )


def _check_rows(
    name: str,
    source: str,
    param: str,
    value: RowSparse,
    shape: tuple[int, ...],
    dtype: Any,
    rows: dict[str, Any],
) -> None:
    """A weight's gradient sent as rows: named by the minibatch's
    :meth:`Model.sparse_rows`, among its rows, and what the server accepts."""
    if param not in rows:
        raise ModelError(
            f"model {name}: {source} returned {param!r} as rows, which only a "
            "weight named by sparse_rows() of the minibatch may be"
        )
    try:
        host = RowSparse(
            np.asarray(to_numpy(value.indices)),
            np.asarray(to_numpy(value.rows)),
            value.n_rows,
        )
    except (AttributeError, TypeError, ValueError) as e:
        raise ModelError(f"model {name}: {source} returned {param!r}: {e}") from None
    problem = sparse_problem(
        host,
        tuple(shape),
        np.dtype(dtype),
        f"model {name}: {source} returned {param!r}",
    )
    if problem:
        raise ModelError(problem)
    if not np.isin(host.indices, np.asarray(rows[param])).all():
        raise ModelError(
            f"model {name}: {source} returned rows of {param!r} that sparse_rows() "
            "did not name (the worker pulled only those)"
        )


def _check_factor_rows(
    name: str, source: str, param: str, value: Factored, batch: int | None
) -> int:
    """A factored weight's row count ``B`` (checked against ``batch``), and that
    its product cannot overflow (as the server checks it)."""
    u, v = value.u, value.v
    rows = int(u.shape[0])
    if not 1 <= rows <= (batch if batch is not None else rows):
        raise ModelError(
            f"model {name}: {source} returned {param!r} as factors of {rows} rows: "
            f"a minibatch of {batch} samples sends 1 to {batch} (one per sample)"
        )
    if may_overflow(u, v):
        raise ModelError(
            f"model {name}: {source} returned {param!r} as factors whose product may "
            "overflow float32"
        )
    return rows


def checked_sparse_rows(model: Model, X: Any) -> dict[str, np.ndarray]:
    """:meth:`Model.sparse_rows` of the minibatch ``X``, checked: a dict of
    matrix name to strictly increasing int32 or int64 NumPy row indices
    (empty for a model that does not declare it).

    Raises
    ------
    ModelError
        Naming the model and what is wrong.
    """
    if not has_sparse_rows(model):
        return {}
    rows = _call(model, "sparse_rows", X)
    if isinstance(rows, dict) and not rows:
        return rows
    try:
        return check_wanted(rows, model.param_shapes())
    except ValueError as e:
        raise ModelError(f"model {model_name(model)}: sparse_rows(): {e}") from None


def has_sparse_rows(model: Model) -> bool:
    """Whether ``model`` overrides :meth:`Model.sparse_rows`."""
    return type(model).sparse_rows is not Model.sparse_rows


def _read_only(params: dict[str, Any]) -> dict[str, Any]:
    """``params`` with each NumPy array a view that cannot be written through."""
    views = {}
    for param, value in params.items():
        if isinstance(value, np.ndarray):
            value = value.view()
            value.flags.writeable = False
        views[param] = value
    return views


def checked_loss_and_grad(
    model: Model,
    params: dict[str, Any],
    X: Any,
    y: Any,
    sample_weight: Any = None,
    factors: frozenset[str] = frozenset(),
    rows: dict[str, Any] | None = None,
) -> tuple[float, dict[str, Any], int]:
    """:meth:`Model.loss_and_grad`, what it returns checked: the worker's way
    to call a model (nothing it makes is pushed unless it passes).

    ``rows`` is the minibatch's :meth:`Model.sparse_rows` (asked here if not
    given): the weights that may come back as rows, and which rows.

    The model is given read-only views of NumPy parameters: they are the
    worker's model copy, and in an in-process cluster may be the server's own
    arrays, which a write into them would change unseen.

    Raises
    ------
    ModelError
        If it raised (a write into the parameters raises), or returned anything
        but a finite loss, a gradient of every parameter in its shape and dtype
        with finite values, and a count of right answers in ``[0, n]``.
    """
    kwargs = {"factors": factors} if factors else {}
    out = _call(
        model, "loss_and_grad", _read_only(params), X, y, sample_weight, **kwargs
    )
    if rows is None:
        rows = checked_sparse_rows(model, X)
    name = model_name(model)
    if not isinstance(out, tuple) or len(out) != 3:
        raise ModelError(
            f"model {name}: loss_and_grad() must return (loss, grads, n_correct), "
            f"got {type(out).__name__}"
        )
    loss, grads, n_correct = out
    try:
        if isinstance(loss, str | bytes):  # float() would parse it
            raise TypeError(loss)
        loss = float(loss)
    except (TypeError, ValueError, OverflowError):
        raise ModelError(
            f"model {name}: loss_and_grad() returned the loss {loss!r:.40}, not a "
            "number"
        ) from None
    if not np.isfinite(loss):
        raise ModelError(f"model {name}: loss_and_grad() returned the loss {loss}")
    check_arrays(
        model,
        grads,
        "loss_and_grad()",
        expected={k: v.dtype for k, v in params.items()},
        factors=factors,
        batch=int(y.shape[0]),
        sparse=rows,
    )
    n = int(y.shape[0])
    try:
        count = int(n_correct)
        exact = count == n_correct
    except (TypeError, ValueError, OverflowError):  # None, "3", nan, inf
        exact = False
    if not exact or not 0 <= count <= n:
        raise ModelError(
            f"model {name}: loss_and_grad() returned n_correct {n_correct!r:.40}, "
            f"not an integer in [0, {n}]"
        )
    return loss, grads, count
