"""Scheduler preload: ``dask scheduler --preload dask_ftps.preload --ftps-store URL``.

A scheduler started so (by hand, by a supervisor, or by a jobqueue cluster's
``scheduler_options={"preload": ["dask_ftps.preload"], "preload_argv": [[...]]}``)
registers a :class:`~dask_ftps.ParameterServer` on the store at start-up if the
store holds a run: the server rebuilds it before the scheduler serves anyone.
On a store without a run the scheduler starts without a server (unless
``--ftps-require-run``), and the first client registers one with a model, so the
same command line serves the first start and every restart. A store that holds
a run which cannot be rebuilt exactly (damage) stops the scheduler from
starting, with an error naming the damaged object; so does a run whose model
is in a module that ``ftps.models.allowed`` does not list (the error names the
module and the setting): code named by a store is not imported by default.
"""

from __future__ import annotations

import json
import logging

import click

from dask_ftps._core import MODES

logger = logging.getLogger(__name__)


def storage_options(ctx: click.Context, param: click.Parameter, value: str | None):
    """A click callback: ``'{"endpoint_url": ...}'`` -> a dict of fsspec options."""
    if value is None:
        return None
    try:
        options = json.loads(value)
    except ValueError as e:
        raise click.BadParameter(f"not JSON: {e}") from None
    if not isinstance(options, dict):
        raise click.BadParameter("must be a JSON object, e.g. '{\"anon\": true}'")
    return options


@click.command()
@click.option(
    "--ftps-store", required=True, help="Zarr store of the run (path or URL)."
)
@click.option(
    "--ftps-storage-options",
    default=None,
    callback=storage_options,
    help="fsspec options for a URL store, as JSON (endpoint, credentials).",
)
@click.option(
    "--ftps-mode",
    type=click.Choice(MODES),
    default=None,
    help="Consistency mode the stored run must have (checked, not changed).",
)
@click.option(
    "--ftps-durable/--no-ftps-durable",
    default=None,
    help="fsync every write of a local store.",
)
@click.option(
    "--ftps-snapshot-every",
    type=click.IntRange(min=1),
    default=None,
    help="Versions between snapshots (default: ftps.store.snapshot-every); give "
    "what the first ParameterServer(snapshot_every=...) gave.",
)
@click.option(
    "--ftps-require-run",
    is_flag=True,
    help="Refuse to start when the store holds no run to resume.",
)
def dask_setup(
    scheduler,
    ftps_store: str,
    ftps_storage_options: dict | None,
    ftps_mode: str | None,
    ftps_durable: bool | None,
    ftps_snapshot_every: int | None,
    ftps_require_run: bool,
):
    """Register a ParameterServer that resumes the store's run, if it holds one."""
    return _setup(
        scheduler,
        ftps_store,
        ftps_storage_options,
        ftps_mode,
        ftps_durable,
        ftps_require_run,
        ftps_snapshot_every,
    )


async def _setup(
    scheduler,
    store: str,
    storage_options: dict | None,
    mode: str | None,
    durable: bool | None,
    require_run: bool,
    snapshot_every: int | None = None,
) -> None:
    from dask_ftps._exceptions import ModelError, StoreError, one_line
    from dask_ftps._scheduler_plugin import ParameterServer

    try:
        has_run = await holds_run(store, storage_options)
    except (StoreError, ModelError) as e:
        # distributed logs and swallows a preload's errors; a plugin whose start
        # fails stops the scheduler: let the server's start fail on the damage
        # (or on a model this scheduler may not import), and say why in one line.
        logger.error(
            "dask_ftps preload: %s cannot be rebuilt: %s: %s",
            store,
            type(e).__name__,
            one_line(e),
        )
        has_run = True
    if not require_run and not has_run:
        logger.warning(
            "dask_ftps preload: %s holds no run yet; no parameter server until a "
            "client registers ParameterServer(store=%r, model=...)",
            store,
            store,
        )
        return
    # Without a run to resume, or on a damaged one, the server's start fails, and
    # so does the scheduler's.
    scheduler.add_plugin(
        ParameterServer(
            store=store,
            storage_options=storage_options,
            mode=mode,
            durable=durable,
            snapshot_every=snapshot_every,
        )
    )
    logger.info("dask_ftps preload: parameter server on %s", store)


async def holds_run(store, storage_options: dict | None = None) -> bool:
    """Whether ``store`` holds a run, read without changing it (the root group and
    a listing of the log; the server's start checks the rest).

    Raises
    ------
    StoreCorrupted, StoreFormatError
        If it holds something that is not a run that can be rebuilt.
    """
    from dask_ftps._store import Journal, resolve

    io = resolve(store, storage_options, read_only=True)
    try:
        if not await io.exists():
            return False
        if await Journal.read_meta(io) is not None:
            return True
    finally:
        await io.close()
    from dask_ftps._recovery import sharded_run

    return await sharded_run(store, storage_options) is not None  # its shards'?
