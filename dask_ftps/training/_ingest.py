"""``train()``'s input: NumPy, SciPy sparse, pandas or Dask data read, checked
and cut into the shards the workers train on."""

from __future__ import annotations

import asyncio
import itertools
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from dask_ftps._exceptions import (
    InvalidRequest,
)
from dask_ftps._sparse import is_sparse as _is_sparse

if TYPE_CHECKING:
    import dask.array as da
    from distributed import Client

    from ._task import Classification

logger = logging.getLogger(__name__)


def is_dask_collection(a: Any) -> bool:
    """Whether ``a`` is a Dask collection (array, DataFrame, ...)."""
    return hasattr(a, "__dask_graph__")


def _local(a: Any, name: str, dtype: Any = None) -> Any:
    """NumPy (or SciPy sparse, for X) from array-likes such as pandas objects."""
    if _is_sparse(a) and name.startswith("X"):
        return a.tocsr()
    if _is_sparse(a):
        raise InvalidRequest("y must be dense: a 1-D array of labels")
    try:
        return np.asarray(a, dtype=dtype)
    except (TypeError, ValueError) as e:
        raise InvalidRequest(f"{name} cannot be read as numbers: {e}") from None


async def _known_chunks(client: Client, a: da.Array) -> da.Array:
    """``a`` with the row counts of its chunks known (computed on the cluster
    when they are not, as ``compute_chunk_sizes()`` would, without blocking)."""
    import dask
    import dask.array as da

    if not any(np.isnan(c) for c in a.chunks[0]):
        return a
    if a.ndim == 2 and any(np.isnan(c) for c in a.chunks[1]):
        raise InvalidRequest("X needs a known number of columns")
    blocks = a.to_delayed().ravel() if a.ndim == 1 else a.to_delayed()[:, 0]
    futures = client.compute([dask.delayed(len)(b) for b in blocks])
    lengths = tuple(await client.gather(futures, asynchronous=True))
    chunks = (lengths,) if a.ndim == 1 else (lengths, *a.chunks[1:])
    return da.Array(a.dask, a.name, chunks, dtype=a.dtype, meta=a._meta)


@dataclass(frozen=True)
class _Data:
    """``train()``'s input, either local (NumPy, SciPy sparse) or Dask arrays."""

    X: Any
    y: Any
    local: bool

    @classmethod
    async def of(cls, client: Client, X: Any, y: Any, task: Classification) -> _Data:
        """Read ``X`` and ``y``; check their shapes against each other and the
        task's."""
        if X is None or y is None:
            raise InvalidRequest("train() needs both X and y")
        lazy = [is_dask_collection(a) for a in (X, y)]
        if any(lazy):
            X = await _known_chunks(client, dask_array(X, "X"))
            y = await _known_chunks(client, dask_array(y, "y"))
            data = cls(X, y, local=False)
        else:
            data = cls(_local(X, "X"), _local(y, "y"), local=True)
        X, y = data.X, data.y
        if X.ndim != 2 or y.ndim != 1:
            raise InvalidRequest(
                f"X must be 2-D and y 1-D, got {X.ndim}-D and {y.ndim}-D"
            )
        if X.shape[0] != y.shape[0]:
            raise InvalidRequest(f"X has {X.shape[0]} rows but y has {y.shape[0]}")
        if X.shape[0] == 0:
            raise InvalidRequest("X has no samples: there is nothing to train on")
        task.check_features(X.shape[1], "X")
        if np.dtype(X.dtype).kind not in "biuf":
            raise InvalidRequest(f"X must hold real numbers, not {X.dtype}")
        if np.dtype(y.dtype).kind not in "iu":
            raise InvalidRequest(
                f"y must hold integer class labels, not {y.dtype} (FTPSClassifier "
                "encodes labels of any type)"
            )
        return data

    @property
    def n_samples(self) -> int:
        return int(self.X.shape[0])

    async def check(self, client: Client, task: Classification) -> np.ndarray:
        """Refuse data the run would fail on half-way: NaN or infinite features,
        labels outside the model's classes. One pass over the data, here for
        local input and on the cluster for Dask input, before any update is
        sent. Returns the count of each class."""
        n_classes = task.n_classes
        if self.local:  # in a thread: not on the client's event loop
            finite, low, high, counts = await asyncio.to_thread(
                _local_checks, self.X, self.y, n_classes
            )
        else:
            import dask
            import dask.array as da

            y = self.y
            checks = [
                # per block: a block may be a SciPy sparse matrix
                [dask.delayed(_finite)(b) for b in self.X.to_delayed().ravel()],
                y.min(),
                y.max(),
                da.bincount(da.clip(y, 0, n_classes - 1), minlength=n_classes),
            ]
            blocks, low, high, counts = await client.gather(
                client.compute(checks), asynchronous=True
            )
            finite = all(blocks)
        if not finite:
            raise InvalidRequest(
                "X holds NaN or infinite values: impute or drop them first"
            )
        task.check_labels(low, high, "y")
        return np.asarray(counts)

    async def shards(
        self, client: Client, sizes: tuple[int, ...], workers: list[str] | None = None
    ) -> _Shards:
        """Futures of each shard's X and y: local input is scattered (one piece
        per shard, not embedded in a graph; to ``workers`` if given), Dask input
        computed in place."""
        if self.local:
            bounds = np.cumsum((0, *sizes))
            parts = [(self.X[a:b], self.y[a:b]) for a, b in itertools.pairwise(bounds)]
            futures = await client.scatter(  # one round trip for all
                [part for pair in parts for part in pair], hash=False, workers=workers
            )
            return _Shards(list(futures[0::2]), list(futures[1::2]), parts, workers)
        X = self.X.rechunk({0: sizes, 1: -1})
        y = self.y.rechunk({0: sizes})
        xs = client.compute(list(X.to_delayed().ravel()))
        ys = client.compute(list(y.to_delayed().ravel()))
        return _Shards(xs, ys, None)


