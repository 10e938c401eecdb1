"""Raw object I/O over a Zarr store: the few operations the journal needs.

Three implementations behind one interface:

- :class:`LocalIO` for a local folder (:class:`zarr.storage.LocalStore`): an
  object that may replace another is written to a temporary file and renamed
  into place; an exclusive create is a hard link of a temporary file, which
  fails if the name exists; a commit's payload array, whose folder is new and
  its writer's own, is written in place (a torn file fails its checksum, and
  the record that names it is created only after it). Optionally with
  ``fsync``; a whole commit is one hop to a thread.
- :class:`FsspecIO` for an fsspec URL (:class:`zarr.storage.FsspecStore`): one
  PUT per object, concurrent where order does not matter; exclusive creates
  use the backend's conditional write where it has one (S3's If-None-Match).
- :class:`StoreIO` for any other Zarr :class:`~zarr.abc.store.Store`, through
  its public methods only.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from functools import cache, cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # zarr is imported when a store object needs it, not before:
    # a restarting scheduler reads a local store without it.
    from zarr.abc.store import Store
    from zarr.core.buffer import BufferPrototype
    from zarr.storage import FsspecStore

logger = logging.getLogger(__name__)


@cache
def _proto() -> BufferPrototype:
    from zarr.core.buffer import default_buffer_prototype

    return default_buffer_prototype()


def _is_store(obj: Any) -> bool:
    """Whether ``obj`` is a Zarr store object (zarr imported only for objects
    that are not paths)."""
    if isinstance(obj, str | os.PathLike):
        return False
    from zarr.abc.store import Store

    return isinstance(obj, Store)


#: A commit's objects: ``(key, bytes)`` pairs written first (any order), then the
#: record that makes them part of the log (an exclusive create). A value may be
#: any object with the buffer protocol (a chunk is a NumPy byte array), or a list
#: of such parts, written one after the other (no copy to join them locally).
Objects = list[tuple[str, Any]]


def joined(value: Any) -> Any:
    """An object's bytes in one buffer (a list of parts joined)."""
    return b"".join(value) if isinstance(value, list) else value


Build = Callable[[], tuple[Objects, str, bytes]]


def check_location(store: Any, storage_options: dict | None = None) -> None:
    """Raise :class:`TypeError` unless ``store`` (with ``storage_options``) names a
    store: a local path, an fsspec URL, or a Zarr store object."""
    if storage_options is not None and not isinstance(storage_options, dict):
        raise TypeError(
            f"storage_options must be a dict, got {type(storage_options).__name__}"
        )
    if _is_store(store):
        if storage_options:
            raise TypeError(
                "storage_options apply to a URL, not to a Zarr Store object"
            )
        return
    if isinstance(store, os.PathLike):
        store = os.fspath(store)
    if not isinstance(store, str) or not store:
        raise TypeError(
            "store must be a local path, an fsspec URL (with storage_options=) or a "
            f"zarr.abc.store.Store, got {type(store).__name__}"
        )
    if storage_options and ("://" not in store or store.startswith("file://")):
        raise TypeError(
            f"storage_options apply to an fsspec URL, not to the local path {store!r}"
        )


def resolve(
    store: Any, storage_options: dict | None = None, *, read_only: bool = False
) -> StoreIO:
    """The :class:`StoreIO` of a path, an fsspec URL or a Zarr store.

    Raises
    ------
    TypeError
        If ``store`` is none of these, or ``storage_options`` go with something
        other than a URL.
    """
    check_location(store, storage_options)
    if _is_store(store):
        from zarr.storage import FsspecStore, LocalStore

        if isinstance(store, LocalStore):
            return LocalIO(Path(store.root), read_only=read_only or store.read_only)
        if isinstance(store, FsspecStore):
            return FsspecIO(store, read_only=read_only)
        return StoreIO(store, read_only=read_only)
    url = os.fspath(store)
    if "://" in url and not url.startswith("file://"):
        from zarr.storage import FsspecStore

        options = {"skip_instance_cache": True, **(storage_options or {})}
        fs_store = FsspecStore.from_url(
            url, storage_options=options, read_only=read_only
        )
        return FsspecIO(fs_store, read_only=read_only, url=url)
    return LocalIO(Path(url.removeprefix("file://")), read_only=read_only)


