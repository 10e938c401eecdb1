"""A model defined outside dask_ftps, as a user would write it: the tests train
it through real processes (importable as ``tests.usermodels``)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dask_ftps.models import Model, array_namespace


@dataclass(frozen=True)
class LinearRidge(Model):
    """Multinomial logistic regression with an L2 penalty, its own parameter
    names, and its own code: not the built-in dense stack."""

    n_features: int = 64
    n_classes: int = 10
    alpha: float = 1e-3
    seed: int = 0

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"weights": (self.n_features, self.n_classes), "bias": (self.n_classes,)}

    def init_params(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(self.seed)
        shapes = self.param_shapes()
        return {
            "weights": rng.normal(0.0, 0.01, shapes["weights"]).astype(np.float32),
            "bias": np.zeros(shapes["bias"], np.float32),
        }

    def _scores(self, params, X):
        xp = array_namespace(X, *params.values())
        W = params["weights"]
        X = xp.asarray(X, dtype=W.dtype)
        return xp, X, X @ W + xp.asarray(params["bias"], dtype=W.dtype)

    def loss_and_grad(self, params, X, y, sample_weight=None):
        xp, X, z = self._scores(params, X)
        n = X.shape[0]
        z = z - z.max(axis=1, keepdims=True)
        logp = z - xp.log(xp.exp(z).sum(axis=1, keepdims=True))
        rows = xp.arange(n)
        w = (
            xp.ones(n, dtype=z.dtype)
            if sample_weight is None
            else xp.asarray(sample_weight, dtype=z.dtype)
        )
        W = params["weights"]
        loss = -(w * logp[rows, y]).sum() / n + 0.5 * self.alpha * float((W * W).sum())
        dz = xp.exp(logp)
        dz[rows, y] -= 1
        dz *= w[:, None] / n
        grads = {
            "weights": X.T @ dz + W.dtype.type(self.alpha) * W,
            "bias": dz.sum(axis=0),
        }
        return float(loss), grads, int((z.argmax(axis=1) == y).sum())

    def predict_proba(self, params, X):
        xp, _, z = self._scores(params, X)
        e = xp.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
