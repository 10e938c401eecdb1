"""Model base class and the shared dense-stack forward/backward code."""

from __future__ import annotations

import numbers
from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import numpy as np

from dask_ftps._factored import Factored, use_factors
from dask_ftps._xp import array_namespace

_REGISTRY: dict[str, type[Model]] = {}


def _check_int(name: str, value: Any, minimum: int) -> int:
    """Validate an integer hyper-parameter and return it as ``int``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int, got {value!r}")  # noqa: TRY004
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(value)


def _freeze_int(obj: Any, name: str, minimum: int) -> None:
    """Validate ``obj.<name>`` and store it back as a plain ``int``."""
    object.__setattr__(obj, name, _check_int(name, getattr(obj, name), minimum))


def _softmax_xent(
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


def _softmax(logits: Any, xp: Any) -> Any:
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
        dws[i] = Factored(acts[i], g) if i in factored else acts[i].T @ g
        dbs[i] = g.sum(axis=0)
        if i > 0:
            g = (g @ ws[i].T) * (acts[i] > 0)
    return dws, dbs


@dataclass(frozen=True)
class Model(ABC):
    """Abstract model spec: a dense ReLU stack with a softmax output.

    Subclasses are frozen dataclasses holding only hyper-parameters; the
    parameters live in plain ``dict[str, array]`` objects.
    """

    kind: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.kind = cls.__name__
        _REGISTRY[cls.__name__] = cls

    @abstractmethod
    def _layers(self) -> list[tuple[str, str]]:
        """Return ``(weight_name, bias_name)`` pairs, input to output."""

    @abstractmethod
    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Return the ordered parameter names and shapes."""

    @abstractmethod
    def init_params(self) -> dict[str, np.ndarray]:
        """Return freshly initialised float32 parameters (deterministic)."""

    def n_params(self) -> int:
        """Return the total number of scalar parameters."""
        return sum(int(np.prod(s)) for s in self.param_shapes().values())

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

    def _prepare_x(self, X: Any, ws: list[Any], xp: Any) -> Any:
        dtype = ws[0].dtype
        if not np.issubdtype(dtype, np.floating):
            dtype = np.dtype(np.float32)
        X = xp.asarray(X, dtype=dtype)
        n_features = self.param_shapes()[self._layers()[0][0]][0]
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
        update_format: str = "dense",
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
        update_format : {"dense", "auto", "factored"}, default "dense"
            How weight gradients are returned: as arrays, as
            :class:`~dask_ftps.Factored` where its two factors are smaller than
            the matrix (``n * (fan_in + fan_out) < fan_in * fan_out``), or
            factored for every float32 weight matrix.
        factor_batch : int, optional
            The number of samples ``"auto"`` weighs the factors' size with
            (default: this batch's). ``train()`` gives the run's ``batch_size``,
            so that a layer goes one way for the whole run, not another for
            the few smaller minibatches.

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
        loss, dlogits, n_correct = _softmax_xent(
            acts[-1], y.astype(xp.int64), xp, weight
        )
        factored = frozenset(
            i
            for i, W in enumerate(ws)
            if use_factors(update_format, factor_batch or n, tuple(W.shape), W.dtype)
        )
        dws, dbs = _dense_backward(ws, acts[:-1], dlogits, factored)
        grads = {}

        def cast(a: Any, like: Any) -> Any:
            return xp.ascontiguousarray(a.astype(like.dtype, copy=False))

        for (wn, bn), dw, db in zip(self._layers(), dws, dbs, strict=True):
            w = params[wn]
            if isinstance(dw, Factored):
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
        return _softmax(_dense_forward(ws, bs, X, xp)[-1], xp)

    def predict(self, params: dict[str, Any], X: Any) -> Any:
        """Return predicted class indices as int64, shape (n,)."""
        xp = array_namespace(X, *params.values())
        ws, bs = self._unpack(params)
        X = self._prepare_x(X, ws, xp)
        return _dense_forward(ws, bs, X, xp)[-1].argmax(axis=1).astype(xp.int64)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable description (inverse: ``model_from_dict``)."""
        d: dict[str, Any] = {"kind": self.kind}
        for f in fields(self):
            v = getattr(self, f.name)
            d[f.name] = list(v) if isinstance(v, tuple) else v
        return d


def model_from_dict(d: dict[str, Any]) -> Model:
    """Rebuild a model spec from :meth:`Model.to_dict` output.

    Parameters
    ----------
    d : dict
        Must contain ``"kind"`` naming a known model plus its fields.

    Returns
    -------
    Model

    Raises
    ------
    ValueError
        For an unknown kind or bad fields.
    """
    if not isinstance(d, dict) or "kind" not in d:
        raise ValueError(f"expected a dict with a 'kind' key, got {d!r}")
    kw = dict(d)
    kind = kw.pop("kind")
    cls = _REGISTRY.get(kind)
    if cls is None:
        raise ValueError(f"unknown model kind {kind!r}; known: {sorted(_REGISTRY)}")
    names = {f.name for f in fields(cls)}
    extra = set(kw) - names
    if extra:
        raise ValueError(f"unknown fields for {kind}: {sorted(extra)}")
    try:
        return cls(**kw)
    except TypeError as exc:
        raise ValueError(f"bad fields for {kind}: {exc}") from exc