class StoreIO:
    """Object I/O through a Zarr store's public API (any store).

    Parameters
    ----------
    store
        The Zarr store.
    read_only
        Refuse every write.
    """

    durable = False
    #: The writer's token: part of its temporary files' names (local stores).
    tag = ""

    def __init__(self, store: Store, *, read_only: bool = False) -> None:
        self.store = store
        self.read_only = read_only
        self.closed = False

    def __str__(self) -> str:
        return str(self.store)

    @property
    def is_local(self) -> bool:
        return False

    # -- reads ------------------------------------------------------------------

    async def exists(self) -> bool:
        """Whether the store is there at all (a folder, a bucket prefix)."""
        return True

    async def get(self, key: str) -> bytes | None:
        buf = await self.store.get(key, prototype=_proto())
        return None if buf is None else buf.to_bytes()

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        return list(await asyncio.gather(*(self.get(k) for k in keys)))

    async def list_dir(self, prefix: str) -> list[str]:
        """Names of the objects and folders directly below ``prefix``."""
        try:
            return [name async for name in self.store.list_dir(prefix)]
        except FileNotFoundError:
            return []

    async def is_empty(self) -> bool:
        try:
            return await self.store.is_empty("")
        except FileNotFoundError:
            return True

    # -- writes -----------------------------------------------------------------

    async def put(self, objects: Objects) -> None:
        """Create or replace ``objects``."""
        self._check_writable()
        await asyncio.gather(*(self._set(k, v) for k, v in objects))

    async def put_new(self, key: str, value: bytes) -> bool:
        """Create ``key`` unless it exists; whether this call created it."""
        self._check_writable()
        await self.store.set_if_not_exists(key, _proto().buffer.from_bytes(value))
        return await self.get(key) == value

    async def commit(self, build: Build) -> bool:
        """Write a commit's objects, then its record if its key is free.

        Returns whether the record was created (False: another writer holds its
        key, and this commit is not part of the log).
        """
        self._check_writable()
        objects, key, record = await asyncio.to_thread(build)
        await self.put(objects)
        return await self.put_new(key, record)

    async def delete(self, keys: Sequence[str]) -> None:
        self._check_writable()
        await asyncio.gather(*(self.store.delete(k) for k in keys))

    async def delete_dirs(self, prefixes: Sequence[str]) -> None:
        self._check_writable()
        await asyncio.gather(*(self.store.delete_dir(p) for p in prefixes))

    async def remove_partial(self, writers: set[str]) -> int:
        """Remove the temporary files killed writers left: untagged ones, and
        those tagged with one of ``writers``. Their count."""
        return 0

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.store.close()

    async def _set(self, key: str, value: Any) -> None:
        await self.store.set(key, _proto().buffer.from_bytes(joined(value)))

    def _check_writable(self) -> None:
        if self.read_only:
            raise PermissionError(f"store {self} is opened read-only")
        if self.closed:
            raise RuntimeError(f"store {self} is closed")


