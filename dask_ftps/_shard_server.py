"""A shard server: one shard of a sharded run, served from a Dask worker.

The scheduler's coordinator (:mod:`dask_ftps._coordinator`) asks a worker that
has the ``ftps-server`` resource to serve shard ``k`` (``ftps_shard_start``).
The worker opens that shard's run in the store, rebuilds it exactly and claims
it (:func:`dask_ftps._recovery.open_run`, as a scheduler does), and answers
``ftps_shard_<op>(ps_shard=k, ...)`` with the same checks as the scheduler's
handlers (:class:`dask_ftps.protocol.Endpoint`). Fencing is the store's: a
paused server whose shard was taken over cannot write its next record.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

from distributed.core import error_message

from dask_ftps._core import MAX_COUNT, field_int, field_str
from dask_ftps._exceptions import FTPSError, InvalidRequest, NotRegistered
from dask_ftps._recovery import open_run
from dask_ftps._server import Server, ServerConfig, rebuilt_summary
from dask_ftps._shards import MAX_SHARDS, ModelShard, shard_store
from dask_ftps._state import ParameterServerState
from dask_ftps._store import RunMeta
from dask_ftps.models._base import model_from_dict
from dask_ftps.optim import optimizer_from_dict
from dask_ftps.protocol import (
    SERVER_OPS,
    Endpoint,
    ShardStartedMessage,
    op_name,
    replies_errors,
)

if TYPE_CHECKING:
    from distributed import Worker

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ShardSpec:
    """What a worker needs to serve a shard (sent by the coordinator)."""

    store: str
    storage_options: dict | None
    shard: int
    shards: int
    model: dict  # the whole model's record
    optimizer: dict
    mode: str
    staleness: int
    durable: bool
    settings: dict  # ServerConfig's fields but the address
    limits: dict

    def meta(self) -> RunMeta:
        return RunMeta(
            ModelShard.of(model_from_dict(self.model), self.shards, self.shard),
            optimizer_from_dict(self.optimizer),
            self.mode,
            self.staleness,
        )


class ShardHost(Endpoint):
    """The server of one shard on this worker, and its handlers."""

    def __init__(self, worker: Worker, spec: ShardSpec, server: Server) -> None:
        self.worker = worker
        self.spec = spec
        self._server = server
        #: The Dask clients the coordinator last said are connected.
        self.clients: frozenset[str] = frozenset()
        server.connected = self._connected
        server.on_event = self._event

    @classmethod
    async def start(cls, worker: Worker, spec: ShardSpec) -> ShardHost:
        meta = spec.meta()
        location = shard_store(spec.store, spec.shard)
        limits = dict(spec.limits)

        def create():
            state = ParameterServerState(
                meta.model,
                meta.optimizer,
                mode=meta.mode,
                staleness=meta.staleness,
                **limits,
            )
            return meta, state.model

        def given(stored: RunMeta) -> RunMeta:
            return meta

        journal, rebuilt = await open_run(
            location,
            spec.storage_options,
            durable=spec.durable,
            create=create,
            given=given,
            address=worker.address,
            rpc=worker.rpc,
            workers=lambda: (),  # a shard rebuilds from its store
            limits=limits,
            status_op=(op_name("status", shard=True), {"ps_shard": spec.shard}),
        )
        config = ServerConfig(**spec.settings, address=worker.address)
        server = Server(rebuilt.state, journal, config, rebuilt, str(journal.io))
        return cls(worker, spec, server)

    @property
    def server(self) -> Server:
        return self._server

    def _clients(self) -> Collection[str]:
        return self.clients

    def _connected(self, holder: str) -> bool:
        return holder.rpartition("/")[0] in self.clients

    def _status_extra(self, reply: dict) -> dict:
        reply["shard"] = self.spec.shard
        reply["address"] = self.worker.address
        return reply

    def _event(self, event: dict) -> None:
        try:
            self.worker.log_event("ftps", {**event, "shard": self.spec.shard})
        except Exception:
            logger.debug("event not sent", exc_info=True)


class ShardHosts:
    """The shard servers a worker runs, and the worker's ``ftps_shard_*`` handlers."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.hosts: dict[int, ShardHost] = {}
        self._starting: dict[int, asyncio.Task] = {}

    def handlers(self) -> dict[str, Any]:
        out = {op_name(op, shard=True): self._route(op) for op in SERVER_OPS}
        out[op_name("start", shard=True)] = self.start
        out[op_name("stop", shard=True)] = self.stop
        out[op_name("clients", shard=True)] = self.set_clients
        return out

    def _host(self, ps_shard: object) -> ShardHost:
        k = field_int("ps_shard", ps_shard, maximum=MAX_SHARDS)
        host = self.hosts.get(k)
        if host is None or host.server.stopped:
            raise NotRegistered(f"worker {self.worker.address} serves no shard {k}")
        return host

    def _route(self, op: str):
        async def handler(ps_shard: object = None, **kwargs: Any) -> dict:
            try:
                host = self._host(ps_shard)
            except FTPSError as e:
                return error_message(e)
            return await getattr(host, op)(**kwargs)

        handler.__name__ = f"shard_{op}"
        return handler

    @replies_errors
    async def start(self, spec: object = None) -> ShardStartedMessage:
        """Serve a shard (rebuilt from its store); a no-op if it is served here."""
        if not isinstance(spec, dict):
            raise InvalidRequest("ftps_shard_start needs a shard spec")
        try:
            shard_spec = ShardSpec(**spec)
        except TypeError as e:
            raise InvalidRequest(f"not a shard spec: {e}") from e
        field_str("store", shard_spec.store)
        k = field_int("shard", shard_spec.shard, maximum=MAX_SHARDS)
        host = self.hosts.get(k)
        if (
            host is not None
            and host.spec == shard_spec
            and not host.server.stopped
            and not host.server.failed
        ):
            return self._started(host, 0.0)
        # Every field is checked before the server of another spec stops.
        try:
            shard_spec.meta()
            ServerConfig(**shard_spec.settings, address=self.worker.address)
            shard_store(shard_spec.store, k)
            if not isinstance(shard_spec.limits, dict) or not isinstance(
                shard_spec.durable, bool
            ):
                raise TypeError("limits must be a dict and durable a bool")
        except (TypeError, ValueError, KeyError) as e:
            raise InvalidRequest(f"not a shard spec: {e}") from e
        task = self._starting.get(k)
        if task is None:
            t0 = time.perf_counter()

            async def go() -> ShardHost:
                old = self.hosts.pop(k, None)
                if old is not None:
                    await old.server.close()
                return await ShardHost.start(self.worker, shard_spec)

            task = self._starting[k] = asyncio.ensure_future(go())
            try:
                host = await task
            finally:
                del self._starting[k]
            self.hosts[k] = host
            logger.info(
                "Shard %d of %d served by %s in %.3fs: %s, version %d, incarnation %d",
                k,
                shard_spec.shards,
                self.worker.address,
                time.perf_counter() - t0,
                host.server.state.model_spec.summary(),
                host.server.state.version,
                host.server.state.incarnation,
            )
            return self._started(host, time.perf_counter() - t0)
        host = await asyncio.shield(task)
        return self._started(host, 0.0)

    @staticmethod
    def _started(host: ShardHost, seconds: float) -> ShardStartedMessage:
        server = host.server
        return {
            "status": "OK",
            "server_id": server.server_id,
            "incarnation": server.state.incarnation,
            "version": int(server.published.version),
            "seconds": seconds,
            "recovery": None
            if server.rebuilt is None or not server.recovered
            else rebuilt_summary(server.rebuilt),
        }

    @replies_errors
    async def stop(self, ps_shard: object = None) -> dict:
        k = field_int("ps_shard", ps_shard, maximum=MAX_SHARDS)
        host = self.hosts.pop(k, None)
        if host is not None:
            await host.server.close()
        return {"status": "OK"}

    @replies_errors
    async def set_clients(self, clients: object = ()) -> dict:
        """The Dask clients connected now, and those that left (their runs free)."""
        if not isinstance(clients, list | tuple) or len(clients) > MAX_COUNT:
            raise InvalidRequest("clients must be a list of client ids")
        known = frozenset(field_str("a client", c) for c in clients)
        for host in self.hosts.values():
            for gone in host.clients - known:
                host.server.state.release_client(gone)
            host.clients = known
        return {"status": "OK"}

    async def close(self) -> None:
        for host in list(self.hosts.values()):
            await host.server.close()
        self.hosts.clear()
