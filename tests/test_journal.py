"""The Zarr journal alone: exact rebuild, crashes at every write, damage, fencing.

Every store here is real (files on disk, or a Zarr store object); crashes are
real SIGKILLs of a forked child.
"""

from __future__ import annotations

import asyncio
import copy
import errno
import itertools
import json
import logging
import multiprocessing
import os
import shutil
import signal
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from distributed.utils_test import captured_logger
from zarr.storage import LocalStore, MemoryStore

import dask_ftps
from dask_ftps import (
    SGD,
    Adam,
    Fenced,
    NotDurable,
    SpecMismatch,
    StoreCorrupted,
    StoreFormatError,
    StoreLocked,
)
from dask_ftps._core import RunSpec, Update, UpdateKey
from dask_ftps._recovery import rebuild
from dask_ftps._server import snapshot_point
from dask_ftps._state import ParameterServerState
from dask_ftps._store import Journal, RunMeta, resolve, take_over
from dask_ftps._store._format import SHARD_ROWS, parse_root
from dask_ftps.models import MLP, SoftmaxRegression
from dask_ftps.testing import (
    DAMAGES,
    KillingStore,
    damage_sweep,
    kill_at,
    start_offline,
    store_objects,
)

from .conftest import digits

MODEL = MLP(n_features=64, hidden=(16,), n_classes=10, seed=0)
OPTIMIZER = SGD(lr=0.1, momentum=0.9)
SPEC = RunSpec((600, 600, 147), batch_size=40, epochs=2)
SCENARIO_BATCHES = (1, 2, 3, 1, 2, 1, 3, 2, 1, 2)  # group commits of these sizes
SNAPSHOT_AFTER = (2, 5)  # after these batches: snapshot, then trim
ADDRESS = "tcp://scheduler:1"


def scripted_updates(
    state: ParameterServerState, spec: RunSpec, n: int, formats=("dense",)
):
    """Deterministic digits minibatch updates, computed from the live model, in
    the update formats ``formats`` in turn."""
    X, _, y, _ = digits()
    bounds = np.cumsum((0, *spec.shard_sizes))  # the spec's shards
    parts = [np.arange(a, b) for a, b in itertools.pairwise(bounds)]
    for i in range(n):
        run = state.runs[-1]
        shard = min(range(spec.n_shards), key=lambda s: (run.clocks[s], s))
        epoch, step = run.next_step(shard)
        rows = parts[shard][
            np.array_split(np.arange(len(parts[shard])), spec.steps[shard])[step]
        ]
        _, grads, _ = MODEL.loss_and_grad(
            state.model.params,
            X[rows],
            y[rows],
            update_format=formats[i % len(formats)],
        )
        yield Update(UpdateKey(run.run, epoch, shard, step), f"tcp://w{shard}:1", grads)


async def commit(journal: Journal, state: ParameterServerState, updates, n=None):
    """Admit each update as it comes (an iterator computes it from the state), then
    make the batch durable, as the server's commit loop does."""
    batch, versions = [], []
    for update in updates if n is None else (next(updates) for _ in range(n)):
        admission = state.admit(update)
        state.commit(admission, state.merge(admission))
        batch.append(update)
        versions.append(int(admission.version))
    await journal.commit(
        batch, versions, int(state.version), state.model.params, state.downloads
    )


async def snapshot(journal: Journal, state: ParameterServerState, keep: int) -> None:
    model, replay_from, entries = snapshot_point(state)
    array = await journal.write_snapshot(model)
    await journal.publish(
        array, int(model.version), replay_from, journal.head.serial, entries, (),
        ADDRESS,
    )  # fmt: skip
    await journal.trim(keep)


async def scenario(store, mode: str = "async", acked: Path | None = None, keep=1):
    """Create, claim, begin a run, commit batches, snapshot and trim.

    Returns the live state at each commit point, keyed by ``(committed, runs)``;
    with ``acked``, appends each acknowledged commit's count to that file.
    """
    state = ParameterServerState(MODEL, OPTIMIZER, mode=mode)
    journal = await Journal.create(
        store, RunMeta(MODEL, OPTIMIZER, mode, 0), state.model
    )
    await journal.claim(ADDRESS)
    states = {(0, 0): _copy(state)}
    run = state.begin_run(SPEC)
    await journal.record_run(0, "", SPEC, int(run.base_version))
    states[0, 1] = _copy(state)
    updates = scripted_updates(state, SPEC, sum(SCENARIO_BATCHES))
    for b, size in enumerate(SCENARIO_BATCHES):
        await commit(journal, state, updates, size)
        states[journal.committed, 1] = _copy(state)
        if acked is not None:
            with acked.open("a") as f:
                f.write(f"{journal.committed}\n")
        if b in SNAPSHOT_AFTER:
            await snapshot(journal, state, keep)
    await journal.close()
    return states


def _copy(state: ParameterServerState):
    return (
        int(state.version),
        {k: v.copy() for k, v in state.model.params.items()},
        {k: v.copy() for k, v in state.model.opt_state.items()},
        [list(r.clocks) for r in state.runs],
    )