class FsspecIO(StoreIO):
    """An fsspec URL: exclusive creates are conditional PUTs where the backend
    has them (s3fs: ``mode="create"``, If-None-Match); elsewhere, create, then
    read back."""

    def __init__(
        self, store: FsspecStore, *, read_only: bool = False, url: str | None = None
    ) -> None:
        super().__init__(store, read_only=read_only)
        self.url = url or store.fs.unstrip_protocol(store.path)
        pipe = getattr(type(store.fs), "_pipe_file", None)
        self._conditional = (
            pipe is not None and "mode" in inspect.signature(pipe).parameters
        )

    def __str__(self) -> str:
        return self.url

    async def put_new(self, key: str, value: bytes) -> bool:
        self._check_writable()
        if not self._conditional:
            return await super().put_new(key, value)
        path = f"{self.store.path}/{key}"
        try:
            await self.store.fs._pipe_file(path, value, mode="create")
        except FileExistsError:
            return False
        return True

    async def close(self) -> None:
        if not self.closed:
            await super().close()
            close = getattr(self.store.fs, "close_session", None)
            s3 = getattr(self.store.fs, "_s3", None)
            if close is not None and s3 is not None:
                try:
                    await s3.close()
                except Exception:  # noqa: BLE001 - a session already gone
                    logger.debug("closing the fsspec session of %s failed", self)


class LocalIO(StoreIO):
    """A local folder, with files written directly (same layout as LocalStore).

    An object that may replace another, and a record, is written to
    ``<name>.<writer>-<uuid>.partial`` and renamed (a record: hard-linked) into
    place, so a reader sees the old object or the new one, never a torn one. A
    commit's payload, under a name only its writer uses, is created in place:
    a crash can leave it torn, but no record names it then. With ``durable``,
    each file and its folder are ``fsync``'d before the record that makes them
    part of the log is created, and the record before the commit returns.
    """

    def __init__(self, root: Path, *, read_only: bool = False) -> None:
        # No zarr store object: every operation is on files here.
        self.read_only = read_only
        self.closed = False
        self.root = root
        self.durable = False

    @cached_property
    def store(self) -> Store:
        """The same folder as a Zarr store (made on first use)."""
        from zarr.storage import LocalStore

        return LocalStore(self.root, read_only=self.read_only)

    def __str__(self) -> str:
        return str(self.root)

    @property
    def is_local(self) -> bool:
        return True

    async def exists(self) -> bool:
        return await asyncio.to_thread(self.root.is_dir)

    async def get(self, key: str) -> bytes | None:
        return await asyncio.to_thread(_read, self.root / key)

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        paths = [self.root / k for k in keys]
        return await asyncio.to_thread(lambda: [_read(p) for p in paths])

    async def list_dir(self, prefix: str) -> list[str]:
        return await asyncio.to_thread(_list_dir, self.root / prefix)

    async def is_empty(self) -> bool:
        return await asyncio.to_thread(
            lambda: not self.root.is_dir() or not any(self.root.iterdir())
        )

    async def put(self, objects: Objects) -> None:
        self._check_writable()
        await asyncio.to_thread(self._write_all, objects)

    async def put_new(self, key: str, value: bytes) -> bool:
        self._check_writable()
        return await asyncio.to_thread(self._create, key, value)

    async def commit(self, build: Build) -> bool:
        self._check_writable()
        return await asyncio.to_thread(self._commit, build)

    async def delete(self, keys: Sequence[str]) -> None:
        self._check_writable()
        await asyncio.to_thread(lambda: [remove_path(self.root / k) for k in keys])

    async def delete_dirs(self, prefixes: Sequence[str]) -> None:
        self._check_writable()
        await asyncio.to_thread(_remove_dirs, self.root, prefixes)

    async def remove_partial(self, writers: set[str]) -> int:
        self._check_writable()
        return await asyncio.to_thread(_remove_partial_files, self.root, writers)

    async def close(self) -> None:
        self.closed = True

    # -- in a thread ------------------------------------------------------------

    def _commit(self, build: Build) -> bool:
        objects, key, record = build()
        self._write_fresh(objects)
        return self._create(key, record)

    def _write_fresh(self, objects: Objects) -> None:
        """Write a commit's payload: a shard of its writer's rows array, or the
        files of an array of its own. No other writer, and no earlier attempt,
        uses these names (writer token, serial, attempt), so each file is
        created in place, with no temporary file and no rename. A file cut
        short by a crash fails its checksum; the record naming it is created
        only after every file is whole."""
        folders: list[Path] = []
        made: list[Path] = []
        for key, value in objects:
            path = self.root / key
            try:  # a rows array's folder is there after its first shard
                create_file(path, value, durable=self.durable)
            except FileNotFoundError:
                make_folder(path.parent)
                made.append(path.parent)
                create_file(path, value, durable=self.durable)
            if path.parent not in folders:
                folders.append(path.parent)
        if self.durable:
            for folder in folders:
                fsync_path(folder)
            for folder in made:  # its entry in the folder above
                fsync_path(folder.parent)

    def _write_all(self, objects: Objects) -> None:
        folders = set()
        for key, value in objects:
            path = self.root / key
            write_file(path, value, exclusive=False, durable=self.durable, tag=self.tag)
            folders.add(path.parent)
        if self.durable:
            for folder in folders:
                fsync_path(folder)
                fsync_path(folder.parent)

    def _create(self, key: str, value: bytes) -> bool:
        path = self.root / key
        try:
            write_file(path, value, exclusive=True, durable=self.durable, tag=self.tag)
        except FileExistsError:
            return False
        if self.durable:
            fsync_path(path.parent)
        return True


