"""Ids, specs and message types shared by the scheduler and worker halves."""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, NewType, TypedDict

from dask_ftps._exceptions import InvalidRequest, InvalidUpdate, NotRegistered

if TYPE_CHECKING:
    import numpy as np

UpdateId = NewType("UpdateId", str)
WorkerId = NewType("WorkerId", str)
Version = NewType("Version", int)
RunId = NewType("RunId", int)
#: The server a run belongs to: a store's persisted run id (the same across
#: scheduler restarts, so that a rebuilt server goes on with its runs), or a
#: memory-only server's own random id (a new one at each start).
ServerId = NewType("ServerId", str)
#: A ``train()`` call that holds a run: ``"<Dask client id>/<call token>"``.
Holder = NewType("Holder", str)

#: Longest worker id (or run name) the server accepts.
MAX_WORKER_LENGTH = 512
#: Bounds on what a message may ask for (memory the server would spend on it).
MAX_SHARDS = 100_000
MAX_COUNT = 2**40
MAX_EPOCHS = 10**6

Mode = Literal["async", "sync", "ssp"]
MODES: tuple[str, ...] = ("async", "sync", "ssp")

_UPDATE_ID = re.compile(r"^(\d{1,9}):(\d{1,9}):(\d{1,9}):(\d{1,12})$")


@dataclass(frozen=True, order=True)
class UpdateKey:
    """The deterministic identity of one minibatch update: run, epoch, shard, step."""

    run: int
    epoch: int
    shard: int
    step: int

    @property
    def id(self) -> UpdateId:
        return UpdateId(f"{self.run}:{self.epoch}:{self.shard}:{self.step}")

    @classmethod
    def parse(cls, update_id: object) -> UpdateKey:
        """Parse ``"run:epoch:shard:step"``; raise :class:`InvalidUpdate` otherwise."""
        match = _UPDATE_ID.match(update_id) if isinstance(update_id, str) else None
        if match is None:
            raise InvalidUpdate(
                f"update id {update_id!r} is not of the form 'run:epoch:shard:step' "
                "(four non-negative integers)"
            )
        return cls(*(int(g) for g in match.groups()))


