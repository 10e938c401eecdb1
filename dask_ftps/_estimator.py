"""``FTPSClassifier``: a scikit-learn classifier trained by the parameter server."""

from __future__ import annotations

import atexit
import contextlib
import logging
import numbers
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.preprocessing import LabelEncoder
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from dask_ftps._client import get_model, status
from dask_ftps._core import MODES
from dask_ftps._exceptions import FTPSError, ServerReplaced
from dask_ftps._scheduler_plugin import ParameterServer
from dask_ftps.models import Model, check_model, dense_model
from dask_ftps.optim import SGD, Adam, Optimizer
from dask_ftps.training._driver import _check_settings, _Settings, _train_call
from dask_ftps.training._ingest import _known_chunks, dask_array, is_dask_collection
from dask_ftps.training._task import Classification, _class_weights

if TYPE_CHECKING:
    from distributed import Client

logger = logging.getLogger(__name__)

_OPTIMIZERS = ("sgd", "adam")


def _server_id_of(client: Client, registration: str) -> str | None:
    """The server id of the server registered as ``registration``, or None if
    another one replaced it already (train() then refuses it)."""
    reply = status(client)
    if reply.get("registration") != registration:
        return None
    return reply.get("server_id")


class FTPSClassifier(ClassifierMixin, BaseEstimator):
    """A neural-network classifier trained on a Dask cluster by a fault-tolerant
    parameter server.

    ``fit`` registers a :class:`~dask_ftps.ParameterServer` with a fresh model on
    the cluster's scheduler (replacing the one there) and runs
    :func:`~dask_ftps.train`; the trained parameters are then copied into the
    estimator, so that ``predict`` runs locally (lazily, on Dask input) and the
    fitted estimator pickles without the cluster (unless ``client`` is a
    ``Client`` object: give an address or None then). Labels may be of any
    type: they are encoded with :class:`~sklearn.preprocessing.LabelEncoder`.

    The settings (``class_weight`` included) and NumPy input are checked
    before the cluster is touched; NaN or Inf in Dask input is found on the
    cluster before any update, but after the fresh server replaced the one
    there.

    Fits in threads of one process take turns. A fit is refused with
    :class:`~dask_ftps.RunInUse` while another client trains on the
    scheduler's server (another process's fit, a ``GridSearchCV`` whose fits
    run on Dask workers), and with :class:`~dask_ftps.ServerReplaced` if
    another client's server replaced the one it registered before it began: a
    fit never trains, or returns, another's model.

    Parameters
    ----------
    hidden_layer_sizes : tuple of int, default (64,)
        Widths of the ReLU hidden layers; ``()`` is softmax (multinomial
        logistic) regression. Not used with ``model``.
    model : dask_ftps.models.Model, optional
        Your own model (see "Your own model" in the docs) instead of the dense
        network of ``hidden_layer_sizes``: its ``n_classes`` must be the number
        of classes in ``y`` (and its ``n_features``, if it has one, the number
        of features of ``X``). Predictions call its ``predict_proba`` with
        float64 parameters.
    epochs : int, default 20
        Passes over the data (the most, with ``early_stopping``).
    batch_size : int, default 32
        The most samples per minibatch (one update).
    optimizer : {"sgd", "adam"}, default "sgd"
        Applied on the server to every merged update.
    lr : float, default 0.05
        Learning rate.
    momentum : float, default 0.9
        Heavy-ball momentum of ``"sgd"``.
    lr_schedule : {"constant", "exponential", "inverse"}, default "constant"
        The learning rate of epoch ``e``: ``lr``, ``lr * lr_decay ** e`` or
        ``lr / (1 + lr_decay * e)``. Each ``partial_fit`` call is a run of one
        epoch, its epoch 0: the schedule does not advance between calls.
    lr_decay : float, default 0.0
        The schedule's factor (in ``(0, 1]`` for ``"exponential"``).
    mode : {"sync", "async", "ssp"}, default "sync"
        How the server merges updates. ``"sync"`` averages one update of every
        shard per version, so that a fit with a given ``random_state`` on the
        same cluster is repeatable; ``"async"`` merges each update on arrival.
    class_weight : dict, "balanced" or None, default None
        Weights of the classes (by label) in the loss.
    early_stopping : bool, default False
        Hold out ``validation_fraction`` of the data (stratified) and stop when
        its loss has not improved by more than ``tol`` for
        ``n_iter_no_change`` epochs.
    validation_fraction : float, default 0.1
        The share held out for ``early_stopping``.
    n_iter_no_change : int, default 5
        Epochs without improvement before stopping.
    tol : float, default 1e-4
        The least improvement of the validation loss that counts.
    store : str, os.PathLike, zarr Store or None, default None
        A Zarr journal for the server: a fit interrupted by a lost scheduler is
        resumed by the same fit (same data size, settings and integer
        ``random_state``) on the same store, and a finished one returned; a
        fit with another data size or ``epochs`` is refused with
        :class:`~dask_ftps.SpecMismatch` (give it another store). The store
        holds one model: another model (``random_state=None`` draws another one),
        optimizer or mode on it is refused with :class:`~dask_ftps.SpecMismatch`.
        Give a search (``GridSearchCV``) no store: its clones would share it.
    client : distributed.Client, str or None, default None
        The cluster: a client, a scheduler address, or None for the current
        default client, else a local in-process cluster of two single-thread
        workers started on first use (and closed at exit).
    random_state : int, RandomState or None, default None
        Seeds the model's initial weights, the minibatch order and the
        validation split.
    callbacks : sequence of callables or None, default None
        ``callback(epoch, record)`` after every epoch; a true return stops.
    verbose : bool, default False
        Show a progress bar.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
        The class labels.
    n_features_in_ : int
        Number of features seen during ``fit``.
    feature_names_in_ : ndarray of shape (n_features_in_,)
        Names of the features, when ``X`` had string column names.
    params_ : dict of str to ndarray
        The trained parameters (float32), as the server served them.
    model_ : dask_ftps.models.Model
        The model spec.
    history_ : list of dict
        One record per epoch: ``loss``, ``accuracy`` (and ``val_loss``,
        ``val_accuracy`` with ``early_stopping``), ``seconds``; the last holds
        ``stopped: 1.0`` when training stopped early.
    loss_curve_ : list of float
        The training loss of each epoch.
    n_iter_ : int
        Epochs run.
    version_ : int
        The server's model version after the last fit.

    Examples
    --------
    >>> from sklearn.pipeline import make_pipeline  # doctest: +SKIP
    >>> from sklearn.preprocessing import StandardScaler  # doctest: +SKIP
    >>> clf = make_pipeline(StandardScaler(), FTPSClassifier(epochs=10))  # doctest: +SKIP
    >>> clf.fit(X_train, y_train).score(X_test, y_test)  # doctest: +SKIP
    """

    def __init__(
        self,
        hidden_layer_sizes: Sequence[int] = (64,),
        *,
        model: Model | None = None,
        epochs: int = 20,
        batch_size: int = 32,
        optimizer: str = "sgd",
        lr: float = 0.05,
        momentum: float = 0.9,
        lr_schedule: str = "constant",
        lr_decay: float = 0.0,
        mode: str = "sync",
        class_weight: Any = None,
        early_stopping: bool = False,
        validation_fraction: float = 0.1,
        n_iter_no_change: int = 5,
        tol: float = 1e-4,
        store: Any = None,
        client: Client | str | None = None,
        random_state: Any = None,
        callbacks: Sequence[Callable] | None = None,
        verbose: bool = False,
    ) -> None:
        self.hidden_layer_sizes = hidden_layer_sizes
        self.model = model
        self.epochs = epochs
        self.batch_size = batch_size
        self.optimizer = optimizer
        self.lr = lr
        self.momentum = momentum
        self.lr_schedule = lr_schedule
        self.lr_decay = lr_decay
        self.mode = mode
        self.class_weight = class_weight
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.n_iter_no_change = n_iter_no_change
        self.tol = tol
        self.store = store
        self.client = client
        self.random_state = random_state
        self.callbacks = callbacks
        self.verbose = verbose

    def __sklearn_clone__(self) -> FTPSClassifier:
        # A client cannot be deep-copied: the clone shares it.
        params = self.get_params(deep=False)
        client = params.pop("client")
        return type(self)(
            client=client, **{k: clone(v, safe=False) for k, v in params.items()}
        )

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True
        tags.non_deterministic = self.mode != "sync"
        return tags

    # -- fitting ------------------------------------------------------------------

    def fit(self, X: Any, y: Any) -> FTPSClassifier:
        """Train a fresh model on ``X`` and ``y``.

        Parameters
        ----------
        X : array-like, sparse matrix, DataFrame or Dask array of shape (n_samples, n_features)
            Training data.
        y : array-like or Dask array of shape (n_samples,)
            Class labels, of any type.

        Returns
        -------
        self : FTPSClassifier
        """
        X, y = self._validate_training_data(X, y, reset=True)
        with _client_for(self.client) as client:
            X, y = _known_lengths(client, X, y)
            self._encode_classes(client, y, classes=None)
            return self._fit(client, X, y, first=True, epochs=self.epochs)

    def partial_fit(self, X: Any, y: Any, classes: Any = None) -> FTPSClassifier:
        """Train one epoch on ``X`` and ``y`` on top of the model so far.

        The first call registers a server with a fresh model and needs
        ``classes``; later calls go on on that server, as long as it still
        holds this estimator's model (another ``fit`` on the cluster replaces
        it: then call ``fit`` again).

        Parameters
        ----------
        X : array-like, sparse matrix, DataFrame or Dask array of shape (n_samples, n_features)
            Training data.
        y : array-like or Dask array of shape (n_samples,)
            Class labels.
        classes : array-like of shape (n_classes,), default None
            Every class of the problem; needed on the first call only.

        Returns
        -------
        self : FTPSClassifier
        """
        if self.early_stopping:
            raise ValueError(
                "partial_fit does not support early_stopping=True: each call is "
                "one epoch"
            )
        first = not hasattr(self, "params_")
        if first and classes is None:
            raise ValueError("classes must be given on the first call to partial_fit")
        X, y = self._validate_training_data(X, y, reset=first)
        with _client_for(self.client) as client:
            X, y = _known_lengths(client, X, y)
            if first:
                self._encode_classes(client, y, classes=classes)
            unseen = np.setdiff1d(_labels(client, y), self.classes_)
            if len(unseen):
                raise ValueError(
                    f"y holds labels that are not among classes_: {unseen.tolist()}"
                )
            return self._fit(client, X, y, first=first, epochs=1)

    def _validate_training_data(self, X: Any, y: Any, reset: bool):
        if y is None:
            raise ValueError(
                f"{type(self).__name__} requires y to be passed, but the target y "
                "is None"
            )
        if is_dask_collection(X) or is_dask_collection(y):
            columns = getattr(X, "columns", None)
            if (
                reset
                and columns is not None
                and all(isinstance(c, str) for c in columns)
            ):
                self.feature_names_in_ = np.asarray(columns, dtype=object)
            X, y = dask_array(X, "X"), dask_array(y, "y")
            if X.ndim != 2 or y.ndim != 1:
                raise ValueError(
                    f"Expected a 2-D X and a 1-D y, got {X.ndim}-D and {y.ndim}-D"
                )
            _check_features(self, X.shape[1], reset)
            return X, y
        X, y = validate_data(
            self,
            X,
            y,
            reset=reset,
            accept_sparse="csr",
            dtype=[np.float64, np.float32],
        )
        check_classification_targets(y)
        return X, y

    def _encode_classes(self, client: Client, y: Any, classes: Any) -> None:
        encoder = LabelEncoder()
        if classes is not None:
            encoder.fit(np.asarray(classes))
        elif is_dask_collection(y):
            labels = _labels(client, y)
            check_classification_targets(labels)  # continuous labels are refused
            encoder.fit(labels)
        else:
            encoder.fit(y)
        if len(encoder.classes_) < 2:
            raise ValueError(
                f"{type(self).__name__} needs samples of at least 2 classes in the "
                f"data; got {len(encoder.classes_)} class"
            )
        self._encoder = encoder
        self.classes_ = encoder.classes_

    def _encode(self, y: Any) -> Any:
        if is_dask_collection(y):
            classes = self.classes_
            return y.map_blocks(
                lambda b: np.searchsorted(classes, b).astype(np.int64),
                dtype=np.int64,
            )
        return self._encoder.transform(y).astype(np.int64)

    def _fit(
        self, client: Client, X: Any, y: Any, first: bool, epochs: int
    ) -> FTPSClassifier:
        """Train ``epochs`` on a fresh server (``first``) or on this estimator's."""
        self._check_params()
        y = self._encode(y)
        rng = check_random_state(self.random_state)
        seed = int(rng.randint(2**31 - 1))
        validation = None
        if self.early_stopping:
            X, y, validation = _hold_out(X, y, self.validation_fraction, seed)
        with _seceded(), _FITTING:  # one server per scheduler: fits take turns
            if first:
                model = self._model(seed)
                server = ParameterServer(
                    self.store,
                    model=model,
                    optimizer=self._optimizer(),
                    mode=self.mode,
                )
                client.register_plugin(server)
                self.model_ = model
                # The server this call registered, and no other's (train()
                # refuses another); later calls check the server's id, which
                # the store's runs keep across restarts and re-registrations.
                registration = server.registration
                self._server_id = _server_id_of(client, registration)
                history, run_name = [], ""
            else:
                registration = self._check_server(client)
                history, run_name = self.history_, f"partial-{self.n_iter_}"
            settings = _Settings(
                epochs=epochs,
                batch_size=self.batch_size,
                seed=seed,
                n_shards=None,
                progress=bool(self.verbose),
                run_name=run_name,
                class_weight=self._class_weight(),
                early_stopping=self.n_iter_no_change if self.early_stopping else None,
                tol=self.tol,
                callbacks=tuple(self.callbacks or ()),
                registration=registration,
            )
            result = _train_call(client, X, y, settings, validation)
            version, params = get_model(client)
        self.params_ = {k: np.asarray(v) for k, v in params.items()}
        self._params64 = {k: v.astype(np.float64) for k, v in self.params_.items()}
        self.version_ = int(version)
        self.history_ = [*history, *result.history]
        self.loss_curve_ = [r.get("loss") for r in self.history_]
        self.n_iter_ = len(self.history_)
        return self

    def _check_server(self, client: Client) -> str | None:
        """Refuse a server that does not go on with this estimator's model: not
        the server id saved at registration (another store's server, or a fresh
        memory-only one), or another model there (trained by someone else since).
        A server of the same store (the scheduler restarted with a preload, or
        one registered again on the store) goes on. Returns its registration,
        for train() to refuse any server that replaces it meanwhile."""
        reply = status(client)
        expected = getattr(self, "_server_id", None)
        if expected is not None and reply.get("server_id") != expected:
            raise ServerReplaced(
                "the cluster's parameter server no longer holds this estimator's "
                "model: it is not the one this estimator trained (another fit or "
                "client replaced it). Call fit to start again"
            )
        version, params = get_model(client)
        ours = version == self.version_ and set(params) == set(self.params_)
        ours = ours and all(
            np.array_equal(np.asarray(params[k]), v) for k, v in self.params_.items()
        )
        if not ours:
            raise FTPSError(
                "the cluster's parameter server no longer holds this estimator's "
                "model (another fit replaced it): call fit to start again"
            )
        return None if expected is None else reply.get("registration")

    def _model(self, seed: int) -> Model:
        if self.model is not None:
            task = Classification.of(self.model)
            if task.n_classes != len(self.classes_):
                raise ValueError(
                    f"model {self.model.summary()} has n_classes={task.n_classes}, "
                    f"but y holds {len(self.classes_)} classes"
                )
            if task.n_features not in (None, self.n_features_in_):
                raise ValueError(
                    f"model {self.model.summary()} has n_features="
                    f"{task.n_features}, but X has {self.n_features_in_} features"
                )
            return self.model
        return dense_model(
            self.n_features_in_,
            tuple(self.hidden_layer_sizes),
            len(self.classes_),
            seed,
        )

    def _optimizer(self) -> Optimizer:
        schedule = {"schedule": self.lr_schedule, "decay": self.lr_decay}
        if self.optimizer == "adam":
            return Adam(lr=self.lr, **schedule)
        return SGD(lr=self.lr, momentum=self.momentum, **schedule)

    def _class_weight(self) -> Any:
        if self.class_weight is None or isinstance(self.class_weight, str):
            return self.class_weight
        if not isinstance(self.class_weight, dict):
            raise ValueError(  # noqa: TRY004 - scikit-learn's convention for a bad param
                f"class_weight must be a dict, 'balanced' or None, got "
                f"{self.class_weight!r}"
            )
        index = {label: i for i, label in enumerate(self.classes_.tolist())}
        unknown = [label for label in self.class_weight if label not in index]
        if unknown:
            raise ValueError(f"class_weight names labels not in the data: {unknown}")
        return {index[label]: w for label, w in self.class_weight.items()}

    def _check_params(self) -> None:
        if self.model is not None:
            check_model(self.model)
        hidden = self.hidden_layer_sizes
        if isinstance(hidden, numbers.Integral) and not isinstance(hidden, bool):
            hidden = (hidden,)
        try:
            widths = tuple(hidden)
        except TypeError:
            widths = None
        if widths is None or not all(
            isinstance(w, numbers.Integral) and not isinstance(w, bool) and w > 0
            for w in widths
        ):
            raise ValueError(
                f"hidden_layer_sizes must be a tuple of positive integers, got {hidden!r}"
            )
        if self.optimizer not in _OPTIMIZERS:
            raise ValueError(
                f"optimizer must be one of {_OPTIMIZERS}, got {self.optimizer!r}"
            )
        fraction = self.validation_fraction
        if self.early_stopping and not (
            isinstance(fraction, numbers.Real) and 0 < fraction < 1
        ):
            raise ValueError(f"validation_fraction must be in (0, 1), got {fraction!r}")
        self._optimizer()  # its own checks of lr, momentum and the schedule
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        # train()'s own checks of its settings and the class weights, here: before
        # the cluster's server is replaced, as ValueErrors (scikit-learn's way).
        settings = _Settings(
            epochs=self.epochs,
            batch_size=self.batch_size,
            seed=0,
            n_shards=None,
            progress=None,
            run_name="",
            class_weight=self._class_weight(),
            early_stopping=self.n_iter_no_change,
            tol=self.tol,
            callbacks=tuple(self.callbacks or ()),
        )
        try:
            _check_settings(n_iter_no_change=self.n_iter_no_change)
            settings.check(validation=())
            _class_weights(settings.class_weight, np.ones(len(self.classes_)))
        except TypeError as e:
            raise ValueError(str(e)) from None

    # -- predicting ---------------------------------------------------------------

    def predict_proba(self, X: Any) -> Any:
        """Class probabilities, shape (n_samples, n_classes), columns in the order
        of ``classes_``; lazy for a Dask array.

        Parameters
        ----------
        X : array-like, sparse matrix, DataFrame or Dask array of shape (n_samples, n_features)

        Returns
        -------
        ndarray or dask.array.Array of shape (n_samples, n_classes)
        """
        check_is_fitted(self, "params_")
        model, params = self.model_, self._params64
        if is_dask_collection(X):
            X = dask_array(X, "X")
            _check_features(self, X.shape[1], reset=False)
            X = X.rechunk({1: -1})
            return X.map_blocks(
                lambda b: model.predict_proba(params, _dense(b)),
                dtype=np.float64,
                chunks=(X.chunks[0], (len(self.classes_),)),
            )
        X = validate_data(
            self, X, reset=False, accept_sparse="csr", dtype=[np.float64, np.float32]
        )
        return _by_rows(X, lambda b: model.predict_proba(params, _dense(b)))

    def predict_log_proba(self, X: Any) -> Any:
        """The logarithm of :meth:`predict_proba`.

        Parameters
        ----------
        X : array-like, sparse matrix, DataFrame or Dask array of shape (n_samples, n_features)

        Returns
        -------
        ndarray or dask.array.Array of shape (n_samples, n_classes)
        """
        proba = self.predict_proba(X)
        with np.errstate(divide="ignore"):
            return np.log(proba)

    def predict(self, X: Any) -> Any:
        """The most probable class of each sample; lazy for a Dask array.

        Parameters
        ----------
        X : array-like, sparse matrix, DataFrame or Dask array of shape (n_samples, n_features)

        Returns
        -------
        ndarray or dask.array.Array of shape (n_samples,)
        """
        proba = self.predict_proba(X)
        classes = self.classes_
        if is_dask_collection(proba):
            return proba.map_blocks(
                lambda p: classes[p.argmax(axis=1)],
                dtype=classes.dtype,
                drop_axis=1,
            )
        return classes[proba.argmax(axis=1)]


