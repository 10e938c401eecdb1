from __future__ import annotations

import functools

import numpy as np
import pytest
from distributed.utils_test import cleanup, loop, loop_in_thread  # noqa: F401


@functools.cache
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits, scaled to [0, 1]: X_train, X_test, y_train, y_test."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X = (X / 16).astype(np.float32)
    return tuple(train_test_split(X, y, test_size=0.25, random_state=0, stratify=y))


@pytest.fixture
def digits_split():
    return digits()
