"""Row-sparse updates: the weight gradient of a layer whose input is sparse.

A minibatch of sparse samples (hashed text, click logs) reads only the rows of
the first layer's weights that its nonzero features name, and its gradient is
zero everywhere else. A worker sends that gradient as :class:`RowSparse`, the
row indices and the rows, instead of the whole ``m x n`` matrix; it pulls only
the rows its next minibatches read (:func:`check_wanted`), and the parameter
server merges the rows it was sent (:func:`apply_rows`) and journals them in
that form (a row-sparse entry of a payload row, :mod:`dask_ftps._layout`).

Optimizers merge a row-sparse update as follows:

- SGD without momentum: exactly as the dense update with zeros elsewhere (a row
  that is not sent does not change: ``p - lr * 0 == p``).
- SGD with momentum and Adam: their *lazy* forms. The velocity (or the moments)
  of a row advance only when an update touches that row; untouched rows keep
  their state and value, where the dense form would decay the state and keep
  moving the row. Adam's bias correction uses the model version (the global
  step), as TensorFlow's ``LazyAdam`` does.

A replay merges the same rows with the same code, so the rebuilt model equals
the served one bit for bit whatever the form.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

from dask_ftps._xp import to_numpy

__all__ = [
    "MAX_ROW_INDEX",
    "RowSparse",
    "apply_rows",
    "check_rows",
    "check_wanted",
    "index_problem",
    "is_sparse",
    "mean_rows",
    "rows_of",
    "sparse_problem",
]

#: Row indices are stored as int32: a matrix of more rows is sent dense.
MAX_ROW_INDEX = (1 << 31) - 1


@dataclass(frozen=True, eq=False)
class RowSparse:
    """The update of an ``(n_rows, n)`` matrix that is zero outside ``indices``.

    Parameters
    ----------
    indices : array of int, shape (k,)
        The rows it changes, strictly increasing, in ``[0, n_rows)``.
    rows : array of shape (k, n)
        Row ``i`` is the update of row ``indices[i]``.
    n_rows : int
        The number of rows of the matrix (``m``).

    Examples
    --------
    >>> g = RowSparse(np.array([1, 3]), np.ones((2, 2), np.float32), 4)
    >>> g.shape, g.size
    ((4, 2), 6)
    >>> g.dense()[:, 0]
    array([0., 1., 0., 1.], dtype=float32)
    """

    indices: Any
    rows: Any
    n_rows: int

    @property
    def shape(self) -> tuple[int, int]:
        """The shape of the matrix this updates: ``(n_rows, n)``."""
        return (int(self.n_rows), int(self.rows.shape[1]))

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.rows.dtype)

    @property
    def k(self) -> int:
        """The number of rows sent."""
        return int(self.indices.shape[0])

    @property
    def size(self) -> int:
        """Numbers sent: the indices and the rows' values."""
        return int(self.indices.size + self.rows.size)

    @property
    def nbytes(self) -> int:
        return int(self.indices.nbytes + self.rows.nbytes)

    def dense(self) -> np.ndarray:
        """The whole ``(n_rows, n)`` update (zeros outside ``indices``), on the host."""
        rows = np.asarray(to_numpy(self.rows))
        out = np.zeros(self.shape, rows.dtype)
        out[np.asarray(to_numpy(self.indices))] = rows
        return out

    def to_host(self) -> RowSparse:
        """The same update in host memory, its indices as int32 (as stored)."""
        return RowSparse(
            np.ascontiguousarray(to_numpy(self.indices), dtype=np.int32),
            np.ascontiguousarray(to_numpy(self.rows)),
            int(self.n_rows),
        )


def is_sparse(X: Any) -> bool:
    """Whether ``X`` is a SciPy sparse matrix or array (without importing SciPy)."""
    return hasattr(X, "tocsr") and hasattr(X, "nnz")


def rows_of(X: Any) -> np.ndarray:
    """The sorted distinct columns that hold a nonzero in sparse ``X``: the rows
    of a first layer's weights a minibatch ``X`` reads (int32).

    Examples
    --------
    >>> import scipy.sparse as sp
    >>> rows_of(sp.csr_matrix(np.array([[0, 1, 0, 2], [0, 3, 0, 0]])))
    array([1, 3], dtype=int32)
    """
    if is_sparse(X):
        X = X.tocsr()  # may be X itself: not changed here
        return np.unique(X.indices[X.data != 0]).astype(np.int32, copy=False)
    X = np.asarray(to_numpy(X))
    return np.flatnonzero((X != 0).any(axis=0)).astype(np.int32)


def index_problem(indices: Any, n_rows: int, what: str) -> str | None:
    """What is wrong with ``indices`` as the rows of a matrix of ``n_rows`` rows
    (None: nothing). Compared, never subtracted: no arithmetic can wrap."""
    if type(indices) is not np.ndarray or indices.ndim != 1:
        return f"{what}: the row indices must be a 1-d NumPy array"
    if indices.dtype not in (np.dtype(np.int32), np.dtype(np.int64)):
        return f"{what}: the row indices must be int32 or int64, not {indices.dtype}"
    if indices.size > n_rows:
        return f"{what}: {indices.size} row indices for a matrix of {n_rows} rows"
    if indices.size and (int(indices.min()) < 0 or int(indices.max()) >= n_rows):
        return f"{what}: a row index lies outside [0, {n_rows})"
    if indices.size > 1 and not bool((indices[1:] > indices[:-1]).all()):
        return f"{what}: the row indices must be strictly increasing (no repeats)"
    return None


