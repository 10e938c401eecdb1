"""Helpers for failure tests, ``dask-ftps chaos`` and the damage sweep.

Fault injection lives here, not in the library: nothing in dask_ftps imports
this module. It offers

- :func:`kill_at`: SIGKILL (or SIGSTOP) this process at the n-th write or
  deletion of a local store's file whose path matches a pattern (the real file
  operations of :class:`~dask_ftps._store._io.LocalIO`, wrapped);
- :func:`dask_setup`: the same as a scheduler preload, driven by the environment
  variables ``DASK_FTPS_TESTING_KILL_AT="<regex>:<n>"`` and
  ``DASK_FTPS_TESTING_STOP_AT`` (``dask scheduler --preload dask_ftps.testing``);
- :class:`KillingStore`: a Zarr store wrapper that dies at its n-th write;
- :class:`PauseWrites`: a journal's writer paused before its n-th write step, on
  any kind of store, until released (a stale owner);
- :func:`start_preloaded`: a real scheduler started with the preload on a store;
- :func:`store_objects` and :func:`damage`: every object of a local store by
  kind, and a bit flip, truncation or deletion of one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
from pathlib import Path
from typing import Any

import numpy as np
from zarr.storage import WrapperStore

from dask_ftps._store import _io

logger = logging.getLogger(__name__)

KILL_ENV = "DASK_FTPS_TESTING_KILL_AT"
STOP_ENV = "DASK_FTPS_TESTING_STOP_AT"
DAMAGES = ("flip", "truncate", "delete")


def kill_at(pattern: str, n: int, sig: int = signal.SIGKILL) -> None:
    """Send this process ``sig`` (SIGKILL; SIGSTOP pauses it, a stale owner to
    be) right before the ``n``-th local-store file operation (a write or a
    deletion) whose path matches ``pattern`` (``re.search``)."""
    regex = re.compile(pattern)
    count = 0
    write, remove = _io.write_file, _io.remove_path

    def check(path: Path) -> None:
        nonlocal count
        if regex.search(str(path)):
            count += 1
            if count == n:
                name = signal.Signals(sig).name
                logger.critical("dask_ftps.testing: %s before %s (%d)", name, path, n)
                os.kill(os.getpid(), sig)

    def killing_write(path: Path, value: bytes, **kwargs: Any) -> None:
        check(path)
        write(path, value, **kwargs)

    def killing_remove(path: Path) -> None:
        check(path)
        remove(path)

    def killing_create(path: Path, value: Any, *, durable: bool) -> None:
        # Two steps: before the file, and half-way through it (a torn file).
        check(path)
        create_in_halves(path, value, lambda: check(path))

    _io.write_file = killing_write
    _io.remove_path = killing_remove
    _io.create_file = killing_create


def create_in_halves(path: Path, value: Any, between: Any) -> None:
    """:func:`~dask_ftps._store._io.create_file`, calling ``between()`` when half
    of ``value`` is written: where a crash or a pause leaves a torn file."""
    data = memoryview(_io.joined(value)).cast("B")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, data[: len(data) // 2])
        between()
        rest = data[len(data) // 2 :]
        while rest:
            rest = rest[os.write(fd, rest) :]
    finally:
        os.close(fd)


def parse_kill_at(spec: str) -> tuple[str, int]:
    """``"<regex>:<n>"`` -> ``(regex, n)``."""
    pattern, _, n = spec.rpartition(":")
    return pattern, int(n)


def dask_setup(server: Any) -> None:
    """Scheduler preload: arm :func:`kill_at` from ``DASK_FTPS_TESTING_KILL_AT``
    (SIGKILL) or ``DASK_FTPS_TESTING_STOP_AT`` (SIGSTOP)."""
    for env, sig in ((KILL_ENV, signal.SIGKILL), (STOP_ENV, signal.SIGSTOP)):
        spec = os.environ.get(env)
        if spec:
            kill_at(*parse_kill_at(spec), sig=sig)


class PauseWrites:
    """Pause a journal's store I/O right before its ``n``-th write step, until
    :meth:`release`: a stale owner paused (a SIGSTOP, a hung VM) at one step of
    a commit, a snapshot or a trim.

    A step is one object written (each file of a local store, each PUT), one
    exclusive create, or one deletion (a key or a folder). Works on every kind
    of :class:`~dask_ftps._store._io.StoreIO` by patching the instance. With
    ``n=None`` it only counts the steps (:attr:`steps`).
    """

    def __init__(self, io: Any, n: int | None) -> None:
        import threading

        self.n = n
        self.steps = 0
        self.paused_at = ""
        self.reached = threading.Event()
        self._released = threading.Event()
        self._lock = threading.Lock()
        self._patch(io)

    def release(self) -> None:
        self._released.set()

    def _hit(self, what: str) -> bool:
        with self._lock:
            self.steps += 1
            if self.steps != self.n:
                return False
            self.paused_at = what
        self.reached.set()
        return True

    def _step(self, what: str) -> None:  # in a thread
        if self._hit(what):
            self._released.wait()

    async def _astep(self, what: str) -> None:
        import asyncio

        if self._hit(what):
            await asyncio.to_thread(self._released.wait)

    def _patch(self, io: Any) -> None:
        if isinstance(io, _io.LocalIO):
            write_all, create = io._write_all, io._create

            def gated_write_all(objects: Any) -> None:
                for key, value in objects:
                    self._step(f"write {key}")
                    write_all([(key, value)])

            def gated_write_fresh(objects: Any) -> None:
                # Each file in two steps: before it, and half-way (torn).
                for key, value in objects:
                    path = io.root / key
                    _io.make_folder(path.parent)
                    self._step(f"write {key}")
                    create_in_halves(
                        path, value, lambda key=key: self._step(f"write half of {key}")
                    )

            io._write_fresh = gated_write_fresh

            def gated_create(key: str, value: bytes) -> bool:
                self._step(f"create {key}")
                return create(key, value)

            io._write_all, io._create = gated_write_all, gated_create
        else:
            set_, put_new = io._set, io.put_new

            async def gated_set(key: str, value: bytes) -> None:
                await self._astep(f"write {key}")
                await set_(key, value)

            async def gated_put_new(key: str, value: bytes) -> bool:
                await self._astep(f"create {key}")
                return await put_new(key, value)

            io._set, io.put_new = gated_set, gated_put_new
        delete, delete_dirs = io.delete, io.delete_dirs

        async def gated_delete(keys: Any) -> None:
            for key in keys:
                await self._astep(f"delete {key}")
                await delete([key])

        async def gated_delete_dirs(prefixes: Any) -> None:
            for prefix in prefixes:
                await self._astep(f"delete {prefix}/")
                await delete_dirs([prefix])

        io.delete, io.delete_dirs = gated_delete, gated_delete_dirs


class KillingStore(WrapperStore):
    """A Zarr store that SIGKILLs its process before its ``crash_at``-th write,
    leaving a stray temporary file as a killed local writer would.

    Parameters
    ----------
    store
        The store to wrap (a :class:`~zarr.storage.LocalStore` for the stray file).
    crash_at
        Which write (set, exclusive set, delete) to die before; None: never.
    log
        Collects the key of every write (shared by the copies zarr makes).
    """

    def __init__(self, store: Any, crash_at: int | None = None, log=None) -> None:
        super().__init__(store)
        self.crash_at = crash_at
        self.writes = 0
        self.log = log if log is not None else []

    def _with_store(self, store: Any) -> KillingStore:
        return type(self)(store, self.crash_at, self.log)

    async def _write(self, key: str, op: str, *args: Any) -> Any:
        self.writes += 1
        self.log.append(key)
        if self.writes == self.crash_at:
            root = getattr(self._store, "root", None)
            if root is not None:
                stray = Path(root) / f"{key}.{os.getpid()}.partial"
                stray.parent.mkdir(parents=True, exist_ok=True)
                stray.write_bytes(b"torn")
            os.kill(os.getpid(), signal.SIGKILL)
        return await getattr(self._store, op)(key, *args)

    async def set(self, key: str, value: Any, byte_range: Any = None) -> None:
        return await self._write(key, "set", value)

    async def set_if_not_exists(self, key: str, value: Any) -> None:
        return await self._write(key, "set_if_not_exists", value)

    async def delete(self, key: str) -> None:
        return await self._write(key, "delete")

    async def delete_dir(self, prefix: str) -> None:
        return await self._write(prefix, "delete_dir")


# -- damage ------------------------------------------------------------------------


def object_kind(root: Path, path: Path) -> str:
    """What a file of a local dask_ftps store is (``"log:commit"``, ``"payload"``,
    ``"snapshot-meta"``, ...)."""
    rel = path.relative_to(root).as_posix()
    if rel == "zarr.json":
        return "root"
    if rel in ("data/zarr.json", "snapshots/zarr.json"):
        return "group"
    if rel.startswith("ftps/log/"):
        try:
            return "log:" + json.loads(path.read_bytes()[:-4])["kind"]
        except (ValueError, KeyError):
            return "log:?"
    if rel.startswith("data/"):
        return "payload-meta" if rel.endswith("zarr.json") else "payload"
    if rel.startswith("snapshots/"):
        return "snapshot-meta" if rel.endswith("zarr.json") else "snapshot"
    return "other"


def store_objects(root: str | os.PathLike) -> dict[str, list[Path]]:
    """Every file of a local store, by :func:`object_kind`, oldest name first."""
    root = Path(root)
    out: dict[str, list[Path]] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if not path.name.endswith(".partial"):
            out.setdefault(object_kind(root, path), []).append(path)
    return out


def damage(path: Path, how: str, rng: np.random.Generator) -> str:
    """Damage one file: ``"flip"`` one random bit, ``"truncate"`` it to a random
    shorter length, or ``"delete"`` it. Returns what was done."""
    if how == "delete":
        path.unlink()
        return f"deleted {path.name}"
    data = bytearray(path.read_bytes())
    if how == "flip":
        bit = int(rng.integers(8 * len(data)))
        data[bit // 8] ^= 1 << (bit % 8)
        path.write_bytes(bytes(data))
        return f"flipped bit {bit} of {path.name}"
    if how == "truncate":
        size = int(rng.integers(len(data)))
        path.write_bytes(bytes(data[:size]))
        return f"truncated {path.name} to {size} of {len(data)} bytes"
    raise ValueError(f"unknown damage {how!r}; one of {DAMAGES}")


# -- the damage sweep ----------------------------------------------------------------


def start_offline(path: str) -> tuple[int, Any]:
    """What a starting server does to a store, with no cluster: open, rebuild,
    claim, clean up. Returns ``(incarnation, state)``."""
    import asyncio

    from dask_ftps._recovery import rebuild
    from dask_ftps._store import Journal, take_over

    async def start():
        async def opened():
            return await Journal.open(path)

        async def rebuilt(journal):
            return (await rebuild(journal)).state

        async def not_alive(*args):
            return False

        journal, incarnation, state = await take_over(
            opened, "tcp://dask-ftps-testing:1", not_alive, rebuilt
        )
        await journal.cleanup()
        await journal.close()
        return incarnation, state

    return asyncio.run(start())


def start_preloaded(
    path: str, storage_options: dict | None = None
) -> tuple[int, int, dict[str, np.ndarray]]:
    """Start a real scheduler (in this process) with the preload, as
    ``dask scheduler --preload dask_ftps.preload --ftps-store PATH`` does, and
    close it once it serves: ``(incarnation, version, params)`` it served.

    Raises
    ------
    StoreError
        The error that stopped the scheduler's start (a damaged store).
    LookupError
        If the scheduler started without a server (the store holds no run).
    """
    import asyncio

    from distributed import Scheduler

    from dask_ftps._exceptions import StoreError

    argv = ["--ftps-store", path]
    if storage_options is not None:
        argv += ["--ftps-storage-options", json.dumps(storage_options)]

    async def start() -> tuple[int, int, dict[str, np.ndarray]]:
        try:
            async with Scheduler(
                host="127.0.0.1",
                port=0,
                dashboard=False,
                dashboard_address="127.0.0.1:0",
                preload=["dask_ftps.preload"],
                preload_argv=[argv],
            ) as scheduler:
                plugin = scheduler.plugins.get("ftps")
                if plugin is None:
                    raise LookupError(f"{path}: the scheduler serves no run")
                state = plugin.server.state
                params = {k: v.copy() for k, v in state.model.params.items()}
                return int(state.incarnation), int(state.version), params
        except RuntimeError as e:  # "Scheduler failed to start."
            if isinstance(e.__cause__, StoreError):
                raise e.__cause__ from None
            raise

    return asyncio.run(start())


def _rebuild_offline(path: str, claim: bool) -> tuple[int, dict[str, np.ndarray]]:
    """The model a store rebuilds to: read only (``recover``), or as a scheduler
    started with the preload does it (:func:`start_preloaded`)."""
    from dask_ftps import recover

    if not claim:
        return recover(path)
    _, version, params = start_preloaded(path)
    return version, params


def _files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def damage_sweep(
    store: str | os.PathLike,
    workdir: str | os.PathLike,
    seed: int = 0,
    hows: tuple[str, ...] = DAMAGES,
    per_kind: int | None = None,
) -> list[dict[str, Any]]:
    """Damage every object of a local store in turn, each way, and classify what
    a rebuild makes of it.

    For each object and each damage, a fresh copy of ``store`` is damaged, then
    rebuilt with :func:`dask_ftps.recover` and by a real scheduler started with
    the preload (:func:`start_preloaded`: open, rebuild, claim, clean-up, on the
    path every restart takes). The outcome is

    - ``"detected"``: both refuse with :class:`~dask_ftps.StoreCorrupted` (or
      :class:`~dask_ftps.StoreFormatError`), and the refusing start changed no
      file;
    - ``"harmless"``: both give the undamaged model, version and bits;
    - ``"silent"``: anything else (a different model, or a refusal that deleted
      something).

    ``per_kind`` limits the objects damaged of each kind to that many (the
    oldest, the newest and others evenly between); None damages every one.

    Returns one dict per case: ``kind``, ``object``, ``how``, ``done``,
    ``outcome`` and ``error``.
    """
    import shutil

    from dask_ftps._exceptions import StoreCorrupted, StoreFormatError

    store, workdir = Path(store), Path(workdir)
    version, params = _rebuild_offline(str(store), claim=False)
    rng = np.random.default_rng(seed)
    rows = []
    for kind, paths in store_objects(store).items():
        if per_kind is not None and len(paths) > per_kind:
            picks = np.linspace(0, len(paths) - 1, per_kind).round().astype(int)
            paths = [paths[i] for i in sorted(set(picks))]
        for victim in paths:
            for how in hows:
                copy = workdir / "damaged.zarr"
                shutil.rmtree(copy, ignore_errors=True)
                shutil.copytree(store, copy)
                done = damage(copy / victim.relative_to(store), how, rng)
                outcome, error = "harmless", ""
                for claim in (False, True):
                    before = _files(copy) if claim else None
                    try:
                        got_version, got = _rebuild_offline(str(copy), claim)
                    except (StoreCorrupted, StoreFormatError) as e:
                        error = f"{type(e).__name__}: {e}"
                        outcome = "detected" if outcome != "silent" else outcome
                        if claim and _files(copy) != before:
                            outcome, error = (
                                "silent",
                                f"a refusing start changed files ({e})",
                            )
                        continue
                    same = got_version == version and all(
                        np.array_equal(got[k], v) for k, v in params.items()
                    )
                    if not same or outcome == "detected":
                        outcome = "silent"  # a different model, or a split verdict
                rows.append({
                    "kind": kind,
                    "object": victim.relative_to(store).as_posix(),
                    "how": how,
                    "done": done,
                    "outcome": outcome,
                    "error": error[:300],
                })  # fmt: skip
    return rows
