"""The dense stack: ReLU layers and a softmax output, the built-in models' code."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from dask_ftps._factored import Factored, use_factors
from dask_ftps._sparse import RowSparse, is_sparse, rows_of
from dask_ftps._xp import array_namespace

from ._base import Model


def softmax_xent(
    logits: Any, y: Any, xp: Any, weight: Any = None
) -> tuple[Any, Any, Any]:
    """Mean softmax cross-entropy, its gradient wrt logits, and hit count.

    Parameters
    ----------
    logits : array, shape (n, k)
        Raw class scores.
    y : array of int, shape (n,)
        Labels in ``[0, k)``.
    xp : module
        Array namespace.
    weight : array, shape (n,), optional
        Per-row weights: the loss is ``sum(weight * row_loss) / n``.

    Returns
    -------
    loss : 0-d array
        Mean (weighted) cross-entropy.
    dlogits : array, shape (n, k)
        Gradient of ``loss`` wrt ``logits``.
    n_correct : 0-d array
        Number of rows whose argmax equals the label.
    """
    n = logits.shape[0]
    rows = xp.arange(n)
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - xp.log(xp.exp(z).sum(axis=1, keepdims=True))
    dlogits = xp.exp(logp)
    dlogits[rows, y] -= 1
    if weight is None:
        loss = -logp[rows, y].sum() / n
    else:
        loss = -(weight * logp[rows, y]).sum() / n
        dlogits *= weight[:, None]
    dlogits /= n
    n_correct = (logits.argmax(axis=1) == y).sum()
    return loss, dlogits, n_correct


def softmax(logits: Any, xp: Any) -> Any:
    """Row-wise softmax of class scores."""
    z = logits - logits.max(axis=1, keepdims=True)
    e = xp.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _dense_forward(ws: list[Any], bs: list[Any], X: Any, xp: Any) -> list[Any]:
    """Run a ReLU dense stack; return the layer inputs followed by the logits."""
    acts = [X]
    last = len(ws) - 1
    for i, (W, b) in enumerate(zip(ws, bs, strict=True)):
        z = acts[-1] @ W + b
        acts.append(z if i == last else xp.maximum(z, 0))
    return acts


def _dense_backward(
    ws: list[Any], acts: list[Any], dlogits: Any, factored: frozenset[int] = frozenset()
) -> tuple[list[Any], list[Any]]:
    """Back-propagate ``dlogits`` through the stack of :func:`_dense_forward`.

    The weight gradient of a layer in ``factored`` is its two factors (the
    layer's input and the error at its output), not their product.
    """
    dws: list[Any] = [None] * len(ws)
    dbs: list[Any] = [None] * len(ws)
    g = dlogits
    for i in range(len(ws) - 1, -1, -1):
        if i == 0 and is_sparse(acts[0]) and ws[0].dtype == np.float32:
            dws[0] = _rows_gradient(acts[0], g, ws[0].shape[0])
        elif i == 0 and is_sparse(acts[0]):
            dws[0] = np.asarray(acts[0].T @ g)
        else:
            dws[i] = Factored(acts[i], g) if i in factored else acts[i].T @ g
        dbs[i] = g.sum(axis=0)
        if i > 0:
            g = (g @ ws[i].T) * (acts[i] > 0)
    return dws, dbs


def _rows_gradient(X: Any, g: Any, n_rows: int) -> Any:
    """``X.T @ g`` for sparse ``X``: the rows of its nonzero columns only, as
    :class:`~dask_ftps.RowSparse` (dense where those rows are most of them)."""
    idx = rows_of(X)
    if 2 * idx.size > n_rows:
        return np.asarray(X.T @ g)
    rows = np.asarray(X.tocsc()[:, idx].T @ g)
    return RowSparse(idx, rows, n_rows)


@dataclass(frozen=True)
class DenseStack(Model):
    """A dense ReLU network with a softmax output: one implementation of
    :class:`Model`, the code of :class:`MLP` and :class:`SoftmaxRegression`.

    Subclasses have the fields ``n_features`` and ``n_classes`` and name their
    layers in :meth:`_layers`.
    """

    @abstractmethod
    def _layers(self) -> list[tuple[str, str]]:
        """Return ``(weight_name, bias_name)`` pairs, input to output."""

    def summary(self) -> str:
        """``MLP 64-128-10``: the class and the layer widths."""
        ws = [self.param_shapes()[w] for w, _ in self._layers()]
        sizes = "-".join(str(n) for n in (ws[0][0], *(w[1] for w in ws)))
        return f"{type(self).__name__} {sizes}"

    def factorable(self) -> tuple[str, ...]:
        """Every layer's weight: its gradient is the layer's input times the
        error at its output."""
        return tuple(w for w, _ in self._layers())

    def _unpack(self, params: dict[str, Any]) -> tuple[list[Any], list[Any]]:
        shapes = self.param_shapes()
        if set(params) != set(shapes):
            raise ValueError(
                f"params keys {sorted(params)} do not match {sorted(shapes)}"
            )
        for name, shape in shapes.items():
            if tuple(params[name].shape) != shape:
                raise ValueError(
                    f"param {name!r} has shape {tuple(params[name].shape)}, "
                    f"expected {shape}"
                )
        layers = self._layers()
        return [params[w] for w, _ in layers], [params[b] for _, b in layers]

    def sparse_rows(self, X: Any) -> dict[str, Any]:
        """For sparse ``X``: the first layer's rows of its nonzero features
        (where they are at most half the rows: more are pulled whole)."""
        name = self._layers()[0][0]
        if not is_sparse(X) or self.param_dtypes()[name] != np.float32:
            return {}
        idx = rows_of(X)
        return {name: idx} if 2 * idx.size <= self.param_shapes()[name][0] else {}

    def _prepare_x(self, X: Any, ws: list[Any], xp: Any) -> Any:
        dtype = ws[0].dtype
        if not np.issubdtype(dtype, np.floating):
            dtype = np.dtype(np.float32)
        n_features = self.param_shapes()[self._layers()[0][0]][0]
        if is_sparse(X):
            if xp is not np:  # a device: the dense minibatch
                X = X.toarray()
            else:
                X = X.tocsr().astype(dtype, copy=False)
                if X.ndim != 2 or X.shape[1] != n_features:
                    raise ValueError(
                        f"X must have shape (n, {n_features}), got {tuple(X.shape)}"
                    )
                return X
        X = xp.asarray(X, dtype=dtype)
        if X.ndim != 2 or X.shape[1] != n_features:
            raise ValueError(
                f"X must have shape (n, {n_features}), got {tuple(X.shape)}"
            )
        return X

    def loss_and_grad(
        self,
        params: dict[str, Any],
        X: Any,
        y: Any,
        sample_weight: Any = None,
        *,
        factors: Iterable[str] = (),
        update_format: str | None = None,
        factor_batch: int | None = None,
    ) -> tuple[float, dict[str, Any], int]:
        """Mean softmax cross-entropy over a batch and its gradient.

        Parameters
        ----------
        params : dict of str to array
            Parameters (NumPy or CuPy). Computation uses their float dtype
            (float32 normally; float64 params give float64 math).
        X : array of shape (n, n_features)
            Features, cast to the parameter dtype.
        y : array of int of shape (n,)
            Labels in ``[0, n_classes)``.
        sample_weight : array of shape (n,), optional
            Non-negative row weights (for example a class weight per label): the
            loss is ``sum(sample_weight * row_loss) / n``.
        factors : iterable of str, default ()
            Weights (of :meth:`factorable`) whose gradient is returned as a
            :class:`~dask_ftps.Factored`: the layer's input and output error.
        update_format : {"dense", "auto", "factored"}, optional
            Another way to choose ``factors``: ``"auto"`` factors a float32
            weight where its two factors are smaller than the matrix
            (``n * (fan_in + fan_out) < fan_in * fan_out``), ``"factored"``
            every float32 weight, ``"dense"`` none.
        factor_batch : int, optional
            The number of samples ``"auto"`` weighs the factors' size with
            (default: this batch's).

        Returns
        -------
        loss : float
            Mean (weighted) cross-entropy.
        grads : dict of str to array or Factored
            Same names, shapes and dtypes as ``params`` (a factored weight's
            ``dense()`` has them).
        n_correct : int
            Number of rows whose predicted class equals ``y``.
        """
        xp = array_namespace(X, y, *params.values())
        ws, bs = self._unpack(params)
        X = self._prepare_x(X, ws, xp)
        y = xp.asarray(y)
        n = X.shape[0]
        if n == 0:
            raise ValueError("loss_and_grad needs a non-empty batch")
        if y.shape != (n,):
            raise ValueError(f"y must have shape ({n},), got {tuple(y.shape)}")
        if not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"y must hold integer labels, got dtype {y.dtype}")
        n_classes = ws[-1].shape[1]
        if int(y.min()) < 0 or int(y.max()) >= n_classes:
            raise ValueError(f"labels must lie in [0, {n_classes})")
        weight = None
        if sample_weight is not None:
            weight = xp.asarray(sample_weight, dtype=X.dtype)
            if weight.shape != (n,):
                raise ValueError(
                    f"sample_weight must have shape ({n},), got {tuple(weight.shape)}"
                )
        acts = _dense_forward(ws, bs, X, xp)
        loss, dlogits, n_correct = softmax_xent(
            acts[-1], y.astype(xp.int64), xp, weight
        )
        names = set(factors)
        if update_format is not None:
            names |= {
                w
                for w, _ in self._layers()
                if use_factors(
                    update_format,
                    factor_batch or n,
                    tuple(params[w].shape),
                    params[w].dtype,
                )
            }
        unknown = names - set(self.factorable())
        if unknown:
            raise ValueError(f"no factors for {sorted(unknown)}: not layer weights")
        factored = frozenset(i for i, (w, _) in enumerate(self._layers()) if w in names)
        dws, dbs = _dense_backward(ws, acts[:-1], dlogits, factored)
        grads = {}

        def cast(a: Any, like: Any) -> Any:
            return xp.ascontiguousarray(a.astype(like.dtype, copy=False))

        for (wn, bn), dw, db in zip(self._layers(), dws, dbs, strict=True):
            w = params[wn]
            if isinstance(dw, RowSparse):
                grads[wn] = RowSparse(dw.indices, cast(dw.rows, w), dw.n_rows)
            elif isinstance(dw, Factored):
                grads[wn] = Factored(cast(dw.u, w), cast(dw.v, w))
            else:
                grads[wn] = cast(dw, w)
            grads[bn] = db.astype(params[bn].dtype, copy=False)
        ordered = {k: grads[k] for k in self.param_shapes()}
        return float(loss), ordered, int(n_correct)

    def predict_proba(self, params: dict[str, Any], X: Any) -> Any:
        """Return class probabilities, shape (n, n_classes), rows summing to 1."""
        xp = array_namespace(X, *params.values())
        ws, bs = self._unpack(params)
        X = self._prepare_x(X, ws, xp)
        return softmax(_dense_forward(ws, bs, X, xp)[-1], xp)

    def predict(self, params: dict[str, Any], X: Any) -> Any:
        """Return predicted class indices as int64, shape (n,)."""
        xp = array_namespace(X, *params.values())
        ws, bs = self._unpack(params)
        X = self._prepare_x(X, ws, xp)
        return _dense_forward(ws, bs, X, xp)[-1].argmax(axis=1).astype(xp.int64)


def dense_model(
    n_features: int, hidden: tuple[int, ...], n_classes: int, seed: int = 0
) -> DenseStack:
    """The built-in model for ``hidden`` layer widths: :class:`MLP`, or
    :class:`SoftmaxRegression` when there are no hidden layers.

    Examples
    --------
    >>> dense_model(64, (), 10)
    SoftmaxRegression(n_features=64, n_classes=10, seed=0)
    """
    from ._mlp import MLP
    from ._softmax import SoftmaxRegression

    if not tuple(hidden):
        return SoftmaxRegression(n_features=n_features, n_classes=n_classes, seed=seed)
    return MLP(n_features=n_features, hidden=hidden, n_classes=n_classes, seed=seed)