def assert_state(state: ParameterServerState, expected) -> None:
    version, params, opt_state, clocks = expected
    assert int(state.version) == version
    for name, value in params.items():
        np.testing.assert_array_equal(state.model.params[name], value)
    for name, value in opt_state.items():
        np.testing.assert_array_equal(state.model.opt_state[name], value)
    assert [list(r.clocks) for r in state.runs] == clocks


def payload_serial(root: Path, p: Path, shard: bool = False) -> int | None:
    """The serial of a commit's own payload array (its folder) or of a shard of a
    rows array (with ``shard``, only of a shard); None for anything else."""
    from dask_ftps._store._format import parse_data_key, parse_shard_key

    key = p.relative_to(root).as_posix()
    parsed = parse_shard_key(key)
    if parsed is None and not shard and p.is_dir():
        parsed = parse_data_key(key + "/")
    return None if parsed is None else parsed[0]


def payload_serials(root: Path) -> list[tuple[int, bool]]:
    """``(serial, is a shard)`` of every payload a store holds."""
    out = []
    for p in (root / "data").rglob("*"):
        serial = payload_serial(root, p)
        if serial is not None:
            out.append((serial, payload_serial(root, p, shard=True) is not None))
    return out


def reopen(path) -> tuple[Journal | None, ParameterServerState | None]:
    async def run():
        journal = await Journal.open(path)
        if journal is None:
            return None, None
        return journal, (await rebuild(journal)).state

    return asyncio.run(run())


async def _not_alive(journal, incarnation, address) -> bool:
    return False


start = start_offline  # what a server's start does: open, rebuild, claim, clean up


# -- crashes at every write ---------------------------------------------------------


def _crash_child(path: str, mode: str, crash_at: int, local: bool, acked: str) -> None:
    logging.disable(logging.CRITICAL)
    if local:  # the real file operations of the local fast path
        kill_at(".*", crash_at)
        store = path
    else:  # through a Zarr store's public methods
        store = KillingStore(LocalStore(path), crash_at=crash_at)
    asyncio.run(scenario(store, mode, acked=Path(acked)))
    os._exit(0)  # the crash point was past the end


def _count_writes(tmp_path, mode: str, local: bool) -> int:
    if not local:
        counter = KillingStore(LocalStore(str(tmp_path / "count.zarr")))
        asyncio.run(scenario(counter, mode))
        return counter.writes
    ctx = multiprocessing.get_context("fork")
    total = 0
    while True:  # the first k with no crash is one past the last write
        total += 1
        child = ctx.Process(
            target=_crash_child,
            args=(str(tmp_path / f"count{total}.zarr"), mode, total, True, os.devnull),
        )
        child.start()
        child.join(60)
        shutil.rmtree(tmp_path / f"count{total}.zarr", ignore_errors=True)
        if child.exitcode == 0:
            return total - 1


@pytest.mark.parametrize("local", [True, False], ids=["local-files", "zarr-store"])
@pytest.mark.parametrize("mode", ["async", "sync"])
def test_crash_at_every_write_opens_at_a_commit_point_bit_exact(tmp_path, mode, local):
    """SIGKILL before write k, for every k, in a real child; reopen and start.

    Every outcome is a commit point of the live run, at or after the last
    acknowledged commit (nothing acknowledged is lost), rebuilt bit for bit, and
    a start on it (claim and cleanup) keeps it exact.
    """
    reference = asyncio.run(scenario(str(tmp_path / "reference.zarr"), mode))
    total = _count_writes(tmp_path, mode, local)
    assert total > 40  # commits, snapshots and trims are all in the sweep
    ctx = multiprocessing.get_context("fork")
    seen = set()
    for k in range(1, total + 2):
        path = str(tmp_path / f"crash{k}.zarr")
        acked = tmp_path / f"acked{k}"
        acked.touch()
        child = ctx.Process(
            target=_crash_child, args=(path, mode, k, local, str(acked))
        )
        child.start()
        child.join(60)
        assert child.exitcode == (-signal.SIGKILL if k <= total else 0), k
        journal, state = reopen(path)
        if journal is None:  # died before the first record: start afresh
            assert not acked.read_text()
            fresh = asyncio.run(scenario(path, mode))
            assert fresh.keys() == reference.keys()
            continue
        last_acked = max(map(int, acked.read_text().split() or ["0"]))
        assert journal.committed >= last_acked, k  # no acknowledged commit lost
        outcome = (journal.committed, len(state.runs))
        seen.add(outcome)
        assert_state(state, reference[outcome])
        incarnation, restarted = start(path)
        assert incarnation == journal.incarnation + 1
        assert_state(restarted, reference[outcome])
        assert not list(Path(path).glob("**/*.partial"))  # removed by the start
        again, state = reopen(path)
        assert again.committed == outcome[0]
        assert_state(state, reference[outcome])
    assert seen == set(reference)  # every commit point was an outcome


