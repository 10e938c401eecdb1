"""The store format: keys, the log records, and how each object is checksummed.

Pure: no I/O. Every object dask_ftps writes carries a CRC-32C that is checked
whenever it is read:

- a log record is canonical JSON followed by its CRC-32C (4 bytes, little
  endian): the layout of Zarr's ``crc32c`` codec;
- a chunk of a commit's payload array or of a snapshot array is raw
  little-endian float32 followed by its CRC-32C: the arrays declare the codecs
  ``bytes`` then ``crc32c``, so zarr itself reads and checks them too;
- a ``zarr.json`` that dask_ftps writes keeps the CRC-32C of its own
  ``dask_ftps`` attribute in that attribute.

A record names the objects it covers with their checksums, and the CRC of the
record before it (``prev``): the log is a hash chain.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any, Literal

import google_crc32c
import numpy as np

from dask_ftps._core import RunSpec
from dask_ftps._exceptions import (
    ModelError,
    SpecMismatch,
    StoreCorrupted,
    StoreFormatError,
)
from dask_ftps._layout import RowFormat
from dask_ftps.models import Model, model_from_dict
from dask_ftps.optim import Optimizer, optimizer_from_dict

FORMAT = "dask-ftps"
FORMAT_VERSION = 5  # 5: row-sparse entries in payload rows
#: Versions this code reads: a version-2 store is a version-3 store without
#: factored rows, a version-3 one a version-4 one without rows arrays, a
#: version-4 one a version-5 one without row-sparse entries. A start that takes
#: one over writes version 5 from then on.
READABLE_VERSIONS = (2, 3, 4, 5)

ROOT_KEY = "zarr.json"
LOG_PREFIX = "ftps/log/"
DATA_PREFIX = "data/"
SNAPSHOT_PREFIX = "snapshots/"
GROUP_KEYS = ("data/zarr.json", "snapshots/zarr.json")
SNAPSHOT_CHUNK = 1 << 20  # float32 elements per snapshot chunk
CHUNK_KEY = "c.0"  # chunk key encoding "default" with separator ".": no folders
COMMIT_CHUNK_KEY = "c.0.0"

_SERIAL_DIGITS = 16
_LOG_KEY = re.compile(rf"^{LOG_PREFIX}(\d{{{_SERIAL_DIGITS}}})$")
_SNAPSHOT_DIR = re.compile(rf"^{SNAPSHOT_PREFIX}v(\d{{12}})\.([0-9a-f]+)$")
_DATA_DIR = re.compile(
    rf"^{DATA_PREFIX}(\d{{{_SERIAL_DIGITS}}})\.([0-9a-f]+)(?:-[1-9]\d*)?/"
)
#: A writer's token (:func:`dask_ftps._store._journal._token`).
_WRITER = "[0-9a-f]{12}"
_ROWS_DIR = re.compile(rf"^{DATA_PREFIX}({_WRITER})/?$")
_SHARD_KEY = re.compile(rf"^{DATA_PREFIX}({_WRITER})/c\.(\d+)\.0$")

#: Rows of one commit's shard in its writer's rows array (a commit of more
#: updates, or of factored ones, is a payload array of its own).
SHARD_ROWS = 64
#: Elements a rows array may declare (its shape's product stays an int64).
_ROWS_ELEMENTS = 1 << 62


def shard_serials(n: int) -> int:
    """Serials a rows array of ``n`` parameters has room for (2**40, fewer for
    a model of more than about 10**5 parameters: 2**36 at 10**6); a commit at
    a later serial is a payload array of its own."""
    return min(1 << 40, _ROWS_ELEMENTS // (SHARD_ROWS * max(n, 1)))


#: A shard index entry of a row the shard does not hold (the sharding codec's).
_EMPTY = (1 << 64) - 1
_INDEX_BYTES = 16 * SHARD_ROWS + 4

Row = tuple[int, int, int, int, str, int]  # run, epoch, shard, step, worker, version


# -- checksums ------------------------------------------------------------------


def crc32c(*parts: bytes | memoryview | np.ndarray) -> int:
    """CRC-32C of the concatenation of ``parts``."""
    crc = 0
    for part in parts:
        crc = google_crc32c.extend(crc, part)
    return crc


def seal(body: bytes) -> bytes:
    """``body`` followed by its CRC-32C: Zarr's ``crc32c`` codec layout."""
    return body + crc32c(body).to_bytes(4, "little")


