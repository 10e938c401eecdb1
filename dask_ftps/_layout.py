"""Flat float32 vectors for parameter dicts: one Zarr chunk per update or snapshot."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


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

    def flatten(self, arrays: dict[str, np.ndarray], out: np.ndarray | None = None):
        """Pack ``arrays`` into a new (or the given) float32 vector."""
        flat = np.empty(self.size, np.float32) if out is None else out
        offset = 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            n = math.prod(shape)
            flat[offset : offset + n] = np.asarray(arrays[name]).reshape(-1)
            offset += n
        return flat

    def unflatten(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """Views of ``flat`` with the layout's names and shapes."""
        out = {}
        offset = 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            n = math.prod(shape)
            out[name] = flat[offset : offset + n].reshape(shape)
            offset += n
        return out
