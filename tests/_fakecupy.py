"""A stand-in for CuPy, on NumPy: runs the device code path without a GPU.

Its arrays are a NumPy subclass, so every NumPy function works on them and
keeps the subclass; ``asarray`` is the upload and ``ndarray.get()`` the
download, and both are counted. Installed as ``sys.modules["cupy"]``, it is
what ``dask_ftps`` takes for CuPy (``ftps.device: gpu`` imports it); no CuPy
code of ours is special-cased for it.
"""

from __future__ import annotations

import types
from collections import Counter

import numpy as np

calls: Counter = Counter()


class ndarray(np.ndarray):
    """An array "on the device"."""

    def get(self) -> np.ndarray:
        calls["get"] += 1
        return np.array(self, copy=True).view(np.ndarray)


def asarray(a, dtype=None) -> ndarray:
    if not isinstance(a, ndarray):
        calls["asarray"] += 1
    return np.asarray(a, dtype=dtype).view(ndarray)


def ascontiguousarray(a, dtype=None) -> ndarray:
    return np.ascontiguousarray(a, dtype=dtype).view(ndarray)


def is_available() -> bool:
    return True


def module() -> types.ModuleType:
    """A fresh ``cupy`` module: NumPy's names, with the device array type."""
    fake = types.ModuleType("cupy")
    fake.__dict__.update(
        {k: getattr(np, k) for k in dir(np) if not k.startswith("_")},
    )
    fake.ndarray = ndarray
    fake.asarray = asarray
    fake.ascontiguousarray = ascontiguousarray
    fake.is_available = is_available
    fake.calls = calls
    return fake
