"""The worker half: a model cache and blocking calls for code running in tasks."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from dask.utils import parse_timedelta
from distributed.core import error_message
from distributed.diagnostics.plugin import WorkerPlugin
from distributed.protocol.serialize import ToPickle
from distributed.utils import sync

from dask_ftps import config
from dask_ftps._core import Holder, ServerId, UpdateKey, check_reply
from dask_ftps._exceptions import (
    DuplicateUpdate,
    NotRegistered,
    ShardUnavailable,
    StaleIncarnation,
)
from dask_ftps._factored import densify
from dask_ftps._shards import Piece
from dask_ftps._sparse import RowSparse
from dask_ftps.protocol import MODEL_COPY_OP, SHARDS_OP, op_name

if TYPE_CHECKING:
    from distributed import Worker

logger = logging.getLogger(__name__)

#: Attempts of a push or pull whose connection broke (the push carries its id:
#: sending it again is safe, the server refuses a second copy).
CALL_ATTEMPTS = 4


@dataclass(frozen=True)
class ModelCopy:
    """A model version as a worker received it; never modified.

    ``server`` names the server object that sent it: a version number means
    something only to that server (a new server starts at version 0 again);
    ``run_id`` names the stored run (None for a memory-only server).
    """

    server: str
    run_id: str | None
    incarnation: int
    version: int
    params: dict[str, np.ndarray]
    #: A sharded run's copy: which assembly of its shards' pieces it is (two
    #: copies of one lowest version may hold other pieces).
    generation: int = 0

    @property
    def partial(self) -> bool:
        """Whether it holds only some rows of some matrices (a sparse pull's
        :class:`~dask_ftps.RowSparse` entries)."""
        return any(isinstance(p, RowSparse) for p in self.params.values())

    @classmethod
    def of(cls, reply: dict) -> ModelCopy:
        """The copy a server's model reply (with ``params``) carries."""
        return cls(
            reply["server"],
            reply["run_id"],
            reply["incarnation"],
            reply["version"],
            reply["params"],
        )