# -- helpers ----------------------------------------------------------------------


def _labels(client: Client, y: Any) -> np.ndarray:
    """The distinct labels of ``y``, computed on ``client``'s cluster for Dask."""
    if not is_dask_collection(y):
        return np.unique(np.asarray(y))
    import dask.array as da

    return np.asarray(client.compute(da.unique(y)).result())


def _known_lengths(client: Client, X: Any, y: Any) -> tuple[Any, Any]:
    """Dask ``X`` and ``y`` with known chunk lengths, the same for both (computed
    on ``client``'s cluster when unknown, as for a Dask DataFrame)."""
    if not is_dask_collection(X):
        return X, y
    X = client.sync(_known_chunks, client, X)
    y = client.sync(_known_chunks, client, y)
    if X.shape[0] != y.shape[0]:
        raise ValueError(f"X has {X.shape[0]} rows but y has {y.shape[0]}")
    return X, y.rechunk({0: X.chunks[0]})


def _dense(block: Any) -> np.ndarray:
    return block.toarray() if hasattr(block, "toarray") else np.asarray(block)


def _by_rows(X: Any, f: Callable[[Any], np.ndarray], rows: int = 65536) -> np.ndarray:
    """``f`` of ``X`` a slab of rows at a time (sparse input is made dense per
    slab)."""
    if X.shape[0] <= rows:
        return f(X)
    return np.concatenate([f(X[i : i + rows]) for i in range(0, X.shape[0], rows)])