def unseal(raw: bytes, key: str) -> bytes:
    """The body of a sealed object; :class:`StoreCorrupted` if it fails its check."""
    if len(raw) < 4:
        raise StoreCorrupted(f"{key}: truncated ({len(raw)} bytes)", key)
    body, stored = raw[:-4], int.from_bytes(raw[-4:], "little")
    if crc32c(body) != stored:
        raise StoreCorrupted(
            f"{key}: checksum mismatch (stored {stored:08x}, computed "
            f"{crc32c(body):08x}): the object was damaged",
            key,
        )
    return body


def canonical(d: Any) -> bytes:
    """The one byte form of a JSON document that dask_ftps checksums."""
    return json.dumps(
        d, sort_keys=True, separators=(",", ":"), allow_nan=False
    ).encode()


def model_crc(arrays: dict[str, np.ndarray], names: tuple[str, ...]) -> int:
    """CRC-32C of ``arrays`` in ``names`` order (C order, native float32 bytes)."""
    crc = 0
    for name in names:
        a = np.ascontiguousarray(arrays[name])
        crc = google_crc32c.extend(crc, a.view(np.uint8).reshape(-1))
    return crc


# -- keys ---------------------------------------------------------------------------


def log_key(serial: int) -> str:
    return f"{LOG_PREFIX}{serial:0{_SERIAL_DIGITS}d}"


def parse_log_key(key: str) -> int | None:
    match = _LOG_KEY.match(key)
    return None if match is None else int(match.group(1))


def data_dir(serial: int, writer: str, attempt: int = 0) -> str:
    """Folder of a commit's payload array: unique to the serial, its writer and
    the writer's attempt at that serial (``-<attempt>`` after the first: a
    failed attempt's array may have been adopted by a later owner, so it is
    never written again)."""
    suffix = f"-{attempt}" if attempt else ""
    return f"{DATA_PREFIX}{serial:0{_SERIAL_DIGITS}d}.{writer}{suffix}"


def data_attempt(folder: str) -> int:
    """The writer's attempt a payload array's folder (:func:`data_dir`) names."""
    tail = folder.rstrip("/").rpartition(".")[2]
    return int(tail.partition("-")[2] or 0)


def parse_data_key(key: str) -> tuple[int, str] | None:
    match = _DATA_DIR.match(key)
    return None if match is None else (int(match.group(1)), match.group(2))


def rows_dir(writer: str) -> str:
    """Folder of a writer's rows array: its dense commits, one shard each."""
    return f"{DATA_PREFIX}{writer}"


def parse_rows_dir(key: str) -> str | None:
    """The writer whose rows array's folder ``key`` is."""
    match = _ROWS_DIR.match(key)
    return None if match is None else match.group(1)


def shard_key(writer: str, serial: int) -> str:
    """The shard of commit ``serial`` in ``writer``'s rows array: rows
    ``serial * SHARD_ROWS`` onwards (chunk key encoding ``default``, ``.``)."""
    return f"{rows_dir(writer)}/c.{serial}.0"


def parse_shard_key(key: str) -> tuple[int, str] | None:
    """``(serial, writer)`` of a shard's key."""
    match = _SHARD_KEY.match(key)
    return None if match is None else (int(match.group(2)), match.group(1))


def snapshot_dir(version: int, writer: str) -> str:
    return f"{SNAPSHOT_PREFIX}v{version:012d}.{writer}"


def parse_snapshot_dir(key: str) -> tuple[int, str] | None:
    """``(version, writer)`` of a snapshot array's folder."""
    match = _SNAPSHOT_DIR.match(key)
    return None if match is None else (int(match.group(1)), match.group(2))


# -- what the root group says about the run ------------------------------------------