def test_a_start_removes_what_lies_past_the_log_and_says_so(tmp_path):
    path = tmp_path / "run.zarr"
    states = asyncio.run(scenario(str(path)))
    journal, _ = reopen(str(path))
    head = journal.head.serial
    # Leftovers of a dead writer: a payload array of a commit that has no record
    # (torn: no zarr.json), a stale attempt at the serial of the claim to come,
    # an unfinished old snapshot, a stray temporary file. Past the claim, another
    # writer's folder may be a later owner's: it stays (later trims take it).
    torn = path / "data" / f"{head + 1:016d}.deadbeef0000"
    torn.mkdir()
    (torn / "c.0.0").write_bytes(b"x" * 100)
    later = path / "data" / f"{head + 7:016d}.cafe00000000"
    later.mkdir()
    old_snapshot = path / "snapshots" / "v000000000001.deadbeef0000"
    old_snapshot.mkdir()
    (path / "ftps" / "log" / "0000000000000003.abc.partial").write_bytes(b"x")
    with captured_logger("dask_ftps._store._journal", level=logging.INFO) as log:
        _, state = start(str(path))
    assert "1 stray temporary files" in log.getvalue()
    assert "'payloads': 1, 'snapshots': 1" in log.getvalue()
    assert not torn.exists() and not old_snapshot.exists()
    assert later.exists()
    assert not list(path.glob("**/*.partial"))
    assert_state(state, states[max(states)])


def test_a_commit_whose_record_was_lost_is_adopted_from_its_payload_array(tmp_path):
    """The payload array repeats its commit's record: deleting the newest record
    (or dying before writing it) changes nothing."""
    path = tmp_path / "run.zarr"
    states = asyncio.run(scenario(str(path)))
    journal, _ = reopen(str(path))
    newest = path / "ftps" / "log" / f"{journal.head.serial:016d}"
    assert journal.head.kind == "commit"
    newest.unlink()
    with captured_logger("dask_ftps._store._journal", level=logging.WARNING) as log:
        version, _params = dask_ftps.recover(str(path))
    assert "adopted" in log.getvalue()
    assert version == states[max(states)][0]
    _, state = start(str(path))
    assert_state(state, states[max(states)])
    assert newest.exists()  # written back by the start


# -- damage ------------------------------------------------------------------------


async def extend(path: str):
    """A new owner's claim, an epoch's history, a new run and its commits after
    the snapshots (one of factored and dense rows): a store that holds every kind
    of record. Returns its state."""
    journal = await Journal.open(path)
    state = (await rebuild(journal)).state
    await journal.claim("tcp://second:1")
    state.record_epoch(0, 0, {"loss": 1.5, "accuracy": None})
    await journal.record_epoch(0, 0, {"loss": 1.5, "accuracy": None})
    spec = RunSpec((300, 300), batch_size=50, epochs=1)
    run = state.begin_run(spec, "more")
    await journal.record_run(int(run.run), "more", spec, int(run.base_version))
    updates = scripted_updates(state, spec, 4, formats=("dense", "factored"))
    await commit(journal, state, updates, 1)
    await commit(journal, state, updates, 3)
    await journal.close()
    return _copy(state)


@pytest.mark.parametrize("how", DAMAGES)
def test_damage_to_any_object_is_detected_or_harmless_never_silent(tmp_path, how):
    """Every object of a store with two snapshots kept, commits, a claim, a run and
    an epoch's history after them: flip a bit, truncate it or delete it.
    recover() and a starting server name the damage or give the same model; a
    start that refuses deletes nothing."""
    original = tmp_path / "original.zarr"
    asyncio.run(scenario(str(original), keep=2))
    asyncio.run(extend(str(original)))
    kinds = set(store_objects(original))
    assert {
        "root", "group", "log:claim", "log:run", "log:epoch", "log:commit",
        "log:snapshot", "payload", "payload-meta", "snapshot", "snapshot-meta",
    } <= kinds  # fmt: skip
    rows = damage_sweep(original, tmp_path, seed=0, hows=(how,))
    assert len(rows) == sum(len(p) for p in store_objects(original).values())
    silent = [r for r in rows if r["outcome"] == "silent"]
    assert not silent, silent
    outcomes = Counter((r["kind"], r["outcome"]) for r in rows)
    # The newest snapshot's chunks fall back to the one before: harmless.
    assert outcomes["snapshot", "harmless"] > 0, outcomes
    assert outcomes["payload", "detected"] > 0, outcomes


def test_damage_to_a_snapshot_written_last_falls_back_exactly(tmp_path):
    """The newest snapshot is the last object written (no commit after it): any
    damage to one of its chunks is caught by its checksum, and recover() and a
    start with the preload fall back to the snapshot before it plus replay, to
    the same model."""
    from dask_ftps.testing import start_preloaded

    original = tmp_path / "original.zarr"
    states = asyncio.run(scenario(str(original), keep=2))

    async def snapshot_last() -> Path:
        journal = await Journal.open(str(original))
        state = (await rebuild(journal)).state
        await journal.claim(ADDRESS)
        await snapshot(journal, state, keep=2)
        await journal.close()
        return original / journal.head.body.array.key

    newest = asyncio.run(snapshot_last())
    expected = states[max(states)]
    chunks = sorted(newest.glob("c.*"))
    assert chunks
    n_params = sum(v.size for v in expected[1].values())
    cases = []
    for chunk in chunks:
        size = chunk.stat().st_size
        # A bit of the first value, of a parameter, of the optimizer's state (the
        # chunk holds both, parameters first), of the trailer; a truncation.
        for byte in sorted({0, min(n_params * 2, size - 5), size - 8, size - 2}):
            cases.append((chunk, byte))
        cases.append((chunk, None))
    for chunk, byte in cases:
        copy = tmp_path / "damaged.zarr"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(original, copy)
        target = copy / chunk.relative_to(original)
        raw = bytearray(target.read_bytes())
        if byte is None:
            del raw[-7:]
        else:
            raw[byte] ^= 0x40
        target.write_bytes(bytes(raw))
        done = f"{chunk.name}: {'truncated' if byte is None else f'byte {byte}'}"
        _, state = reopen(str(copy))  # parameters and optimizer state
        assert_state(state, expected)
        got_version, got = dask_ftps.recover(str(copy))
        _, started_version, started = start_preloaded(str(copy))
        assert got_version == started_version == expected[0], done
        for name, value in expected[1].items():
            np.testing.assert_array_equal(got[name], value, err_msg=done)
            np.testing.assert_array_equal(started[name], value, err_msg=done)


