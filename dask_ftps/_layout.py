"""Flat float32 vectors for parameter dicts: one Zarr chunk per update or snapshot.

An update's row is its arrays in the layout's order; a weight sent factored
(:class:`~dask_ftps.Factored`) takes its two factors' place, ``u`` then ``v``;
one sent as rows (:class:`~dask_ftps.RowSparse`) its ``k`` row indices (int32,
their bits stored as they are in float32 slots) then its ``k`` rows. A row's
:data:`RowFormat` says which entries are factored and with how many samples,
and which are rows and how many, which is all a reader needs to cut the row
again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dask_ftps._factored import Factored
from dask_ftps._sparse import RowSparse, index_problem

#: ``(batch, factored, sparse)``: the entries at ``factored`` (of the layout's
#: names) are factored, each with ``batch`` samples; each ``(i, k)`` of
#: ``sparse`` says entry ``i`` is ``k`` rows; ``(0, (), ())`` is a dense row.
RowFormat = tuple[int, tuple[int, ...], tuple[tuple[int, int], ...]]
DENSE: RowFormat = (0, (), ())


@dataclass(frozen=True)
class Layout:
    """Names and shapes of the arrays packed, in order, into one flat vector."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, arrays: dict[str, np.ndarray]) -> Layout:
        return cls(tuple(arrays), tuple(tuple(a.shape) for a in arrays.values()))

    @property
    def size(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    def row_format(self, arrays: dict) -> RowFormat:
        """The format of an update's row (its factored entries share a batch)."""
        factored = tuple(
            i for i, name in enumerate(self.names) if isinstance(arrays[name], Factored)
        )
        sparse = tuple(
            (i, arrays[name].k)
            for i, name in enumerate(self.names)
            if isinstance(arrays[name], RowSparse)
        )
        batch = arrays[self.names[factored[0]]].batch if factored else 0
        return (batch, factored, sparse)

    def row_size(self, fmt: RowFormat = DENSE) -> int:
        """Values in a row of format ``fmt``.

        Raises
        ------
        ValueError
            If ``fmt`` names entries that are not matrices, or is malformed.
        """
        batch, factored, sparse = fmt
        rows = dict(sparse)
        if (
            factored
            and (
                batch < 1
                or list(factored) != sorted(set(factored))
                or not all(0 <= i < len(self.shapes) for i in factored)
                or any(len(self.shapes[i]) != 2 for i in factored)
            )
        ) or (
            sparse
            and (
                [i for i, _ in sparse] != sorted(rows)
                or len(rows) != len(sparse)
                or not all(0 <= i < len(self.shapes) for i in rows)
                or any(len(self.shapes[i]) != 2 for i in rows)
                or any(not 0 <= k <= self.shapes[i][0] for i, k in sparse)
                or set(rows) & set(factored)
            )
        ):
            raise ValueError(f"row format {fmt!r} does not fit the layout")
        return sum(
            batch * sum(shape)
            if i in factored
            else rows[i] * (1 + shape[1])
            if i in rows
            else math.prod(shape)
            for i, shape in enumerate(self.shapes)
        )

    def flatten(self, arrays: dict, out: np.ndarray | None = None) -> np.ndarray:
        """Pack ``arrays`` (factored entries as their factors) into a new (or the
        given) float32 vector of :meth:`row_size` values."""
        fmt = self.row_format(arrays)
        flat = np.empty(self.row_size(fmt), np.float32) if out is None else out
        offset = 0
        for name in self.names:
            a = arrays[name]
            if isinstance(a, RowSparse):
                k = a.k
                indices = np.asarray(a.indices).astype("<i4", copy=False)
                flat[offset : offset + k] = indices.view("<f4")  # the bits
                offset += k
                parts: tuple = (a.rows,)
            else:
                parts = (a.u, a.v) if isinstance(a, Factored) else (a,)
            for part in parts:
                part = np.asarray(part)
                flat[offset : offset + part.size] = part.reshape(-1)
                offset += part.size
        return flat

    def unflatten(self, flat: np.ndarray, fmt: RowFormat = DENSE) -> dict:
        """Views of ``flat`` with the layout's names and shapes (factored entries
        of ``fmt`` as :class:`~dask_ftps.Factored` views, row entries as
        :class:`~dask_ftps.RowSparse` ones).

        Raises
        ------
        ValueError
            If a row entry's indices are not strictly increasing row numbers.
        """
        batch, factored, sparse = fmt
        rows = dict(sparse)
        out: dict = {}
        offset = 0
        for i, (name, shape) in enumerate(zip(self.names, self.shapes, strict=True)):
            if i in rows:
                k, n = rows[i], shape[1]
                indices = flat[offset : offset + k].view("<i4")
                problem = index_problem(indices, shape[0], f"the rows of {name}")
                if problem:  # a row a checksum vouches for, but not this code's
                    raise ValueError(problem)
                offset += k
                values = flat[offset : offset + k * n].reshape(k, n)
                offset += k * n
                out[name] = RowSparse(indices, values, shape[0])
            elif i in factored:
                m, n = shape
                u = flat[offset : offset + batch * m].reshape(batch, m)
                offset += batch * m
                v = flat[offset : offset + batch * n].reshape(batch, n)
                offset += batch * n
                out[name] = Factored(u, v)
            else:
                size = math.prod(shape)
                out[name] = flat[offset : offset + size].reshape(shape)
                offset += size
        return out