def sparse_problem(
    g: Any, shape: tuple[int, ...], dtype: np.dtype, what: str
) -> str | None:
    """What is wrong with ``g`` as a :class:`RowSparse` update of a parameter of
    ``shape`` and ``dtype`` (None: nothing). The one check of the kind: the
    server's (:class:`~dask_ftps.InvalidUpdate`) and the model check's
    (:class:`~dask_ftps.ModelError`)."""
    if type(g) is not RowSparse:
        return f"{what}: a {type(g).__name__}, not a RowSparse"
    if not all(hasattr(g, a) for a in ("indices", "rows", "n_rows")):
        return f"{what}: a RowSparse without its indices, rows or n_rows"
    if len(shape) != 2 or np.dtype(dtype) != np.float32:
        return f"{what}: only a float32 matrix can be sent as rows"
    if shape[0] > MAX_ROW_INDEX + 1:
        return f"{what}: a matrix of more than 2**31 rows cannot be sent as rows"
    n_rows = g.n_rows
    if isinstance(n_rows, bool) or not isinstance(n_rows, numbers.Integral):
        return f"{what}: n_rows must be an int"
    if int(n_rows) != shape[0]:
        return (
            f"{what}: rows of a matrix of {n_rows} rows, the parameter has {shape[0]}"
        )
    problem = index_problem(g.indices, shape[0], what)
    if problem:
        return problem
    rows = g.rows
    if type(rows) is not np.ndarray or rows.dtype != np.float32:
        return f"{what}: the rows must be a float32 NumPy array"
    if rows.shape != (g.indices.shape[0], shape[1]):
        return (
            f"{what}: rows of shape {rows.shape} for {g.indices.shape[0]} indices of "
            f"a matrix of width {shape[1]}"
        )
    if not np.isfinite(rows).all():
        return f"{what}: holds NaN or Inf"
    return None


def check_rows(g: Any, shape: tuple[int, ...], dtype: np.dtype, what: str) -> RowSparse:
    """``g`` checked by :func:`sparse_problem` (ValueError), its indices as int32."""
    problem = sparse_problem(g, shape, dtype, what)
    if problem:
        raise ValueError(problem)
    return RowSparse(g.indices.astype(np.int32, copy=False), g.rows, int(g.n_rows))


def check_wanted(
    wanted: object, shapes: dict[str, tuple[int, ...]]
) -> dict[str, np.ndarray]:
    """A pull's ``rows``: which rows of which matrices the worker asks for.

    Parameters
    ----------
    wanted
        A dict of parameter name to strictly increasing row indices (int32 or
        int64 NumPy arrays): at most a matrix's rows each.
    shapes
        The model's parameter shapes.

    Raises
    ------
    ValueError
        Naming what is wrong.
    """
    if not isinstance(wanted, dict) or not wanted or len(wanted) > len(shapes):
        raise ValueError("rows must be a non-empty dict of matrix name to indices")
    out = {}
    for name, indices in wanted.items():
        shape = shapes.get(name) if type(name) is str else None
        if shape is None or len(shape) != 2:
            # str.__getitem__: a plain str, whatever a subclass's __str__ does
            shown = str.__getitem__(name, slice(80)) if isinstance(name, str) else ""
            raise ValueError(
                f"rows names {shown!r} (a {type(name).__name__}), not a matrix of "
                "the model"
            )
        problem = index_problem(indices, shape[0], f"rows of {name}")
        if problem:
            raise ValueError(problem)
        out[name] = indices
    return out


def mean_rows(updates: list[RowSparse]) -> RowSparse:
    """The mean of row-sparse updates of one matrix, over the union of their
    rows: the same bits as the mean of their dense forms on those rows (the
    first is copied, the others added in order, then divided by their count).
    """
    if len(updates) == 1:
        return updates[0]
    union = np.unique(np.concatenate([u.indices for u in updates]))
    acc = np.zeros((union.size, updates[0].shape[1]), updates[0].rows.dtype)
    first = updates[0]
    acc[np.searchsorted(union, first.indices)] = first.rows
    covered = np.zeros(union.size, np.int64)  # by the updates after the first
    for u in updates[1:]:
        at = np.searchsorted(union, u.indices)
        acc[at] += u.rows
        covered[at] += 1
    # The dense sum adds a zero where an update lacks a row: -0.0 becomes +0.0.
    acc[covered < len(updates) - 1] += 0.0
    acc /= len(updates)
    return RowSparse(union.astype(np.int32), acc, first.n_rows)


def apply_rows(
    update: Any,
    p: np.ndarray,
    g: RowSparse,
    slots: list[np.ndarray],
    step: int,
    lr: float,
    inplace: bool,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Merge a row-sparse ``g`` into ``p`` and its optimizer ``slots``: the
    optimizer's own ``update(p, g, slots, step, lr, inplace)`` on the rows
    ``g`` names only (the lazy form; see the module's docstring).

    With ``inplace`` the rows are written into ``p`` and ``slots``; otherwise
    into copies (the served model is never changed under its readers).
    """
    idx = g.indices
    new_rows, new_slots = update(
        p[idx], g.rows.astype(p.dtype, copy=False), [s[idx] for s in slots],
        step, lr, True,
    )  # fmt: skip
    if not inplace:
        p = p.copy()
        slots = [s.copy() for s in slots]
    p[idx] = new_rows
    for s, rows in zip(slots, new_slots, strict=True):
        s[idx] = rows
    return p, slots
