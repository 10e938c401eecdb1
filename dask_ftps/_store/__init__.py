"""The Zarr store of a run: format records, raw I/O, ownership and the journal.

- :mod:`._format`: keys, log records and checksums (pure);
- :mod:`._io`: object I/O over a local folder, an fsspec URL or any Zarr store;
- :mod:`._journal`: the log, read and checked; commits, snapshots, trims, replay;
- :mod:`._ownership`: taking a store over.

See ``docs/store-format.md``.
"""

from __future__ import annotations

from dask_ftps._store._format import FORMAT_VERSION, Record, RunEntry, RunMeta
from dask_ftps._store._io import StoreIO, resolve
from dask_ftps._store._journal import CommittedUpdates, Journal, ReplayEvent
from dask_ftps._store._ownership import take_over

__all__ = [
    "FORMAT_VERSION",
    "CommittedUpdates",
    "Journal",
    "Record",
    "ReplayEvent",
    "RunEntry",
    "RunMeta",
    "StoreIO",
    "resolve",
    "take_over",
]