def _failed_attempt_then(path: str, then: str) -> tuple[int, tuple]:
    """A store whose writer failed a commit after its payload array was whole
    (no space for the record), then went on with ``then``: ``"commit"`` (another
    batch at the same serial, acknowledged) or ``"release"`` (a clean close at
    that serial). Returns the serial and the live state."""

    async def run():
        await scenario(path, keep=1)
        journal = await Journal.open(path)
        await journal.claim(ADDRESS)
        state = (await rebuild(journal)).state
        refused = copy.deepcopy(state)
        create = journal.io._create

        def no_space(key, value):
            raise OSError(errno.ENOSPC, "No space left on device", key)

        journal.io._create = no_space
        with pytest.raises(NotDurable):
            await commit(journal, refused, scripted_updates(refused, SPEC, 2), 2)
        journal.io._create = create
        if then == "commit":
            await commit(journal, state, scripted_updates(state, SPEC, 1), 1)
        else:
            await journal.release("closed")
        await journal.close()
        return journal.head.serial, _copy(state)

    return asyncio.run(run())


@pytest.mark.parametrize("order", [sorted, lambda n: sorted(n, reverse=True)])
@pytest.mark.parametrize("then", ["commit", "release"])
def test_a_failed_attempts_array_never_stands_in_for_a_damaged_record(
    tmp_path, monkeypatch, then, order
):
    """A refused batch's whole array stays at its serial (a start may have
    adopted it). With the record at that serial damaged, only the array the
    record was the copy of stands in for it, whatever order the store lists
    them in: the next attempt's (the acknowledged batch), or none (a release
    record: the damage is named), and a start deletes nothing acknowledged."""
    from dask_ftps._store import _journal

    path = tmp_path / "run.zarr"
    serial, expected = _failed_attempt_then(str(path), then)
    # The first attempt is a shard of the writer's rows array, the next one (a
    # new name: the first may have been adopted) an array of its own.
    payloads = sorted(
        (p for p in (path / "data").rglob("*") if payload_serial(path, p) == serial),
        key=lambda p: not payload_serial(path, p, shard=True),
    )
    assert len(payloads) == (2 if then == "commit" else 1)
    listed = _journal._payload_keys

    async def in_order(io, names):
        return {s: order(keys) for s, keys in (await listed(io, names)).items()}

    monkeypatch.setattr(_journal, "_payload_keys", in_order)
    record = path / "ftps" / "log" / f"{serial:016d}"
    raw = bytearray(record.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    record.write_bytes(bytes(raw))
    if then == "release":
        with pytest.raises(StoreCorrupted, match=f"{serial:016d}"):
            dask_ftps.recover(str(path))
        return
    version, params = dask_ftps.recover(str(path))
    assert version == expected[0]
    for name, value in expected[1].items():
        np.testing.assert_array_equal(params[name], value)
    _, state = start(str(path))
    assert_state(state, expected)
    assert payloads[-1].exists()  # the acknowledged attempt's array


def test_a_changed_digit_in_the_newest_record_changes_nothing_and_deletes_nothing(
    tmp_path,
):
    """The reported case: one digit of the commit point changed made the store open
    two updates early, and the next writer deleted them. Now the record fails its
    checksum and its copy in the payload array serves; with the copy damaged
    too, the store is refused with the record's name and nothing is deleted."""
    path = tmp_path / "run.zarr"
    states = asyncio.run(scenario(str(path)))
    expected = states[max(states)]
    journal, _ = reopen(str(path))
    head = journal.head
    key = path / "ftps" / "log" / f"{head.serial:016d}"
    raw = key.read_bytes()
    seq = f'"seq":{head.body.seq}'.encode()
    assert seq in raw
    key.write_bytes(raw.replace(seq, f'"seq":{head.body.seq - 2}'.encode()))
    with captured_logger("dask_ftps._store._journal", level=logging.WARNING) as log:
        _, state = start(str(path))
    assert f"log record {head.serial} is damaged" in log.getvalue()
    assert_state(state, expected)
    info = dask_ftps.inspect(str(path))
    assert info["updates"] == max(states)[0]
    assert info["read_from_copies"] == [head.serial] and len(info["damaged"]) == 1

    copy = path / head.body.data.key  # a shard: the record's copy is in it
    assert head.body.data.shard
    copy.write_bytes(copy.read_bytes().replace(b'"seq"', b'"sEq"'))
    files = sorted(p.relative_to(path) for p in path.rglob("*"))
    with pytest.raises(StoreCorrupted, match="checksum mismatch") as error:
        start(str(path))
    assert error.value.key == f"ftps/log/{head.serial:016d}"
    assert sorted(p.relative_to(path) for p in path.rglob("*")) == files


# -- offline tools and stores ----------------------------------------------------------


def test_recover_and_inspect_offline_any_number_of_times(tmp_path):
    path = str(tmp_path / "run.zarr")
    states = asyncio.run(scenario(path))
    committed = max(states)[0]
    for _ in range(3):
        version, params = dask_ftps.recover(path)
        assert version == states[committed, 1][0]
        for name, value in states[committed, 1][1].items():
            np.testing.assert_array_equal(params[name], value)
        info = dask_ftps.inspect(path)
    assert info["version"] == version
    assert info["updates"] == committed
    assert info["incarnation"] == 1
    assert len(info["global"]) == committed - info["first_row"]
    assert {"update_id", "worker", "version"} == set(info["global"][0])
    assert info["model"]["kind"] == "MLP"
    assert info["runs"][0]["shard_sizes"] == list(SPEC.shard_sizes)
    assert info["damaged"] == []


def test_bad_stores_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        dask_ftps.recover(str(tmp_path / "missing.zarr"))
    empty = tmp_path / "empty.zarr"
    empty.mkdir()
    with pytest.raises(StoreFormatError, match="holds no committed dask_ftps run"):
        dask_ftps.inspect(str(empty))
    foreign = tmp_path / "foreign.zarr"
    foreign.mkdir()
    (foreign / "zarr.json").write_text(
        json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}})
    )
    (foreign / "ftps").mkdir()
    (foreign / "ftps" / "log").mkdir()
    (foreign / "ftps" / "log" / f"{0:016d}").write_bytes(b"junk")
    with pytest.raises(StoreFormatError, match="not written by dask_ftps"):
        dask_ftps.recover(str(foreign))
    with pytest.raises(TypeError, match="store must be"):
        dask_ftps.recover(42)
    with pytest.raises(TypeError, match="storage_options apply to an fsspec URL"):
        dask_ftps.recover(str(empty), storage_options={"anon": True})


