"""Array-namespace dispatch between NumPy and (optional) CuPy.

CuPy is never imported at module import time: an array can only be a
``cupy.ndarray`` if the caller already imported CuPy, so detection looks at
``sys.modules``.
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any

import numpy as np

__all__ = ["DEVICES", "array_namespace", "gpu_available", "to_namespace", "to_numpy"]

#: Values of ``ftps.device``: where workers compute gradients.
DEVICES: tuple[str, ...] = ("auto", "cpu", "gpu")


def _cupy_if_loaded() -> ModuleType | None:
    return sys.modules.get("cupy")


def _is_cupy_array(a: Any) -> bool:
    cp = _cupy_if_loaded()
    return cp is not None and isinstance(a, cp.ndarray)


def array_namespace(*arrays: Any) -> ModuleType:
    """Return the array module for ``arrays``.

    Parameters
    ----------
    *arrays : array-like
        Arrays to inspect.

    Returns
    -------
    module
        ``cupy`` if any argument is a ``cupy.ndarray``, else ``numpy``.
    """
    cp = _cupy_if_loaded()
    if cp is not None and any(isinstance(a, cp.ndarray) for a in arrays):
        return cp
    return np


def gpu_available() -> bool:
    """Return True if CuPy imports and reports a usable GPU."""
    try:
        import cupy

        return bool(cupy.is_available())
    except Exception:  # noqa: BLE001 - ImportError, CUDA runtime errors, ...
        return False


def to_numpy(a: Any) -> np.ndarray:
    """Return ``a`` as a NumPy array (copying device arrays to the host)."""
    if _is_cupy_array(a):
        return a.get()
    return np.asarray(a)


def to_namespace(arrays: dict[str, Any], xp: ModuleType) -> dict[str, Any]:
    """Move a dict of arrays to the namespace ``xp``.

    Parameters
    ----------
    arrays : dict of str to array
        Arrays to move.
    xp : module
        ``numpy`` or ``cupy``.

    Returns
    -------
    dict
        A new dict with the same keys; NumPy arrays already in place are not
        copied.
    """
    if xp is np:
        return {k: to_numpy(v) for k, v in arrays.items()}
    return {k: xp.asarray(v) for k, v in arrays.items()}
