"""A stale owner paused at every step of its writes, on every kind of store.

The old owner of a store is paused (as by SIGSTOP or a hung VM) right before
one step of its next commit, snapshot or trim; a new owner opens the store
(adopting a whole commit it finds), claims it and trains on; then the old owner
resumes as if nothing happened. For every step, on a local folder, a Zarr
store object and S3 (a moto server on 127.0.0.1): every object the new owner's
run holds is unchanged, a restart rebuilds the new owner's model bit for bit,
and ``recover()`` agrees. The same through real processes: a preload scheduler
stopped by SIGSTOP right before it creates a commit's record.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from distributed import Client
from distributed.utils import open_port
from zarr.storage import LocalStore, WrapperStore

import dask_ftps
from dask_ftps import SGD, Fenced, ParameterServer
from dask_ftps._recovery import rebuild
from dask_ftps._store import Journal, resolve
from dask_ftps._store._format import DATA_PREFIX, log_key, parse_data_key
from dask_ftps.testing import STOP_ENV, PauseWrites

from .conftest import BUCKET
from .test_journal import SPEC, _copy, assert_state, commit, scenario, scripted_updates
from .test_journal import snapshot as take_snapshot


async def _old_owners_script(journal: Journal, state) -> None:
    """What the old owner does next: a commit, a snapshot (its array, its record,
    a trim) and another commit."""
    updates = scripted_updates(state, SPEC, 3)
    await commit(journal, state, updates, 2)
    await take_snapshot(journal, state, keep=1)
    await commit(journal, state, updates, 1)


async def _count_steps(make) -> int:
    await scenario(make(), keep=1)
    journal = await Journal.open(make())
    await journal.claim("tcp://old:1")
    state = (await rebuild(journal)).state
    gate = PauseWrites(journal.io, None)
    await _old_owners_script(journal, state)
    await journal.close()
    return gate.steps


async def _stale_owner_case(make, k: int, objects, new_snapshots: bool) -> dict:
    """Pause the old owner before its step ``k``, take over, train (and take a
    snapshot, which trims what came before, if ``new_snapshots``), resume it;
    check the new owner's objects, a restart and recover()."""
    await scenario(make(), keep=1)
    old = await Journal.open(make())
    await old.claim("tcp://old:1")
    old_state = (await rebuild(old)).state
    gate = PauseWrites(old.io, k)
    stale = asyncio.ensure_future(_old_owners_script(old, old_state))
    while not gate.reached.is_set():
        assert not stale.done(), f"the old owner ended before its step {k}"
        await asyncio.sleep(0.001)

    new = await Journal.open(make())
    adopted = new.adopted is not None
    new_state = (await rebuild(new)).state
    await new.claim("tcp://new:1")
    await new.cleanup()
    updates = scripted_updates(new_state, SPEC, 6)
    for _ in range(3):
        await commit(new, new_state, updates, 2)
    if new_snapshots:
        await take_snapshot(new, new_state, keep=1)
    expected = _copy(new_state)
    held = {k: v for k, v in (await objects()).items() if _needed(new, k)}

    gate.release()
    try:
        await stale
        outcome = "went on"  # paused after its last record: nothing to fence
    except Fenced:
        outcome = "fenced"
    except Exception as e:  # noqa: BLE001 - any failure of the old owner is fine
        outcome = f"failed: {e!r}"
    await old.close()

    after = await objects()
    changed = sorted(k for k, v in held.items() if after.get(k) != v)
    assert not changed, (k, gate.paused_at, outcome, changed)
    # A restart: open, rebuild, claim, clean up; then what recover() says.
    restarted = await Journal.open(make())
    assert_state((await rebuild(restarted)).state, expected)
    await restarted.claim("tcp://restart:1")
    await restarted.cleanup()
    # No payload array at or below the claim that no commit record names is left.
    for name in await restarted.io.list_dir(DATA_PREFIX.rstrip("/")):
        parsed = parse_data_key(f"{DATA_PREFIX}{name}/")
        if parsed is None or parsed[0] > restarted.claim_serial:
            continue
        record = restarted.records.get(parsed[0])
        assert record is not None and record.kind == "commit", name
        assert record.body.data.key == f"{DATA_PREFIX}{name}", name
    await restarted.close()
    await new.close()
    return {
        "adopted": adopted,
        "outcome": outcome,
        "step": gate.paused_at,
        "expected": expected,
    }


