"""Scheduler preload: ``dask scheduler --preload dask_ftps.preload --ftps-store URL``.

A scheduler started so (by hand, by a supervisor, or by a jobqueue cluster's
``scheduler_options={"preload": ["dask_ftps.preload"], "preload_argv": [[...]]}``)
registers a :class:`~dask_ftps.ParameterServer` on the store at start-up; if the
store holds a run, the server rebuilds it before the scheduler serves anyone.
"""

from __future__ import annotations

import logging

import click

from dask_ftps._core import MODES

logger = logging.getLogger(__name__)


@click.command()
@click.option(
    "--ftps-store", required=True, help="Zarr store of the run (path or URL)."
)
@click.option(
    "--ftps-mode",
    type=click.Choice(MODES),
    default=None,
    help="Consistency mode of a new run (a stored run keeps its own).",
)
@click.option(
    "--ftps-durable/--no-ftps-durable",
    default=None,
    help="fsync every write of a local store.",
)
def dask_setup(scheduler, ftps_store: str, ftps_mode: str | None, ftps_durable) -> None:
    """Register a ParameterServer that resumes (or refuses to start without) a run."""
    from dask_ftps._scheduler_plugin import ParameterServer

    plugin = ParameterServer(store=ftps_store, mode=ftps_mode, durable=ftps_durable)
    scheduler.add_plugin(plugin)
    logger.info("dask_ftps preload: parameter server on %s", ftps_store)
