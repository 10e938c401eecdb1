"""The scheduler's part of a sharded parameter server: placement and coordination.

With ``ParameterServer(..., shards=S)`` the model's parameters live on S shard
servers (:mod:`dask_ftps._shard_server`) on workers with the ``ftps-server``
resource; workers push and pull their slices straight to them. The scheduler
keeps what is global:

- placement: which worker serves each shard; a shard whose worker left (or
  stopped answering) is served again on another tagged worker (or the same
  one, restarted), rebuilt exactly from its part of the store;
- the runs: a run begins on every shard under one lock (so its number is the
  same on each), an epoch's record and a run's end go to every shard;
- the clients connected (a run's holder is alive while its client is);
- the whole model for readers (``get_model``, ``status``), gathered from the
  shards: its version is the lowest shard version (the vector beside it).

Each shard's journal lives in the store's folder ``shards/<k>``; the scheduler
writes nothing itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from dask.utils import parse_timedelta
from distributed.protocol.serialize import ToPickle

from dask_ftps import config
from dask_ftps._core import check_reply, field_int, field_server, field_str
from dask_ftps._exceptions import (
    FTPSError,
    InvalidRequest,
    NotRegistered,
    ServerReplaced,
    ShardUnavailable,
)
from dask_ftps._recovery import listening
from dask_ftps._shards import MAX_SHARDS, Piece, assemble, plan
from dask_ftps.protocol import (
    SERVER_OPS,
    SHARDS_OP,
    BeginRunMessage,
    FindRunMessage,
    OKMessage,
    ParamsMessage,
    ShardsMessage,
    StepMessage,
    op_name,
    replies_errors,
)

if TYPE_CHECKING:
    from distributed import Scheduler

    from dask_ftps.models import Model

logger = logging.getLogger(__name__)

#: How long the first placement waits for more tagged workers to join, so that
#: the shards spread over them instead of all going to the first one.
FIRST_PLACEMENT_GRACE = 2.0
#: How long a worker where a shard's start failed, or whose server of it did
#: not answer, is passed over for that shard.
EXCLUDED_FOR = 10.0


class Coordinator:
    """Places the shards of one sharded run and answers the scheduler's ops.

    Parameters
    ----------
    scheduler
        The scheduler.
    model
        The whole model.
    shard_spec
        The fields of :class:`~dask_ftps._shard_server.ShardSpec` but ``shard``.
    """

    def __init__(self, scheduler: Scheduler, model: Model, shard_spec: dict) -> None:
        self.scheduler = scheduler
        self.model = model
        self.shards: int = shard_spec["shards"]
        self.layout: tuple[tuple[Piece, ...], ...] = plan(
            model.param_shapes(), self.shards
        )
        self.shard_spec = shard_spec
        shapes = model.param_shapes()
        #: Parameters each shard holds.
        self.shard_params = [
            sum((p.stop - p.start) * math.prod(shapes[p.name][1:]) for p in pieces)
            for pieces in self.layout
        ]
        self.resource = str(config.get("shards.resource"))
        self.place_timeout = parse_timedelta(config.get("shards.place-timeout"))
        self.probe_timeout = parse_timedelta(config.get("store.owner-timeout"))
        #: Shard -> the worker serving it, and what its start answered.
        self.placement: dict[int, str] = {}
        self.info: dict[int, dict] = {}
        #: Shard -> when its server was lost (until it is served again).
        self.lost_at: dict[int, float] = {}
        #: Every loss and what replaced it (shard, from, to, seconds).
        self.recoveries: list[dict] = []
        #: The run's identity: shard 0's run id (the same through recoveries).
        self.server_id: str | None = None
        #: Shard -> workers not to place it on, until when (a start failed
        #: there, or its server there did not answer).
        self._excluded: dict[int, dict[str, float]] = {}
        self._changed = asyncio.Condition()
        self._wake = asyncio.Event()
        self._runs = asyncio.Lock()
        self._closed = False
        self._started = time.monotonic()
        self._tasks: set[asyncio.Task] = set()
        self._placer = asyncio.create_task(self._place_loop(), name="ftps-place")

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called (it places and answers no more)."""
        return self._closed

    # -- placement -------------------------------------------------------------

    def handlers(self) -> dict[str, Callable[..., Awaitable[dict]]]:
        out = {op_name(op): getattr(self, op) for op in SERVER_OPS}
        out[SHARDS_OP] = self.shards_op
        return out

    def worker_added(self) -> None:
        self._wake.set()

    def worker_removed(self, address: str) -> None:
        if self._closed or self.scheduler.status.name in (
            "closing",
            "closed",
            "closing_gracefully",
        ):
            return  # its workers leave with it
        for k, where in list(self.placement.items()):
            if where == address:
                self._lose(k, f"its worker {address} left")
        for excluded in self._excluded.values():
            excluded.pop(address, None)
        self._wake.set()

    def clients_changed(self) -> None:
        """Tell the shard servers which clients are connected (a run whose
        client left is free)."""
        if self.placement:
            self._background(self._send_clients())

    async def _send_clients(self, addresses: Any = None) -> None:
        """Tell the shard servers which clients are connected; a server that
        does not answer within ``ftps.store.owner-timeout`` is skipped."""
        clients = sorted(self.scheduler.clients)

        async def send(address: str) -> None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(
                    self.scheduler.rpc(address).ftps_shard_clients(clients=clients),
                    self.probe_timeout,
                )

        where = set(self.placement.values()) if addresses is None else set(addresses)
        await asyncio.gather(*(send(a) for a in where))

    async def _stop_server(self, k: int, address: str) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                self.scheduler.rpc(address).ftps_shard_stop(ps_shard=k),
                self.probe_timeout,
            )

    def _background(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _exclude(self, k: int, address: str) -> None:
        """Place shard ``k`` elsewhere than ``address`` for a while."""
        self._excluded.setdefault(k, {})[address] = time.monotonic() + EXCLUDED_FOR

    def _lose(self, k: int, why: str) -> None:
        address = self.placement.pop(k, None)
        if address is None:
            return
        self.info.pop(k, None)
        # A server judged lost that still runs (slow, paused) must not keep its
        # claim: asked to stop, at best effort (a dead one answers nothing).
        self._background(self._stop_server(k, address))
        self.lost_at[k] = time.monotonic()
        logger.warning("Shard %d lost at %s: %s; placing it again", k, address, why)
        self.scheduler.log_event(
            "ftps", {"action": "shard-lost", "shard": k, "address": address, "why": why}
        )
        self._wake.set()

    def _candidates(self, k: int) -> list[str]:
        load = {a: 0 for a in self.placement.values()}
        for a in self.placement.values():
            load[a] += 1
        now = time.monotonic()
        excluded = {a for a, t in self._excluded.get(k, {}).items() if t > now}
        tagged = [
            a
            for a, ws in self.scheduler.workers.items()
            if ws.resources.get(self.resource, 0) > 0 and a not in excluded
        ]
        return sorted(tagged, key=lambda a: (load.get(a, 0), a))

    async def _place_loop(self) -> None:
        warned = False
        while not self._closed:
            if self.scheduler.status.name in (
                "closing",
                "closed",
                "closing_gracefully",
            ):
                return  # its workers leave with it: nothing to place
            missing = [k for k in range(self.shards) if k not in self.placement]
            if not missing:
                self._wake.clear()
                await self._wake.wait()
                continue
            chosen: dict[int, str] = {}
            for k in missing:
                candidates = self._candidates(k)
                if candidates:
                    # Spread: the least loaded, counting this round's choices.
                    taken = list(chosen.values())
                    candidates.sort(key=lambda a: taken.count(a))
                    chosen[k] = candidates[0]
            spread = len(set(chosen.values()))
            if (
                chosen
                and not self.placement
                and spread < len(missing)
                and time.monotonic() < self._started + FIRST_PLACEMENT_GRACE
            ):
                # The first placement (a new or restarted scheduler): workers
                # join one by one; wait a moment for more, to spread the shards.
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), 0.25)
                continue
            if not chosen:
                if not warned:
                    logger.warning(
                        "No worker with the resource %r: shards %s wait for one (start "
                        "workers with --resources %s=1)",
                        self.resource,
                        missing,
                        self.resource,
                    )
                    warned = True
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), 1.0)
                continue
            warned = False
            try:
                await asyncio.gather(*(self._start(k, a) for k, a in chosen.items()))
            except Exception:  # the placer goes on whatever one start did
                logger.exception("Placing shards %s failed; trying again", chosen)
                await asyncio.sleep(0.5)
            if any(k not in self.placement for k in chosen):
                await asyncio.sleep(0.05)

    async def _start(self, k: int, address: str) -> None:
        spec = {**self.shard_spec, "shard": k}
        t0 = time.monotonic()
        try:
            reply = await asyncio.wait_for(
                self.scheduler.rpc(address).ftps_shard_start(spec=spec),
                self.place_timeout,
            )
            reply = check_reply(reply, "ftps_shard_start")
        except Exception as e:  # noqa: BLE001 - try again, elsewhere if need be
            if address not in self.scheduler.workers or isinstance(e, FTPSError):
                logger.info("Shard %d not served at %s: %r", k, address, e)
            if isinstance(e, FTPSError) and not isinstance(e, NotRegistered):
                self._exclude(k, address)
            if isinstance(e, TimeoutError):
                logger.warning(
                    "Shard %d: its start at %s took longer than %gs; placing it "
                    "elsewhere",
                    k,
                    address,
                    self.place_timeout,
                )
                self._exclude(k, address)
                self._background(self._stop_server(k, address))
            return
        if address not in self.scheduler.workers:  # it left meanwhile
            return
        if self._closed:
            return
        if k == 0:
            self.server_id = reply["server_id"]
        self.placement[k] = address
        self.info[k] = reply
        lost = self.lost_at.pop(k, None)
        event = {
            "action": "shard-served",
            "shard": k,
            "address": address,
            "incarnation": reply["incarnation"],
            "version": reply["version"],
            "start_s": round(time.monotonic() - t0, 4),
            "recovery": reply.get("recovery"),
        }
        if lost is not None:
            event["since_lost_s"] = round(time.monotonic() - lost, 4)
            self.recoveries.append(event)
        logger.info(
            "Shard %d served at %s (incarnation %d, version %d)%s",
            k,
            address,
            reply["incarnation"],
            reply["version"],
            "" if lost is None else f", {event['since_lost_s']:.3f}s after its loss",
        )
        self.scheduler.log_event("ftps", event)
        self._background(self._send_clients([address]))
        async with self._changed:
            self._changed.notify_all()

    async def served(self) -> None:
        """Wait until every shard is served (``ftps.shards.place-timeout``)."""
        self._check_open()
        if len(self.placement) == self.shards:
            return

        async def all_placed() -> None:
            async with self._changed:
                await self._changed.wait_for(
                    lambda: len(self.placement) == self.shards or self._closed
                )

        try:
            await asyncio.wait_for(all_placed(), self.place_timeout)
        except TimeoutError:
            missing = sorted(set(range(self.shards)) - set(self.placement))
            raise ShardUnavailable(
                f"shards {missing} of {self.shards} are not served after "
                f"{self.place_timeout:g}s: start workers with the resource "
                f"{self.resource!r} (dask worker --resources {self.resource}=1)"
            ) from None
        if self._closed:
            raise NotRegistered("the sharded parameter server closed")

    def _check_open(self) -> None:
        if self._closed:
            raise NotRegistered("the sharded parameter server closed")

    async def _suspect(self, k: int, address: str) -> None:
        """A worker could not reach shard ``k`` at ``address``: if it does not
        answer there now, place the shard elsewhere."""
        if self.placement.get(k) != address:
            return  # already replaced
        alive = False
        if await listening(address, self.probe_timeout):
            try:
                reply = await asyncio.wait_for(
                    self.scheduler.rpc(address).ftps_shard_status(ps_shard=k),
                    self.probe_timeout,
                )
                alive = (
                    isinstance(reply, dict)
                    and reply.get("status") == "OK"
                    and not reply.get("failed")  # it refuses everything
                )
            except Exception:  # noqa: BLE001 - no answer: not alive
                alive = False
        if not alive and self.placement.get(k) == address:
            self._exclude(k, address)
            self._lose(k, "it does not answer, or it failed")

    async def close(self, stop_servers: bool = False) -> None:
        """Stop placing; with ``stop_servers``, also stop the shard servers
        (a server of another store replaces this one)."""
        self._closed = True
        if stop_servers:
            await asyncio.gather(
                *(self._stop_server(k, a) for k, a in self.placement.items())
            )
        for task in list(self._tasks):
            task.cancel()
        self._placer.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._placer
        async with self._changed:
            self._changed.notify_all()

    # -- calls to the shards -----------------------------------------------------

    async def _call(
        self, k: int, op: str, *, named: bool = False, **kwargs: Any
    ) -> dict:
        """``op`` at shard ``k``'s server; sent again where its server was
        replaced meanwhile (every server op is safe to repeat). A call
        unanswered for ``ftps.shards.probe-after`` asks whether that server
        still answers (a paused process is replaced)."""
        deadline = time.monotonic() + self.place_timeout
        probe = parse_timedelta(config.get("shards.probe-after"))
        while True:
            await self.served()
            address = self.placement[k]
            if named:  # the run's server id at this shard (its run id)
                kwargs["server_id"] = self.info[k]["server_id"]
            call = asyncio.ensure_future(
                getattr(self.scheduler.rpc(address), op_name(op, shard=True))(
                    ps_shard=k, **kwargs
                )
            )
            try:
                while True:
                    done, _ = await asyncio.wait({call}, timeout=probe)
                    if done:
                        return check_reply(call.result(), op_name(op, shard=True))
                    await self._suspect(k, address)
                    if self.placement.get(k) != address:
                        break  # replaced: send it to the new server
            except (OSError, NotRegistered) as e:
                if time.monotonic() > deadline:
                    raise ShardUnavailable(f"shard {k}: {e}") from e
                await self._suspect(k, address)
                await asyncio.sleep(0.05)
            finally:
                if not call.done():
                    call.cancel()

    async def _each(self, op: str, **kwargs: Any) -> list[dict]:
        return list(
            await asyncio.gather(
                *(self._call(k, op, **kwargs) for k in range(self.shards))
            )
        )

    def _check_server(self, server_id: object, op: str) -> None:
        expect = field_server(server_id, op)
        if expect != self.server_id:
            raise ServerReplaced(
                f"{op} of server {expect[:12]!r} is not served here: the scheduler's "
                f"sharded parameter server is {str(self.server_id)[:12]!r}"
            )

    # -- the scheduler's ops --------------------------------------------------------

    @replies_errors
    async def shards_op(
        self, suspect: object = None, address: object = None
    ) -> ShardsMessage:
        """Where every shard is served (workers push and pull there). With
        ``suspect`` (a shard) and ``address``: that shard did not answer there."""
        if suspect is not None:
            k = field_int("suspect", suspect, maximum=MAX_SHARDS - 1)
            await self._suspect(k, field_str("address", address))
        await self.served()
        return {
            "status": "OK",
            "server_id": self.server_id,
            "shards": [
                {
                    "address": self.placement[k],
                    "server_id": self.info[k]["server_id"],
                    "incarnation": self.info[k]["incarnation"],
                }
                for k in range(self.shards)
            ],
            "layout": [
                [[p.name, p.start, p.stop, p.whole] for p in pieces]
                for pieces in self.layout
            ],
        }

    @replies_errors
    async def begin_run(
        self, server_id: object = None, **kwargs: Any
    ) -> BeginRunMessage:
        await self.served()
        if server_id is not None:
            self._check_server(server_id, "begin_run")
        await self._send_clients()
        async with self._runs:  # the same run number on every shard
            replies = []
            for k in range(self.shards):  # in order: one run list on all shards
                replies.append(await self._call(k, "begin_run", named=True, **kwargs))
        runs = {r["run"] for r in replies}
        if len(runs) != 1:
            raise FTPSError(f"the shards began different runs {sorted(runs)}")
        first = replies[0]
        return {
            "status": "OK",
            "run": first["run"],
            "server_id": self.server_id,
            "base_version": min(r["base_version"] for r in replies),
            "incarnation": first["incarnation"],
            "finished": all(r["finished"] for r in replies),
            "next": [
                list(min(tuple(r["next"][s]) for r in replies))
                for s in range(len(first["next"]))
            ],
            "history": min((r["history"] for r in replies), key=len),
            "version": min(r["version"] for r in replies),
        }

    @replies_errors
    async def find_run(self, **kwargs: Any) -> FindRunMessage:
        return await self._call(0, "find_run", **kwargs)

    async def _every_shard(
        self, op: str, server_id: object, kwargs: dict[str, Any]
    ) -> list[dict]:
        """``op`` of the run ``server_id`` names, at every shard (each its own
        server id)."""
        await self.served()
        self._check_server(server_id, op)
        return list(
            await asyncio.gather(
                *(self._call(k, op, named=True, **kwargs) for k in range(self.shards))
            )
        )

    @replies_errors
    async def end_epoch(self, server_id: object = None, **kwargs: Any) -> OKMessage:
        await self._every_shard("end_epoch", server_id, kwargs)
        return {"status": "OK"}

    @replies_errors
    async def end_run(self, server_id: object = None, **kwargs: Any) -> OKMessage:
        await self._every_shard("end_run", server_id, kwargs)
        return {"status": "OK"}

    @replies_errors
    async def next_step(self, server_id: object = None, **kwargs: Any) -> StepMessage:
        replies = await self._every_shard("next_step", server_id, kwargs)
        epoch, step = min((r["epoch"], r["step"]) for r in replies)
        return {"status": "OK", "epoch": epoch, "step": step}

    @replies_errors
    async def pull(self, **kwargs: Any) -> dict:
        raise InvalidRequest(
            "this parameter server is sharded: workers pull from its shard servers "
            "(ftps_shards says where)"
        )

    @replies_errors
    async def push(self, **kwargs: Any) -> dict:
        raise InvalidRequest(
            "this parameter server is sharded: workers push to its shard servers "
            "(ftps_shards says where)"
        )

    @replies_errors
    async def status(self) -> dict:
        await self.served()
        replies = await self._each("status")
        first = replies[0]
        workers = self.scheduler.workers
        runs = [r.get("run") for r in replies]
        run = None
        if all(runs):
            run = dict(runs[0])
            for key in ("accepted",):
                if key in run:
                    run[key] = min(r[key] for r in runs)
        return {
            "status": "OK",
            "mode": first["mode"],
            "server_id": self.server_id,
            "run_id": self.server_id,
            "store": self.shard_spec["store"],
            "incarnation": first["incarnation"],
            "version": min(r["version"] for r in replies),
            "versions": [r["version"] for r in replies],
            "updates": min(r["updates"] for r in replies),
            "run": run,
            "failed": next((r["failed"] for r in replies if r.get("failed")), None),
            "inflight": first["inflight"],
            "model": self.model.summary(),
            "shards": [
                {
                    "shard": k,
                    "address": self.placement.get(k),
                    "version": r["version"],
                    "incarnation": r["incarnation"],
                    "updates": r["updates"],
                    "snapshots": r.get("snapshots"),
                    "store": r.get("store"),
                    "recovery": r.get("recovery"),
                    "params": self.shard_params[k],
                }
                for k, r in enumerate(replies)
            ],
            "recoveries": list(self.recoveries[-20:]),
            "resource": self.resource,
            "workers": sorted(workers),
            "nthreads": sum(ws.nthreads for ws in workers.values()),
        }

    @replies_errors
    async def get_model(self) -> ParamsMessage:
        await self.served()
        replies = await self._each("get_model")
        params = assemble([r["params"] for r in replies], self.layout)
        return {
            "status": "OK",
            "version": min(r["version"] for r in replies),
            "versions": [r["version"] for r in replies],
            "params": ToPickle(params),
        }

    @replies_errors
    async def model_spec(self) -> dict:
        await self.served()
        return {
            "status": "OK",
            "server_id": self.server_id,
            "model": ToPickle(self.model),
        }

    @replies_errors
    async def records(self) -> dict:
        await self.served()
        replies = await self._each("records")
        out: dict[str, list] = {}
        for k, reply in enumerate(replies):
            for key, rows in reply.items():
                if key == "status" or not isinstance(rows, list):
                    continue
                out.setdefault(key, []).extend({**row, "shard": k} for row in rows)
        return {"status": "OK", **out}
