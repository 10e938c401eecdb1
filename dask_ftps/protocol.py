"""Messages between clients, workers, shard servers and the scheduler.

The operation names (``ftps_*``) and :class:`Endpoint`: the handlers of one
:class:`~dask_ftps._server.Server`, which check every field of every message
before anything changes, call the server and answer its reply. The scheduler's
:class:`~dask_ftps.ParameterServer` is an endpoint of its server; a shard server
on a Dask worker is an endpoint of its shard's (the same checks, the same code).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Collection
from typing import Any, TypedDict

import numpy as np
from distributed.core import error_message
from distributed.protocol.serialize import ToPickle

from dask_ftps._core import (
    MAX_COUNT,
    MAX_EPOCHS,
    Holder,
    ModelMessage,
    OKMessage,
    RunSpec,
    Update,
    UpdateKey,
    WorkerId,
    field_holder,
    field_int,
    field_live,
    field_server,
    field_step,
    field_str,
    holder_client,
)
from dask_ftps._exceptions import (
    FTPSError,
    InvalidRequest,
    InvalidUpdate,
    NotRegistered,
    StaleIncarnation,
)
from dask_ftps._sparse import check_wanted
from dask_ftps._state import check_worker

logger = logging.getLogger(__name__)

#: What a server answers, by operation: the scheduler routes ``ftps_<op>`` to
#: the scheduler's endpoint; a shard server's worker routes ``ftps_shard_<op>``
#: to the endpoint of the shard it hosts.
SERVER_OPS = (
    "begin_run",
    "find_run",
    "end_epoch",
    "end_run",
    "next_step",
    "pull",
    "push",
    "status",
    "get_model",
    "model_spec",
    "records",
)
#: The scheduler's operations of a sharded run beside those: the placement of
#: every shard (``ftps_shards``).
SHARDS_OP = "ftps_shards"
#: A worker's operation beside its shard servers' (``op_name(op, shard=True)``,
#: with ``start``, ``stop`` and ``clients``): its model copy.
MODEL_COPY_OP = "ftps_model_copy"


# -- the replies, typed (every one a dict on the wire: ``{"status": "OK", ...}``) --


class BeginRunMessage(OKMessage):
    """``begin_run``: the run, where each data shard goes on, its history."""

    run: int
    server_id: str
    base_version: int
    incarnation: int
    finished: bool
    next: list[list[int]]  # (epoch, step) by data shard
    history: list[dict]
    version: int


class FindRunMessage(OKMessage):
    run: int | None
    spec: dict | None
    finished: bool | None


class StepMessage(OKMessage):
    """``next_step``: where a data shard goes on."""

    epoch: int
    step: int


class ParamsMessage(OKMessage, total=False):
    """``get_model``: the model (a sharded server's: its shards' put together,
    ``version`` the lowest, ``versions`` each)."""

    version: int
    versions: list[int]
    params: object  # ToPickle[dict[str, np.ndarray]]


class ShardEntry(TypedDict):
    address: str  # the worker serving it
    server_id: str  # its run's id
    incarnation: int


class ShardsMessage(OKMessage, total=False):
    """``ftps_shards``: where each shard is served and which keys it holds
    (``shards`` None: the server is not sharded)."""

    server_id: str | None
    shards: list[ShardEntry] | None
    layout: list[list[list]]  # by shard: [name, first row, end row, whole]


class ShardStartedMessage(OKMessage):
    """``ftps_shard_start``: the shard served, and how it was rebuilt."""

    server_id: str
    incarnation: int
    version: int
    seconds: float
    recovery: dict | None


def op_name(op: str, shard: bool = False) -> str:
    """The handler name of ``op`` at the scheduler, or at a shard server."""
    return f"ftps_shard_{op}" if shard else f"ftps_{op}"


def replies_errors(handler: Callable[..., Awaitable[dict]]):
    """Send a refusal back to the caller as an error message, never a crash."""

    @functools.wraps(handler)
    async def wrapper(*args: Any, **kwargs: Any) -> dict:
        try:
            return await handler(*args, **kwargs)
        except FTPSError as e:
            logger.info("%s refused: %s", handler.__name__, e)
            return error_message(e)
        except TypeError as e:  # missing or unexpected message keys
            logger.info("%s refused: %s", handler.__name__, e)
            return error_message(InvalidRequest(f"{handler.__name__}: {e}"))
        except Exception as e:
            logger.warning("%s failed on a request", handler.__name__, exc_info=True)
            return error_message(InvalidRequest(f"{handler.__name__}: {e!r}"))

    return wrapper


class Endpoint:
    """The handlers of one server: decode, call, answer.

    A subclass provides :attr:`server` and :meth:`_clients`.
    """

    @property
    def server(self) -> Any:  # a dask_ftps._server.Server
        raise NotRegistered("the parameter server has not started")

    def _clients(self) -> Collection[str]:
        """The ids of the Dask clients connected now (a run's holder is alive
        while its client is)."""
        raise NotImplementedError

    def _status_extra(self, reply: dict) -> dict:
        return reply

    def endpoint_handlers(self, shard: bool = False) -> dict[str, Callable]:
        """The handlers by name (``ftps_<op>``, or ``ftps_shard_<op>``)."""
        return {op_name(op, shard): getattr(self, op) for op in SERVER_OPS}

    @replies_errors
    async def begin_run(
        self,
        spec: object,
        name: object = "",
        holder: object = None,
        live: object = (),
        server_id: object = None,
    ) -> BeginRunMessage:
        """Begin or find a run. ``holder`` (``"<client id>/<token>"``) names the
        ``train()`` call, ``live`` the calls of the same client still running,
        ``server_id`` the server the caller expects (from ``ftps_status``)."""
        run_spec = RunSpec.from_dict(spec)
        run_name = field_str("name", name)
        caller = None if holder is None else field_holder(holder)
        mine = field_live(live, caller)
        expect = None if server_id is None else field_server(server_id, "begin_run")
        clients = self._clients()
        own = None if caller is None else holder_client(caller)

        def alive(other: Holder) -> bool:
            client = holder_client(other)
            if client == own:  # the caller's client says which of its calls live
                return other in mine
            return client in clients

        return await self.server.begin_run(run_spec, run_name, caller, alive, expect)

    @replies_errors
    async def end_run(
        self, server_id: object, run: object, holder: object
    ) -> OKMessage:
        """The ``train()`` call ``holder`` ended: it holds ``run`` no more."""
        server = self.server
        expect = field_server(server_id, "end_run")
        run_number = field_int("run", run, maximum=MAX_COUNT)
        caller = field_holder(holder)
        server.check_server(expect, "the run")
        return server.release(run_number, caller)

    @replies_errors
    async def find_run(
        self,
        name: object,
        n_samples: object,
        batch_size: object,
        epochs: object,
        seed: object,
    ) -> FindRunMessage:
        return self.server.find_run(
            field_str("name", name),
            field_int("n_samples", n_samples, maximum=MAX_COUNT),
            field_int("batch_size", batch_size, maximum=MAX_COUNT),
            field_int("epochs", epochs, maximum=MAX_EPOCHS),
            field_int("seed", seed, maximum=2**63 - 1),
        )

    @replies_errors
    async def end_epoch(
        self, run: object, epoch: object, values: object, server_id: object = None
    ) -> OKMessage:
        self.server.check_server(field_server(server_id, "end_epoch"), f"run {run}")
        return await self.server.end_epoch(
            field_int("run", run, maximum=MAX_COUNT),
            field_int("epoch", epoch, maximum=MAX_EPOCHS),
            _history_values(values),
        )

    @replies_errors
    async def next_step(
        self,
        run: object,
        shard: object,
        server_id: object = None,
        holder: object = None,
    ) -> StepMessage:
        expect = field_server(server_id, "next_step")
        caller = field_holder(holder)  # malformed: InvalidRequest, whatever server
        self.server.check_server(expect, f"run {run}")
        return await self.server.next_step(
            field_int("run", run, maximum=MAX_COUNT),
            field_int("shard", shard, maximum=MAX_COUNT),
            caller,
        )

    def _connected(self, holder: Holder) -> bool:
        """Whether the client of the train() call ``holder`` is connected."""
        return holder_client(holder) in self._clients()

    @replies_errors
    async def pull(
        self,
        worker: object,
        run: object,
        shard: object,
        epoch: object,
        step: object,
        have_version: object = -1,
        have_server: object = None,
        server_id: object = None,
        holder: object = None,
        rows: object = None,
    ) -> ModelMessage:
        """The model to compute ``(epoch, step)`` of a shard from. ``holder``
        names the train() call the asking task belongs to (every pull, push
        and next_step does): it must hold the run. ``rows`` (a dict of matrix
        name to strictly increasing row indices) asks for only those rows of
        those matrices, and the rest of the model whole."""
        expect = field_server(server_id, "pull")
        caller = field_holder(holder)
        self.server.check_server(expect, f"run {run}")
        wanted = self._wanted(rows, InvalidRequest)
        return await self.server.pull(
            WorkerId(check_worker(worker, InvalidRequest)),
            field_int("run", run, maximum=MAX_COUNT),
            field_int("shard", shard, maximum=MAX_COUNT),
            field_int("epoch", epoch, maximum=MAX_EPOCHS),
            field_int("step", step, maximum=MAX_COUNT),
            field_int("have_version", have_version, minimum=-1),
            field_str("have_server", have_server, optional=True),
            caller,
            wanted,
        )

    def _wanted(
        self, rows: object, error: type[Exception]
    ) -> dict[str, np.ndarray] | None:
        """A pull's ``rows``, checked against the served model's matrices."""
        if rows is None:
            return None
        try:
            return check_wanted(rows, self.server.state.shapes)
        except ValueError as e:
            raise error(str(e)) from None

    @replies_errors
    async def push(
        self,
        worker: object,
        update_id: object,
        grads: object,
        incarnation: object,
        next_step: object = None,
        have_version: object = -1,
        have_server: object = None,
        server_id: object = None,
        holder: object = None,
        rows: object = None,
    ) -> ModelMessage:
        """Accept one update once it is durable; with ``next_step``, answer with
        the model for that step (only ``rows`` of its matrices, as a pull). ``server_id`` names the server the update's run
        began on: an update of another server's run is refused first; ``holder``
        the train() call it belongs to: an update of a run another call holds
        is refused before it changes anything."""
        server = self.server
        expect = field_server(server_id, "push")
        caller = field_holder(holder)
        server.check_server(expect, f"update {str(update_id)[:40]!r}")
        wanted = self._wanted(rows, InvalidUpdate)
        if not isinstance(incarnation, int) or isinstance(incarnation, bool):
            raise StaleIncarnation(f"message from incarnation {incarnation!r:.40}")
        update = Update(
            UpdateKey.parse(update_id),
            WorkerId(check_worker(worker, InvalidUpdate)),
            _grads(grads),
            caller,
        )
        return await server.push(
            update,
            incarnation,
            field_step(next_step),
            field_int("have_version", have_version, InvalidUpdate, minimum=-1),
            field_str("have_server", have_server, InvalidUpdate, optional=True),
            wanted,
        )

    @replies_errors
    async def status(self) -> dict:
        server = self.server
        reply = server.status()
        # Only async mode computes ahead of what was acknowledged: a sync round
        # needs the round before it, an ssp bound counts acknowledged clocks.
        reply["inflight"] = server.config.inflight if reply["mode"] == "async" else 1
        return self._status_extra(reply)

    @replies_errors
    async def model_spec(self) -> dict:
        """The served model object itself (pickled, as the client registered it,
        or as this scheduler rebuilt it): what ``train()`` ships to its tasks,
        with no lookup of the class by name on the client."""
        return {
            "status": "OK",
            "server_id": self.server.server_id,
            "model": ToPickle(self.server.state.model_spec),
        }

    @replies_errors
    async def get_model(self) -> ParamsMessage:
        model = self.server.published
        return {
            "status": "OK",
            "version": int(model.version),
            "params": ToPickle(model.params),
        }

    @replies_errors
    async def records(self) -> dict:
        return {"status": "OK", **(await self.server.records())}


def _history_values(value: object) -> dict[str, float | None]:
    """An epoch's history record: at most 32 short names, each a number or None
    (NaN and infinities are kept as None)."""
    if not isinstance(value, dict) or len(value) > 32:
        raise InvalidRequest("values must be a dict of at most 32 numbers by name")
    out: dict[str, float | None] = {}
    for name, number in value.items():
        field_str("a history name", name, max_length=64)
        if number is not None and (
            isinstance(number, bool) or not isinstance(number, int | float)
        ):
            raise InvalidRequest(f"history value {name!r} must be a number or None")
        out[name] = None if number is None or not np.isfinite(number) else float(number)
    return out


def _grads(value: object) -> dict[str, np.ndarray]:
    """The ``grads`` field: a dict of NumPy arrays by name (shapes are the state's
    to check)."""
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise InvalidUpdate(
            f"grads must be a dict of arrays by parameter name, got "
            f"{type(value).__name__}"
        )
    return value