# -- file operations (module functions: tests wrap them to kill a writer) ---------


def write_file(
    path: Path, value: bytes, *, exclusive: bool, durable: bool, tag: str = ""
) -> None:
    """Write ``path`` whole: a temporary file ``<name>.<tag>-<uuid>.partial``
    renamed (or, exclusive, linked) into place. Raises :class:`FileExistsError`
    if ``exclusive`` and ``path`` exists."""
    tmp = path.with_name(f"{path.name}.{tag}-{uuid.uuid4().hex}.partial")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    try:
        try:
            fd = os.open(tmp, flags, 0o644)
        except FileNotFoundError:  # the first object of its folder
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, flags, 0o644)
        try:
            view = memoryview(value).cast("B")
            while view:
                view = view[os.write(fd, view) :]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        if exclusive:
            os.link(tmp, path)  # fails if path exists: the create is exclusive
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def make_folder(path: Path) -> None:
    """Create ``path`` (its parent exists or is created); no error if it exists."""
    try:
        os.mkdir(path)
    except FileExistsError:
        pass
    except FileNotFoundError:
        path.mkdir(parents=True, exist_ok=True)


def create_file(path: Path, value: Any, *, durable: bool) -> None:
    """Create ``path`` with ``value`` (bytes, or a list of parts) in place (no
    temporary file): for objects whose name no other writer uses and whose
    damage a checksum detects.
    Raises :class:`FileExistsError` if ``path`` exists."""
    parts = [
        memoryview(p).cast("B") for p in (value if isinstance(value, list) else [value])
    ]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        while parts:  # one writev for all parts, unless it writes short
            written = os.writev(fd, parts)
            while parts and written >= len(parts[0]):
                written -= len(parts.pop(0))
            if parts:
                parts[0] = parts[0][written:]
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None


def _list_dir(path: Path) -> list[str]:
    try:
        return [entry.name for entry in os.scandir(path)]
    except (FileNotFoundError, NotADirectoryError):
        return []


def remove_path(path: Path) -> None:
    """Delete a file or a folder with what it holds (nothing if it is gone)."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _remove_dirs(root: Path, prefixes: Sequence[str]) -> None:
    for prefix in prefixes:
        remove_path(root / prefix)


def partial_tag(name: str) -> str | None:
    """The writer's tag in a temporary file's name; None for an untagged one (a
    Zarr store's own, or another program's)."""
    part = name.removesuffix(".partial").rpartition(".")[2]
    tag, dash, _ = part.partition("-")
    return tag if dash else None


def _remove_partial_files(root: Path, writers: set[str]) -> int:
    removed = 0
    for folder, _, files in os.walk(root):
        for name in files:
            if name.endswith(".partial"):
                tag = partial_tag(name)
                if not tag or tag in writers:
                    remove_path(Path(folder, name))
                    removed += 1
    return removed
