"""Shards: the parameters split into key ranges, each served by its own server.

A sharded run (``ParameterServer(..., shards=S)``) cuts the model's parameters
into S parts by :func:`plan`: whole arrays where they fit, the large ones by
rows. Shard ``k`` is a run of its own in the store's folder ``shards/<k>``,
whose model is a :class:`ModelShard` (the base model's record plus ``k`` and
``S``): the state machine, the journal, the recovery and the fencing of a
whole run, for that shard's keys. A row range of an array is a parameter of
the shard named ``"<name>@<first>-<end>"``.

Every optimizer dask_ftps ships is elementwise and counts steps by the
shard's version (which every update advances on every shard), so a shard
merges exactly the bits the whole model would: a sync run with S shards equals
one with 1, bit for bit.
"""

from __future__ import annotations

import json
import math
import posixpath
from dataclasses import dataclass
from typing import Any

import numpy as np

from dask_ftps._exceptions import FTPSError, ModelError
from dask_ftps.models._base import MODELS, Model, _freeze_int, model_from_dict

#: Most shards a run may have.
MAX_SHARDS = 64
#: The folder of the store that holds the shards' runs.
SHARDS_FOLDER = "shards"


@dataclass(frozen=True)
class Piece:
    """Rows ``[start, stop)`` of parameter ``name`` (all of it if ``whole``)."""

    name: str
    start: int
    stop: int
    whole: bool

    @property
    def key(self) -> str:
        """The name of the piece in its shard's model."""
        return self.name if self.whole else f"{self.name}@{self.start}-{self.stop}"


