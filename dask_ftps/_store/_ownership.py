"""Ownership: how a server takes a store over, and why a stale one cannot harm it.

Fencing is by construction (see :mod:`dask_ftps._store._journal`): the claim is
a log record at the next serial, created exclusively, so the replaced server's
next record fails to be created and it stops. The liveness check here only
keeps a second scheduler from taking over a store whose owner still serves
(a user's mistake, not a correctness matter); it runs while the rebuild reads
the store, so a dead owner costs no waiting beyond the rebuild.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from dask_ftps._exceptions import Fenced, StoreLocked
from dask_ftps._store._journal import Journal

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: How often a start reads the store again when another server wrote it
#: between the read and the claim.
CLAIM_ATTEMPTS = 5


async def take_over(
    open_journal: Callable[[], Awaitable[Journal]],
    address: str,
    is_alive: Callable[[Journal, int, str], Awaitable[bool]],
    rebuild: Callable[[Journal], Awaitable[T]],
) -> tuple[Journal, int, T]:
    """Open a store, rebuild its state and claim it: ``(journal, incarnation, rebuilt)``.

    Parameters
    ----------
    open_journal
        Opens the store for writing (called again after a lost race).
    address
        This server's address, recorded in the claim.
    is_alive
        ``is_alive(journal, incarnation, address)`` says whether the owner the
        log names still serves this store; awaited while ``rebuild`` runs.
    rebuild
        Rebuilds the state the journal holds (nothing is written before it ends).

    Raises
    ------
    StoreLocked
        If the owner is alive, or other servers kept writing the store.
    """
    for attempt in range(CLAIM_ATTEMPTS):
        journal = await open_journal()
        owner = journal.owner()
        alive = None
        if owner is not None and owner[1] != address:
            alive = asyncio.ensure_future(is_alive(journal, *owner))
        try:
            rebuilt = await rebuild(journal)
            if alive is not None and await alive:
                raise StoreLocked(
                    f"store {journal.io} is written by incarnation {owner[0]} at "
                    f"{owner[1]}, which is alive"
                )
            incarnation = await journal.claim(address)
        except Fenced as e:
            logger.warning(
                "Claim of %s lost a race (%s); reading it again", journal.io, e
            )
            await journal.close()
            continue
        except BaseException:
            await journal.close()
            raise
        finally:
            if alive is not None and not alive.done():
                alive.cancel()
        logger.info(
            "Claimed %s: incarnation %d%s",
            journal.io,
            incarnation,
            "" if attempt == 0 else f" (attempt {attempt + 1})",
        )
        return journal, incarnation, rebuilt
    raise StoreLocked("other servers kept writing the store while this one started")
