"""The worker half: a model cache and blocking calls for code running in tasks."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from distributed.core import error_message
from distributed.diagnostics.plugin import WorkerPlugin
from distributed.protocol.serialize import ToPickle
from distributed.utils import sync

from dask_ftps._core import Holder, ServerId, UpdateKey, check_reply
from dask_ftps._exceptions import NotRegistered

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
        self.worker = worker
        self.latest = None
        self._lock = threading.Lock()
        worker.handlers["ftps_model_copy"] = self.model_copy

    def teardown(self, worker: Worker) -> None:
        if worker.handlers.get("ftps_model_copy") == self.model_copy:
            del worker.handlers["ftps_model_copy"]

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
    ) -> ModelCopy:
        """The model to compute ``(epoch, step)`` of a shard from (may wait)."""
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
    ) -> concurrent.futures.Future[ModelCopy | None]:
        """Send a push and return at once: the future is done once the server
        accepted it (it is durable then), with the model for ``next_step``."""
        kwargs = {
            "server_id": server,
            "holder": holder,
            "worker": self.worker.address,
            "update_id": key.id,
            "grads": ToPickle(grads),
            "incarnation": incarnation,
            "next_step": next_step,
            **self._have(self.latest),
        }

        async def push() -> ModelCopy | None:
            reply = await self._acall("ftps_push", **kwargs)
            return None if next_step is None else self._keep(reply)

        return asyncio.run_coroutine_threadsafe(push(), self.worker.loop.asyncio_loop)

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
                copy = ModelCopy(
                    reply["server"],
                    reply["run_id"],
                    reply["incarnation"],
                    reply["version"],
                    reply["params"],
                )
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


def get_worker_plugin() -> FTPSWorkerPlugin:
    """The :class:`FTPSWorkerPlugin` of the worker running the current task."""
    from distributed import get_worker

    try:
        return get_worker().plugins["ftps"]
    except KeyError:
        raise NotRegistered(
            "this worker has no dask_ftps plugin: register a ParameterServer"
        ) from None