def plan(
    shapes: dict[str, tuple[int, ...]], shards: int
) -> tuple[tuple[Piece, ...], ...]:
    """Cut parameters of ``shapes`` into ``shards`` parts of near-equal size.

    Arrays are taken in name order; an array that fits in what is left of the
    current part goes there whole, one that is larger than a part's share is
    cut by rows (its first axis), and a small one that does not fit goes whole
    to the part with room left. Deterministic: the same shapes and count give
    the same plan on every process.

    Raises
    ------
    ModelError
        If the parameters cannot fill ``shards`` parts (fewer rows than parts).
    """
    if (
        not isinstance(shards, int)
        or isinstance(shards, bool)
        or not 1 <= shards <= MAX_SHARDS
    ):
        raise ValueError(
            f"shards must be an integer in [1, {MAX_SHARDS}], got {shards!r}"
        )
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    total = sum(sizes.values())
    share = -(-total // shards)
    parts: list[list[Piece]] = [[] for _ in range(shards)]
    fill = [0] * shards
    k = 0
    for name in sorted(shapes):
        shape = shapes[name]
        rows = shape[0] if shape else 1
        row = sizes[name] // rows if rows else 0
        if sizes[name] <= share - fill[k] or sizes[name] < share or rows < 2:
            # Whole: where it fits, else in the emptiest part from k on.
            if sizes[name] > share - fill[k] and k + 1 < shards:
                k = min(range(k, shards), key=lambda j: fill[j])
            parts[k].append(Piece(name, 0, rows, True))
            fill[k] += sizes[name]
            if fill[k] >= share and k + 1 < shards:
                k += 1
            continue
        start = 0
        while start < rows:
            take_rows = max(1, round((share - fill[k]) / row))
            stop = rows if k + 1 == shards else min(rows, start + take_rows)
            parts[k].append(Piece(name, start, stop, start == 0 and stop == rows))
            fill[k] += (stop - start) * row
            if (stop < rows or fill[k] >= share) and k + 1 < shards:
                k += 1  # this part is full
            start = stop
    if any(not p for p in parts):
        raise ModelError(
            f"the model's parameters ({total:,} in {len(shapes)} arrays) cannot fill "
            f"{shards} shards: use fewer shards"
        )
    return tuple(tuple(p) for p in parts)


@MODELS.builtin
@dataclass(frozen=True)
class ModelShard(Model):
    """Shard ``shard`` of ``shards`` of a model: the parameters a shard server
    holds. ``base`` is the whole model's record (:meth:`Model.to_dict`) as JSON.

    Only a server uses it (its parameters, their first values): workers compute
    with the whole model.
    """

    base: str
    shards: int
    shard: int

    def __post_init__(self) -> None:
        _freeze_int(self, "shards", 1)
        _freeze_int(self, "shard", 0)
        if self.shard >= self.shards or self.shards > MAX_SHARDS:
            raise ModelError(f"shard {self.shard} of {self.shards} is not a shard")
        if not isinstance(self.base, str):
            raise ModelError("ModelShard.base must be a model record in JSON")

    @classmethod
    def of(cls, model: Model, shards: int, shard: int) -> ModelShard:
        return cls(json.dumps(model.to_dict(), sort_keys=True), shards, shard)

    @property
    def model(self) -> Model:
        """The whole model (imported only as ``ftps.models.allowed`` allows)."""
        cached = self.__dict__.get("_model")
        if cached is None:
            cached = model_from_dict(json.loads(self.base))
            object.__setattr__(self, "_model", cached)
        return cached

    @property
    def pieces(self) -> tuple[Piece, ...]:
        cached = self.__dict__.get("_pieces")
        if cached is None:
            cached = plan(self.model.param_shapes(), self.shards)[self.shard]
            object.__setattr__(self, "_pieces", cached)
        return cached

    @property
    def n_classes(self) -> int:
        return self.model.n_classes

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = self.model.param_shapes()
        return {
            p.key: (p.stop - p.start, *shapes[p.name][1:]) if shapes[p.name] else ()
            for p in self.pieces
        }

    def init_params(self) -> dict[str, np.ndarray]:
        return take(self.model.init_params(), self.pieces, copy=True)

    def loss_and_grad(self, params, X, y, sample_weight=None):
        raise FTPSError("a shard of a model is not a model to compute with")

    def predict_proba(self, params, X):
        raise FTPSError("a shard of a model is not a model to compute with")

    def summary(self) -> str:
        return (
            f"shard {self.shard} of {self.shards} of {self.model.summary()}: "
            f"{self.n_params():,} parameters"
        )


def take(
    params: dict[str, Any], pieces: tuple[Piece, ...], *, copy: bool = False
) -> dict[str, Any]:
    """The arrays of ``pieces`` cut from whole ``params`` (views unless ``copy``;
    dense arrays: :func:`~dask_ftps._factored.densify` an update first)."""
    out = {}
    for p in pieces:
        value = params[p.name]
        part = value if p.whole else value[p.start : p.stop]
        out[p.key] = np.array(part) if copy else part
    return out


def assemble(
    parts: list[dict[str, np.ndarray]],
    layout: tuple[tuple[Piece, ...], ...],
) -> dict[str, np.ndarray]:
    """The whole model's arrays from its shards' (in the order of ``layout``)."""
    gathered: dict[str, list[tuple[int, np.ndarray]]] = {}
    for params, pieces in zip(parts, layout, strict=True):
        for p in pieces:
            gathered.setdefault(p.name, []).append((p.start, params[p.key]))
    out = {}
    for name, chunks in gathered.items():
        chunks.sort(key=lambda c: c[0])
        out[name] = (
            chunks[0][1] if len(chunks) == 1 else np.concatenate([c for _, c in chunks])
        )
    return out


def shard_store(store: Any, shard: int) -> str:
    """Where shard ``shard`` of a sharded run's store keeps its run."""
    if not isinstance(store, str):
        raise TypeError(
            "a sharded parameter server needs a store given as a path or URL "
            f"(each shard keeps its run in a folder of it), got {type(store).__name__}"
        )
    if "://" in store:
        return f"{store.rstrip('/')}/{SHARDS_FOLDER}/{shard}"
    return posixpath.join(store, SHARDS_FOLDER, str(shard))
