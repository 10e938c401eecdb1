"""Multinomial logistic (softmax) regression."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._base import MODELS, _freeze_int
from ._dense import DenseStack


@MODELS.builtin
@dataclass(frozen=True)
class SoftmaxRegression(DenseStack):
    """Linear softmax classifier ``softmax(X @ W + b)``.

    Parameters
    ----------
    n_features : int
        Number of input features (> 0).
    n_classes : int
        Number of classes (>= 2).
    seed : int, default 0
        Seed for :meth:`init_params` (>= 0).
    """

    n_features: int
    n_classes: int
    seed: int = 0

    def __post_init__(self) -> None:
        _freeze_int(self, "n_features", 1)
        _freeze_int(self, "n_classes", 2)
        _freeze_int(self, "seed", 0)

    def _layers(self) -> list[tuple[str, str]]:
        return [("W", "b")]

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Return ``{"W": (n_features, n_classes), "b": (n_classes,)}``."""
        return {"W": (self.n_features, self.n_classes), "b": (self.n_classes,)}

    def init_params(self) -> dict[str, np.ndarray]:
        """Return float32 params: ``W`` ~ N(0, 0.01**2), ``b`` = 0."""
        rng = np.random.default_rng(self.seed)
        shapes = self.param_shapes()
        W = rng.standard_normal(shapes["W"], dtype=np.float32) * np.float32(0.01)
        return {"W": W, "b": np.zeros(shapes["b"], dtype=np.float32)}