@dataclass(frozen=True)
class RunSpec:
    """A training run: how the data is cut into shards and walked through.

    Parameters
    ----------
    shard_sizes
        Number of samples in each shard, fixed for the run.
    batch_size
        Samples per minibatch; the last minibatch of a shard may be smaller.
    epochs
        Passes over every shard.
    seed
        Seed of the per-(epoch, shard) minibatch order.
    """

    shard_sizes: tuple[int, ...]
    batch_size: int
    epochs: int
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "shard_sizes", tuple(self.shard_sizes))
        if not self.shard_sizes or any(
            not _is_int(s) or s < 1 for s in self.shard_sizes
        ):
            raise InvalidRequest(
                f"shard_sizes must be positive integers, got {self.shard_sizes!r}"
            )
        for name in ("batch_size", "epochs"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise InvalidRequest(
                    f"{name} must be a positive integer, got {value!r}"
                )
        if not _is_int(self.seed) or self.seed < 0:
            raise InvalidRequest(
                f"seed must be a non-negative integer, got {self.seed!r}"
            )

    @property
    def n_shards(self) -> int:
        return len(self.shard_sizes)

    @property
    def steps(self) -> tuple[int, ...]:
        """Minibatches per epoch of each shard."""
        return tuple(-(-size // self.batch_size) for size in self.shard_sizes)

    @property
    def rounds_per_epoch(self) -> int:
        """Positions per epoch on the shared clock: the longest shard's steps."""
        return max(self.steps)

    @property
    def minibatches(self) -> int:
        """Minibatch updates the whole run consists of."""
        return self.epochs * sum(self.steps)

    def position(self, epoch: int, step: int) -> int:
        """Place of ``(epoch, step)`` on the run's clock."""
        return epoch * self.rounds_per_epoch + step

    def to_dict(self) -> dict:
        return {
            "shard_sizes": list(self.shard_sizes),
            "batch_size": self.batch_size,
            "epochs": self.epochs,
            "seed": self.seed,
        }

    @classmethod
    def from_dict(cls, d: object) -> RunSpec:
        """Parse a spec as :meth:`to_dict` writes it; :class:`InvalidRequest` else."""
        if not isinstance(d, dict):
            raise InvalidRequest(f"a run spec must be a dict, got {type(d).__name__}")
        unknown = set(d) - {"shard_sizes", "batch_size", "epochs", "seed"}
        if unknown:
            raise InvalidRequest(f"unknown run spec fields {sorted(map(str, unknown))}")
        sizes = d.get("shard_sizes")
        if not isinstance(sizes, list | tuple) or len(sizes) > MAX_SHARDS:
            raise InvalidRequest(
                f"shard_sizes must be a list of at most {MAX_SHARDS} positive integers"
            )
        try:
            spec = cls(
                shard_sizes=tuple(sizes),
                batch_size=d["batch_size"],
                epochs=d["epochs"],
                seed=d.get("seed", 0),
            )
        except (KeyError, TypeError) as e:
            raise InvalidRequest(f"not a run spec: {e!r}") from e
        for name, value, limit in (
            ("batch_size", spec.batch_size, MAX_COUNT),
            ("epochs", spec.epochs, MAX_EPOCHS),
            ("seed", spec.seed, 2**63 - 1),
            ("shard size", max(spec.shard_sizes), MAX_COUNT),
        ):
            if value > limit:
                raise InvalidRequest(f"{name} must be at most {limit}, got {value}")
        return spec


@dataclass(frozen=True)
class Update:
    """One pushed minibatch update, as the parameter server receives it."""

    key: UpdateKey
    worker: WorkerId
    grads: dict[str, np.ndarray]
    #: The train() call it belongs to (None: replayed from the journal): it is
    #: refused while another call holds its run.
    holder: Holder | None = None


@dataclass(frozen=True)
class ModelVersion:
    """An immutable published model: readers may hold it while a merge runs."""

    version: Version
    params: dict[str, np.ndarray]
    opt_state: dict[str, np.ndarray]


def field_server(value: object, op: str) -> ServerId:
    """The ``server_id`` field every message of a run carries (as
    ``ftps_begin_run`` answered it): a non-empty string of at most
    ``MAX_SERVER_ID`` characters. A malformed one is :class:`InvalidRequest`;
    a well-formed one of another server is the server's to refuse
    (:class:`~dask_ftps.ServerReplaced`)."""
    if value is None:
        raise InvalidRequest(
            f"{op} must name the server_id its run began on (ftps_begin_run answers it)"
        )
    if not isinstance(value, str) or not 0 < len(value) <= MAX_SERVER_ID:
        raise InvalidRequest(
            f"{op}: server_id must be a non-empty string of at most "
            f"{MAX_SERVER_ID} characters, got {type(value).__name__} {value!r:.80}"
        )
    return ServerId(value)


#: Longest server id a message may name.
MAX_SERVER_ID = 128
#: A ``train()`` call's holder id: ``"<Dask client id>/<hex token>"``.
_HOLDER = re.compile(r"[A-Za-z0-9_.:-]{1,128}/[0-9a-f]{1,64}")
#: Most holders a ``live`` list may name (one client's train() calls at once).
MAX_LIVE = 64


def field_holder(value: object, name: str = "holder") -> Holder:
    """A ``train()`` call's holder id, ``"<client id>/<hex token>"`` (the
    client id of letters, digits and ``_.:-``, at most 128 characters; the
    token of at most 64 lowercase hex digits)."""
    if not isinstance(value, str) or _HOLDER.fullmatch(value) is None:
        raise InvalidRequest(
            f"{name} must be '<client id>/<hex token>', got "
            f"{type(value).__name__} {value!r:.80}"
        )
    return Holder(value)


def field_live(value: object, holder: Holder | None) -> frozenset[Holder]:
    """``live``: the caller's client's train() calls still running, each a
    holder of that same client (at most ``MAX_LIVE``); none without a holder."""
    if not isinstance(value, list | tuple) or len(value) > MAX_LIVE:
        raise InvalidRequest(f"live must be a list of at most {MAX_LIVE} holders")
    own = None if holder is None else holder_client(holder)
    live = set()
    for entry in value:
        checked = field_holder(entry, "a live holder")
        if holder_client(checked) != own:
            raise InvalidRequest(
                f"live may only name the calls of the caller's own client "
                f"({own!r}), got {checked!r:.80}"
            )
        live.add(checked)
    return frozenset(live)


def holder_client(holder: str) -> str:
    """The Dask client id of a run's holder."""
    return holder.rpartition("/")[0]


class OKMessage(TypedDict):
    status: Literal["OK"]


class ModelMessage(OKMessage, total=False):
    server: str  # this server object's identity: a worker's copy is valid for it only
    incarnation: int
    version: int
    params: object  # ToPickle[dict[str, np.ndarray]] or None when not newer


def download_entries(failure_probability: float, negligible: float) -> int:
    """Smallest N with ``failure_probability ** N <= negligible`` (patent claim 10).

    Examples
    --------
    >>> download_entries(0.05, 1e-6)
    5
    """
    if not 0 < failure_probability < 1 or not 0 < negligible < 1:
        raise ValueError("probabilities must lie strictly between 0 and 1")
    ratio = math.log(negligible) / math.log(failure_probability)
    return max(1, math.ceil(ratio - 1e-9))  # 4.000000000000001 is 4


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# -- message fields: checked at the boundary, before any state changes -----------


def field_int(
    name: str,
    value: object,
    error: type[Exception] = InvalidRequest,
    minimum: int = 0,
    maximum: int = 2**62,
) -> int:
    """An integer message field in ``[minimum, maximum]`` (bools are not integers)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise error(f"{name} must be an integer, got {type(value).__name__}")
    value = int(value)
    if not minimum <= value <= maximum:
        raise error(f"{name} must lie in [{minimum}, {maximum}], got {value}")
    return value


def field_str(
    name: str,
    value: object,
    error: type[Exception] = InvalidRequest,
    optional: bool = False,
    max_length: int = MAX_WORKER_LENGTH,
) -> str | None:
    """A short string message field (or None where ``optional``)."""
    if value is None and optional:
        return None
    if not isinstance(value, str) or len(value) > max_length:
        raise error(
            f"{name} must be a string of at most {max_length} characters, got "
            f"{type(value).__name__}"
        )
    return value


def field_step(value: object, error: type[Exception] = InvalidUpdate):
    """``next_step``: None or ``(epoch, step)``."""
    if value is None:
        return None
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise error(f"next_step must be None or (epoch, step), got {value!r:.80}")
    return (
        field_int("next_step epoch", value[0], error, maximum=MAX_EPOCHS),
        field_int("next_step step", value[1], error, maximum=MAX_COUNT),
    )


def check_reply(reply: object, op: str) -> dict:
    """Return an OK reply of op ``op``; raise the error a handler sent back.

    Raises
    ------
    NotRegistered
        If the scheduler has no handler for ``op`` (it answers None then).
    """
    from distributed.core import clean_exception

    if reply is None:
        raise NotRegistered(
            f"the scheduler has no handler {op!r}: register a "
            "dask_ftps.ParameterServer first (client.register_plugin(...) or "
            "dask scheduler --preload dask_ftps.preload)"
        )
    assert isinstance(reply, dict)
    if reply.get("status") != "OK":
        _, exc, tb = clean_exception(**reply)
        assert exc is not None
        raise exc.with_traceback(tb)
    return reply
