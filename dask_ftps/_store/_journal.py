"""The journal: one store's log, read and checked, and written by its one owner.

The log is a sequence of records ``ftps/log/<serial>``, each created
exclusively: two servers can never both write serial ``n``, so whoever fails
to create a record learns it was fenced off, and a stale server can add
nothing after the record of the server that replaced it. Every other object a
server writes (a commit's payload array, a snapshot) has a name of its own
(serial or version, and the writer's token): a stale server cannot overwrite
what the log holds. It deletes only what lies below the oldest snapshot it
published itself, which no later owner reads.

No writer deletes what another writer may hold: a commit whose record create
fails (fenced, or the store failed) leaves its payload array in place. A start
that read the store while that writer was paused may have adopted the array
into its log already; only the owner of the log (a start's clean-up, a trim
below a snapshot) deletes payload arrays no record names.

Records below the oldest snapshot kept are deleted, except claims: a replaced
server's next record is always at the serial of the claim that replaced it.

A commit writes its payload (a shard of its writer's rows array, which holds
the rows and a copy of the commit's record; or, for a commit of its own, the
chunk, then a ``zarr.json`` that repeats the record) and then its record; the
push is acknowledged after that. If the record is lost (or the server died
just before writing it), the payload still holds the whole commit: the next
reader adopts it, so a deleted record changes nothing.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dask_ftps._core import ModelVersion, RunSpec, Update, UpdateKey, Version, WorkerId
from dask_ftps._exceptions import (
    Fenced,
    FTPSError,
    NotDurable,
    StoreCorrupted,
    StoreFormatError,
)
from dask_ftps._layout import DENSE, Layout
from dask_ftps._store._format import (
    COMMIT_CHUNK_KEY,
    DATA_PREFIX,
    GROUP_KEYS,
    LOG_PREFIX,
    ROOT_KEY,
    SHARD_ROWS,
    SNAPSHOT_CHUNK,
    SNAPSHOT_PREFIX,
    ArrayRef,
    Claim,
    Commit,
    DataRef,
    EpochEnded,
    Record,
    Release,
    RunBegun,
    RunEntry,
    RunMeta,
    Snapshot,
    array_document,
    checked_attrs,
    commit_document,
    data_attempt,
    data_dir,
    decode_chunk,
    decode_shard,
    encode_chunk,
    group_document,
    log_key,
    model_crc,
    new_chunk,
    parse_data_key,
    parse_log_key,
    parse_root,
    parse_rows_dir,
    parse_shard_key,
    parse_snapshot_dir,
    record_from_attributes,
    root_document,
    rows_dir,
    rows_document,
    seal_chunk,
    seal_shard,
    shard_key,
    shard_record,
    shard_rows,
    shard_serials,
    shard_tail,
    snapshot_dir,
)
from dask_ftps._store._io import StoreIO, resolve

logger = logging.getLogger(__name__)

#: Commits whose payloads are read in one go during a replay (the next group is
#: read while this one is applied).
REPLAY_GROUP = 8


@dataclass(frozen=True)
class CommittedUpdates:
    """A replay event: the updates of one commit, in commit order.

    Updates the snapshot already holds are left out; ``grads`` are empty dicts
    when the replay was asked not to read payloads up to that version.
    """

    record: Record
    updates: tuple[Update, ...]
    versions: tuple[int, ...]

    @property
    def commit(self) -> Commit:
        return self.record.body


ReplayEvent = RunBegun | EpochEnded | CommittedUpdates


class Journal:
    """The log of one store, opened by its single writer or read-only by tools.

    Use :meth:`open` (None if the store holds no run) or :meth:`create`.
    """

    io: StoreIO
    meta: RunMeta
    records: dict[int, Record]
    head: Record
    params_layout: Layout
    state_layout: Layout

    def __init__(
        self,
        io: StoreIO,
        meta: RunMeta,
        records: dict[int, Record],
        damaged: dict[int, StoreCorrupted],
        adopted: Record | None = None,
    ) -> None:
        self.io = io
        self.meta = meta
        self.records = records
        self.damaged = damaged
        self.adopted = adopted
        self.head = records[max(records)]
        if adopted is not None:
            self.records[adopted.serial] = adopted
            self.head = adopted
        self.incarnation = self.head.incarnation
        self.writer: str | None = None
        self.claim_serial: int | None = None
        self._partial_removed = 0
        #: ``(serial, n)``: the next commit at ``serial`` is this writer's n-th
        #: attempt there (its earlier arrays may be held by a later owner).
        self._attempt = (-1, 0)
        params = meta.model.init_params()
        self.params_layout = Layout.of(params)
        self.state_layout = Layout.of(meta.optimizer.init_state(params))
        self._lock = asyncio.Lock()
        self._intact_from = self._intact_suffix()
        self.root_ok = True
        commits = [r for r in self.records.values() if r.kind == "commit"]
        self._last = max(
            commits or [r for r in self.records.values() if r.kind == "snapshot"],
            key=lambda r: r.serial,
        )
        self._committed = max(
            [r.body.stop for r in self.records.values() if r.kind == "commit"]
            + [
                r.body.replay_from
                for r in self.records.values()
                if r.kind == "snapshot"
            ]
        )

    def __str__(self) -> str:
        return str(self.io)

    # -- opening ------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        store: Any,
        storage_options: dict | None = None,
        *,
        read_only: bool = False,
    ) -> Journal | None:
        """Open the run a store holds; None if it holds none (empty, or its
        creation was torn).

        Raises
        ------
        StoreCorrupted
            If the log or the root group is damaged beyond an exact rebuild.
        StoreFormatError
            If the store holds something other than a dask_ftps run.
        FileNotFoundError
            If ``read_only`` and the store does not exist.
        """
        io = resolve(store, storage_options, read_only=read_only)
        return await cls.open_io(io)

    @classmethod
    async def open_io(cls, io: StoreIO) -> Journal | None:
        if io.read_only and not await io.exists():
            raise FileNotFoundError(f"no store at {io}")
        raw_root, names, data_names = await asyncio.gather(
            io.get(ROOT_KEY), io.list_dir(LOG_PREFIX), io.list_dir(DATA_PREFIX)
        )
        serials = sorted(
            s for s in (parse_log_key(LOG_PREFIX + n) for n in names) if s is not None
        )
        data_dirs = await _payload_keys(io, data_names)
        if not serials:
            if data_dirs:
                raise StoreCorrupted(
                    f"{io}: the log ({LOG_PREFIX}) is gone, but commits are stored",
                    LOG_PREFIX,
                )
            if raw_root is not None:
                parse_root(raw_root)  # another program's, or another format version
            elif not (await io.is_empty() or await _only_ftps_objects(io)):
                raise StoreFormatError(
                    f"{io} holds something that is not a dask_ftps run"
                )
            return None  # nothing yet, or a creation that died before its first record
        raws = await io.get_many([log_key(s) for s in serials])
        records: dict[int, Record] = {}
        damaged: dict[int, StoreCorrupted] = {}
        damaged_raw: dict[int, bytes] = {}
        for serial, raw in zip(serials, raws, strict=True):
            key = log_key(serial)
            if raw is None:  # deleted since listed (a trim): below any floor
                continue
            try:
                records[serial] = Record.decode(raw, key)
            except StoreCorrupted as e:
                damaged[serial], damaged_raw[serial] = e, raw
        if not records:
            if raw_root is not None:
                parse_root(raw_root)  # another program's, or another format version
            raise next(iter(damaged.values()))
        head = max(max(records), max(damaged, default=-1))
        await _substitute_from_payloads(io, records, damaged_raw, data_dirs, head)
        if damaged and max(damaged) > max(records):
            raise damaged[max(damaged)]  # the newest record: nothing stands in for it
        adopted = await _adoptable(io, records, data_dirs, head)
        if adopted is not None:
            logger.warning(
                "%s: commit %d is complete in %s but has no log record (the writer "
                "died before writing it, or it was lost): adopted",
                io,
                adopted.serial,
                adopted.body.data.key,
            )
        meta, root_ok = _run_meta(io, records, raw_root)
        journal = cls(io, meta, records, damaged, adopted)
        journal.root_ok = root_ok
        journal._check_head()
        return journal

    @classmethod
    async def read_meta(cls, io: StoreIO) -> RunMeta | None:
        """The run a store holds (None if none): the root group's description,
        or, if that is missing or damaged in any way (a flipped bit can also make
        it look like another program's), the log's copy."""
        raw = await io.get(ROOT_KEY)
        if raw is not None and await io.list_dir(LOG_PREFIX):
            try:
                return parse_root(raw)
            except (StoreCorrupted, StoreFormatError) as e:
                logger.warning("%s: %s; reading the log's copy", io, e)
        journal = await cls.open_io(io)
        return None if journal is None else journal.meta

    @classmethod
    async def create(
        cls,
        store: Any,
        meta: RunMeta,
        initial: ModelVersion,
        storage_options: dict | None = None,
    ) -> Journal:
        """Start a new run in a store that holds none (empty, or torn at creation)."""
        io = resolve(store, storage_options)
        return await cls.create_io(io, meta, initial)

    @classmethod
    async def create_io(
        cls, io: StoreIO, meta: RunMeta, initial: ModelVersion
    ) -> Journal:
        if await cls.open_io(io) is not None:
            raise StoreFormatError(f"{io} already holds a run: open it instead")
        if not meta.run_id:
            meta = RunMeta(
                meta.model, meta.optimizer, meta.mode, meta.staleness, uuid.uuid4().hex
            )
        writer = _token()
        io.tag = writer
        await io.put([(k, group_document()) for k in GROUP_KEYS])
        params = meta.model.init_params()
        layouts = Layout.of(params), Layout.of(meta.optimizer.init_state(params))
        array = await _write_snapshot_array(io, initial, writer, layouts, meta.run_id)
        record = Record(
            0,
            0,
            writer,
            None,
            time.time(),
            Snapshot(int(initial.version), 0, 0, (), (), array, "", meta.to_json()),
        )
        # The first record decides who created the run; only then its root group.
        if not await io.put_new(log_key(0), record.encode()):
            raise Fenced(f"another server created a run in {io} at the same time")
        await io.put([(ROOT_KEY, root_document(meta))])
        logger.info("Created store %s for %s", io, meta.model)
        journal = cls(io, meta, {0: record}, {})
        return journal

    # -- what the log says -----------------------------------------------------------

    def snapshots(self) -> list[Record]:
        """Snapshot records a rebuild can start from, newest first (their replay
        range is whole)."""
        return [
            r
            for s, r in sorted(self.records.items(), reverse=True)
            if r.kind == "snapshot" and r.body.first_serial >= self._intact_from
        ]

    @property
    def floor(self) -> int:
        """The first record any rebuild can need."""
        return min(r.body.first_serial for r in self.snapshots())

    @property
    def committed(self) -> int:
        """Updates committed (the global dataset's length)."""
        return self._committed

    @property
    def version(self) -> int:
        """The model version after the last commit (what the server served); a
        snapshot published later holds an older one."""
        return self._last.body.version

    @property
    def downloads(self) -> tuple[tuple[str, int], ...]:
        """The download dataset at the last commit (or snapshot)."""
        return self._last.body.downloads

    def commits(self) -> list[Record]:
        """The retained commit records, oldest first, from the floor on."""
        floor = self.floor
        return [
            r
            for s, r in sorted(self.records.items())
            if s >= floor and r.kind == "commit"
        ]

    def runs(self) -> list[tuple[RunBegun, dict[int, dict]]]:
        """Every run of the log and its epochs' history: the newest snapshot's,
        then those begun after."""
        newest = self.snapshots()[0]
        runs = [
            (
                RunBegun(e.run, e.name, e.spec, e.base_version),
                {epoch: dict(values) for epoch, values in e.history},
            )
            for e in newest.body.runs
        ]
        for s in range(newest.body.first_serial, self.head.serial + 1):
            record = self.records[s]
            if record.kind == "run" and record.body.run >= len(runs):
                runs.append((record.body, {}))
            elif record.kind == "epoch" and record.body.run < len(runs):
                runs[record.body.run][1][record.body.epoch] = dict(record.body.values)
        return runs

    def owner(self) -> tuple[int, str] | None:
        """``(incarnation, address)`` of the server that writes the store; None
        after a clean release (or when no record names an address)."""
        if self.head.kind == "release":
            return None
        for _, record in sorted(self.records.items(), reverse=True):
            if (
                record.writer == self.head.writer
                and record.kind in ("claim", "snapshot")
                and record.body.address
            ):
                return record.incarnation, record.body.address
        return None

    def commit_at_version(self, version: int) -> Record | None:
        """The retained commit after which the model had ``version``."""
        for record in self.commits():
            if record.body.version == version:
                return record
        return None

    # -- reading data ---------------------------------------------------------------

    async def read_snapshot(self, record: Record) -> tuple[ModelVersion, Snapshot]:
        """The snapshot's model and optimizer state, checked chunk by chunk."""
        snap: Snapshot = record.body
        flat = await _read_array(self.io, snap.array)
        n = self.params_layout.size
        if snap.array.n != n + self.state_layout.size:
            raise StoreCorrupted(
                f"{snap.array.key}: {snap.array.n} values, the model needs "
                f"{n + self.state_layout.size}",
                snap.array.key,
            )
        flat = flat.astype(np.float32)  # a writable copy, native byte order
        model = ModelVersion(
            Version(snap.version),
            self.params_layout.unflatten(flat[:n]),
            self.state_layout.unflatten(flat[n:]),
        )
        return model, snap

    async def replay(
        self, start: Record, *, payloads_after: int = -1
    ) -> AsyncIterator[ReplayEvent]:
        """The runs begun and updates committed after snapshot ``start``, in order.

        Parameters
        ----------
        start
            A snapshot record (one of :meth:`snapshots`).
        payloads_after
            Updates that take part in a model version of at most this come
            with empty ``grads``, and payloads holding only such updates are
            not read (a model copy stands in for them).
        """
        snap: Snapshot = start.body
        serials = range(snap.first_serial, self.head.serial + 1)

        def needs_payload(record: Record) -> bool:
            return max(row[5] for row in record.body.rows) > payloads_after

        wanted = [
            self.records[s]
            for s in serials
            if self.records[s].kind == "commit"
            and self.records[s].body.stop > snap.replay_from
            and needs_payload(self.records[s])
        ]
        groups = [
            wanted[i : i + REPLAY_GROUP] for i in range(0, len(wanted), REPLAY_GROUP)
        ]
        payloads: dict[int, list[np.ndarray]] = {}
        reading = (
            asyncio.ensure_future(self._read_payloads(groups[0])) if groups else None
        )
        next_group = 1
        try:
            for serial in serials:
                record = self.records[serial]
                if record.kind in ("run", "epoch"):
                    yield record.body
                if record.kind != "commit" or record.body.stop <= snap.replay_from:
                    continue
                grads: list[np.ndarray] | None = None
                if needs_payload(record):
                    if serial not in payloads:
                        payloads.update(await reading)
                        reading = None
                        if next_group < len(groups):
                            reading = asyncio.ensure_future(
                                self._read_payloads(groups[next_group])
                            )
                            next_group += 1
                    grads = payloads.pop(serial)
                yield self._event(record, grads, snap.replay_from, payloads_after)
        finally:
            if reading is not None and not reading.done():
                reading.cancel()

    def _event(
        self,
        record: Record,
        payloads: list[np.ndarray] | None,
        replay_from: int,
        payloads_after: int,
    ) -> CommittedUpdates:
        commit: Commit = record.body
        updates, versions = [], []
        for i, (run, epoch, shard, step, worker, version) in enumerate(commit.rows):
            if commit.seq + i < replay_from:
                continue
            grads: dict = {}
            if payloads is not None and version > payloads_after:
                try:
                    grads = self.params_layout.unflatten(
                        payloads[i],
                        commit.data.formats[i] if commit.data.formats else DENSE,
                    )
                except ValueError as e:
                    key = _chunk_key(commit.data)
                    raise StoreCorrupted(f"{key}: row {i}: {e}", key) from e
            updates.append(
                Update(UpdateKey(run, epoch, shard, step), WorkerId(worker), grads)
            )
            versions.append(version)
        return CommittedUpdates(record, tuple(updates), tuple(versions))

    async def _read_payloads(
        self, records: list[Record]
    ) -> dict[int, list[np.ndarray]]:
        """Each commit's payload rows, checked against the record and the model."""
        keys = [_chunk_key(r.body.data) for r in records]
        raws = await self.io.get_many(keys)
        out = {}
        for record, key, raw in zip(records, keys, raws, strict=True):
            data: DataRef = record.body.data
            if raw is None:
                raise StoreCorrupted(
                    f"{key}: the payload of commit {record.serial} is missing", key
                )
            sizes = self._row_sizes(data, key)
            if data.shard:
                out[record.serial] = list(
                    decode_shard(raw, key, data.shape[0], data.shape[1], data.crc)
                )
                continue
            values = decode_chunk(raw, key, data.shape[0] * data.shape[1], data.crc)
            bounds = np.cumsum([0, *sizes])
            out[record.serial] = [
                values[start:stop] for start, stop in itertools.pairwise(bounds)
            ]
        return out

    def _row_sizes(self, data: DataRef, key: str) -> list[int]:
        """The sizes of a payload array's rows; :class:`StoreCorrupted` if they do
        not add up to the array or do not fit the model."""
        layout = self.params_layout
        if not data.formats:
            if data.shape[1] != layout.size:
                raise StoreCorrupted(
                    f"{key}: {data.shape[1]} parameters, the model has {layout.size}",
                    key,
                )
            return [layout.size] * data.shape[0]
        try:
            sizes = [layout.row_size(f) for f in data.formats]
        except ValueError as e:
            raise StoreCorrupted(f"{key}: {e}", key) from e
        if sum(sizes) != data.shape[1]:
            raise StoreCorrupted(
                f"{key}: {data.shape[1]} values, its rows' formats need {sum(sizes)}",
                key,
            )
        return sizes

    # -- the single writer --------------------------------------------------------

    async def claim(self, address: str) -> int:
        """Take the store over: the next incarnation.

        Writes the adopted commit's record first, if any, then the claim.

        Raises
        ------
        Fenced
            If another server wrote the log since it was read (open it again).
        """
        if self.adopted is not None:
            adopted = self.adopted
            raw = adopted.encode()
            created = await self.io.put_new(log_key(adopted.serial), raw)
            if not created and await self.io.get(log_key(adopted.serial)) != raw:
                raise Fenced(f"{self.io}: the log moved on while it was read")
            self.adopted = None
        writer = _token()
        record = Record(
            self.head.serial + 1,
            self.head.incarnation + 1,
            writer,
            self.head.crc,
            time.time(),
            Claim(address, socket.gethostname(), os.getpid(), self.meta.run_id),
        )
        if not await self.io.put_new(log_key(record.serial), record.encode()):
            raise Fenced(
                f"{self.io}: another server wrote record {record.serial} first"
            )
        self.writer, self.incarnation = writer, record.incarnation
        self.claim_serial = record.serial
        self._advance(record)
        self.io.tag = writer
        # The writer's rows array, for Zarr readers (the journal reads its shards
        # itself: without this document only Zarr cannot).
        await self.io.put(
            [(f"{rows_dir(writer)}/zarr.json", rows_document(self.params_layout.size))]
        )
        # Temporary files of the writers this log knows are dead ones' (a later
        # owner's, unknown here, are left alone).
        known = {r.writer for r in self.records.values()}
        self._partial_removed = await self.io.remove_partial(known - {writer})
        if not self.root_ok:
            await self.io.put([(ROOT_KEY, root_document(self.meta))])
            # Damage was named when the store was opened; an older format's
            # root (a store taken over) is simply written in this one.
            logger.info("%s: wrote %s again from the log's copy", self.io, ROOT_KEY)
            self.root_ok = True
        return record.incarnation

    async def commit(
        self,
        updates: Sequence[Update],
        versions: Sequence[int],
        version: int,
        params: dict[str, np.ndarray],
        downloads: Sequence[tuple[str, int]],
    ) -> Record:
        """Make ``updates`` durable: their payload array, then their record.

        ``version`` and ``params`` are the model after them.

        Raises
        ------
        Fenced
            If another server took the store over: nothing was committed.
        NotDurable
            If the store failed and the record is not in it: nothing was committed.
        """
        async with self._lock:
            serial, writer = self.head.serial + 1, self._writer()
            rows = tuple(
                (u.key.run, u.key.epoch, u.key.shard, u.key.step, str(u.worker), int(v))
                for u, v in zip(updates, versions, strict=True)
            )
            seq = self.committed
            layout = self.params_layout
            attempt = self._attempt[1] if self._attempt[0] == serial else 0
            folder = data_dir(serial, writer, attempt)
            built: dict[str, Any] = {}

            def sealed(data: DataRef) -> Record:
                """The commit's record, naming its payload ``data`` (in ``built``)."""
                body = Commit(
                    seq,
                    rows,
                    int(version),
                    model_crc(params, layout.names),
                    tuple((str(w), int(v)) for w, v in downloads),
                    data,
                )
                record = self._record(serial, body)
                built["record"], built["raw"] = record, record.encode()
                return record

            def build():
                formats = [layout.row_format(u.grads) for u in updates]
                if (
                    attempt == 0
                    and len(updates) <= SHARD_ROWS
                    and serial < shard_serials(layout.size)
                    and all(f == DENSE for f in formats)
                ):
                    return build_shard()
                sizes = [layout.row_size(f) for f in formats]
                if any(f != DENSE for f in formats):
                    shape = (1, sum(sizes))  # rows one after the other
                else:
                    shape, formats = (len(updates), layout.size), []
                chunk, flat = new_chunk(sum(sizes))  # filled in place: one copy
                offset = 0
                for update, size in zip(updates, sizes, strict=True):
                    layout.flatten(update.grads, out=flat[offset : offset + size])
                    offset += size
                record = sealed(
                    DataRef(folder, shape, seal_chunk(chunk), tuple(formats))
                )
                meta = commit_document(shape, record)
                objects = [
                    (f"{folder}/{COMMIT_CHUNK_KEY}", chunk),
                    (f"{folder}/zarr.json", meta),
                ]
                return objects, log_key(serial), built["raw"]

            def build_shard():
                # One object: the rows, the record's copy and the shard's index.
                raw, rows2d = shard_rows(len(updates), layout.size)
                for update, out in zip(updates, rows2d, strict=True):
                    layout.flatten(update.grads, out=out)
                key = shard_key(writer, serial)
                shape = (len(updates), layout.size)
                sealed(DataRef(key, shape, seal_shard(raw), (), shard=True))
                tail = shard_tail(len(updates), layout.size, built["raw"])
                return [(key, [raw, tail])], log_key(serial), built["raw"]

            # A failed commit leaves its payload array where it is: a start that
            # read the store while this writer was paused may have adopted it
            # into its log, and a writer cannot know it was not (see the module's
            # docstring). An array no record names is deleted by the owner's
            # start or trims; this writer's next attempt at ``serial`` writes an
            # array of another name.
            try:
                await self._write_record(build, built, serial)
            except BaseException:
                self._attempt = (serial, attempt + 1)
                raise
            return built["record"]

    async def record_run(
        self, run: int, name: str, spec: RunSpec, base_version: int
    ) -> Record:
        """Persist a ``begin_run`` that created run number ``run``."""
        return await self._append(RunBegun(run, name, spec, base_version))

    async def record_epoch(
        self, run: int, epoch: int, values: dict[str, float | None]
    ) -> Record:
        """Persist what ``train()`` reported at the end of an epoch."""
        return await self._append(EpochEnded(run, epoch, tuple(sorted(values.items()))))

    async def write_snapshot(self, model: ModelVersion) -> ArrayRef:
        """Write a snapshot's array (not yet part of the log: :meth:`publish`)."""
        return await _write_snapshot_array(
            self.io,
            model,
            self._writer(),
            (self.params_layout, self.state_layout),
            self.meta.run_id,
        )

    async def publish(
        self,
        array: ArrayRef,
        version: int,
        replay_from: int,
        at_serial: int,
        runs: Sequence[RunEntry],
        downloads: Sequence[tuple[str, int]],
        address: str,
    ) -> Record:
        """List a written snapshot in the log.

        ``at_serial`` is the newest record the snapshot's state includes, and
        ``replay_from`` the number of updates merged into it (fewer than were
        committed while a sync round is open).
        """
        first = at_serial + 1
        for s in range(at_serial, -1, -1):
            record = self.records.get(s)
            if record is None:
                break
            if record.kind == "commit":
                if record.body.seq <= replay_from < record.body.stop:
                    first = s
                elif record.body.stop <= replay_from:
                    break
        body = Snapshot(
            version,
            replay_from,
            first,
            tuple(runs),
            tuple(downloads),
            array,
            address,
            self.meta.to_json(),
        )
        return await self._append(body)

    async def trim(self, keep: int) -> dict[str, int]:
        """Delete what no rebuild can need: records, payloads and snapshots
        below the oldest of the newest ``keep`` snapshots (the patent's retention
        of the gradient and global datasets).

        Only what this journal knows to be old goes: a replaced server that
        trims late cannot delete what its successor wrote.
        """
        kept = self.snapshots()[:keep][::-1]  # oldest first
        if len(kept) < keep:
            return {"records": 0, "payloads": 0, "snapshots": 0}
        # torn: also what a replaced writer left at or below this one's claim
        # after the start's clean-up ran (a late attempt of a paused writer).
        return await self._delete_below(kept[0], torn=True)

    async def cleanup(self) -> dict[str, int]:
        """After a claim: delete what a crash, a stale server or a torn trim left
        (files past the log, stray temporary files, objects below the floor)."""
        partial = self._partial_removed
        deleted = await self._delete_below(self.snapshots()[-1], torn=True)
        if partial or any(deleted.values()):
            logger.info(
                "%s: removed %d stray temporary files, and below the floor or past "
                "the log: %s",
                self.io,
                partial,
                deleted,
            )
        return {"partial": partial, **deleted}

    async def release(self, reason: str) -> None:
        """Say in the log that this server stopped writing (a clean close)."""
        await self._append(Release(reason))

    async def close(self) -> None:
        await self.io.close()

    @property
    def closed(self) -> bool:
        return self.io.closed

    # -- internals ---------------------------------------------------------------------

    def _writer(self) -> str:
        if self.writer is None:
            raise RuntimeError("this journal has not claimed its store")
        return self.writer

    def _record(self, serial: int, body: Any) -> Record:
        return Record(
            serial, self.incarnation, self._writer(), self.head.crc, time.time(), body
        )

    async def _append(self, body: Any) -> Record:
        async with self._lock:
            serial = self.head.serial + 1
            record = self._record(serial, body)
            raw = record.encode()
            built = {"record": record, "raw": raw}
            await self._write_record(lambda: ([], log_key(serial), raw), built, serial)
            return record

    async def _write_record(self, build, built: dict, serial: int) -> None:
        key = log_key(serial)
        try:
            created = await self.io.commit(build)
        except Exception as e:
            try:
                landed = await self.io.get(key)
            except Exception as read_error:  # noqa: BLE001 - reported below
                raise FTPSError(
                    f"{self.io}: writing {key} failed ({e!r}) and it cannot be read "
                    f"back ({read_error!r})"
                ) from e
            if landed is None or "raw" not in built:
                raise NotDurable(f"{self.io}: writing {key} failed: {e!r}") from e
            if landed != built["raw"]:
                raise Fenced(f"{self.io}: another server wrote {key}") from e
            logger.warning(
                "%s: %s is written although its write raised %r", self.io, key, e
            )
            created = True
        if not created:
            raise Fenced(
                f"{self.io}: another server wrote {key}: this server "
                f"(incarnation {self.incarnation}) was replaced and writes no more"
            )
        self._advance(built["record"])

    def _advance(self, record: Record) -> None:
        self.records[record.serial] = record
        self.head = record
        if record.kind == "commit":  # a snapshot's version may be older
            self._last = record
            self._committed = record.body.stop

    def _intact_suffix(self) -> int:
        """The lowest serial from which the log is whole up to its head: every
        record there, each chained to the one before, commits back to back."""
        serial = self.head.serial
        while serial - 1 in self.records:
            this, before = self.records[serial], self.records[serial - 1]
            if this.prev != before.crc:
                break
            if this.kind == "commit":
                last = _previous_commit(self.records, serial)
                if last is not None and last.body.stop != this.body.seq:
                    break
            serial -= 1
        return serial

    def _check_head(self) -> None:
        """Refuse a log that no snapshot can be rebuilt from, naming the damage."""
        if self.snapshots():
            return
        gap = self._intact_from - 1
        if gap in self.damaged:
            raise self.damaged[gap]
        if gap in self.records:
            raise StoreCorrupted(
                f"{log_key(self._intact_from)}: does not follow {log_key(gap)} "
                "(its chain link or update sequence differs): the log was damaged",
                log_key(self._intact_from),
            )
        raise StoreCorrupted(
            f"{log_key(gap)}: missing between records that exist (or no snapshot "
            "from which the log is whole): the log was damaged",
            log_key(gap),
        )

    async def _delete_below(self, oldest: Record, torn: bool) -> dict[str, int]:
        """Delete the records, payloads and snapshot arrays that lie below the
        snapshot ``oldest`` (kept, with every snapshot after it).

        - records: those this journal holds below ``oldest``'s replay range,
          except claims (a replaced server's next record is at the serial of the
          claim that replaced it: that claim must stay for the write to fail);
        - payloads below that range; with ``torn`` (a start), also the payloads
          at or below this server's claim that no commit record names (torn
          commits, or a stale server's attempts); never one above the claim,
          which can only be a later owner's;
        - snapshot arrays of records below ``oldest``, and arrays no record
          names that are older than ``oldest`` (torn snapshots); never a newer
          one, which may be a later owner's.
        """
        floor, version = oldest.body.first_serial, oldest.body.version
        names, data_names, snapshot_names = await asyncio.gather(
            self.io.list_dir(LOG_PREFIX),
            self.io.list_dir(DATA_PREFIX),
            self.io.list_dir(SNAPSHOT_PREFIX),
        )
        records = [
            s
            for s in (parse_log_key(LOG_PREFIX + n) for n in names)
            if s is not None
            and s < floor
            and s in self.records
            and self.records[s].kind != "claim"
        ]
        payloads, shards = [], []
        keys = await _payload_keys(self.io, data_names)
        for serial, found in keys.items():
            for key in found:
                shard = parse_shard_key(key)
                writer = shard[1] if shard else parse_data_key(f"{key}/")[1]
                if serial < floor:
                    (shards if shard else payloads).append(key)
                elif (
                    torn
                    and writer != self.writer
                    and self.claim_serial is not None
                    and serial <= self.claim_serial
                ):
                    record = self.records.get(serial)
                    if (
                        record is None
                        or record.kind != "commit"
                        or record.body.data.key != key
                    ):
                        (shards if shard else payloads).append(key)
        # A rows array of a writer this log knows (not this one, not a later
        # owner's) goes with its last shard.
        known = {r.writer for r in self.records.values()} - {self.writer}
        gone = set(shards)
        for name in data_names:
            writer = parse_rows_dir(f"{DATA_PREFIX}{name}")
            if writer in known and all(
                k in gone
                for found in keys.values()
                for k in found
                if k.startswith(f"{DATA_PREFIX}{name}/")
            ):
                payloads.append(f"{DATA_PREFIX}{name}")
        arrays = {
            r.body.array.key: r.serial
            for r in self.records.values()
            if r.kind == "snapshot"
        }
        snapshots = []
        for name in snapshot_names:
            key = f"{SNAPSHOT_PREFIX}{name}"
            parsed = parse_snapshot_dir(key)
            if parsed is None:
                continue
            if key in arrays:
                if arrays[key] < oldest.serial:
                    snapshots.append(key)
            elif parsed[0] < version:
                snapshots.append(key)
        # Data first, then the records naming it: a reader never finds a payload
        # array whose record a trim deleted (it would stand in for the record).
        await self.io.delete(shards)
        await self.io.delete_dirs(payloads + snapshots)
        await self.io.delete([log_key(s) for s in records])
        for s in records:
            self.records.pop(s, None)
            self.damaged.pop(s, None)
        return {
            "records": len(records),
            "payloads": len(payloads) + len(shards),
            "snapshots": len(snapshots),
        }


# -- helpers ---------------------------------------------------------------------------


def _token() -> str:
    return uuid.uuid4().hex[:12]


async def _payload_keys(io: StoreIO, names: list[str]) -> dict[int, list[str]]:
    """Every payload array or shard under ``data/``, by serial: a commit's own
    array (its folder) or a shard of a writer's rows array (its key)."""
    out: dict[int, list[str]] = {}
    writers = []
    for name in names:
        parsed = parse_data_key(f"{DATA_PREFIX}{name}/")
        if parsed is not None:
            out.setdefault(parsed[0], []).append(f"{DATA_PREFIX}{name}")
        elif parse_rows_dir(f"{DATA_PREFIX}{name}") is not None:
            writers.append(name)
    listed = await asyncio.gather(*(io.list_dir(f"{DATA_PREFIX}{w}/") for w in writers))
    for writer, files in zip(writers, listed, strict=True):
        for file in files:
            key = f"{DATA_PREFIX}{writer}/{file}"
            parsed = parse_shard_key(key)
            if parsed is not None:
                out.setdefault(parsed[0], []).append(key)
    return out


def _copy_key(data: DataRef) -> str:
    """The object that repeats a commit's record."""
    return data.key if data.shard else f"{data.key}/zarr.json"


def _chunk_key(data: DataRef) -> str:
    """The object that holds a commit's rows."""
    return data.key if data.shard else f"{data.key}/{COMMIT_CHUNK_KEY}"


async def _only_ftps_objects(io: StoreIO) -> bool:
    """Whether a store without a root ``zarr.json`` holds only what a torn
    creation leaves (group documents and a first snapshot)."""
    names = {n for n in await io.list_dir("") if not n.endswith(".partial")}
    return names <= {"data", "snapshots", "ftps"}


async def _commit_in_payloads(
    io: StoreIO, key: str, serial: int, raw: bytes | None = None
) -> Record | None:
    """The commit record a payload array's ``zarr.json`` (or a shard) repeats,
    if it is sound; ``raw``: the shard's bytes, if read already."""
    shard = parse_shard_key(key) is not None
    where = key if shard else f"{key}/zarr.json"
    if raw is None:
        raw = await io.get(where)
    if raw is None:
        return None
    try:
        if shard:
            record = Record.decode(shard_record(raw, where), log_key(serial))
        else:
            record = record_from_attributes(checked_attrs(raw, where), where)
    except (StoreCorrupted, StoreFormatError):
        return None
    if (
        record.serial != serial
        or record.kind != "commit"
        or record.body.data.key != key
    ):
        return None
    return record


async def _substitute_from_payloads(
    io: StoreIO,
    records: dict[int, Record],
    damaged_raw: dict[int, bytes],
    data_dirs: dict[int, list[str]],
    head: int,
) -> None:
    """Fill missing or damaged commit records from their payload arrays, from the
    oldest retained snapshot's range on (below it, a trim may be deleting them).

    A serial may hold several whole arrays (a writer's failed attempts, a
    replaced writer's late one): a copy stands in only if it is the one record
    that fits where it stands: chained to the record before it (and written by
    that record's writer, as every commit is), chained to by the record after
    it, and, for a damaged record, the same bytes but for the damage (a few
    flipped bytes, or a truncation). Otherwise the damage stays named.
    """
    floors = [r.body.first_serial for r in records.values() if r.kind == "snapshot"]
    low = min(floors, default=0)
    for serial in sorted(data_dirs):
        if serial in records or serial > head or serial < low:
            continue
        before, after = records.get(serial - 1), records.get(serial + 1)
        raw = damaged_raw.get(serial)
        found = []
        for folder in data_dirs[serial]:
            record = await _commit_in_payloads(io, folder, serial)
            if (
                record is None
                or (before is not None and record.prev != before.crc)
                or (before is not None and record.writer != before.writer)
                or (after is not None and record.crc != after.prev)
                or (raw is not None and not _damaged_copy(raw, record.encode()))
            ):
                continue
            found.append(record)
        if len(found) == 1:
            records[serial] = found[0]
            logger.warning(
                "%s: log record %d is %s; its copy in %s serves",
                io,
                serial,
                "damaged" if raw is not None else "missing",
                _copy_key(found[0].body.data),
            )
        elif found:
            logger.warning(
                "%s: log record %d is %s and %d payload arrays could stand in for "
                "it: none is used",
                io,
                serial,
                "damaged" if raw is not None else "missing",
                len(found),
            )


def _damaged_copy(damaged: bytes, intact: bytes) -> bool:
    """Whether ``damaged`` is ``intact`` with a few bytes changed, or cut short."""
    if len(damaged) == len(intact):
        a = np.frombuffer(damaged, np.uint8)
        b = np.frombuffer(intact, np.uint8)
        return int(np.count_nonzero(a != b)) <= _DAMAGED_BYTES
    return len(damaged) < len(intact) and intact.startswith(damaged)


#: Bytes a damaged record may differ in from the copy that stands in for it.
_DAMAGED_BYTES = 8


async def _adoptable(
    io: StoreIO,
    records: dict[int, Record],
    data_dirs: dict[int, list[str]],
    head: int,
) -> Record | None:
    """A complete commit right after the log's head whose record is missing: by
    the head's writer (only it continues the log without a claim), chained to
    the head, its chunk whole; of several such (attempts whose record failed),
    the writer's last attempt."""
    if head not in records:
        return None
    last = records[head]

    def attempt(key: str) -> int:
        return 0 if parse_shard_key(key) is not None else data_attempt(key)

    for folder in sorted(data_dirs.get(head + 1, ()), key=attempt, reverse=True):
        # A shard holds the record's copy and the rows: read it once.
        shard = await io.get(folder) if parse_shard_key(folder) is not None else None
        record = await _commit_in_payloads(io, folder, head + 1, shard)
        if record is None or record.prev != last.crc or record.writer != last.writer:
            continue
        data: DataRef = record.body.data
        key = _chunk_key(data)
        raw = shard if data.shard else await io.get(key)
        try:
            if raw is None:
                continue
            if data.shard:
                decode_shard(raw, key, data.shape[0], data.shape[1], data.crc)
            else:
                decode_chunk(raw, key, data.shape[0] * data.shape[1], data.crc)
        except StoreCorrupted:
            continue  # torn or damaged: it was never acknowledged
        return record
    return None


def _run_meta(
    io: StoreIO, records: dict[int, Record], raw_root: bytes | None
) -> tuple[RunMeta, bool]:
    """The run's description, from the newest snapshot record (the root group is
    a copy for zarr readers), and whether the root group agrees with it."""
    snapshots = sorted(
        (r for r in records.values() if r.kind == "snapshot"),
        key=lambda r: r.serial,
        reverse=True,
    )
    if not snapshots:
        if raw_root is None:
            raise StoreCorrupted(
                f"{io}: neither {ROOT_KEY} nor a snapshot record", ROOT_KEY
            )
        return parse_root(raw_root), True
    meta = RunMeta.from_json(snapshots[0].body.meta)
    try:
        root = None if raw_root is None else parse_root(raw_root)
    except (StoreCorrupted, StoreFormatError) as e:
        logger.warning("%s: %s; the log's copy serves", io, e)
        return meta, False
    if root != meta:
        logger.warning(
            "%s: %s is %s; the log's copy of the run's description serves",
            io, ROOT_KEY, "missing" if root is None else "not the log's",
        )  # fmt: skip
        return meta, False
    # An earlier version's root, or damage outside the checked attributes (zarr's
    # own fields): the next start writes the root again.
    return meta, raw_root == root_document(meta)


def _previous_commit(records: dict[int, Record], serial: int) -> Record | None:
    """The nearest commit before ``serial`` (None at a gap or the log's start)."""
    for s in range(serial - 1, -1, -1):
        record = records.get(s)
        if record is None:
            return None
        if record.kind == "commit":
            return record
    return None


async def _write_snapshot_array(
    io: StoreIO,
    model: ModelVersion,
    writer: str,
    layouts: tuple[Layout, Layout],
    run_id: str,
) -> ArrayRef:
    params_layout, state_layout = layouts
    folder = snapshot_dir(int(model.version), writer)
    n = params_layout.size + state_layout.size
    chunk = min(max(n, 1), SNAPSHOT_CHUNK)

    def build() -> tuple[list[tuple[str, bytes]], ArrayRef]:
        flat = np.empty(n, np.float32)
        params_layout.flatten(model.params, out=flat[: params_layout.size])
        state_layout.flatten(model.opt_state, out=flat[params_layout.size :])
        objects, crcs = [], []
        for i in range(max(1, math.ceil(n / chunk))):
            raw, crc = encode_chunk(flat[i * chunk : (i + 1) * chunk])
            objects.append((f"{folder}/c.{i}", raw))
            crcs.append(crc)
        ref = ArrayRef(folder, n, chunk, tuple(crcs))
        meta = array_document(
            (n,), (chunk,), {"version": int(model.version), "run_id": run_id}
        )
        return [*objects, (f"{folder}/zarr.json", meta)], ref

    objects, ref = await asyncio.to_thread(build)
    await io.put(objects)
    return ref


async def _read_array(io: StoreIO, ref: ArrayRef) -> np.ndarray:
    keys = [f"{ref.key}/c.{i}" for i in range(len(ref.crcs))]
    raws = await io.get_many(keys)
    parts = []
    for i, (key, raw) in enumerate(zip(keys, raws, strict=True)):
        if raw is None:
            raise StoreCorrupted(f"{key}: a chunk of the snapshot is missing", key)
        size = min(ref.chunk, ref.n - i * ref.chunk) if ref.n else 0
        parts.append(decode_chunk(raw, key, size, ref.crcs[i]))
    return np.concatenate(parts) if parts else np.empty(0, np.float32)
