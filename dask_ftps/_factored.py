"""Factored dense-layer updates (patent claim 11) and their fixed-bits product.

For one sample, the gradient of a dense layer's ``m x n`` weights is the outer
product of the layer's input (``m`` numbers) and the error at its output (``n``
numbers); for a minibatch of ``B`` samples it is ``U.T @ V`` with ``U`` of shape
``(B, m)`` and ``V`` of shape ``(B, n)``. A worker sends those two factors
instead of the ``m * n`` products when ``B * (m + n) < m * n``
(``ftps.update-format``), and the parameter server multiplies them out.

Replay must rebuild the served model bit for bit, on whatever machine and BLAS
it runs. A float32 matrix product does not promise that: its bits depend on
how the BLAS orders the sums (blocking, threads, SIMD width, FMA). So
:func:`product` computes ``U.T @ V`` in a way whose every step is exact or
elementwise: each factor is split into two slices of ``beta`` bits on a grid
fixed per column (the column's largest magnitude), so that every product of
slices is a sum of integers below ``2**53`` in float64, which any BLAS computes
exactly, in any order; the two slice products are added elementwise and
rounded once to float32. The result is the same bits everywhere. The slices
drop what lies more than ``2 * beta`` bits (about 42) below a column's largest
value: for columns whose magnitudes span less than about ``2**18`` the result
is within float32 rounding of the exact product (a float32 GEMM is about ten
times further off); an entry made only of a column's far smaller values loses
precision (see :func:`product`).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from dask_ftps._sparse import RowSparse
from dask_ftps._xp import array_namespace, to_numpy

__all__ = [
    "UPDATE_FORMATS",
    "Factored",
    "densify",
    "factor_pays",
    "merge_form",
    "prepare",
    "product",
    "replay_cost",
    "to_host",
    "update_nbytes",
    "use_factors",
]

UpdateFormat = Literal["auto", "dense", "factored"]
#: Values of ``ftps.update-format``: factors where smaller, never, or always.
UPDATE_FORMATS: tuple[str, ...] = ("auto", "dense", "factored")

#: float64 elements of each partial product (rows of the result at a time): two
#: buffers of this size are reused for every block of rows.
_BLOCK_ELEMENTS = 1 << 19
#: The GEMM of the slices: any BLAS gives the same exact sums.
_matmul = np.matmul


@dataclass(frozen=True, eq=False)
class Factored:
    """The update of an ``m x n`` weight matrix as the product ``u.T @ v``.

    Parameters
    ----------
    u : array of shape (B, m)
        The layer's inputs of the minibatch's ``B`` samples.
    v : array of shape (B, n)
        The loss gradient at the layer's outputs of the same samples.
    """

    u: Any
    v: Any

    @property
    def batch(self) -> int:
        """``B``, the number of samples (rows of both factors)."""
        return int(self.u.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """The shape of the weight matrix this updates: ``(m, n)``."""
        return (int(self.u.shape[1]), int(self.v.shape[1]))

    @property
    def size(self) -> int:
        """Numbers sent: ``B * (m + n)``."""
        return int(self.u.size + self.v.size)

    @property
    def nbytes(self) -> int:
        return int(self.u.nbytes + self.v.nbytes)

    def dense(self) -> np.ndarray:
        """The ``m x n`` float32 update, computed by :func:`product` (now, or
        already, by a thread that :func:`prepare` started: the same bits)."""
        with _prepared_lock:
            future = _prepared.pop(self, None)
        if future is not None:
            try:
                return future.result()
            except CancelledError:  # its replay ended first (a sync round open)
                pass
        return product(self.u, self.v)


#: Products started ahead of their use (:func:`prepare`), by update; an entry
#: goes with its update if nobody asks for it (a replay that stopped early).
_prepared: weakref.WeakKeyDictionary[Factored, Future] = weakref.WeakKeyDictionary()
_prepared_lock = threading.Lock()


def prepare(grads: dict[str, Any], submit: Callable[..., Future]) -> int:
    """Start multiplying out the :class:`Factored` entries of ``grads`` now,
    with ``submit(func, *args)`` (an executor's): their :meth:`Factored.dense`
    then waits for that result instead of computing it. A replay calls this on
    updates it has read but not yet merged, so that the products, which do not
    depend on the model, are computed while the updates before them merge.

    Returns
    -------
    int
        The products started.
    """
    started = 0
    for g in grads.values():
        if isinstance(g, Factored):
            with _prepared_lock:
                if g in _prepared:
                    continue
                _prepared[g] = submit(product, g.u, g.v)
            started += 1
    return started


#: Samples of a factored update whose product costs one dense merge of the same
#: matrix: the product of ``B`` samples is ``3 B`` float64 multiply-adds an
#: element; measured on a 2-core AMD EPYC at 1e6 parameters, 64 samples took
#: about 7 ms in one thread, an SGD-with-momentum merge about 2.5 ms.
_PRODUCT_SAMPLES_PER_MERGE = 24


def replay_cost(grads: dict[str, Any]) -> float:
    """What merging ``grads`` again costs a replay, in parameters merged: a dense
    array counts its size; a factored one its matrix's size times ``1 + B / 24``
    (the fixed-bits product of ``B`` samples, then the merge); a row-sparse one
    the values of its rows. A server that
    snapshots when the cost accumulated since its last snapshot passes a budget
    bounds the time a restart spends replaying, whatever the update kinds.

    Examples
    --------
    >>> g = {"W": Factored(np.ones((48, 100), np.float32), np.ones((48, 10), np.float32))}
    >>> replay_cost(g), replay_cost({"W": np.ones((100, 10), np.float32)})
    (3000.0, 1000.0)
    """
    cost = 0.0
    for g in grads.values():
        if isinstance(g, Factored):
            m, n = g.shape
            cost += m * n * (1.0 + g.batch / _PRODUCT_SAMPLES_PER_MERGE)
        elif isinstance(g, RowSparse):  # its rows, merged in place
            cost += float(g.rows.size)
        else:
            cost += float(np.size(g))
    return cost


def may_overflow(u: Any, v: Any) -> bool:
    """Whether the float32 product ``u.T @ v`` of factors ``(B, m)`` and
    ``(B, n)`` may overflow: ``|u.T @ v| <= B * max|u| * max|v|`` (NumPy or
    CuPy factors)."""
    xp = array_namespace(u, v)
    bound = u.shape[0] * float(xp.abs(u).max()) * float(xp.abs(v).max())
    return not bound <= float(np.finfo(np.float32).max)


def factor_pays(batch: int, shape: tuple[int, ...]) -> bool:
    """Whether ``batch`` samples' factors are smaller than the dense update.

    Examples
    --------
    >>> factor_pays(16, (256, 256)), factor_pays(256, (256, 256))
    (True, False)
    """
    return len(shape) == 2 and batch * (shape[0] + shape[1]) < shape[0] * shape[1]


def use_factors(
    update_format: str, batch: int, shape: tuple[int, ...], dtype: Any
) -> bool:
    """Whether a weight of ``shape`` and ``dtype`` is sent factored.

    ``"auto"`` factors where that is smaller, ``"factored"`` every float32
    matrix, ``"dense"`` nothing.
    """
    if update_format not in UPDATE_FORMATS:
        raise ValueError(
            f"ftps.update-format must be one of {UPDATE_FORMATS}, got {update_format!r}"
        )
    if len(shape) != 2 or np.dtype(dtype) != np.float32 or update_format == "dense":
        return False
    return update_format == "factored" or factor_pays(batch, shape)


def slice_bits(batch: int) -> int:
    """Bits per slice: ``batch * 2 ** (2 * bits) <= 2 ** 53`` (exact float64 sums).

    Examples
    --------
    >>> slice_bits(16), slice_bits(256), slice_bits(1024)
    (24, 22, 21)
    """
    return (53 - (batch - 1).bit_length()) // 2


def _slices(a: np.ndarray, bits: int, first: np.ndarray, second: np.ndarray) -> None:
    """Write two float64 slices of ``a`` on grids fixed per column.

    With ``2 ** e`` above a column's largest magnitude, ``first`` gets the
    multiples of ``2 ** (e - bits)`` nearest ``a`` (integers up to
    ``2 ** bits`` in those units), ``second`` what remains, rounded to
    multiples of ``2 ** (e - 2 * bits)``: at most ``2 ** (bits - 1)`` units.
    Multiplying by powers of two (within float64's range here) and ``rint``
    are exact.
    """
    _, e = np.frexp(np.abs(a).max(axis=0))
    up = np.ldexp(1.0, bits - e)  # 1 / unit of the first slice, per column
    down = np.ldexp(1.0, e - bits)
    np.multiply(a, up, out=first)
    np.rint(first, out=first)
    first *= down
    np.subtract(a, first, out=second)  # exact: at most half a unit
    up *= 2.0**bits
    down *= 2.0**-bits
    second *= up
    np.rint(second, out=second)
    second *= down


def product(u: Any, v: Any) -> np.ndarray:
    """``u.T @ v`` as float32, the same bits on every machine and BLAS.

    Parameters
    ----------
    u : array of shape (B, m)
        float32 factor (NumPy, or CuPy: moved to the host first).
    v : array of shape (B, n)
        float32 factor.

    Returns
    -------
    ndarray of float32, shape (m, n)

    Notes
    -----
    ``u1 @ v1`` and ``u1 @ v2 + u2 @ v1`` (one product over ``2 B`` rows) are
    sums of at most ``B * 2 ** (2 * bits) <= 2 ** 53`` units of one size, so
    float64 holds every partial sum exactly, whatever order a BLAS adds them
    in; their elementwise sum is rounded once to float64 and once to float32.
    (The one thing a BLAS may still choose is the sign of an exact zero: the
    result's zeros are made ``+0``.)
    Leaving out ``u2 @ v2`` and what lies below the second slices changes the
    result by at most about ``B * 2 ** (1 - 2 * bits)`` times the product of
    the two columns' largest magnitudes: below float32 rounding when the
    columns' magnitudes span less than about ``2 ** 18``; beyond that, an
    entry made of a column's small values only keeps less precision than a
    float32 GEMM would give it (absolute error still about ``2 ** -43`` of the
    columns' largest products).
    """
    u, v = np.asarray(to_numpy(u)), np.asarray(to_numpy(v))
    if u.dtype != np.float32 or v.dtype != np.float32:
        raise ValueError(f"factors must be float32, got {u.dtype} and {v.dtype}")
    if u.ndim != 2 or v.ndim != 2 or u.shape[0] != v.shape[0] or u.shape[0] < 1:
        raise ValueError(
            f"factors must be (B, m) and (B, n) with B >= 1, got {u.shape} and {v.shape}"
        )
    u, v = u.astype(np.float64), v.astype(np.float64)
    batch, m = u.shape
    n = v.shape[1]
    bits = slice_bits(batch)
    left = np.empty((2 * batch, m))  # rows: u1 then u2
    right = np.empty((2 * batch, n))  # rows: v2 then v1 (the cross terms)
    _slices(u, bits, left[:batch], left[batch:])
    _slices(v, bits, right[batch:], right[:batch])
    v1 = right[batch:]
    # The left factors transposed and contiguous: a block of the result's rows
    # is a contiguous block of theirs, multiplied into two buffers reused for
    # every block (no fresh pages per block, one pass of each sum per block).
    cross = np.ascontiguousarray(left.T)  # (m, 2B): u1.T beside u2.T
    first = cross[:, :batch]
    out = np.empty((m, n), np.float32)
    rows = max(1, min(m, _BLOCK_ELEMENTS // max(n, 1)))
    whole = np.empty((rows, n))
    part = np.empty((rows, n))
    for start in range(0, m, rows):
        stop = min(m, start + rows)
        a, c = whole[: stop - start], part[: stop - start]
        _matmul(first[start:stop], v1, out=a)  # u1.T @ v1, exact
        _matmul(cross[start:stop], right, out=c)  # u1.T @ v2 + u2.T @ v1, exact
        a += c  # rounded once to float64
        a += 0.0  # an exact zero is +0 whatever sign a BLAS gave its sum
        out[start:stop] = a  # rounded to float32
    return out


def densify(grads: dict[str, Any]) -> dict[str, np.ndarray]:
    """``grads`` with every :class:`Factored` entry multiplied out and every
    :class:`~dask_ftps.RowSparse` one made whole."""
    return {
        name: g.dense() if isinstance(g, Factored | RowSparse) else g
        for name, g in grads.items()
    }


def merge_form(grads: dict[str, Any]) -> dict[str, Any]:
    """``grads`` as an optimizer merges them: factors multiplied out, rows kept."""
    return {
        name: g.dense() if isinstance(g, Factored) else g for name, g in grads.items()
    }


def to_host(grads: dict[str, Any]) -> dict[str, Any]:
    """``grads`` in host memory (NumPy), factors kept factored and rows as rows."""
    return {
        name: Factored(to_numpy(g.u), to_numpy(g.v))
        if isinstance(g, Factored)
        else g.to_host()
        if isinstance(g, RowSparse)
        else to_numpy(g)
        for name, g in grads.items()
    }


def update_nbytes(grads: dict[str, Any]) -> int:
    """The bytes an update's payload takes (factors and rows counted as sent)."""
    return sum(int(g.nbytes) for g in grads.values())
