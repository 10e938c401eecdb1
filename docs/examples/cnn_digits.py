"""A small convolutional network for scikit-learn's digits, as a dask_ftps model.

``ConvNet`` is a model of one's own (a :class:`dask_ftps.models.Model`): a 3x3
convolution written as an im2col matrix product, ReLU, 2x2 max pooling, a
dense ReLU layer and a dense softmax layer, with its exact backward pass. It is
written once in array-API style (``xp = array_namespace(...)``, then ``xp.``
functions and array methods only): the same lines run on NumPy and on CuPy.

Run it (a ``LocalCluster`` of two worker processes; about 20 s on two cores)::

    python docs/examples/cnn_digits.py            # --quick: 4 epochs; --seed 3

It trains the ConvNet and the built-in ``MLP(64, (128,), 10)`` with dask_ftps
the same way (:data:`EPOCHS`, :data:`BATCH_SIZE`, :func:`optimizer`) and prints
their test accuracy beside scikit-learn's ``LogisticRegression``, on the
digits' stratified 75/25 split (``--seed`` picks the split; 0 is the one the
tests and benchmarks use).

For a restarted scheduler to rebuild a run of it, this folder must be on the
scheduler's and the workers' ``PYTHONPATH`` and the module allowed on the
scheduler: ``DASK_FTPS__MODELS__ALLOWED='["cnn_digits"]'``.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from dask_ftps.models import Model, array_namespace

__all__ = ["BATCH_SIZE", "EPOCHS", "ConvNet", "compare", "digits_split", "main"]

#: How both networks are trained (chosen for the ConvNet, on seeds 0 to 4).
EPOCHS = 40
BATCH_SIZE = 32


@functools.cache
def patch_index(side: int, kernel: int) -> np.ndarray:
    """The im2col gather index of a ``kernel`` x ``kernel`` "same" convolution.

    Parameters
    ----------
    side : int
        The images' width and height: a row of ``X`` is ``side * side``
        pixels, row by row.
    kernel : int
        The filters' width and height (odd).

    Returns
    -------
    ndarray of int64, shape (side * side, kernel * kernel)
        Row ``p`` lists the pixels under the filter centred on pixel ``p``. A
        position off the image is ``side * side``: the index of a zero column
        appended to ``X`` (zero padding).
    """
    pad = kernel // 2
    rows, cols = np.divmod(np.arange(side * side), side)
    dr, dc = np.divmod(np.arange(kernel * kernel), kernel)
    r = rows[:, None] + dr[None, :] - pad
    c = cols[:, None] + dc[None, :] - pad
    inside = (r >= 0) & (r < side) & (c >= 0) & (c < side)
    return np.where(inside, r * side + c, side * side).astype(np.int64)


@dataclass(frozen=True)
class ConvNet(Model):
    """Convolution, ReLU, 2x2 max pooling, a dense ReLU layer, softmax.

    Parameters
    ----------
    n_features : int, default 64
        Pixels per image: ``side * side`` with ``side`` even (8 x 8 digits).
    n_classes : int, default 10
        Number of classes.
    channels : int, default 64
        Convolution filters.
    kernel : int, default 3
        The filters' width and height (odd; "same" zero padding).
    hidden : int, default 256
        Units of the dense ReLU layer.
    seed : int, default 0
        Seed of :meth:`init_params`.
    """

    n_features: int = 64
    n_classes: int = 10
    channels: int = 64
    kernel: int = 3
    hidden: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        side = math.isqrt(self.n_features) if self.n_features > 0 else 0
        if side < 2 or side * side != self.n_features or side % 2:
            raise ValueError(
                f"n_features must be the square of an even number, got "
                f"{self.n_features!r}"
            )
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"kernel must be odd and >= 1, got {self.kernel!r}")
        if min(self.channels, self.hidden) < 1 or self.n_classes < 2:
            raise ValueError("channels and hidden must be >= 1, n_classes >= 2")

    @property
    def side(self) -> int:
        """The images' width and height."""
        return math.isqrt(self.n_features)

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """The filters, the dense layer's and the output layer's weights and
        biases."""
        pooled = (self.side // 2) ** 2 * self.channels
        return {
            "conv_W": (self.kernel * self.kernel, self.channels),
            "conv_b": (self.channels,),
            "hidden_W": (pooled, self.hidden),
            "hidden_b": (self.hidden,),
            "out_W": (self.hidden, self.n_classes),
            "out_b": (self.n_classes,),
        }

    def init_params(self) -> dict[str, np.ndarray]:
        """He-normal weights and zero biases: float32, the same for a seed."""
        rng = np.random.default_rng(self.seed)
        params = {}
        for name, shape in self.param_shapes().items():
            if name.endswith("_W"):
                std = np.float32(np.sqrt(2.0 / shape[0]))
                params[name] = rng.standard_normal(shape, dtype=np.float32) * std
            else:
                params[name] = np.zeros(shape, dtype=np.float32)
        return params

    def _inputs(self, params: dict[str, Any], X: Any) -> tuple[Any, Any]:
        """The array namespace, and ``X`` in the parameters' dtype."""
        xp = array_namespace(X, *params.values())
        X = xp.asarray(X, dtype=params["out_W"].dtype)
        if X.ndim != 2 or X.shape[1] != self.n_features:
            raise ValueError(
                f"X must have shape (n, {self.n_features}), got {tuple(X.shape)}"
            )
        return xp, X

    def _forward(self, params: dict[str, Any], X: Any, xp: Any) -> tuple[Any, dict]:
        """The logits, and what the backward pass needs."""
        n, side, c, h = X.shape[0], self.side, self.channels, self.side // 2
        # im2col: one row of kernel * kernel pixels per (image, position); the
        # convolution is then one matrix product.
        padded = xp.zeros((n, self.n_features + 1), dtype=X.dtype)
        padded[:, : self.n_features] = X
        idx = xp.asarray(patch_index(side, self.kernel))
        patches = padded[:, idx].reshape(n * side * side, self.kernel**2)
        conv = patches @ params["conv_W"] + params["conv_b"]  # (n*side*side, c)
        # 2x2 max pooling of the ReLU: each window's four pixels on one axis.
        windows = (
            xp.maximum(conv, 0)
            .reshape(n, h, 2, h, 2, c)
            .transpose(0, 1, 3, 5, 2, 4)
            .reshape(n * h * h * c, 4)
        )
        taken = windows.argmax(axis=1)
        pooled = windows[xp.arange(windows.shape[0]), taken].reshape(n, h * h * c)
        hidden = pooled @ params["hidden_W"] + params["hidden_b"]
        active = xp.maximum(hidden, 0)
        logits = active @ params["out_W"] + params["out_b"]
        saved = {
            "patches": patches,
            "conv": conv,
            "taken": taken,
            "pooled": pooled,
            "hidden": hidden,
            "active": active,
        }
        return logits, saved

    def loss_and_grad(
        self, params: dict[str, Any], X: Any, y: Any, sample_weight: Any = None
    ) -> tuple[float, dict[str, Any], int]:
        """Mean softmax cross-entropy of a minibatch and its exact gradient.

        Parameters
        ----------
        params : dict of str to array
            The parameters (NumPy or CuPy); the math runs in their dtype.
        X : array of shape (n, n_features)
            Images, one per row.
        y : array of int of shape (n,)
            Labels in ``[0, n_classes)``.
        sample_weight : array of shape (n,), optional
            The loss is ``sum(sample_weight * sample_loss) / n``.

        Returns
        -------
        loss : float
            The mean (weighted) cross-entropy.
        grads : dict of str to array
            The gradient of each parameter, in its shape and dtype.
        n_correct : int
            How many of the minibatch's samples the network classifies right.
        """
        xp, X = self._inputs(params, X)
        n, side, c, h = X.shape[0], self.side, self.channels, self.side // 2
        logits, s = self._forward(params, X, xp)
        rows = xp.arange(n)
        # Softmax cross-entropy, and its gradient with respect to the logits.
        shifted = logits - logits.max(axis=1, keepdims=True)
        logp = shifted - xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))
        sample_loss = -logp[rows, y]
        d = xp.exp(logp)
        d[rows, y] -= 1
        if sample_weight is not None:
            w = xp.asarray(sample_weight, dtype=X.dtype)
            sample_loss = sample_loss * w
            d = d * w[:, None]
        d = d / n
        grads = {"out_W": s["active"].T @ d, "out_b": d.sum(axis=0)}
        # Back through the dense ReLU layer ...
        d = (d @ params["out_W"].T) * (s["hidden"] > 0)
        grads["hidden_W"] = s["pooled"].T @ d
        grads["hidden_b"] = d.sum(axis=0)
        # ... the pooling (each window's gradient goes to the pixel it took) ...
        d = (d @ params["hidden_W"].T).reshape(n * h * h * c)
        windows = xp.zeros((d.shape[0], 4), dtype=X.dtype)
        windows[xp.arange(d.shape[0]), s["taken"]] = d
        d = (
            windows.reshape(n, h, h, c, 2, 2)
            .transpose(0, 1, 4, 2, 5, 3)
            .reshape(n * side * side, c)
        )
        # ... the ReLU and the convolution.
        d = d * (s["conv"] > 0)
        grads["conv_W"] = s["patches"].T @ d
        grads["conv_b"] = d.sum(axis=0)
        n_correct = int((logits.argmax(axis=1) == y).sum())
        ordered = {name: grads[name] for name in self.param_shapes()}
        return float(sample_loss.sum() / n), ordered, n_correct

    def predict_proba(self, params: dict[str, Any], X: Any) -> Any:
        """Class probabilities, shape (n, n_classes), rows summing to 1."""
        xp, X = self._inputs(params, X)
        logits, _ = self._forward(params, X, xp)
        e = xp.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    def predict(self, params: dict[str, Any], X: Any) -> Any:
        """Predicted classes, int64 of shape (n,): no softmax needed."""
        xp, X = self._inputs(params, X)
        return self._forward(params, X, xp)[0].argmax(axis=1).astype(xp.int64)