def _needed(journal: Journal, key: str) -> bool:
    """Whether the object ``key`` (relative to the store) is part of what the
    journal's newest snapshot and the log after it need: a stale owner may
    delete only what lies below a snapshot it published itself."""
    newest = journal.snapshots()[0]
    first = newest.body.first_serial
    prefixes = [newest.body.array.key + "/", "zarr.json"]
    for serial, record in journal.records.items():
        if serial >= first:
            prefixes.append(log_key(serial))
            if record.kind == "commit":
                prefixes.append(record.body.data.key + "/")
            if record.kind == "snapshot":
                prefixes.append(record.body.array.key + "/")
    return any(key.split(".zarr/", 1)[-1].startswith(p) for p in prefixes)


def _local_objects(path: Path):
    async def objects() -> dict[str, bytes]:
        return {
            p.relative_to(path).as_posix(): p.read_bytes()
            for p in sorted(path.rglob("*"))
            if p.is_file() and not p.name.endswith(".partial")
        }

    return objects


def _sweep(make, objects, recover, variants=(False, True)) -> list[dict]:
    total = asyncio.run(_count_steps(make["count"]))
    assert total >= 10  # chunks, copies of records, records, snapshot chunks, trims
    cases = []
    for k, new_snapshots in itertools.product(range(1, total + 1), variants):
        case = asyncio.run(
            _stale_owner_case(
                make[k, new_snapshots], k, objects(k, new_snapshots), new_snapshots
            )
        )
        version, params = recover(k, new_snapshots)
        assert version == case["expected"][0]
        for name, value in case["expected"][1].items():
            np.testing.assert_array_equal(params[name], value)
        cases.append(case)
    steps = " ".join(c["step"].split()[0] for c in cases)
    assert "create" in steps and "delete" in steps and "write" in steps
    # The reported case is among them: a whole commit adopted by the new owner
    # while the old one was paused before its record, then fenced off.
    assert any(c["adopted"] and c["outcome"] == "fenced" for c in cases), cases
    return cases


class _Folders:
    """A store per case, made by ``factory(path)``."""

    def __init__(self, tmp_path: Path, factory) -> None:
        self.tmp_path, self.factory = tmp_path, factory

    def path(self, *k) -> Path:
        return self.tmp_path / f"run{'-'.join(map(str, k))}.zarr"

    def __getitem__(self, k):
        return lambda: self.factory(
            str(self.path(*(k if isinstance(k, tuple) else (k,))))
        )


@pytest.mark.parametrize("kind", ["local-folder", "zarr-store-object"])
def test_a_stale_owner_paused_at_any_write_step_changes_nothing(tmp_path, kind):
    factory = str if kind == "local-folder" else (
        lambda p: WrapperStore(LocalStore(p))  # a Store that is no LocalStore
    )  # fmt: skip
    folders = _Folders(tmp_path, factory)
    _sweep(
        folders,
        lambda *k: _local_objects(folders.path(*k)),
        lambda *k: dask_ftps.recover(str(folders.path(*k))),
    )


@pytest.mark.slow
def test_a_stale_owner_paused_at_any_write_step_changes_nothing_on_s3(s3):
    import s3fs
    from zarr.storage import FsspecStore

    options = {**s3, "skip_instance_cache": True}
    prefix = f"{BUCKET}/stale-{time.time_ns()}"
    fs = s3fs.S3FileSystem(**options)

    def url(*k) -> str:
        return f"s3://{prefix}/run{'-'.join(map(str, k))}.zarr"

    class Stores:
        def __getitem__(self, k):
            k = k if isinstance(k, tuple) else (k,)
            return lambda: FsspecStore.from_url(url(*k), storage_options=options)

    def objects(*k):
        async def listed() -> dict[str, bytes]:
            fs.invalidate_cache()
            keys = sorted(fs.find(url(*k).removeprefix("s3://")))
            return dict(zip(keys, fs.cat(keys).values() if keys else [], strict=True))

        return listed

    _sweep(Stores(), objects, lambda *k: dask_ftps.recover(url(*k), storage_options=s3))


