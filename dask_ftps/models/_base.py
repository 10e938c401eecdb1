"""The model interface: what a model gives the parameter server and its workers."""

from __future__ import annotations

import numbers
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from dask_ftps._registry import Registry

#: The model kinds: dask_ftps's own by short name, any other by import path.
MODELS: Registry[Model] = Registry("model", imports=True)


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


@dataclass(frozen=True)
class Model(ABC):
    """A classifier the parameter server trains: subclass it.

    A model is a frozen dataclass of hyper-parameters; its parameters are a
    ``dict`` of named float arrays that the server holds, merges updates into
    and stores. The methods are written once in array-API code (``xp =
    array_namespace(X, *params.values())``) so that the same code runs on NumPy
    and on CuPy.

    A subclass implements:

    - ``n_classes``: a field (or property), the number of classes (>= 2);
    - :meth:`param_shapes`: the parameters' names and shapes;
    - :meth:`init_params`: the first parameters, deterministic (seeded);
    - :meth:`loss_and_grad`: a minibatch's mean loss, the gradient of each
      parameter, and how many of its samples the model classified right;
    - :meth:`predict_proba`: class probabilities.

    and may declare:

    - ``n_features``: a field (or property), the number of features a sample
      has, which ``train()`` then checks the data against;
    - :meth:`factorable`: weights whose gradient :meth:`loss_and_grad` can send
      as two factors (a dense layer's input and output error: patent claim 11);
    - :meth:`sparse_rows`: weights a sparse minibatch reads only some rows of
      (a first layer over sparse features, an embedding table): their gradient
      is sent as :class:`~dask_ftps.RowSparse` and only those rows are pulled;
    - :meth:`predict`: a faster prediction than the argmax of the probabilities.

    The store records a model as its class's import path and its fields (see
    :meth:`to_dict`): a scheduler restarted with the preload imports that module
    only if ``ftps.models.allowed`` names it. Fields must be JSON values.
    """

    #: The class's name in descriptions: dask_ftps's own classes by their short
    #: name, any other by its import path ``"module:QualName"``.
    kind: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        MODELS.defines(cls)

    @abstractmethod
    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """The parameters' names and shapes, in a fixed order."""

    @abstractmethod
    def init_params(self) -> dict[str, np.ndarray]:
        """The first parameters: NumPy arrays of :meth:`param_shapes` and
        :meth:`param_dtypes`, the same on every call (seeded)."""

    @abstractmethod
    def loss_and_grad(
        self, params: dict[str, Any], X: Any, y: Any, sample_weight: Any = None
    ) -> tuple[float, dict[str, Any], int]:
        """A minibatch's loss and its gradient.

        Parameters
        ----------
        params : dict of str to array
            The parameters (NumPy or CuPy arrays, all of one kind).
        X : array of shape (n, ...)
            The minibatch's features, of the same array kind as ``params``.
        y : array of int of shape (n,)
            Class labels in ``[0, n_classes)``.
        sample_weight : array of shape (n,), optional
            Per-sample weights (``train(class_weight=...)``): the loss is
            ``sum(sample_weight * sample_loss) / n``.

        Returns
        -------
        loss : float
            The mean loss.
        grads : dict of str to array
            The gradient of ``loss`` for every parameter: the same names,
            shapes and dtypes as ``params``, finite.
        n_correct : int
            How many samples of the minibatch the model classifies right.
        """

    @abstractmethod
    def predict_proba(self, params: dict[str, Any], X: Any) -> Any:
        """Class probabilities, shape (n, n_classes), rows summing to 1."""

    def predict(self, params: dict[str, Any], X: Any) -> Any:
        """Predicted classes, int64 of shape (n,): the argmax of
        :meth:`predict_proba`."""
        return self.predict_proba(params, X).argmax(axis=1).astype("int64")

    def param_dtypes(self) -> dict[str, np.dtype]:
        """Each parameter's dtype: float32 for all (the server merges and the
        store keeps float32; other dtypes are not supported yet)."""
        return {name: np.dtype(np.float32) for name in self.param_shapes()}

    def factorable(self) -> tuple[str, ...]:
        """Weights whose gradient :meth:`loss_and_grad` can return as a
        :class:`~dask_ftps.Factored` (default: none).

        A model that names some accepts ``factors=`` (a set of those names) in
        :meth:`loss_and_grad`, and returns ``Factored(u, v)`` with ``u.T @ v``
        the gradient for each. The workers pass the names for which
        ``ftps.update-format`` says the factors are worth sending.
        """
        return ()

    def sparse_rows(self, X: Any) -> dict[str, Any]:
        """The rows of each weight that the minibatch ``X`` reads (default: none).

        A model that names a weight ``W`` here for ``X`` promises that
        :meth:`loss_and_grad` on ``X`` reads no other row of ``W`` (its other
        rows may be stale in the worker's copy: the worker pulls only these),
        and may return ``W``'s gradient as :class:`~dask_ftps.RowSparse`, with
        indices among these. That is the case of a layer whose input is sparse:
        the rows are the features that hold a nonzero in ``X``
        (:func:`~dask_ftps.rows_of`).

        Returns
        -------
        dict of str to array of int
            Strictly increasing row indices (NumPy) by weight name.
        """
        return {}

    def summary(self) -> str:
        """One line naming the model for people (logs, the CLI, the dashboard)."""
        return f"{type(self).__name__} ({self.n_params():,} parameters)"

    def n_params(self) -> int:
        """The total number of scalar parameters."""
        return sum(int(np.prod(s)) for s in self.param_shapes().values())

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able description: ``{"kind": ..., <field>: <value>}`` (inverse:
        :func:`model_from_dict`)."""
        return MODELS.describe(self)


def model_from_dict(d: dict[str, Any]) -> Model:
    """Rebuild a model from :meth:`Model.to_dict` output.

    A class this process has already defined is used as it is; a module named
    by ``d`` is imported only if ``ftps.models.allowed`` allows it.

    Parameters
    ----------
    d : dict
        ``"kind"`` (a dask_ftps model's name, or ``"module:QualName"``) and the
        model's fields.

    Returns
    -------
    Model

    Raises
    ------
    ModelNotAllowed
        If ``d`` names a module that ``ftps.models.allowed`` does not allow.
    ModelError
        If the module named cannot be imported or has no such model.
    ValueError
        For an unknown kind or bad fields.
    """
    return MODELS.rebuild(d)
