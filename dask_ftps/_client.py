"""Client-side calls: the live model and the server's status."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from dask_ftps._core import check_reply
from dask_ftps._exceptions import NotRegistered, ServerReplaced

if TYPE_CHECKING:
    from distributed import Client

    from dask_ftps.models import Model


def get_model(client: Client) -> tuple[int, dict[str, np.ndarray]]:
    """The live model on the parameter server: ``(version, params)``.

    ``params`` are the caller's own NumPy arrays: changing them changes nothing
    on the server.

    Examples
    --------
    >>> version, params = dask_ftps.get_model(client)  # doctest: +SKIP
    """
    return client.sync(_get_model, client)


def status(client: Client) -> dict:
    """The parameter server's counters.

    Returns
    -------
    dict
        At least ``version``, ``incarnation``, ``updates`` (accepted update
        ids), ``mode``, ``workers`` (addresses), ``run`` (the latest run's
        progress), ``global_rows``, ``download_rows``, ``gradient_entries`` and
        ``gradient_bytes`` (the payloads the gradient datasets hold in memory).
    """
    return client.sync(_status, client)


def records(client: Client) -> dict[str, list[dict]]:
    """The live server's global dataset and download dataset.

    Returns
    -------
    dict
        ``global``: rows ``{"update_id", "worker", "version"}`` in commit
        order; ``download``: rows ``{"worker", "version"}``.
    """
    return client.sync(_records, client)


async def _read(client: Client, op: str) -> dict:
    """Ask the scheduler ``op`` (a read that changes nothing); asked once more on a
    closed connection: the client's pool may hand out a connection to a
    scheduler that has since been restarted on the same address."""
    from distributed.comm import CommClosedError

    handler = getattr(client.scheduler, op)
    try:
        reply = await handler()
    except CommClosedError:
        reply = await handler()
    return check_reply(reply, op)


async def _records(client: Client) -> dict[str, list[dict]]:
    reply = await _read(client, "ftps_records")
    reply.pop("status")
    return reply


async def model_spec(client: Client, server_id: str | None = None) -> Model:
    """The served model object (not rebuilt from its description: no class is
    looked up by name here); with ``server_id``, :class:`ServerReplaced` if
    another server serves now."""
    reply = await _read(client, "ftps_model_spec")
    if server_id is not None and reply["server_id"] != server_id:
        raise ServerReplaced(
            "the scheduler's parameter server was replaced while train() read its "
            "model: call train() again"
        )
    return reply["model"]


async def _get_model(client: Client) -> tuple[int, dict[str, np.ndarray]]:
    reply = await _read(client, "ftps_get_model")
    # The caller's own arrays: in an in-process cluster the reply holds the
    # server's (read-only) ones themselves.
    params = {
        k: v if v.flags.writeable else v.copy() for k, v in reply["params"].items()
    }
    return reply["version"], params


async def _status(client: Client) -> dict:
    reply = await _read(client, "ftps_status")
    reply.pop("status")
    return reply


def _hosts_server(dask_scheduler) -> bool:
    """On the scheduler: whether a ParameterServer's handlers are there."""
    return "ftps_status" in dask_scheduler.handlers


async def hosts_server(client: Client) -> bool:
    """Whether the scheduler hosts a parameter server, asked without calling a
    handler it may lack (the scheduler would log a traceback).

    Raises
    ------
    NotRegistered
        If the scheduler cannot be asked (dask_ftps not installed there).
    """
    try:
        return await client.run_on_scheduler(_hosts_server, asynchronous=True)
    except Exception as e:
        raise NotRegistered(
            f"cannot ask the scheduler for a parameter server ({e!r}): is dask_ftps "
            "installed where the scheduler runs?"
        ) from e


async def require_server(client: Client) -> None:
    """Raise :class:`NotRegistered` unless the scheduler hosts a parameter server."""
    if not await hosts_server(client):
        raise NotRegistered(
            "the scheduler hosts no parameter server: register a "
            "dask_ftps.ParameterServer first (client.register_plugin(...) or dask "
            "scheduler --preload dask_ftps.preload)"
        )