def _check_features(estimator: FTPSClassifier, n_features: int, reset: bool) -> None:
    if reset:
        estimator.n_features_in_ = int(n_features)
    elif n_features != estimator.n_features_in_:
        raise ValueError(
            f"X has {n_features} features, but {type(estimator).__name__} is "
            f"expecting {estimator.n_features_in_} features as input"
        )


def _hold_out(X: Any, y: Any, fraction: float, seed: int):
    """``(X_train, y_train, (X_val, y_val))``: a stratified split of NumPy input,
    a random one of Dask input."""
    if is_dask_collection(X) or is_dask_collection(y):
        import dask.array as da

        rng = da.random.default_rng(seed)
        held = rng.random(X.shape[0], chunks=(X.chunks[0],)) < fraction
        return X[~held], y[~held], (X[held], y[held])
    from sklearn.model_selection import train_test_split

    counts = np.bincount(y)
    stratify = y if counts[counts > 0].min() >= 2 else None
    X_train, X_val, y_train, y_val = train_test_split(
        X, y, test_size=fraction, random_state=seed, stratify=stratify
    )
    return X_train, y_train, (X_val, y_val)


_LOCK = threading.Lock()
_FITTING = threading.Lock()  # held by a fit from registering its server to the end


@contextlib.contextmanager
def _seceded():
    """Inside a Dask task (a search whose fits run on Dask workers, with joblib's
    ``dask`` backend), leave the worker's thread pool while the fit waits for its
    turn and for its training tasks: fits holding every thread of a worker that
    their training tasks need would wait for each other for ever."""
    from distributed import rejoin, secede
    from distributed.worker import thread_state

    if getattr(thread_state, "key", None) is None:  # not in a task
        yield
        return
    secede()
    try:
        yield
    finally:
        rejoin()


