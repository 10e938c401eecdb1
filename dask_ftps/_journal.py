"""The Zarr store: layout, group commit, commit point, snapshots and retention.

Layout of a store (a Zarr v3 group; see ``docs/store-format.md``)::

    zarr.json                  group; attributes: format, model, optimizer, mode, ...
    ftps/commits/<serial>      the commit point (the newest one): all data is valid up to it
    ftps/owner.json            the incarnation that writes the store, and where it runs
    ftps/incarnations/<n>      one object per incarnation ever claimed (exclusive create)
    rows/                      int64 (capacity, 6): run, epoch, shard, step, worker, version;
                               one chunk per update
    payloads/                  float32 (capacity, n_params): one chunk per update
    snapshots/v<version>/      float32 (n_params + n_opt,): parameters then optimizer state

Row ``i`` of ``rows`` and of ``payloads`` is the ``i``-th accepted update (the global
dataset and the gradient datasets). Rows and payloads at or past ``seq`` in the
commit document are torn writes: they are discarded on open. The single writer is
the parameter server on the scheduler; it serialises every mutation.

Every object a commit writes is a new one (a new chunk, a new commit document):
replacing an existing file costs a forced flush on ext4 (``auto_da_alloc``), a new
one does not.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import signal
import socket
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import zarr.api.asynchronous as za
from zarr.abc.store import Store
from zarr.codecs import BytesCodec
from zarr.codecs.bytes import Endian
from zarr.core.buffer import default_buffer_prototype
from zarr.storage import FsspecStore, LocalStore

from dask_ftps._core import ModelVersion, RunSpec, Update, UpdateKey, Version, WorkerId
from dask_ftps._exceptions import FTPSError, SpecMismatch, StoreLocked
from dask_ftps._layout import Layout
from dask_ftps.models import Model, model_from_dict
from dask_ftps.optim import Optimizer, optimizer_from_dict

logger = logging.getLogger(__name__)

FORMAT = "dask-ftps"
FORMAT_VERSION = 1
COMMIT_PREFIX = "ftps/commits/"
OWNER_KEY = "ftps/owner.json"
CLAIM_PREFIX = "ftps/incarnations/"
ROW_FIELDS = ("run", "epoch", "shard", "step", "worker", "version")
SNAPSHOT_CHUNK = 1 << 20
_PROTO = default_buffer_prototype()


class StoreFormatError(FTPSError, ValueError):
    """The store holds something that is not a dask_ftps run of this format."""


@dataclass(frozen=True)
class RunStart:
    """A ``begin_run`` that created a run: replayed before row ``begun_at``."""

    spec: RunSpec
    base_version: int
    begun_at: int

    def to_json(self) -> dict:
        return {**asdict(self), "spec": self.spec.to_dict()}

    @classmethod
    def from_json(cls, d: dict) -> RunStart:
        return cls(RunSpec.from_dict(d["spec"]), d["base_version"], d["begun_at"])


@dataclass(frozen=True)
class SnapshotRef:
    """A complete snapshot: the model at ``version`` and the runs' clocks as of
    row ``replay_from`` (rows before it are merged into the snapshot)."""

    name: str
    version: int
    replay_from: int
    runs: tuple[tuple[tuple[int, ...], bool], ...]  # (clocks, superseded) per run
    pending: tuple[tuple[str, int], ...] = ()

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "version": self.version,
            "replay_from": self.replay_from,
            "runs": [[list(c), s] for c, s in self.runs],
        }

    @classmethod
    def from_json(cls, d: dict) -> SnapshotRef:
        runs = tuple((tuple(c), bool(s)) for c, s in d["runs"])
        return cls(d["name"], d["version"], d["replay_from"], runs)


@dataclass
class CommitDoc:
    """The commit point. Written whole and atomically after the data it covers."""

    seq: int = 0
    serial: int = 0
    incarnation: int = 0
    workers: list[str] = field(default_factory=list)
    runs: list[RunStart] = field(default_factory=list)
    downloads: list[tuple[str, int]] = field(default_factory=list)
    snapshots: list[SnapshotRef] = field(default_factory=list)

    def to_bytes(self) -> bytes:
        d = {
            "seq": self.seq,
            "serial": self.serial,
            "incarnation": self.incarnation,
            "workers": self.workers,
            "runs": [r.to_json() for r in self.runs],
            "downloads": [list(d) for d in self.downloads],
            "snapshots": [s.to_json() for s in self.snapshots],
            "time": time.time(),
        }
        return json.dumps(d, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> CommitDoc:
        d = json.loads(raw)
        return cls(
            seq=d["seq"],
            serial=d["serial"],
            incarnation=d["incarnation"],
            workers=list(d["workers"]),
            runs=[RunStart.from_json(r) for r in d["runs"]],
            downloads=[(w, v) for w, v in d["downloads"]],
            snapshots=[SnapshotRef.from_json(s) for s in d["snapshots"]],
        )


@dataclass(frozen=True)
class RunMeta:
    """What the store's root attributes say about the run it holds."""

    model: Model
    optimizer: Optimizer
    mode: str
    staleness: int

    def to_attrs(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": self.model.to_dict(),
            "optimizer": self.optimizer.to_dict(),
            "mode": self.mode,
            "staleness": self.staleness,
        }

    @classmethod
    def from_attrs(cls, attrs: dict) -> RunMeta:
        if attrs.get("format") != FORMAT:
            raise StoreFormatError(
                f"not a dask_ftps store (format {attrs.get('format')!r})"
            )
        if attrs.get("format_version") != FORMAT_VERSION:
            raise StoreFormatError(
                f"store format version {attrs.get('format_version')!r}; this "
                f"dask_ftps reads version {FORMAT_VERSION}"
            )
        return cls(
            model_from_dict(attrs["model"]),
            optimizer_from_dict(attrs["optimizer"]),
            attrs["mode"],
            attrs["staleness"],
        )

    def check_same(self, other: RunMeta) -> None:
        for name in ("model", "optimizer", "mode", "staleness"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                raise SpecMismatch(
                    f"the store holds a run with {name} {mine!r}; refusing to "
                    f"resume it with {theirs!r} (use another store to start afresh)"
                )


async def open_store(
    store: str | os.PathLike | Store, read_only: bool = False
) -> Store:
    """A Zarr store for a local path, an fsspec URL or a ready store."""
    if isinstance(store, Store):
        return store
    url = os.fspath(store)
    if "://" in url and not url.startswith("file://"):
        return FsspecStore.from_url(url, read_only=read_only)
    path = url.removeprefix("file://")
    if read_only and not os.path.isdir(path):
        raise FileNotFoundError(f"no store at {path!r}")
    return await LocalStore.open(path, read_only=read_only)


async def holds_run(store: str | os.PathLike) -> bool:
    """Whether ``store`` holds a run (a commit point), read without changing it."""
    try:
        return await _read_doc(await open_store(store, read_only=True)) is not None
    except FileNotFoundError:
        return False


class Journal:
    """One store, opened by its single writer (or read-only by tools).

    Use :meth:`create` for a new run and :meth:`open` for an existing one.
    """

    store: Store
    meta: RunMeta
    doc: CommitDoc
    params_layout: Layout
    state_layout: Layout

    def __init__(self, store: Store, group: Any, meta: RunMeta, doc: CommitDoc):
        self.store = store
        self.group = group
        self.meta = meta
        self.doc = doc
        params = meta.model.init_params()
        self.params_layout = Layout.of(params)
        self.state_layout = Layout.of(meta.optimizer.init_state(params))
        self.durable = False
        self.writes = 0
        self.owner: dict | None = None
        #: Versions of the snapshots the store's commit point lists (the in-memory
        #: document lists a new one a moment before it is written).
        self.stored_snapshots = tuple(ref.version for ref in doc.snapshots)
        self._crash_at = _crash_points()
        self._appends = self._snapshots = 0
        self._doc_lock = asyncio.Lock()
        self._rows: Any = None
        self._payloads: Any = None
        self._worker_index: dict[str, int] = {}

    # -- opening --------------------------------------------------------------

    @classmethod
    async def create(
        cls,
        store: str | os.PathLike | Store,
        meta: RunMeta,
        initial: ModelVersion,
    ) -> Journal:
        """Start a new run in an empty store (or one whose creation was torn)."""
        store = await open_store(store)
        if await _read_doc(store) is not None:
            raise StoreFormatError("the store already holds a run: open it instead")
        group = await za.open_group(
            store, mode="w", zarr_format=3, attributes=meta.to_attrs()
        )
        journal = cls(store, group, meta, CommitDoc())
        n = journal.params_layout.size
        journal._rows = await group.create_array(
            "rows",
            shape=(64, len(ROW_FIELDS)),
            dtype="int64",
            chunks=(1, len(ROW_FIELDS)),
            fill_value=-1,
            compressors=None,
            config={"write_empty_chunks": True},
            dimension_names=("update", "field"),
            attributes={"fields": list(ROW_FIELDS)},
        )
        journal._payloads = await group.create_array(
            "payloads",
            shape=(64, n),
            dtype="float32",
            chunks=(1, n),
            compressors=None,
            config={"write_empty_chunks": True},
            fill_value=0.0,
            dimension_names=("update", "param"),
            attributes={
                "names": list(journal.params_layout.names),
                "shapes": [list(s) for s in journal.params_layout.shapes],
            },
        )
        await group.create_group("snapshots")
        ref = await journal.write_snapshot(
            initial, replay_from=0, runs=(), publish=False
        )
        journal.doc.snapshots = [ref]
        await journal._write_doc()
        logger.info("Created store %s for %s", _describe(store), meta.model)
        return journal

    @classmethod
    async def open(
        cls, store: str | os.PathLike | Store, *, read_only: bool = False
    ) -> Journal | None:
        """Open the run a store holds; None if it holds none (empty or never committed)."""
        store = await open_store(store, read_only=read_only)
        doc = await _read_doc(store)
        if doc is None:
            if not read_only and not await store.is_empty(""):
                logger.warning(
                    "Store %s has no commit point: its creation was torn; "
                    "starting it afresh",
                    _describe(store),
                )
            return None
        try:
            group = await za.open_group(
                store, mode="r" if read_only else "r+", use_consolidated=False
            )
        except Exception as e:
            raise StoreFormatError(f"cannot open {_describe(store)}: {e}") from e
        meta = RunMeta.from_attrs(dict(group.attrs))
        journal = cls(store, group, meta, doc)
        journal._rows = await group.getitem("rows")
        journal._payloads = await group.getitem("payloads")
        for array in (journal._rows, journal._payloads):
            if not _raw_rows(array):
                raise StoreFormatError(
                    f"{_describe(store)}: array {array.path!r} does not hold one "
                    "raw little-endian chunk per update"
                )
        journal._worker_index = {w: i for i, w in enumerate(doc.workers)}
        if not read_only:
            await journal._discard_torn_writes()
        return journal

    # -- the single writer ------------------------------------------------------

    async def claim(self, address: str, check_alive) -> int:
        """Take the next incarnation; refuse if another live server writes the store.

        ``check_alive(address, incarnation)`` is awaited for the current owner
        and must say whether it still serves this store.
        """
        raw = await self.store.get(OWNER_KEY, prototype=_PROTO)
        owner = json.loads(raw.to_bytes()) if raw is not None else None
        last = self.doc.incarnation
        if owner is not None:
            last = max(last, owner["incarnation"])
            if await check_alive(owner["address"], owner["incarnation"]):
                raise StoreLocked(
                    f"store {_describe(self.store)} is written by incarnation "
                    f"{owner['incarnation']} at {owner['address']}, which is alive"
                )
        incarnation = last + 1
        key = f"{CLAIM_PREFIX}{incarnation}"
        if await self.store.exists(key):
            raise StoreLocked(
                f"incarnation {incarnation} was claimed by another server"
            )
        await self.store.set_if_not_exists(key, _buf(address.encode()))
        claimed = await self.store.get(key, prototype=_PROTO)
        if claimed is None or claimed.to_bytes() != address.encode():
            raise StoreLocked(
                f"incarnation {incarnation} was claimed by another server"
            )
        owner = {
            "incarnation": incarnation,
            "address": address,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "time": time.time(),
        }
        await self._set(OWNER_KEY, json.dumps(owner).encode())
        self.owner = owner
        for old in range(max(1, incarnation - 8), incarnation - 1):
            await self.store.delete(f"{CLAIM_PREFIX}{old}")
        self.doc.incarnation = incarnation
        await self._write_doc()
        return incarnation

    async def append(
        self,
        updates: list[Update],
        versions: list[int],
        downloads: list[tuple[WorkerId, Version]],
    ) -> None:
        """Group commit: payloads, then rows, then the commit point."""
        if not updates:
            return
        start, stop = self.doc.seq, self.doc.seq + len(updates)
        await self._ensure_capacity(stop)
        flat = np.empty((len(updates), self.params_layout.size), np.float32)
        for i, update in enumerate(updates):
            self.params_layout.flatten(update.grads, out=flat[i])
        write_payloads = self._write_chunks(self._payloads, start, flat)
        self.writes += len(updates)
        rows = np.array(
            [
                (
                    *(getattr(u.key, f) for f in ROW_FIELDS[:4]),
                    self._worker_id(u.worker),
                    v,
                )
                for u, v in zip(updates, versions, strict=True)
            ],
            dtype=np.int64,
        )
        await asyncio.gather(
            write_payloads,
            self._write_chunks(self._rows, start, rows),
            self._check_owner(),
        )
        if self.durable:
            await self._fsync(start, stop)
        self._appends += 1
        self._maybe_crash("commit", self._appends)
        async with self._doc_lock:
            self.doc.seq = stop
            self.doc.downloads = [(str(w), int(v)) for w, v in downloads]
            await self._write_doc(owner_checked=True)

    async def record_run(self, spec: RunSpec, base_version: int) -> None:
        """Persist a ``begin_run`` that created a run."""
        async with self._doc_lock:
            self.doc.runs.append(RunStart(spec, base_version, self.doc.seq))
            await self._write_doc()

    async def write_snapshot(
        self,
        model: ModelVersion,
        replay_from: int,
        runs: tuple,
        publish: bool = True,
    ) -> SnapshotRef:
        """Write a snapshot; with ``publish`` list it in the commit point and trim."""
        name = f"v{int(model.version):012d}"
        n_params, n_state = self.params_layout.size, self.state_layout.size
        flat = np.empty(n_params + n_state, np.float32)
        self.params_layout.flatten(model.params, out=flat[:n_params])
        self.state_layout.flatten(model.opt_state, out=flat[n_params:])
        array = await self.group.create_array(
            f"snapshots/{name}",
            shape=flat.shape,
            dtype="float32",
            chunks=(min(len(flat), SNAPSHOT_CHUNK),) if len(flat) else (1,),
            compressors=None,
            config={"write_empty_chunks": True},
            fill_value=0.0,
            overwrite=True,
        )
        await array.setitem(slice(None), flat)
        self.writes += 1
        ref = SnapshotRef(name, int(model.version), replay_from, runs)
        if publish:
            self._snapshots += 1
            self._maybe_crash("snapshot", self._snapshots)
            async with self._doc_lock:
                self.doc.snapshots = [*self.doc.snapshots, ref]
                await self._write_doc()
        return ref

    async def trim(self, keep_snapshots: int) -> dict[str, int]:
        """Delete what no recovery can need: old snapshots, payloads and rows before
        the oldest kept snapshot (the patent's retention of the gradient and global
        datasets). The commit point is updated first, so a crash leaves garbage,
        never a hole."""
        async with self._doc_lock:
            kept = self.doc.snapshots[-keep_snapshots:]
            dropped = self.doc.snapshots[:-keep_snapshots]
            if not dropped:
                return {"snapshots": 0, "payloads": 0}
            self.doc.snapshots = kept
            await self._write_doc()
        floor = kept[0].replay_from
        await self._delete_dirs([f"snapshots/{ref.name}" for ref in dropped])
        first = dropped[0].replay_from
        deleted = await self._delete_payloads(range(first, floor))
        await self._delete_dirs([f"rows/c/{i}" for i in range(first, floor)])
        return {"snapshots": len(dropped), "payloads": deleted}

    # -- reading --------------------------------------------------------------

    @property
    def floor(self) -> int:
        """The first row any recovery can need."""
        return self.doc.snapshots[0].replay_from

    async def last_version(self) -> int:
        """The model version of the last committed update (or of the snapshot)."""
        if self.doc.seq > self.floor:
            return int((await self.read_rows(self.doc.seq - 1, self.doc.seq))[0, -1])
        return self.doc.snapshots[-1].version

    async def read_rows(self, start: int, stop: int) -> np.ndarray:
        if stop <= start:
            return np.empty((0, len(ROW_FIELDS)), np.int64)
        return await self._rows.getitem((slice(start, stop), slice(None)))

    async def read_payloads(self, start: int, stop: int) -> np.ndarray:
        return await self._payloads.getitem((slice(start, stop), slice(None)))

    async def read_snapshot(self, ref: SnapshotRef) -> ModelVersion:
        array = await self.group.getitem(f"snapshots/{ref.name}")
        flat = await array.getitem(slice(None))
        n = self.params_layout.size
        return ModelVersion(
            Version(ref.version),
            {k: v.copy() for k, v in self.params_layout.unflatten(flat[:n]).items()},
            {k: v.copy() for k, v in self.state_layout.unflatten(flat[n:]).items()},
        )

    def row_update(self, row: np.ndarray, payload: np.ndarray | None) -> Update:
        """The update of a global-dataset row (without grads if no payload)."""
        key = UpdateKey(*(int(x) for x in row[:4]))
        worker = WorkerId(self.doc.workers[int(row[4])])
        grads = {} if payload is None else self.params_layout.unflatten(payload)
        return Update(key, worker, grads)

    # -- internals ------------------------------------------------------------

    def _maybe_crash(self, point: str, count: int) -> None:
        """Fault injection for failure tests (``ftps.testing.crash-at``)."""
        if self._crash_at.get(point) == count:
            logger.critical("ftps.testing.crash-at: SIGKILL at %s %d", point, count)
            os.kill(os.getpid(), signal.SIGKILL)

    def _worker_id(self, worker: str) -> int:
        index = self._worker_index.get(worker)
        if index is None:
            index = self._worker_index[worker] = len(self.doc.workers)
            self.doc.workers.append(worker)
        return index

    async def _ensure_capacity(self, stop: int) -> None:
        capacity = self._payloads.shape[0]
        if stop > capacity:
            new = max(2 * capacity, stop)
            self._payloads = await _resized(
                self._payloads, (new, self._payloads.shape[1])
            )
        capacity = self._rows.shape[0]
        if stop > capacity:
            new = max(2 * capacity, stop)
            self._rows = await _resized(self._rows, (new, len(ROW_FIELDS)))

    async def _write_doc(self, owner_checked: bool = False) -> None:
        """Write the next commit document; drop the one before the previous."""
        if not owner_checked:
            await self._check_owner()
        self.doc.serial += 1
        writes = [self._set_once(_doc_key(self.doc.serial), self.doc.to_bytes())]
        if self.doc.serial > 2:  # the previous document stays until this one is in
            writes.append(self.store.delete(_doc_key(self.doc.serial - 2)))
        await asyncio.gather(*writes)
        self.stored_snapshots = tuple(ref.version for ref in self.doc.snapshots)

    async def _check_owner(self) -> None:
        """Refuse to write once another incarnation has claimed the store."""
        if self.owner is None:
            return
        raw = await self.store.get(OWNER_KEY, prototype=_PROTO)
        owner = json.loads(raw.to_bytes()) if raw is not None else {}
        if owner.get("incarnation") != self.owner["incarnation"]:
            raise StoreLocked(
                f"incarnation {owner.get('incarnation')} at {owner.get('address')} "
                f"took over {_describe(self.store)}; this server (incarnation "
                f"{self.owner['incarnation']}) stops writing it"
            )

    async def _set_once(self, key: str, value: bytes) -> None:
        """Write a commit document; its serial can be taken once only, so that of
        two servers that both believe they own the store, one fails here."""
        await self.store.set_if_not_exists(key, _buf(value))
        held = await self.store.get(key, prototype=_PROTO)
        if held is None or held.to_bytes() != value:
            raise StoreLocked(
                f"another server wrote {key} of {_describe(self.store)} first: "
                "this one no longer owns the store"
            )
        self.writes += 1
        if self.durable:
            await self._fsync_keys([key])

    async def _set(self, key: str, value: bytes) -> None:
        await self.store.set(key, _buf(value))
        self.writes += 1
        if self.durable:
            await self._fsync_keys([key])

    async def _write_chunks(self, array: Any, start: int, values: np.ndarray) -> None:
        """Rows ``start, start + 1, ...`` of ``array``, one chunk each.

        The journal's arrays have no codec but little-endian bytes, so a chunk's
        object is its raw bytes: they go to the store directly, past zarr's
        general write path (the bytes are the same; it costs about 1 ms less
        per chunk). :meth:`open` refuses arrays of another layout.
        """
        little = values.astype(values.dtype.newbyteorder("<"), copy=False)
        await asyncio.gather(
            *(
                self.store.set(
                    f"{array.path}/{array.metadata.encode_chunk_key((start + i, 0))}",
                    _buf(row.tobytes()),
                )
                for i, row in enumerate(little)
            )
        )

    async def _delete_payloads(self, indices: range) -> int:
        # Whole chunk folders ("payloads/c/<i>"), so that no empty folder stays behind.
        await self._delete_dirs([f"payloads/c/{i}" for i in indices])
        return len(indices)

    async def _delete_dirs(self, prefixes: list[str]) -> None:
        """Delete folders; a local store's (``shutil.rmtree``) off the event loop."""
        if isinstance(self.store, LocalStore):
            await asyncio.to_thread(_remove_dirs, self.store, prefixes)
        else:
            await asyncio.gather(*(self.store.delete_dir(p) for p in prefixes))

    async def _fsync(self, start: int, stop: int) -> None:
        keys = [
            f"{name}/c/{i}/0"
            for name in ("payloads", "rows")
            for i in range(start, stop)
        ]
        await self._fsync_keys(keys)

    async def _fsync_keys(self, keys: list[str]) -> None:
        if isinstance(self.store, LocalStore):
            await asyncio.to_thread(_fsync_paths, [self.store.root / k for k in keys])

    async def _discard_torn_writes(self) -> None:
        """Remove what lies past the commit point, or below the retention floor."""
        seq, floor = self.doc.seq, self.floor
        stray = 0
        if isinstance(self.store, LocalStore):
            stray = await asyncio.to_thread(_remove_partial_files, self.store.root)
        torn, garbage = [], []
        for name in ("payloads", "rows"):
            async for key in self.store.list_prefix(f"{name}/c/"):
                match = re.match(rf"{name}/c/(\d+)/0$", key)
                if match:
                    index = int(match.group(1))
                    if index >= seq:
                        torn.append(f"{name}/c/{index}")
                    elif index < floor:
                        garbage.append(f"{name}/c/{index}")
        listed = {ref.name for ref in self.doc.snapshots}
        old_snapshots = set()
        async for key in self.store.list_prefix("snapshots/"):
            name = key.split("/")[1]
            if name != "zarr.json" and name not in listed:
                old_snapshots.add(name)
        await self._delete_dirs(
            torn + garbage + [f"snapshots/{name}" for name in old_snapshots]
        )
        stale_docs = [k async for k in self.store.list_prefix(COMMIT_PREFIX)]
        for key in stale_docs:
            if key != _doc_key(self.doc.serial):
                await self.store.delete(key)
        if stray or torn or old_snapshots:
            logger.warning(
                "Opened %s at its commit point (%d updates): discarded %d torn "
                "payload/row chunks, %d unfinished snapshots and %d stray "
                "temporary files past it",
                _describe(self.store),
                seq,
                len(torn),
                len(old_snapshots),
                stray,
            )
        if garbage:
            logger.info("Removed %d payloads below the retention floor", len(garbage))


def _crash_points() -> dict[str, int]:
    """``{"commit": n}``: die in the n-th group commit, after its payloads and rows
    are written and before its commit point; ``{"snapshot": n}``: die after the
    n-th snapshot's data is written, before it is listed."""
    from dask_ftps import config

    return dict(config.get("testing.crash-at") or {})


_DOC_KEY = re.compile(rf"^{COMMIT_PREFIX}\d{{16}}$")


def _doc_key(serial: int) -> str:
    return f"{COMMIT_PREFIX}{serial:016d}"


async def _read_doc(store: Store) -> CommitDoc | None:
    """The newest commit document, or None (stray temporary files are no documents)."""
    keys = [k async for k in store.list_prefix(COMMIT_PREFIX)]
    for key in sorted((k for k in keys if _DOC_KEY.match(k)), reverse=True):
        raw = await store.get(key, prototype=_PROTO)
        if raw is not None:
            return CommitDoc.from_bytes(raw.to_bytes())
    return None


async def _resized(array: Any, shape: tuple[int, ...]) -> Any:
    await array.resize(shape)  # in place: writes the new zarr.json, then the metadata
    return array


def _buf(value: bytes):
    return _PROTO.buffer.from_bytes(value)


def _describe(store: Store) -> str:
    return str(store.root) if isinstance(store, LocalStore) else str(store)


def _raw_rows(array: Any) -> bool:
    """Whether each chunk of ``array`` is one whole row stored as raw
    little-endian bytes."""
    meta = array.metadata
    codecs = getattr(meta, "codecs", ())
    return (
        meta.zarr_format == 3
        and tuple(meta.chunk_grid.chunk_shape) == (1, array.shape[1])
        and len(codecs) == 1
        and isinstance(codecs[0], BytesCodec)
        and codecs[0].endian in (None, Endian.little)
    )


def _remove_dirs(store: LocalStore, prefixes: list[str]) -> None:
    if store.read_only:
        raise ValueError(f"store {store.root} is read-only")
    for prefix in prefixes:
        path = store.root / prefix
        if path.is_dir():
            shutil.rmtree(path)


def _remove_partial_files(root) -> int:
    removed = 0
    for dirpath, _, files in os.walk(root):
        for name in files:
            if name.endswith(".partial"):
                os.unlink(os.path.join(dirpath, name))
                removed += 1
    return removed


def _fsync_paths(paths) -> None:
    dirs = set()
    for path in paths:
        if path.exists():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            dirs.add(path.parent)
    for d in dirs:
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
