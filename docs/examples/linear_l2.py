"""The smallest model: multinomial logistic regression with an L2 penalty.

Copy this file to start a model of your own. A model is a frozen dataclass of
hyper-parameters (JSON values: the store records them) that says which
parameters it has, makes the first ones, and computes a minibatch's loss and
gradient. The parameter server holds the parameters, merges the gradients with
its optimizer and stores them; the model never sees the optimizer.

Run it (two worker processes on this machine; a few seconds)::

    python docs/examples/linear_l2.py

For a restarted scheduler to rebuild a run of it, this module must be
importable there and on the workers (``PYTHONPATH``), and allowed:
``DASK_FTPS__MODELS__ALLOWED='["linear_l2"]'``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from dask_ftps.models import Model, array_namespace

__all__ = ["LinearL2", "main"]


@dataclass(frozen=True)
class LinearL2(Model):
    """Softmax regression, ``loss = mean cross-entropy + alpha / 2 * ||W||²``.

    Parameters
    ----------
    n_features : int, default 64
        Features per sample (``train()`` checks ``X`` against it).
    n_classes : int, default 10
        Number of classes.
    alpha : float, default 1e-4
        Strength of the L2 penalty on the weights (the bias is not penalised).
    seed : int, default 0
        Seed of the first weights.
    """

    n_features: int = 64
    n_classes: int = 10
    alpha: float = 1e-4
    seed: int = 0

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Names and shapes: a weight matrix and a bias."""
        return {"W": (self.n_features, self.n_classes), "b": (self.n_classes,)}

    def init_params(self) -> dict[str, np.ndarray]:
        """Small random weights, zero bias: float32 NumPy arrays, the same for
        the same ``seed``."""
        rng = np.random.default_rng(self.seed)
        W = 0.01 * rng.standard_normal((self.n_features, self.n_classes))
        return {"W": W.astype(np.float32), "b": np.zeros(self.n_classes, np.float32)}

    def loss_and_grad(
        self, params: dict[str, Any], X: Any, y: Any, sample_weight: Any = None
    ) -> tuple[float, dict[str, Any], int]:
        """A minibatch's loss, its exact gradient, and how many it got right.

        Parameters
        ----------
        params : dict of str to array
            ``W`` and ``b``: NumPy or CuPy arrays; the math runs in their dtype.
        X : array of shape (n, n_features)
        y : array of int of shape (n,)
            Labels in ``[0, n_classes)``.
        sample_weight : array of shape (n,), optional
            The data term is ``sum(sample_weight * sample_loss) / n``.

        Returns
        -------
        loss : float
        grads : dict of str to array
            ``W`` and ``b``, in their shapes and dtype.
        n_correct : int
        """
        # NumPy or CuPy, whichever the arrays are: write xp.<f>, never np.<f>.
        xp = array_namespace(X, *params.values())
        W, b = params["W"], params["b"]
        X = xp.asarray(X, dtype=W.dtype)
        n, rows = X.shape[0], xp.arange(X.shape[0])

        logits = X @ W + b
        z = logits - logits.max(axis=1, keepdims=True)  # no overflow in exp
        logp = z - xp.log(xp.exp(z).sum(axis=1, keepdims=True))
        sample_loss = -logp[rows, y]

        # d(loss)/d(logits) = (softmax - one_hot(y)) * weight / n
        dlogits = xp.exp(logp)
        dlogits[rows, y] -= 1
        if sample_weight is not None:
            w = xp.asarray(sample_weight, dtype=W.dtype)
            sample_loss = sample_loss * w
            dlogits = dlogits * w[:, None]
        dlogits = dlogits / n

        loss = sample_loss.sum() / n + self.alpha / 2 * (W * W).sum()
        grads = {"W": X.T @ dlogits + self.alpha * W, "b": dlogits.sum(axis=0)}
        n_correct = (logits.argmax(axis=1) == y).sum()
        return float(loss), grads, int(n_correct)

    def predict_proba(self, params: dict[str, Any], X: Any) -> Any:
        """Class probabilities, shape (n, n_classes), rows summing to 1."""
        xp = array_namespace(X, *params.values())
        X = xp.asarray(X, dtype=params["W"].dtype)
        logits = X @ params["W"] + params["b"]
        e = xp.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)


def main(argv: list[str] | None = None) -> float:
    """Train :class:`LinearL2` on the digits with dask_ftps and print its test
    accuracy beside scikit-learn's ``LogisticRegression``."""
    import argparse
    import logging

    from distributed import Client, LocalCluster
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    import dask_ftps

    parser = argparse.ArgumentParser(description=main.__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    X, y = load_digits(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(
        (X / 16).astype(np.float32), y, test_size=0.25, random_state=0, stratify=y
    )
    # LogisticRegression(C=1) minimises sum(sample_loss) + ||W||² / 2: the same
    # objective as ours, divided by n, with alpha = 1 / n.
    model = LinearL2(alpha=1 / len(y_train), seed=args.seed)
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, silence_logs=logging.ERROR
        ) as cluster,
        Client(cluster) as client,
    ):
        client.register_plugin(
            dask_ftps.ParameterServer(
                model=model, optimizer=dask_ftps.SGD(lr=0.1, momentum=0.9)
            )
        )
        dask_ftps.train(
            client,
            X_train,
            y_train,
            epochs=args.epochs,
            batch_size=32,
            seed=args.seed,
            progress=False,
        )
        _, params = dask_ftps.get_model(client)
    accuracy = float((model.predict(params, X_test) == y_test).mean())
    reference = LogisticRegression(max_iter=1000).fit(X_train, y_train)
    print(f"LinearL2 (alpha={model.alpha:.2e}) test accuracy {accuracy:.4f}")
    print(
        f"LogisticRegression (C=1)   test accuracy {reference.score(X_test, y_test):.4f}"
    )
    return accuracy


if __name__ == "__main__":
    # Import this file as the module "linear_l2", not "__main__": the store
    # records the model as "linear_l2:LinearL2", which other processes import.
    from linear_l2 import main as _main

    _main()