@pytest.mark.parametrize("version", [1, 6])
def test_a_store_of_another_format_version_is_refused(tmp_path, version):
    """A store written by an earlier dask_ftps (format 1: a commit document, no
    log) or a later one is named as such, not taken for an empty or damaged
    one."""
    from dask_ftps._store._format import canonical, crc32c

    path = tmp_path / "old.zarr"
    (path / "ftps" / "commits").mkdir(parents=True)
    (path / "ftps" / "commits" / f"{1:016d}").write_text('{"seq": 3}')
    attrs = RunMeta(MODEL, OPTIMIZER, "async", 0, "x").to_json()
    attrs["format_version"] = version
    doc = {"zarr_format": 3, "node_type": "group", "attributes": {
        "dask_ftps": {**attrs, "crc32c": crc32c(canonical(attrs))}}}  # fmt: skip
    (path / "zarr.json").write_text(json.dumps(doc))
    for tool in (dask_ftps.recover, dask_ftps.inspect):
        with pytest.raises(StoreFormatError, match=f"format version {version}"):
            tool(str(path))


@pytest.mark.parametrize("old", [2, 3, 4])
def test_an_older_store_is_read_and_taken_over_as_version_5(tmp_path, monkeypatch, old):
    """Format 2 is format 3 without factored rows, format 3 format 4 without rows
    arrays (every commit an array of its own), format 4 format 5 without
    row-sparse entries: this code reads them, and a start that takes one over
    writes version 5 (root and records, shards of its rows
    array) from then on, factored commits included."""
    from dask_ftps._store import _format, _journal

    path = tmp_path / "old.zarr"
    with monkeypatch.context() as m:
        m.setattr(_format, "FORMAT_VERSION", old)
        m.setattr(_journal, "SHARD_ROWS", 0)  # as the older code wrote: no shards
        states = asyncio.run(scenario(str(path)))
    assert not any(shard for _, shard in payload_serials(path))

    def root_version() -> int:
        return json.loads((path / "zarr.json").read_text())["attributes"]["dask_ftps"][
            "format_version"
        ]

    assert root_version() == old
    version, params = dask_ftps.recover(str(path))
    expected = states[max(states)]
    assert version == expected[0]
    for name, value in expected[1].items():
        np.testing.assert_array_equal(params[name], value)
    assert dask_ftps.inspect(str(path))["factored_updates"] == 0

    state = asyncio.run(extend(str(path)))  # a new owner, factored rows too
    assert root_version() == 5
    assert any(shard for _, shard in payload_serials(path))  # its dense commits
    assert dask_ftps.inspect(str(path))["factored_updates"] > 0
    version, params = dask_ftps.recover(str(path))
    assert version == state[0]
    for name, value in state[1].items():
        np.testing.assert_array_equal(params[name], value)


