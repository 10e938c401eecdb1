"""Models: the :class:`Model` interface, and the dense stack that dask_ftps ships.

A model is a frozen dataclass of hyper-parameters; its parameters are dicts of
named arrays. Subclass :class:`Model` to train your own (see "Your own model"
in the docs).
"""

from __future__ import annotations

from dask_ftps._factored import Factored
from dask_ftps._sparse import RowSparse, rows_of
from dask_ftps._xp import array_namespace

from ._base import Model, model_from_dict
from ._check import check_model
from ._dense import DenseStack, dense_model
from ._mlp import MLP
from ._softmax import SoftmaxRegression

__all__ = [
    "MLP",
    "DenseStack",
    "Factored",
    "Model",
    "RowSparse",
    "SoftmaxRegression",
    "array_namespace",
    "check_model",
    "dense_model",
    "model_from_dict",
    "rows_of",
]
