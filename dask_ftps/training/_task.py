"""The task ``train()`` trains a model for: classification into ``n_classes``
classes, read through the model interface."""

from __future__ import annotations

import logging
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from dask_ftps._exceptions import InvalidRequest
from dask_ftps.models import Model

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Classification:
    """Classification into a model's ``n_classes`` classes: what ``train()``
    checks its data against, and how it scores a model. The one place outside
    :mod:`dask_ftps.models` that reads the model's ``n_classes`` and (optional)
    ``n_features``.

    Attributes
    ----------
    n_classes
        Labels are integers in ``[0, n_classes)``.
    n_features
        The number of features a sample has, or None where the model does not
        say (the model checks its input itself).
    """

    n_classes: int
    n_features: int | None = None

    @classmethod
    def of(cls, model: Model) -> Classification:
        """The task of ``model`` (checked by :func:`~dask_ftps.models.check_model`)."""
        n_features = getattr(model, "n_features", None)
        return cls(
            int(model.n_classes), None if n_features is None else int(n_features)
        )

    def check_features(self, n_features: int, what: str) -> None:
        """Refuse data whose samples have another number of features."""
        if self.n_features is not None and n_features != self.n_features:
            raise InvalidRequest(
                f"{what} has {n_features} features, the server's model expects "
                f"{self.n_features}"
            )

    def check_labels(self, low: int, high: int, what: str) -> None:
        """Refuse labels (lowest ``low``, highest ``high``) outside the classes."""
        if low < 0 or high >= self.n_classes:
            bad = low if low < 0 else high
            raise InvalidRequest(
                f"{what} holds the label {bad}, but the server's model has "
                f"{self.n_classes} classes: labels must be integers in "
                f"[0, {self.n_classes})"
            )

    def class_weights(self, class_weight: Any, counts: np.ndarray) -> np.ndarray | None:
        """The weight of each class, from ``train()``'s ``class_weight``."""
        return _class_weights(class_weight, counts)

    def score(
        self, model: Model, params: dict[str, np.ndarray], X: np.ndarray, y: np.ndarray
    ) -> tuple[float, float]:
        """Mean cross-entropy (unweighted) and accuracy of ``params`` on ``(X, y)``."""
        return _score(model, params, X, y)


def _class_weights(class_weight: Any, counts: np.ndarray) -> np.ndarray | None:
    """The weight of each class, from ``train()``'s ``class_weight``."""
    if class_weight is None:
        return None
    n_classes = len(counts)
    if isinstance(class_weight, str):
        if class_weight != "balanced":
            raise InvalidRequest(
                f"class_weight must be None, 'balanced' or a mapping, got "
                f"{class_weight!r}"
            )
        present = counts > 0
        weights = np.ones(n_classes)
        weights[present] = counts.sum() / (present.sum() * counts[present])
        return weights.astype(np.float32)
    if not isinstance(class_weight, Mapping):
        raise InvalidRequest(
            f"class_weight must be None, 'balanced' or a mapping of class to weight, "
            f"got {type(class_weight).__name__}"
        )
    weights = np.ones(n_classes, dtype=np.float32)
    for label, weight in class_weight.items():
        if (
            isinstance(label, bool)
            or not isinstance(label, numbers.Integral)
            or not 0 <= label < n_classes
        ):
            raise InvalidRequest(
                f"class_weight names the class {label!r}: classes are integers in "
                f"[0, {n_classes})"
            )
        if (
            isinstance(weight, bool)
            or not isinstance(weight, numbers.Real)
            or not np.isfinite(weight)
            or weight < 0
        ):
            raise InvalidRequest(
                f"class_weight[{label}] must be a finite number >= 0, got {weight!r}"
            )
        weights[int(label)] = weight
    return weights


def _score(
    model: Model, params: dict[str, np.ndarray], X: np.ndarray, y: np.ndarray
) -> tuple[float, float]:
    """Mean cross-entropy (unweighted) and accuracy of ``params`` on ``(X, y)``:
    a forward pass, off the event loop."""
    proba = np.asarray(model.predict_proba(params, X), dtype=np.float64)
    p = proba[np.arange(len(y)), y]
    loss = float(-np.log(np.maximum(p, np.finfo(np.float64).tiny)).mean())
    return loss, float((proba.argmax(axis=1) == y).mean())
