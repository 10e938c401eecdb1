"""Multi-layer perceptron with ReLU hidden layers and a softmax output."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import numpy as np

from ._base import MODELS, _check_int, _freeze_int
from ._dense import DenseStack


@MODELS.builtin
@dataclass(frozen=True)
class MLP(DenseStack):
    """Dense ReLU network trained with softmax cross-entropy.

    Parameters
    ----------
    n_features : int
        Number of input features (> 0).
    hidden : tuple of int, default (128,)
        Hidden layer widths (each > 0); a list is converted to a tuple.
    n_classes : int, default 2
        Number of classes (>= 2).
    seed : int, default 0
        Seed for :meth:`init_params` (>= 0).
    """

    n_features: int
    hidden: tuple[int, ...] = (128,)
    n_classes: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        _freeze_int(self, "n_features", 1)
        _freeze_int(self, "n_classes", 2)
        _freeze_int(self, "seed", 0)
        h = self.hidden
        if isinstance(h, (str, bytes)) or not hasattr(h, "__iter__"):
            raise ValueError(f"hidden must be a sequence of ints, got {h!r}")
        hidden = tuple(_check_int(f"hidden[{i}]", v, 1) for i, v in enumerate(h))
        object.__setattr__(self, "hidden", hidden)

    def _layers(self) -> list[tuple[str, str]]:
        return [(f"W{i}", f"b{i}") for i in range(len(self.hidden) + 1)]

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Return ``{"W0": ..., "b0": ..., "W1": ..., ...}`` layer by layer."""
        sizes = (self.n_features, *self.hidden, self.n_classes)
        shapes: dict[str, tuple[int, ...]] = {}
        for i, (fan_in, fan_out) in enumerate(pairwise(sizes)):
            shapes[f"W{i}"] = (fan_in, fan_out)
            shapes[f"b{i}"] = (fan_out,)
        return shapes

    def init_params(self) -> dict[str, np.ndarray]:
        """Return float32 params: He-normal weights, zero biases."""
        rng = np.random.default_rng(self.seed)
        params: dict[str, np.ndarray] = {}
        for name, shape in self.param_shapes().items():
            if name.startswith("W"):
                std = np.float32(np.sqrt(2.0 / shape[0]))
                params[name] = rng.standard_normal(shape, dtype=np.float32) * std
            else:
                params[name] = np.zeros(shape, dtype=np.float32)
        return params