@dataclass(frozen=True)
class RunMeta:
    """What the store's root attributes say about the run it holds."""

    model: Model
    optimizer: Optimizer
    mode: str
    staleness: int
    run_id: str = ""

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "run_id": self.run_id,
            "model": self.model.to_dict(),
            "optimizer": self.optimizer.to_dict(),
            "mode": self.mode,
            "staleness": self.staleness,
        }

    @classmethod
    def from_json(cls, d: dict) -> RunMeta:
        if d.get("format") != FORMAT:
            raise StoreFormatError(
                f"not a dask_ftps store (format {d.get('format')!r})"
            )
        if d.get("format_version") not in READABLE_VERSIONS:
            raise StoreFormatError(
                f"store format version {d.get('format_version')!r}; this dask_ftps "
                f"reads versions {' and '.join(map(str, READABLE_VERSIONS))}"
            )
        try:
            return cls(
                model_from_dict(d["model"]),
                optimizer_from_dict(d["optimizer"]),
                _str(d["mode"]),
                _int(d["staleness"]),
                _str(d["run_id"]),
            )
        except ModelError:
            raise  # a model that is not allowed or not importable: not damage
        except (KeyError, TypeError, ValueError) as e:
            raise StoreCorrupted(
                f"zarr.json: bad run description: {e}", ROOT_KEY
            ) from e

    def check_same(self, other: RunMeta) -> None:
        for name in ("model", "optimizer", "mode", "staleness"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                raise SpecMismatch(
                    f"the store holds a run with {name} {mine!r}; refusing to "
                    f"resume it with {theirs!r} (use another store to start afresh)"
                )


def root_document(meta: RunMeta) -> bytes:
    """The root group's ``zarr.json``, its ``dask_ftps`` attribute checksummed."""
    attrs = meta.to_json()
    return _zarr_json(
        {"zarr_format": 3, "node_type": "group"},
        {"dask_ftps": {**attrs, "crc32c": crc32c(canonical(attrs))}},
    )


def group_document() -> bytes:
    return _zarr_json({"zarr_format": 3, "node_type": "group"}, {})


def parse_root(raw: bytes) -> RunMeta:
    attrs = checked_attrs(raw, ROOT_KEY)
    return RunMeta.from_json(attrs)


def checked_attrs(raw: bytes, key: str) -> dict:
    """The ``dask_ftps`` attribute of a ``zarr.json``, checked against its CRC."""
    try:
        doc = json.loads(raw)
        attrs = dict(doc["attributes"]["dask_ftps"])
        stored = attrs.pop("crc32c")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        if _is_foreign(raw):
            raise StoreFormatError(f"{key}: not written by dask_ftps") from e
        raise StoreCorrupted(
            f"{key}: not a readable dask_ftps document ({e})", key
        ) from e
    if not isinstance(stored, int) or crc32c(canonical(attrs)) != stored:
        raise StoreCorrupted(f"{key}: checksum mismatch: the object was damaged", key)
    return attrs


def _is_foreign(raw: bytes) -> bool:
    """A readable zarr.json without dask_ftps attributes (another program's)."""
    try:
        doc = json.loads(raw)
        return isinstance(doc, dict) and "dask_ftps" not in doc.get("attributes", {})
    except (ValueError, UnicodeDecodeError):
        return False


def _zarr_json(node: dict, attributes: dict) -> bytes:
    return json.dumps({**node, "attributes": attributes}, indent=2).encode()


def array_document(
    shape: tuple[int, ...], chunks: tuple[int, ...], attributes: dict
) -> bytes:
    """``zarr.json`` of a float32 array whose chunks are raw little-endian bytes
    plus a CRC-32C, with keys ``c.0``/``c.0.0`` (separator ``.``: no folders)."""
    attrs = {**attributes, "crc32c": crc32c(canonical(attributes))}
    return _zarr_json(_array_node(shape, chunks), {"dask_ftps": attrs})


def commit_document(shape: tuple[int, int], record: Record) -> bytes:
    """A commit's payload array's ``zarr.json``: :func:`array_document` (one
    chunk) with the attribute :func:`commit_attributes`, compact, the record's
    canonical bytes spliced in rather than encoded again (a commit's hot path)."""
    body = b'{"record":' + record._canonical + b"}"  # canonical(commit_attributes)
    node = json.dumps(_array_node(shape, shape), separators=(",", ":")).encode()
    return b'%s,"attributes":{"dask_ftps":{"crc32c":%d,%s}}' % (
        node[:-1],
        crc32c(body),
        body[1:],
    )


def rows_document(n: int) -> bytes:
    """``zarr.json`` of a writer's rows array: float32 ``(SHARD_ROWS *
    shard_serials(n), n)``, one shard of ``SHARD_ROWS`` rows per commit serial
    (codec ``sharding_indexed``, index at the end), each row one inner chunk
    (raw little-endian bytes plus a CRC-32C, as the index). Rows no commit
    wrote read as zeros."""
    node = _array_node((SHARD_ROWS * shard_serials(n), n), (SHARD_ROWS, n))
    crc_codecs = node.pop("codecs")
    node["codecs"] = [
        {
            "name": "sharding_indexed",
            "configuration": {
                "chunk_shape": [1, n],
                "codecs": crc_codecs,
                "index_codecs": crc_codecs,
                "index_location": "end",
            },
        }
    ]
    return _zarr_json(node, {})


def shard_rows(k: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The rows of a shard of ``k`` rows of ``n`` float32 (each followed by its
    CRC-32C) as bytes, and a ``(k, n)`` float32 view to fill in place before
    :func:`seal_shard`."""
    raw = np.empty((k, 4 * n + 4), np.uint8)
    return raw, raw[:, : 4 * n].view("<f4")


def seal_shard(raw: np.ndarray) -> int:
    """Write each row's CRC-32C into its trailer; return the shard's CRC (of the
    trailers one after the other, :attr:`DataRef.crc`)."""
    for row in raw:
        row[-4:] = np.frombuffer(crc32c(row[:-4]).to_bytes(4, "little"), np.uint8)
    return crc32c(np.ascontiguousarray(raw[:, -4:]))


def shard_tail(k: int, n: int, record: bytes) -> bytes:
    """What follows a shard's rows: the commit's record (sealed, as in the log:
    a copy the sharding codec ignores) and the shard's index with its CRC-32C."""
    index = np.full((SHARD_ROWS, 2), _EMPTY, "<u8")
    index[:k, 0] = np.arange(k, dtype="<u8") * (4 * n + 4)
    index[:k, 1] = 4 * n + 4
    raw = index.tobytes()
    return record + raw + crc32c(raw).to_bytes(4, "little")


def _shard_index(raw: bytes, key: str) -> np.ndarray:
    if len(raw) < _INDEX_BYTES:
        raise StoreCorrupted(f"{key}: truncated ({len(raw)} bytes)", key)
    tail = raw[-_INDEX_BYTES:]
    if crc32c(tail[:-4]) != int.from_bytes(tail[-4:], "little"):
        raise StoreCorrupted(f"{key}: the shard's index fails its checksum", key)
    return np.frombuffer(tail[:-4], "<u8").reshape(SHARD_ROWS, 2)


def decode_shard(raw: bytes, key: str, k: int, n: int, crc: int) -> np.ndarray:
    """The ``(k, n)`` float32 rows of a shard, checked against their trailers,
    its index and ``crc``."""
    index = _shard_index(raw, key)
    row = 4 * n + 4
    expected = np.full((SHARD_ROWS, 2), _EMPTY, "<u8")
    expected[:k, 0] = np.arange(k, dtype="<u8") * row
    expected[:k, 1] = row
    if not np.array_equal(index, expected) or len(raw) < k * row + _INDEX_BYTES:
        raise StoreCorrupted(
            f"{key}: the shard does not hold {k} rows of {n} values", key
        )
    rows = np.frombuffer(raw, np.uint8, count=k * row).reshape(k, row)
    for i in range(k):
        stored = int.from_bytes(rows[i, -4:].tobytes(), "little")
        if crc32c(rows[i, :-4]) != stored:
            raise StoreCorrupted(f"{key}: row {i} fails its checksum", key)
    if crc32c(np.ascontiguousarray(rows[:, -4:])) != crc:
        raise StoreCorrupted(
            f"{key}: the shard's rows are not those its record names", key
        )
    return rows[:, : 4 * n].view("<f4")


def shard_record(raw: bytes, key: str) -> bytes:
    """The sealed copy of its commit's record a shard keeps (between its rows and
    its index); :class:`StoreCorrupted` if the shard's index is damaged."""
    index = _shard_index(raw, key)
    used = index[:, 0] != _EMPTY
    end = int((index[used, 0] + index[used, 1]).max()) if used.any() else 0
    if end > len(raw) - _INDEX_BYTES:
        raise StoreCorrupted(f"{key}: the shard's index points past its end", key)
    return raw[end : len(raw) - _INDEX_BYTES]


def _array_node(shape: tuple[int, ...], chunks: tuple[int, ...]) -> dict:
    return {
        "zarr_format": 3,
        "node_type": "array",
        "shape": list(shape),
        "data_type": "float32",
        "chunk_grid": {
            "name": "regular",
            "configuration": {"chunk_shape": list(chunks)},
        },
        "chunk_key_encoding": {
            "name": "default",
            "configuration": {"separator": "."},
        },
        "fill_value": 0.0,
        "codecs": [
            {"name": "bytes", "configuration": {"endian": "little"}},
            {"name": "crc32c"},
        ],
        "storage_transformers": [],
    }


# -- log records ---------------------------------------------------------------------

History = tuple[tuple[int, tuple[tuple[str, float | None], ...]], ...]


@dataclass(frozen=True)
class RunEntry:
    """A run as a snapshot holds it: spec, name, where it began and its clocks."""

    run: int
    name: str
    spec: RunSpec
    base_version: int
    clocks: tuple[int, ...]
    superseded: bool
    history: History = ()

    def to_json(self) -> dict:
        return {
            **asdict(self),
            "spec": self.spec.to_dict(),
            "clocks": list(self.clocks),
            "history": [[e, [list(kv) for kv in values]] for e, values in self.history],
        }

    @classmethod
    def from_json(cls, d: dict) -> RunEntry:
        return cls(
            _int(d["run"]),
            _str(d["name"]),
            RunSpec.from_dict(d["spec"]),
            _int(d["base_version"]),
            tuple(_int(c) for c in d["clocks"]),
            _bool(d["superseded"]),
            tuple((_int(e), _values(v)) for e, v in d["history"]),
        )


@dataclass(frozen=True)
class Claim:
    """A server took the store over: every later record is its own."""

    address: str
    host: str
    pid: int
    run_id: str

    kind: Literal["claim"] = field(default="claim", init=False)

    def to_json(self) -> dict:
        return {
            "address": self.address,
            "host": self.host,
            "pid": self.pid,
            "run_id": self.run_id,
        }

    @classmethod
    def from_json(cls, d: dict) -> Claim:
        return cls(
            _str(d["address"]), _str(d["host"]), _int(d["pid"]), _str(d["run_id"])
        )


@dataclass(frozen=True)
class RunBegun:
    """A ``begin_run`` that created run number ``run``."""

    run: int
    name: str
    spec: RunSpec
    base_version: int

    kind: Literal["run"] = field(default="run", init=False)

    def to_json(self) -> dict:
        return {
            "run": self.run,
            "name": self.name,
            "spec": self.spec.to_dict(),
            "base_version": self.base_version,
        }

    @classmethod
    def from_json(cls, d: dict) -> RunBegun:
        return cls(
            _int(d["run"]),
            _str(d["name"]),
            RunSpec.from_dict(d["spec"]),
            _int(d["base_version"]),
        )


@dataclass(frozen=True)
class EpochEnded:
    """What ``train()`` reported at the end of an epoch of run ``run``."""

    run: int
    epoch: int
    values: tuple[tuple[str, float | None], ...]

    kind: Literal["epoch"] = field(default="epoch", init=False)

    def to_json(self) -> dict:
        return {
            "run": self.run,
            "epoch": self.epoch,
            "values": [list(kv) for kv in self.values],
        }

    @classmethod
    def from_json(cls, d: dict) -> EpochEnded:
        return cls(_int(d["run"]), _int(d["epoch"]), _values(d["values"]))


def _row_format(f: Any) -> RowFormat:
    """A payload row's format: ``[batch, factored]``, or with row-sparse entries
    ``[batch, factored, [[i, k], ...]]`` (format 5)."""
    if not isinstance(f, list) or len(f) not in (2, 3):
        raise ValueError(f"bad row format {f!r}")
    rows = tuple((_int(i), _int(k)) for i, k in f[2]) if len(f) == 3 else ()
    return (_int(f[0]), tuple(_int(i) for i in f[1]), rows)


@dataclass(frozen=True)
class DataRef:
    """A commit's payload array, float32 in one chunk.

    Dense rows only (``formats`` empty): ``(len(rows), n_params)``, row *i* the
    *i*-th update. Otherwise ``(1, total)``: the rows one after the other, row
    *i* of format ``formats[i]`` (see :mod:`dask_ftps._layout`), so that a
    factored update takes the room of its factors only, and a row-sparse one
    the room of its row indices and rows.
    """

    key: str  # the array's folder; a shard's key (``shard``)
    shape: tuple[int, int]
    #: Of the chunk's data bytes (the chunk's own trailer repeats it); of a
    #: shard, of its rows' CRC-32C trailers one after the other.
    crc: int
    formats: tuple[RowFormat, ...] = ()
    #: The rows are a shard of the writer's rows array (:func:`shard_rows`):
    #: dense, ``shape[0] <= SHARD_ROWS``.
    shard: bool = False

    def to_json(self) -> dict:
        d = {"key": self.key, "shape": list(self.shape), "crc": self.crc}
        if self.formats:
            d["formats"] = [
                [b, list(f), [list(r) for r in rows]] if rows else [b, list(f)]
                for b, f, rows in self.formats
            ]
        if self.shard:
            d["shard"] = True
        return d

    @classmethod
    def from_json(cls, d: dict) -> DataRef:
        shape = tuple(_int(s) for s in d["shape"])
        if len(shape) != 2:
            raise ValueError(f"bad payload shape {shape}")
        formats = tuple(_row_format(f) for f in d.get("formats", ()))
        if formats and shape[0] != 1:
            raise ValueError(f"bad payload shape {shape} for rows of several formats")
        shard = _bool(d.get("shard", False))
        key = _str(d["key"])
        if shard and (
            formats or not 0 < shape[0] <= SHARD_ROWS or parse_shard_key(key) is None
        ):
            raise ValueError(f"bad shard {key!r} of shape {shape}")
        return cls(key, shape, _int(d["crc"]), formats, shard)

    @property
    def rows(self) -> int:
        """The number of updates it holds."""
        return len(self.formats) if self.formats else self.shape[0]


@dataclass(frozen=True)
class Commit:
    """Updates ``seq .. seq + len(rows) - 1`` were accepted, in this order.

    ``rows`` are the global dataset's rows (update id parts, worker, the
    version the update takes part in); ``version`` and ``model_crc`` are the
    model after the commit (what the server then serves); ``downloads`` is
    the download dataset at the commit.
    """

    seq: int
    rows: tuple[Row, ...]
    version: int
    model_crc: int
    downloads: tuple[tuple[str, int], ...]
    data: DataRef

    kind: Literal["commit"] = field(default="commit", init=False)

    @property
    def stop(self) -> int:
        return self.seq + len(self.rows)

    def to_json(self) -> dict:
        return {
            "seq": self.seq,
            "rows": [list(r) for r in self.rows],
            "version": self.version,
            "model_crc": self.model_crc,
            "downloads": [list(d) for d in self.downloads],
            "data": self.data.to_json(),
        }

    @classmethod
    def from_json(cls, d: dict) -> Commit:
        rows = tuple(_row(r) for r in d["rows"])
        data = DataRef.from_json(d["data"])
        if not rows or data.rows != len(rows):
            raise ValueError(f"{len(rows)} rows for a payload of shape {data.shape}")
        return cls(
            _int(d["seq"]),
            rows,
            _int(d["version"]),
            _int(d["model_crc"]),
            _downloads(d["downloads"]),
            data,
        )


@dataclass(frozen=True)
class ArrayRef:
    """A snapshot array: ``n`` float32 (parameters, then optimizer state)."""

    key: str
    n: int
    chunk: int
    crcs: tuple[int, ...]  # of each chunk's data bytes

    def to_json(self) -> dict:
        return {
            "key": self.key,
            "n": self.n,
            "chunk": self.chunk,
            "crcs": list(self.crcs),
        }

    @classmethod
    def from_json(cls, d: dict) -> ArrayRef:
        ref = cls(
            _str(d["key"]),
            _int(d["n"]),
            _int(d["chunk"]),
            tuple(_int(c) for c in d["crcs"]),
        )
        if ref.chunk < 1 or len(ref.crcs) != max(1, math.ceil(ref.n / ref.chunk)):
            raise ValueError(f"bad snapshot array {ref}")
        return ref


@dataclass(frozen=True)
class Snapshot:
    """The model and optimizer state at ``version`` and every run's clocks.

    It holds the effect of the first ``replay_from`` updates; a rebuild replays
    the log from record ``first_serial`` on, skipping updates before
    ``replay_from`` and runs it already holds.
    """

    version: int
    replay_from: int
    first_serial: int
    runs: tuple[RunEntry, ...]
    downloads: tuple[tuple[str, int], ...]
    array: ArrayRef
    address: str
    meta: dict  # the run's description (RunMeta.to_json): the root group's copy

    kind: Literal["snapshot"] = field(default="snapshot", init=False)

    def to_json(self) -> dict:
        return {
            "version": self.version,
            "replay_from": self.replay_from,
            "first_serial": self.first_serial,
            "runs": [r.to_json() for r in self.runs],
            "downloads": [list(d) for d in self.downloads],
            "array": self.array.to_json(),
            "address": self.address,
            "meta": self.meta,
        }

    @classmethod
    def from_json(cls, d: dict) -> Snapshot:
        if not isinstance(d["meta"], dict):
            raise TypeError(f"expected the run's description, got {d['meta']!r}")
        return cls(
            _int(d["version"]),
            _int(d["replay_from"]),
            _int(d["first_serial"]),
            tuple(RunEntry.from_json(r) for r in d["runs"]),
            _downloads(d["downloads"]),
            ArrayRef.from_json(d["array"]),
            _str(d["address"]),
            d["meta"],
        )


@dataclass(frozen=True)
class Release:
    """The server closed cleanly: nobody writes the store until the next claim."""

    reason: str

    kind: Literal["release"] = field(default="release", init=False)

    def to_json(self) -> dict:
        return {"reason": self.reason}

    @classmethod
    def from_json(cls, d: dict) -> Release:
        return cls(_str(d["reason"]))


Body = Claim | RunBegun | EpochEnded | Commit | Snapshot | Release
_BODIES: dict[str, type] = {
    "claim": Claim,
    "run": RunBegun,
    "epoch": EpochEnded,
    "commit": Commit,
    "snapshot": Snapshot,
    "release": Release,
}


@dataclass(frozen=True)
class Record:
    """One object of the log: ``ftps/log/<serial>``, written once, exclusively.

    ``incarnation`` and ``writer`` name the server that wrote it (a claim
    starts a new one); ``prev`` is the CRC of record ``serial - 1`` (None for
    the first record).
    """

    serial: int
    incarnation: int
    writer: str
    prev: int | None
    time: float
    body: Body

    @property
    def kind(self) -> str:
        return self.body.kind

    def to_json(self) -> dict:
        return {
            "serial": self.serial,
            "kind": self.body.kind,
            "incarnation": self.incarnation,
            "writer": self.writer,
            "prev": self.prev,
            "time": self.time,
            "body": self.body.to_json(),
        }

    def encode(self) -> bytes:
        """The record's object: canonical JSON and its CRC-32C."""
        return self._canonical + self.crc.to_bytes(4, "little")

    @cached_property
    def _canonical(self) -> bytes:
        return canonical(self.to_json())

    @cached_property
    def crc(self) -> int:
        """CRC-32C of the record's bytes (the next record's ``prev``)."""
        return crc32c(self._canonical)

    @classmethod
    def decode(cls, raw: bytes, key: str) -> Record:
        body = unseal(raw, key)
        record = cls.from_json(_loads(body, key), key)
        record.__dict__["_canonical"] = body  # its bytes as written, checked above
        return record

    @classmethod
    def from_json(cls, d: Any, key: str) -> Record:
        try:
            kind = d["kind"]
            if kind not in _BODIES:
                raise ValueError(f"unknown record kind {kind!r}")
            prev = d["prev"]
            record = cls(
                _int(d["serial"]),
                _int(d["incarnation"]),
                _str(d["writer"]),
                None if prev is None else _int(prev),
                float(d["time"]),
                _BODIES[kind].from_json(d["body"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise StoreCorrupted(f"{key}: not a valid log record ({e!r})", key) from e
        expected = parse_log_key(key)
        if expected is not None and expected != record.serial:
            raise StoreCorrupted(
                f"{key}: holds the record of serial {record.serial}", key
            )
        return record


def commit_attributes(record: Record) -> dict:
    """What a commit's payload array keeps in its ``zarr.json``: the commit's
    record, so that a lost or damaged log record can be read again there."""
    return {"record": record.to_json()}


def record_from_attributes(attrs: dict, key: str) -> Record:
    try:
        return Record.from_json(attrs["record"], key)
    except KeyError as e:
        raise StoreCorrupted(f"{key}: holds no commit record", key) from e


def new_chunk(n: int) -> tuple[np.ndarray, np.ndarray]:
    """A chunk object's bytes (``4 n`` of data, 4 of CRC) and a float32 view of
    its data, to be filled in place and then :func:`seal_chunk`'d."""
    raw = np.empty(4 * n + 4, np.uint8)
    return raw, raw[:-4].view("<f4")


def seal_chunk(raw: np.ndarray) -> int:
    """Write the CRC-32C of a :func:`new_chunk`'s data into its trailer; return it."""
    crc = crc32c(raw[:-4])
    raw[-4:] = np.frombuffer(crc.to_bytes(4, "little"), np.uint8)
    return crc


def encode_chunk(values: np.ndarray) -> tuple[np.ndarray, int]:
    """A chunk object (little-endian float32 and its CRC-32C) and that CRC."""
    raw, data = new_chunk(values.size)
    data[:] = values.reshape(-1)
    return raw, seal_chunk(raw)


def decode_chunk(raw: bytes, key: str, n: int, crc: int) -> np.ndarray:
    """The float32 values of a chunk, checked against its trailer and ``crc``."""
    if len(raw) != 4 * n + 4:
        raise StoreCorrupted(
            f"{key}: {len(raw)} bytes, expected {4 * n + 4} for {n} float32 values",
            key,
        )
    data = np.frombuffer(raw, dtype="<f4", count=n)
    stored = int.from_bytes(raw[-4:], "little")
    computed = crc32c(data.view(np.uint8))
    if computed != stored or computed != crc:
        raise StoreCorrupted(
            f"{key}: checksum mismatch (record {crc:08x}, chunk {stored:08x}, "
            f"computed {computed:08x}): the object was damaged",
            key,
        )
    return data


# -- field parsers (a record that parses is well typed) --------------------------------


def _loads(body: bytes, key: str) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise StoreCorrupted(f"{key}: not JSON ({e})", key) from e


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {value!r}")
    return value


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    return value


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected a boolean, got {value!r}")
    return value


def _row(r: Any) -> Row:
    run, epoch, shard, step, worker, version = r
    return (
        _int(run),
        _int(epoch),
        _int(shard),
        _int(step),
        _str(worker),
        _int(version),
    )


def _values(pairs: Any) -> tuple[tuple[str, float | None], ...]:
    out = []
    for name, value in pairs:
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int | float)
        ):
            raise TypeError(f"expected a number or null, got {value!r}")
        out.append((_str(name), None if value is None else float(value)))
    return tuple(out)


def _downloads(rows: Any) -> tuple[tuple[str, int], ...]:
    return tuple((_str(w), _int(v)) for w, v in rows)