class FTPSWorkerPlugin(WorkerPlugin):
    """Keeps the newest model this worker downloaded, and talks to the server.

    The parameter server installs it on every worker. The download dataset on
    the server names the version each worker holds here.
    """

    name = "ftps"
    idempotent = False

    worker: Worker
    latest: ModelCopy | None

    def setup(self, worker: Worker) -> None:
        from dask_ftps._shard_server import ShardHosts

        self.worker = worker
        self.latest = None
        self._lock = threading.Lock()
        #: The shard servers this worker runs (a sharded server's).
        self.hosts = ShardHosts(worker)
        #: A sharded run's layout by its server id (None: not sharded).
        self._layouts: dict[str, _Layout | None] = {}
        #: The newest copy of each shard of a sharded run received here.
        self._pieces: dict[tuple[str, int], ModelCopy] = {}
        self._assembled = 0
        #: ftps.shards.probe-after, ftps.shards.place-timeout, ftps.wait-timeout
        #: (read once here, not on every call to a shard).
        self._shard_timeouts = tuple(
            parse_timedelta(config.get(key))
            for key in ("shards.probe-after", "shards.place-timeout", "wait-timeout")
        )
        self._handlers = {MODEL_COPY_OP: self.model_copy, **self.hosts.handlers()}
        worker.handlers.update(self._handlers)

    async def teardown(self, worker: Worker) -> None:
        for op, handler in self._handlers.items():
            if worker.handlers.get(op) == handler:
                del worker.handlers[op]
        await self.hosts.close()

    # -- handlers -------------------------------------------------------------

    async def model_copy(self) -> dict:
        """The newest model this worker holds, for a recovering server."""
        copy = self.latest
        if copy is None:
            return error_message(NotRegistered("this worker holds no model copy"))
        return {
            "status": "OK",
            "run_id": copy.run_id,
            "incarnation": copy.incarnation,
            "version": copy.version,
            "params": ToPickle(copy.params),
        }

    # -- methods for worker threads ---------------------------------------------

    # Every call names the server its run began on (``server``, as
    # ``ftps_begin_run`` answered): a server that replaced it refuses the call
    # with ServerReplaced instead of taking it for one of its own runs. It names
    # the train() call it belongs to (``holder``, as given to
    # ``ftps_begin_run``): a run another call holds refuses it with RunInUse.

    def next_step(
        self, run: int, shard: int, *, server: ServerId, holder: Holder
    ) -> tuple[int, int]:
        """``(epoch, step)`` where shard ``shard`` of ``run`` goes on."""
        layout = self._layout(server)
        if layout is not None:
            return sync(
                self.worker.loop, self._sharded_next_step, layout, run, shard, holder
            )
        reply = self._call(
            "ftps_next_step", run=run, shard=shard, server_id=server, holder=holder
        )
        return reply["epoch"], reply["step"]

    def pull(
        self,
        run: int,
        shard: int,
        epoch: int,
        step: int,
        *,
        server: ServerId,
        holder: Holder,
        rows: dict[str, np.ndarray] | None = None,
    ) -> ModelCopy:
        """The model to compute ``(epoch, step)`` of a shard from (may wait);
        with ``rows``, only those rows of those matrices (a partial copy) and
        the rest whole. A sharded server sends whole pieces."""
        layout = self._layout(server)
        if layout is not None:
            return sync(
                self.worker.loop,
                self._sharded_pull,
                layout,
                holder,
                {"run": run, "shard": shard, "epoch": epoch, "step": step},
            )
        have = self.latest
        reply = self._call(
            "ftps_pull",
            server_id=server,
            holder=holder,
            worker=self.worker.address,
            run=run,
            shard=shard,
            epoch=epoch,
            step=step,
            **self._have(have),
            **({} if rows is None else {"rows": ToPickle(rows)}),
        )
        return self._keep(reply)

    def push(
        self,
        key: UpdateKey,
        grads: dict[str, np.ndarray],
        incarnation: int,
        next_step: tuple[int, int] | None,
        *,
        server: ServerId,
        holder: Holder,
    ) -> ModelCopy | None:
        """Push an update; with ``next_step``, return the model for that step."""
        return self.push_async(
            key, grads, incarnation, next_step, server=server, holder=holder
        ).result()

    def push_async(
        self,
        key: UpdateKey,
        grads: dict[str, np.ndarray],
        incarnation: int,
        next_step: tuple[int, int] | None,
        *,
        server: ServerId,
        holder: Holder,
        rows: dict[str, np.ndarray] | None = None,
    ) -> concurrent.futures.Future[ModelCopy | None]:
        """Send a push and return at once: the future is done once the server
        accepted it (it is durable then), with the model for ``next_step``
        (only ``rows`` of its matrices, if given: see :meth:`pull`)."""
        layout = self._layout(server)
        if layout is not None:
            # Whole arrays to cut into slices: factors multiplied out and rows
            # written into zeros once, here in the task's thread (not per
            # shard, not on the event loop).
            grads = densify(grads)
            return asyncio.run_coroutine_threadsafe(
                self._sharded_push(layout, key, grads, incarnation, next_step, holder),
                self.worker.loop.asyncio_loop,
            )
        kwargs = {
            "server_id": server,
            "holder": holder,
            "worker": self.worker.address,
            "update_id": key.id,
            "grads": ToPickle(grads),
            "incarnation": incarnation,
            "next_step": next_step,
            **self._have(self.latest),
            **({} if rows is None or next_step is None else {"rows": ToPickle(rows)}),
        }

        async def push() -> ModelCopy | None:
            reply = await self._acall("ftps_push", **kwargs)
            return None if next_step is None else self._keep(reply)

        return asyncio.run_coroutine_threadsafe(push(), self.worker.loop.asyncio_loop)

    # -- a sharded server: calls go to its shard servers ---------------------------

    def _layout(self, server: ServerId) -> _Layout | None:
        """The layout of the sharded run of ``server`` (None: not sharded)."""
        if server in self._layouts:
            return self._layouts[server]
        return sync(self.worker.loop, self._fetch_layout, server)

    async def _fetch_layout(
        self, server: str, suspect: int | None = None, address: str | None = None
    ) -> _Layout | None:
        kwargs = {} if suspect is None else {"suspect": suspect, "address": address}
        reply = await self.worker.scheduler.ftps_shards(**kwargs)
        if reply is None:  # a scheduler with no such handler: not sharded
            self._layouts[server] = None
            return None
        reply = check_reply(reply, SHARDS_OP)
        if reply.get("shards") is None or reply["server_id"] != server:
            self._layouts[server] = None  # the scheduler's server is not sharded
            return None
        layout = _Layout.of(reply)
        self._layouts[server] = layout
        return layout

    async def _shard_call(self, server: str, k: int, op: str, **kwargs: Any) -> dict:
        """``op`` at shard ``k``'s server, where the scheduler says it is served
        now; sent again where it moved (every op is safe to send again: a push
        carries its id). A call unanswered for ``ftps.shards.probe-after`` makes
        the scheduler ask whether that server still serves."""
        probe, place, wait = self._shard_timeouts
        deadline = time.monotonic() + place
        # A pull may wait for its round as long as a server lets it.
        longest = deadline + wait
        layout = self._layouts[server]
        while True:
            assert layout is not None
            address, server_id = layout.shards[k][:2]
            call = asyncio.ensure_future(
                getattr(self.worker.rpc(address), op_name(op, shard=True))(
                    ps_shard=k, server_id=server_id, **kwargs
                )
            )
            try:
                while True:
                    done, _ = await asyncio.wait({call}, timeout=probe)
                    if done:
                        try:
                            return check_reply(call.result(), op_name(op, shard=True))
                        except StaleIncarnation:
                            # A server replaced since (the task goes on from the
                            # new one), or a fenced one where the layout is old.
                            layout = await self._fetch_layout(server, k, address)
                            if layout is None or layout.shards[k][0] == address:
                                raise
                            break  # served elsewhere now: send it there
                    if time.monotonic() > longest:
                        raise ShardUnavailable(
                            f"shard {k} at {address} did not answer {op} in "
                            f"{longest - deadline + place:g}s"
                        )
                    # Unanswered: still served there? (a paused process is not)
                    layout = await self._fetch_layout(server, k, address)
                    if layout is None:
                        raise NotRegistered("the sharded parameter server is gone")
                    if layout.shards[k][0] != address:
                        call.cancel()
                        break  # served elsewhere now: send it there
            except (OSError, NotRegistered) as e:
                if time.monotonic() > deadline:
                    raise ShardUnavailable(
                        f"shard {k} of run {server[:12]}: {e}"
                    ) from e
                logger.info(
                    "shard %d at %s: %r; asking where it is served", k, address, e
                )
                await asyncio.sleep(0.05)
                layout = await self._fetch_layout(server, k, address)
                if layout is None:
                    raise
            finally:
                if not call.done():
                    call.cancel()

    async def _sharded_next_step(
        self, layout: _Layout, run: int, shard: int, holder: Holder
    ) -> tuple[int, int]:
        replies = await asyncio.gather(
            *(
                self._shard_call(
                    layout.server_id,
                    k,
                    "next_step",
                    run=run,
                    shard=shard,
                    holder=holder,
                )
                for k in range(layout.n)
            )
        )
        # Where every shard has the step before: a shard ahead refuses the
        # steps it has as duplicates (taken as accepted).
        return min((r["epoch"], r["step"]) for r in replies)

    async def _sharded_pull(
        self, layout: _Layout, holder: Holder, where: dict
    ) -> ModelCopy:
        sent = self._held(layout)
        replies = await self._pull_shards(layout, range(layout.n), holder, where, sent)
        return self._assemble(layout, replies, sent)

    async def _pull_shards(
        self,
        layout: _Layout,
        shards: Any,
        holder: Holder,
        where: dict,
        sent: list[ModelCopy | None],
    ) -> list[dict]:
        """Each of ``shards``' model for ``where`` (run, data shard, epoch, step)."""
        return list(
            await asyncio.gather(
                *(
                    self._shard_call(
                        layout.server_id,
                        k,
                        "pull",
                        holder=holder,
                        worker=self.worker.address,
                        **where,
                        **self._have(sent[k]),
                    )
                    for k in shards
                )
            )
        )

    async def _sharded_push(
        self,
        layout: _Layout,
        key: UpdateKey,
        grads: dict[str, np.ndarray],
        incarnation: Any,
        next_step: tuple[int, int] | None,
        holder: Holder,
    ) -> ModelCopy | None:
        """Push each shard its slice; accepted once every shard has it durable
        (a shard that had it already counts: it was accepted there before)."""
        from dask_ftps._shards import take

        incarnations = (
            incarnation if isinstance(incarnation, tuple) else (incarnation,) * layout.n
        )
        sent = self._held(layout)

        async def one(k: int) -> dict | Exception:
            try:
                return await self._shard_call(
                    layout.server_id,
                    k,
                    "push",
                    holder=holder,
                    worker=self.worker.address,
                    update_id=key.id,
                    grads=ToPickle(take(grads, layout.pieces[k])),
                    incarnation=incarnations[k],
                    next_step=next_step,
                    **self._have(sent[k]),
                )
            except DuplicateUpdate as e:
                return e

        replies = await asyncio.gather(*(one(k) for k in range(layout.n)))
        duplicates = [k for k, r in enumerate(replies) if isinstance(r, Exception)]
        if len(duplicates) == layout.n:
            raise replies[0]
        if next_step is None:
            return None
        if duplicates:  # the model for the next step from those shards too
            epoch, step = next_step
            where = {"run": key.run, "shard": key.shard, "epoch": epoch, "step": step}
            pulled = await self._pull_shards(layout, duplicates, holder, where, sent)
            for k, reply in zip(duplicates, pulled, strict=True):
                replies[k] = reply
        return self._assemble(layout, replies, sent)

    def _held(self, layout: _Layout) -> list[ModelCopy | None]:
        """The shards' pieces this worker holds now (what a request says it has)."""
        with self._lock:
            return [self._pieces.get((layout.server_id, k)) for k in range(layout.n)]

    def _assemble(
        self, layout: _Layout, replies: list, sent: list[ModelCopy | None]
    ) -> ModelCopy:
        """The whole model from the shards' replies; a shard that sent nothing
        new meant the piece the request said this worker holds (``sent``)."""
        from dask_ftps._shards import assemble

        parts = []
        for k, reply in enumerate(replies):
            held = sent[k]
            if reply["params"] is not None:
                piece = ModelCopy.of(reply)
                cache = (layout.server_id, k)
                with self._lock:
                    newest = self._pieces.get(cache)
                    if (
                        newest is None
                        or newest.server != piece.server
                        or newest.version <= piece.version
                    ):
                        self._pieces[cache] = piece
            elif (
                held is None
                or held.server != reply["server"]
                or held.version != reply["version"]
            ):
                raise NotRegistered(f"shard {k} sent no model and none is cached")
            else:
                piece = held
            parts.append(piece)
        with self._lock:
            self._assembled += 1
            generation = self._assembled
        return ModelCopy(
            layout.server_id,
            layout.server_id,
            tuple(p.incarnation for p in parts),
            min(p.version for p in parts),
            assemble([p.params for p in parts], layout.pieces),
            generation,
        )

    # -- internals ------------------------------------------------------------

    def _call(self, op: str, **kwargs: Any) -> dict:
        return sync(self.worker.loop, self._acall, op, **kwargs)

    async def _acall(self, op: str, **kwargs: Any) -> dict:
        """Call the server; a call whose connection broke is sent again."""
        for attempt in range(CALL_ATTEMPTS):
            try:
                reply = await self._send(op, **kwargs)
                break
            except OSError as e:  # CommClosedError: the reply may be lost
                if attempt + 1 == CALL_ATTEMPTS or self.worker.status.name != "running":
                    raise
                logger.info("%s failed (%r); sending it again", op, e)
                await asyncio.sleep(0.1 * 2**attempt)
        return check_reply(reply, op)

    async def _send(self, op: str, **kwargs: Any) -> dict:
        return await getattr(self.worker.scheduler, op)(**kwargs)

    @staticmethod
    def _have(copy: ModelCopy | None) -> dict[str, Any]:
        if copy is None:
            return {"have_server": None, "have_version": -1}
        return {"have_server": copy.server, "have_version": copy.version}

    def _keep(self, reply: dict) -> ModelCopy:
        with self._lock:
            latest = self.latest
            if reply["params"] is not None:
                copy = ModelCopy.of(reply)
                if copy.partial:
                    # Some rows only: not a copy to rebuild a server from, nor
                    # one a later pull may say it holds. ``latest`` stays the
                    # newest whole copy (older than the download row then: a
                    # recovery does not start from it).
                    return copy
                if (
                    latest is None
                    or latest.server != copy.server
                    or latest.version <= copy.version
                ):
                    self.latest = copy
                return copy
            if (
                latest is None
                or latest.server != reply["server"]
                or latest.version < reply["version"]
            ):
                raise NotRegistered("the server sent no model and none is cached")
            return latest


@dataclass(frozen=True)
class _Layout:
    """Where each shard of a sharded run is served, and which keys it holds."""

    server_id: str
    shards: tuple[tuple[str, str], ...]  # (address, shard server id) by shard
    pieces: tuple[tuple[Piece, ...], ...]

    @property
    def n(self) -> int:
        return len(self.shards)

    @classmethod
    def of(cls, reply: dict) -> _Layout:
        return cls(
            reply["server_id"],
            tuple((s["address"], s["server_id"]) for s in reply["shards"]),
            tuple(
                tuple(Piece(str(n), int(a), int(b), bool(w)) for n, a, b, w in part)
                for part in reply["layout"]
            ),
        )


def get_worker_plugin() -> FTPSWorkerPlugin:
    """The :class:`FTPSWorkerPlugin` of the worker running the current task."""
    from distributed import get_worker

    try:
        return get_worker().plugins["ftps"]
    except KeyError:
        raise NotRegistered(
            "this worker has no dask_ftps plugin: register a ParameterServer"
        ) from None