def _finite(X: Any) -> bool:
    """Whether every value of ``X`` (NumPy or SciPy sparse) is finite."""
    return bool(np.isfinite(X.data if _is_sparse(X) else X).all())


def _local_checks(X: Any, y: np.ndarray, n_classes: int) -> tuple:
    """``(finite, lowest label, highest label, class counts)`` of local input."""
    finite = _finite(X)
    low, high = int(y.min()), int(y.max())
    counts = None
    if low >= 0 and high < n_classes:
        counts = np.bincount(y, minlength=n_classes)
    return finite, low, high, counts


@dataclass
class _Shards:
    """Futures of the shards' X and y. Dask recomputes a lost chunk of a Dask
    input; a scattered shard (``parts``: local input) lost with its worker is
    scattered again from the caller's data."""

    xs: list
    ys: list
    parts: list[tuple[Any, Any]] | None
    workers: list[str] | None = None  # where to scatter (None: anywhere)

    def lost(self, s: int) -> bool:
        if self.parts is None:
            return False
        return any(f.status != "finished" for f in (self.xs[s], self.ys[s]))

    async def scatter(self, client: Client, s: int) -> None:
        """Scatter shard ``s`` again (its futures were lost)."""
        X, y = self.parts[s]
        if self.workers is not None:
            # Where the workers named at the start still live (a restarted
            # worker has a new address): the others, else anywhere.
            info = await client.scheduler.identity()
            self.workers = [
                w for w in self.workers if w in info.get("workers", {})
            ] or None
        x_future, y_future = await client.scatter(
            [X, y], hash=False, workers=self.workers
        )
        self.xs[s].release()
        self.ys[s].release()
        self.xs[s], self.ys[s] = x_future, y_future

    def release(self) -> None:
        """Drop our references (data the caller holds stays)."""
        for future in self.xs + self.ys:
            future.release()


def dask_array(a: Any, name: str) -> da.Array:
    """A Dask array from a Dask array, DataFrame or Series, or an in-memory
    array-like (chunk sizes possibly unknown: see :func:`_known_chunks`)."""
    import dask.array as da  # here, not at import: the scheduler preload stays light

    if hasattr(a, "to_dask_array"):  # a Dask DataFrame or Series
        return a.to_dask_array()
    if isinstance(a, da.Array):
        return a
    if is_dask_collection(a):
        raise InvalidRequest(
            f"{name} is a {type(a).__name__}: give a Dask array or DataFrame"
        )
    local = _local(a, name)
    if _is_sparse(local):
        local = local.toarray()  # beside Dask input, it is small
    return da.from_array(local)


async def _validation(
    client: Client, validation: Any, task: Classification
) -> tuple[np.ndarray, np.ndarray]:
    """``(X_val, y_val)`` in memory, checked against the task."""
    if not isinstance(validation, tuple | list) or len(validation) != 2:
        raise InvalidRequest("validation must be a pair (X_val, y_val)")
    arrays = []
    for a, name in zip(validation, ("X_val", "y_val"), strict=True):
        if is_dask_collection(a):
            a = await client.compute(dask_array(a, name))
        arrays.append(_local(a, name))  # sparse X stays sparse
    Xv, yv = arrays
    if Xv.ndim != 2 or yv.ndim != 1 or Xv.shape[0] != len(yv) or len(yv) == 0:
        raise InvalidRequest(
            "validation must be (X, y) with one label per row, got shapes "
            f"{Xv.shape} and {yv.shape}"
        )
    task.check_features(Xv.shape[1], "validation X")
    if yv.dtype.kind not in "iu":
        raise InvalidRequest(f"validation labels must be integers, not {yv.dtype}")
    task.check_labels(int(yv.min()), int(yv.max()), "validation y")
    if not np.isfinite(Xv.data if _is_sparse(Xv) else Xv).all():
        raise InvalidRequest("validation X holds NaN or infinite values")
    return Xv.astype(np.float32), yv.astype(np.int64)