def test_an_exclusive_create_never_replaces_an_object_on_any_store(tmp_path, s3):
    """What fencing rests on: creating a log record that exists fails and leaves
    it as it was, on each kind of store."""
    from zarr.storage import FsspecStore

    url = f"s3://{BUCKET}/create-{time.time_ns()}.zarr"
    stores = {
        "local-folder": str(tmp_path / "a.zarr"),
        "zarr-store-object": WrapperStore(LocalStore(str(tmp_path / "b.zarr"))),
        "s3": FsspecStore.from_url(url, storage_options=s3),
    }

    async def check(store) -> None:
        io = resolve(store)
        try:
            assert await io.put_new("ftps/log/0000000000000001", b"first")
            assert not await io.put_new("ftps/log/0000000000000001", b"second")
            assert await io.get("ftps/log/0000000000000001") == b"first"
        finally:
            await io.close()

    for store in stores.values():
        asyncio.run(check(store))


@pytest.mark.slow
def test_a_scheduler_stopped_before_a_commits_record_deletes_nothing(tmp_path):
    """Real processes, the reported window: the owning scheduler stops (SIGSTOP)
    after a commit's payload array is whole and before its log record exists. A
    scheduler started with the preload on another port adopts the commit and
    trains the run to its end; the old one resumes, is fenced off and deletes
    nothing: the run is exact, every minibatch once, and a restart serves it."""
    from .test_scheduler_loss import MODEL as SMALL_MLP
    from .test_scheduler_loss import (
        _background,
        _poll,
        _same_model,
        _served,
        _status,
        expected_ids,
        scheduler,
        train,
        wait_for_workers,
        workers,
    )

    store = str(tmp_path / "run.zarr")
    ports = open_port(), open_port(), open_port()
    old_address, new_address, _ = (f"tcp://127.0.0.1:{p}" for p in ports)
    fast = {"DASK_FTPS__STORE__OWNER_TIMEOUT": "1s", "DASK_FTPS__WAIT_TIMEOUT": "20s"}
    # The log's 13th record create: creation, claim and the run's record come
    # first, then commits (no snapshot and no epoch's end before it).
    stop = {**fast, STOP_ENV: "ftps/log/:13"}
    total = len(expected_ids())
    with (
        # (a kill pattern that matches nothing: the testing preload, to stop)
        scheduler(ports[0], store, "nothing:1", env=stop) as old,
        workers(old_address, env=fast),
        Client(old_address, timeout="60s") as old_client,
    ):
        wait_for_workers(old_client, 2)
        old_client.register_plugin(
            ParameterServer(
                store, model=SMALL_MLP, optimizer=SGD(lr=0.05, momentum=0.5),
                snapshot_every=10_000,
            )
        )  # fmt: skip
        _background(train, old_client)
        stopped = psutil.Process(old.pid)
        _poll(
            lambda: stopped.status() == psutil.STATUS_STOPPED,
            what="the old scheduler to stop before a record",
        )
        try:
            with (
                # No snapshot: the adopted commit stays in what a rebuild reads.
                scheduler(
                    ports[1], store, None, "--ftps-snapshot-every", "10000", env=fast
                ) as new,
                workers(new_address, env=fast),
                Client(new_address, timeout="60s") as new_client,
            ):
                wait_for_workers(new_client, 2)
                assert _status(new_client)["incarnation"] == 2
                old.send_signal(signal.SIGCONT)
                _poll(
                    lambda: "fenced" in str(_status(old_client).get("failed")),
                    what="the old owner to learn it was fenced",
                )
                assert _same_model(new_client, store) == _status(new_client)["version"]
                result = train(new_client)
                assert result.minibatches == total
                info = dask_ftps.inspect(store)
                ids = [row["update_id"] for row in info["global"]]
                assert sorted(ids) == sorted(expected_ids())  # each once
                assert _same_model(new_client, store) == total
                new.send_signal(signal.SIGKILL)
                new.wait(30)
        finally:
            old.send_signal(signal.SIGCONT)
    with scheduler(ports[2], store) as restarted:
        served = _served(ports[2], restarted)
        assert served is not None, "the restarted scheduler did not serve"
        assert (served["version"], served["updates"]) == (total, total)
    assert dask_ftps.recover(store)[0] == total