# -- training it with dask_ftps, beside the MLP and LogisticRegression ------------


def optimizer() -> Any:
    """The optimizer both networks train with (on the parameter server)."""
    import dask_ftps

    return dask_ftps.SGD(lr=0.02, momentum=0.9, schedule="exponential", decay=0.95)


def digits_split(seed: int = 0) -> tuple[np.ndarray, ...]:
    """The digits scaled to [0, 1] (float32), split 75/25, stratified, with
    ``random_state=seed``: ``X_train, X_test, y_train, y_test``. Seed 0 is the
    split of ``tests/conftest.py`` and ``benchmarks/_common.py``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X = (X / 16).astype(np.float32)
    return tuple(train_test_split(X, y, test_size=0.25, random_state=seed, stratify=y))


def compare(
    client: Any, seed: int = 0, epochs: int = EPOCHS, batch_size: int = BATCH_SIZE
) -> dict[str, dict[str, float]]:
    """Test accuracy of the ConvNet, the MLP and ``LogisticRegression`` on the
    split of ``seed``.

    The two networks train with dask_ftps on ``client``'s cluster, one after
    the other, the same way: a fresh memory-only ``ParameterServer`` in async
    mode with :func:`optimizer`, ``train(epochs, batch_size, seed=seed)``; the
    networks' initial weights are seeded with ``seed`` too.

    Returns
    -------
    dict
        ``{"ConvNet": {"accuracy": ..., "seconds": ..., "n_params": ...},
        "MLP": {...}, "LogisticRegression": {...}}``.
    """
    from sklearn.linear_model import LogisticRegression

    import dask_ftps
    from dask_ftps.models import MLP

    X_train, X_test, y_train, y_test = digits_split(seed)
    results = {}
    for model in (ConvNet(seed=seed), MLP(64, (128,), 10, seed=seed)):
        started = time.perf_counter()
        client.register_plugin(
            dask_ftps.ParameterServer(model=model, optimizer=optimizer(), mode="async")
        )
        dask_ftps.train(
            client,
            X_train,
            y_train,
            epochs=epochs,
            batch_size=batch_size,
            seed=seed,
            progress=False,
        )
        _, params = dask_ftps.get_model(client)
        results[type(model).__name__] = {
            "accuracy": float((model.predict(params, X_test) == y_test).mean()),
            "seconds": time.perf_counter() - started,
            "n_params": model.n_params(),
        }
    started = time.perf_counter()
    logreg = LogisticRegression(max_iter=1000).fit(X_train, y_train)
    results["LogisticRegression"] = {
        "accuracy": float(logreg.score(X_test, y_test)),
        "seconds": time.perf_counter() - started,
        "n_params": int(logreg.coef_.size + logreg.intercept_.size),
    }
    return results


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Train the ConvNet and the MLP with dask_ftps on a local cluster of two
    worker processes and print their test accuracy beside LogisticRegression's."""
    import argparse
    import logging

    from distributed import Client, LocalCluster

    parser = argparse.ArgumentParser(description=main.__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="split, weights, order")
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--quick", action="store_true", help="4 epochs")
    args = parser.parse_args(argv)
    epochs = 4 if args.quick else args.epochs
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.ERROR,
        ) as cluster,
        Client(cluster) as client,
    ):
        results = compare(client, seed=args.seed, epochs=epochs)
    print(f"digits, split seed {args.seed}, {epochs} epochs of {BATCH_SIZE}:")
    for name, r in results.items():
        print(
            f"  {name:<18} test accuracy {r['accuracy']:.4f}  "
            f"({r['n_params']:,} parameters, {r['seconds']:.1f} s)"
        )
    return results


if __name__ == "__main__":
    # Import this file as the module "cnn_digits", not "__main__": the store
    # records the model as "cnn_digits:ConvNet", which other processes import.
    from cnn_digits import main as _main

    _main()