def test_a_root_group_that_differs_from_the_log_is_rewritten_from_it(tmp_path):
    """The log's snapshot records carry the run's description: the root group's
    zarr.json (for zarr readers) is a copy, and a start repairs it."""
    path = tmp_path / "run.zarr"
    states = asyncio.run(scenario(str(path)))
    original = (path / "zarr.json").read_bytes()
    (path / "zarr.json").write_bytes(original.replace(b'"async"', b'"sync"'))
    assert dask_ftps.recover(str(path))[0] == states[max(states)][0]
    start(str(path))
    assert (path / "zarr.json").read_bytes() == original


def test_every_bit_flip_of_the_root_description_still_starts(tmp_path):
    """The root group's zarr.json is a copy of the log's description: whatever
    single bit of it flips (some flips make it look like another program's),
    the start path reads the log's copy, and a real scheduler started with the
    preload serves the run and rewrites the root."""
    from dask_ftps.preload import holds_run
    from dask_ftps.testing import start_preloaded

    path = tmp_path / "run.zarr"
    states = asyncio.run(scenario(str(path)))
    root = path / "zarr.json"
    original = root.read_bytes()
    expected = parse_root(original)

    async def sweep() -> dict[str, list[int]]:
        verdicts: dict[str, list[int]] = {}
        for bit in range(8 * len(original)):
            flipped = bytearray(original)
            flipped[bit // 8] ^= 1 << (bit % 8)
            root.write_bytes(bytes(flipped))
            try:
                parse_root(bytes(flipped))
                verdict = "still valid"
            except (StoreCorrupted, StoreFormatError) as e:
                verdict = type(e).__name__
            verdicts.setdefault(verdict, []).append(bit)
            assert await holds_run(str(path)), bit
            io = resolve(str(path), read_only=True)
            assert await Journal.read_meta(io) == expected, bit
        root.write_bytes(original)
        return verdicts

    verdicts = asyncio.run(sweep())
    # The class that blocked restarts is in the sweep, and flips of zarr's own
    # fields, which the checksum does not cover.
    assert verdicts.keys() == {"StoreFormatError", "StoreCorrupted", "still valid"}
    version = states[max(states)][0]
    for bit in [v[len(v) // 2] for v in verdicts.values()]:
        flipped = bytearray(original)
        flipped[bit // 8] ^= 1 << (bit % 8)
        root.write_bytes(bytes(flipped))
        assert start_preloaded(str(path))[1] == version
        assert root.read_bytes() == original  # rewritten from the log's copy


@pytest.mark.parametrize("kind", ["path", "file-url", "local-store", "memory-store"])
def test_any_zarr_store(tmp_path, kind):
    """A path, a file:// URL, a LocalStore and a MemoryStore hold a run alike."""
    stores = {
        "path": lambda: str(tmp_path / "run.zarr"),
        "file-url": lambda: f"file://{tmp_path / 'run.zarr'}",
        "local-store": lambda: LocalStore(str(tmp_path / "run.zarr")),
        "memory-store": MemoryStore,
    }
    store = stores[kind]()
    states = asyncio.run(scenario(store))
    version, _params = dask_ftps.recover(store)
    assert version == states[max(states)][0]
    assert dask_ftps.inspect(store)["updates"] == max(states)[0]


def test_resuming_with_another_spec_is_refused(tmp_path):
    path = str(tmp_path / "run.zarr")
    asyncio.run(scenario(path))
    journal, _ = reopen(path)
    other = RunMeta(SoftmaxRegression(64, 10), OPTIMIZER, "async", 0)
    with pytest.raises(SpecMismatch, match="model"):
        journal.meta.check_same(other)
    other = RunMeta(MODEL, Adam(lr=0.01), "async", 0)
    with pytest.raises(SpecMismatch, match="optimizer"):
        journal.meta.check_same(other)


def test_a_snapshot_published_after_newer_commits_leaves_the_version_theirs(tmp_path):
    """Snapshots are written while commits go on: the log's version, download
    dataset and the worker-copy bounds are the newest commit's, not the
    snapshot's (it holds an older version)."""
    path = str(tmp_path / "run.zarr")

    async def run():
        state = ParameterServerState(MODEL, OPTIMIZER)
        journal = await Journal.create(
            path, RunMeta(MODEL, OPTIMIZER, "async", 0), state.model
        )
        await journal.claim(ADDRESS)
        state.begin_run(SPEC)
        await journal.record_run(0, "", SPEC, 0)
        updates = scripted_updates(state, SPEC, 4)
        await commit(journal, state, updates, 2)
        model, replay_from, entries = snapshot_point(state)
        at = journal.head.serial
        state.record_download("tcp://w:9", state.version)
        await commit(journal, state, updates, 2)  # newer than the snapshot
        array = await journal.write_snapshot(model)
        await journal.publish(
            array, int(model.version), replay_from, at, entries, (), ADDRESS
        )
        assert journal.version == int(state.version) == 4 > model.version
        assert ("tcp://w:9", 2) in journal.downloads
        await journal.close()
        return state

    state = asyncio.run(run())
    journal, rebuilt = reopen(path)
    assert journal.version == 4 and ("tcp://w:9", 2) in journal.downloads
    assert_state(rebuilt, _copy(state))
    assert dask_ftps.inspect(path)["version"] == 4


def test_storage_stays_bounded_over_a_long_run(tmp_path):
    """Snapshots every 25 versions, one kept: files stay bounded as updates grow."""
    path = str(tmp_path / "run.zarr")
    model = SoftmaxRegression(64, 10)

    async def long_run(n):
        state = ParameterServerState(model, SGD(lr=0.05))
        journal = await Journal.create(
            path, RunMeta(model, SGD(lr=0.05), "async", 0), state.model
        )
        await journal.claim(ADDRESS)
        spec = RunSpec((10**6,), 1, 1)
        state.begin_run(spec)
        await journal.record_run(0, "", spec, 0)
        grads = {
            k: np.full(v.shape, 0.01, np.float32) for k, v in state.model.params.items()
        }
        files = []
        for i in range(n):
            await commit(journal, state, [Update(UpdateKey(0, 0, 0, i), "w", grads)])
            if state.version % 25 == 0:
                await snapshot(journal, state, keep=1)
                # Exactly the kept snapshot's array, and no payload below it.
                arrays = [
                    p for p in os.listdir(Path(path) / "snapshots") if p != "zarr.json"
                ]
                assert len(arrays) == 1, (i, arrays)
                floor = journal.snapshots()[0].body.first_serial
                serials = [s for s, _ in payload_serials(Path(path))]
                assert all(s >= floor for s in serials), i
            if i % 100 == 99:
                files.append(sum(len(f) for _, _, f in os.walk(path)))
        await journal.close()
        return files

    files = asyncio.run(long_run(600))
    # Two files per commit since the kept snapshot (its shard and its record),
    # plus a constant number.
    assert max(files) <= 2 * 25 + 20, files
    assert files[-1] <= files[0] + 10, files
    assert dask_ftps.inspect(path)["updates"] == 600


# -- one writer ------------------------------------------------------------------------


def test_of_two_writers_at_the_same_point_the_second_is_fenced(tmp_path):
    path = str(tmp_path / "run.zarr")
    asyncio.run(scenario(path))

    async def race():
        first, second = await Journal.open(path), await Journal.open(path)
        # Both believe they own the store.
        first.writer, second.writer = "a" * 12, "b" * 12
        state = (await rebuild(first)).state
        update = next(scripted_updates(state, SPEC, 1))
        admission = state.admit(update)
        state.commit(admission, state.merge(admission))
        args = (
            [update],
            [int(admission.version)],
            int(state.version),
            state.model.params,
            [],
        )
        await first.commit(*args)
        with pytest.raises(Fenced, match="another server wrote"):
            await second.commit(*args)
        return first.committed

    committed = asyncio.run(race())
    assert dask_ftps.inspect(path)["updates"] == committed


def test_a_stale_writer_cannot_change_what_the_new_owner_wrote(tmp_path):
    """The old owner goes on (it was paused and does not know it was replaced):
    its commits, snapshots and trims all fail or write only what nobody reads, and
    the new owner's run replays bit for bit."""
    path = str(tmp_path / "run.zarr")
    asyncio.run(scenario(path, keep=1))

    async def run():
        old = await Journal.open(path)
        await old.claim("tcp://old:1")
        old_state = (await rebuild(old)).state
        new = await Journal.open(path)
        assert await new.claim("tcp://new:1") == old.incarnation + 1
        new_state = (await rebuild(new)).state
        updates = scripted_updates(new_state, SPEC, 6)
        for _ in range(3):
            await commit(new, new_state, updates, 2)
        await snapshot(new, new_state, keep=1)
        expected = _copy(new_state)
        files = {
            p.relative_to(path): p.read_bytes()
            for p in Path(path).rglob("*")
            if p.is_file()
        }
        # The stale owner commits, snapshots and trims as if nothing happened.
        stale = scripted_updates(old_state, SPEC, 3)
        with pytest.raises(Fenced):
            await commit(old, old_state, stale, 1)
        with pytest.raises(Fenced):
            await old.record_run(1, "x", SPEC, 0)
        with pytest.raises(Fenced):
            await snapshot(old, old_state, keep=1)
        await old.trim(1)  # deletes only below its own newest snapshot's floor
        for rel, raw in files.items():
            if (Path(path) / rel).exists():
                assert (Path(path) / rel).read_bytes() == raw, rel
        reopened = await Journal.open(path)
        assert reopened.head.serial == new.head.serial
        return expected, (await rebuild(reopened)).state

    expected, state = asyncio.run(run())
    assert_state(state, expected)


def test_a_live_owner_keeps_the_store(tmp_path):
    path = str(tmp_path / "run.zarr")
    asyncio.run(scenario(path))

    async def alive(journal, incarnation, address):
        return address == ADDRESS and incarnation == 1

    async def claim(is_alive):
        async def opened():
            return await Journal.open(path)

        async def rebuilt(journal):
            return None

        journal, incarnation, _ = await take_over(
            opened, "tcp://other:2", is_alive, rebuilt
        )
        await journal.close()
        return incarnation

    with pytest.raises(StoreLocked, match="alive"):
        asyncio.run(claim(alive))
    assert dask_ftps.inspect(path)["incarnation"] == 1
    assert asyncio.run(claim(_not_alive)) == 2


def _start_child(path: str, k: int) -> None:
    logging.disable(logging.CRITICAL)
    kill_at(".*", k)
    start(path)
    os._exit(0)


def test_a_start_killed_at_any_write_never_locks_the_store(tmp_path):
    """SIGKILL a start (open, rebuild, claim, clean-up) before each of its writes
    and deletions; the next start always succeeds, on the same state."""
    path = tmp_path / "run.zarr"
    states = asyncio.run(scenario(str(path)))
    expected = states[max(states)]
    # Leave work for the start: a record to adopt, garbage to delete.
    journal, _ = reopen(str(path))
    (path / "ftps" / "log" / f"{journal.head.serial:016d}").unlink()
    (path / "data" / f"{journal.head.serial:016d}.0123456789ab").mkdir()
    (path / "snapshots" / "v000000000001.0123456789ab").mkdir()
    ctx = multiprocessing.get_context("fork")
    k = 0
    while True:
        k += 1
        work = tmp_path / f"start{k}.zarr"
        shutil.copytree(path, work)
        child = ctx.Process(target=_start_child, args=(str(work), k))
        child.start()
        child.join(60)
        incarnation, state = start(str(work))
        assert_state(state, expected)
        assert incarnation in (2, 3)  # killed before its claim, or after
        if child.exitcode == 0:
            assert incarnation == 3
            break
        assert child.exitcode == -signal.SIGKILL
    assert k >= 4  # adoption, claim and deletions were all interrupted


def test_durable_commits_fsync_data_before_the_record_and_the_record_before_ack(
    tmp_path, monkeypatch
):
    """durable=True: each file and folder of a commit is fsync'd before its record
    is created, and the record and the log folder before commit() returns."""
    path = tmp_path / "run.zarr"
    events: list[tuple[str, str]] = []
    real_fsync, real_link = os.fsync, os.link

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def link(src, dst):
        events.append(("link", str(dst)))
        return real_link(src, dst)

    async def run():
        state = ParameterServerState(MODEL, OPTIMIZER)
        journal = await Journal.create(
            str(path), RunMeta(MODEL, OPTIMIZER, "async", 0), state.model
        )
        journal.io.durable = True
        await journal.claim(ADDRESS)
        state.begin_run(SPEC)
        await journal.record_run(0, "", SPEC, 0)
        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "link", link)
        await commit(journal, state, list(scripted_updates(state, SPEC, 1)))
        events.append(("returned", ""))
        return journal.head

    head = asyncio.run(run())
    assert head.body.data.shard
    shard = path / head.body.data.key
    record = str(path / "ftps" / "log" / f"{head.serial:016d}")
    link_at = events.index(("link", record))
    before = [p for op, p in events[:link_at] if op == "fsync"]
    after = [p for op, p in events[link_at:] if op == "fsync"]
    # The shard is created in place (its name is the writer's own): fsync'd
    # under its name, before the record is linked.
    assert str(shard) in before, events
    assert str(shard.parent) in before, events  # its folder entry
    assert any(p.startswith(f"{record}.") for p in before), events  # the record
    assert str(path / "ftps" / "log") in after, events  # its folder entry
    assert events[-1] == ("returned", "")


def test_a_writers_rows_array_is_read_by_zarr_as_the_updates_it_holds(tmp_path):
    """A dense commit is a shard of its writer's rows array: zarr itself reads the
    rows (checking every CRC-32C) as the updates the log names, in order."""
    import zarr

    path = tmp_path / "run.zarr"
    asyncio.run(scenario(str(path)))
    journal, _ = reopen(str(path))
    commits = [r for r in journal.records.values() if r.kind == "commit"]
    shards = [r for r in commits if r.body.data.shard]
    assert shards
    payloads = asyncio.run(journal._read_payloads(shards))
    for record in shards:
        folder, _, _ = record.body.data.key.rpartition("/")
        rows = zarr.open_array(str(path / folder), mode="r")
        k = len(record.body.rows)
        start = SHARD_ROWS * record.serial
        np.testing.assert_array_equal(
            rows[start : start + k], np.stack(payloads[record.serial])
        )
        assert not rows[start + k : start + SHARD_ROWS].any()  # no more rows there


def test_a_commit_arrays_zarr_json_holds_exactly_its_record(tmp_path):
    """commit_document splices the record's canonical bytes into the array
    document (no second JSON encoding): zarr reads it as an array, and its
    checked attributes are commit_attributes(record), the one definition."""
    import zarr

    from dask_ftps._store._format import checked_attrs, commit_attributes

    path = tmp_path / "run.zarr"
    asyncio.run(scenario(str(path)))
    asyncio.run(extend(str(path)))  # factored rows: commits with arrays of their own
    journal, _ = reopen(str(path))
    own = [
        r
        for r in journal.records.values()
        if r.kind == "commit" and not r.body.data.shard
    ]
    assert own
    for record in own:
        raw = (path / record.body.data.key / "zarr.json").read_bytes()
        assert checked_attrs(raw, "k") == commit_attributes(record)
        array = zarr.open_array(str(path / record.body.data.key), mode="r")
        assert array.shape == record.body.data.shape