_LOCAL: list[Client] = []  # the local cluster's client, started on first use


@contextlib.contextmanager
def _client_for(spec: Client | str | None) -> Iterator[Client]:
    """The client a fit uses: ``spec``, a client of the address ``spec`` (closed
    after the fit), the default client, or a local cluster's (kept till exit)."""
    from distributed import Client, default_client

    if isinstance(spec, Client):
        yield spec
        return
    if isinstance(spec, str):
        with Client(spec, set_as_default=False) as client:
            yield client
        return
    if spec is not None:
        raise TypeError(
            f"client must be a distributed.Client, an address or None, got {spec!r}"
        )
    try:
        client = default_client()
    except ValueError:  # no default client
        client = _local_client()
    yield client


def _local_client() -> Client:
    from distributed import Client, LocalCluster

    with _LOCK:
        if _LOCAL and _LOCAL[0].status == "running":
            return _LOCAL[0]
        cluster = LocalCluster(
            n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None
        )
        client = Client(cluster, set_as_default=False)
        logger.info("FTPSClassifier started a local cluster: %s", cluster)
        if not _LOCAL:
            atexit.register(_close_local)
        _LOCAL[:] = [client]
        return client


def _close_local() -> None:
    for client in _LOCAL:
        cluster = client.cluster
        client.close()
        if cluster is not None:
            cluster.close()
    _LOCAL.clear()
