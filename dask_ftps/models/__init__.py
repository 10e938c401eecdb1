"""Model specs: hyper-parameters only; parameters are dicts of arrays."""

from __future__ import annotations

from ._base import Model, model_from_dict
from ._mlp import MLP
from ._softmax import SoftmaxRegression

__all__ = ["MLP", "Model", "SoftmaxRegression", "model_from_dict"]
