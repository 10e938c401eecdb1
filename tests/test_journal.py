"""The Zarr journal alone: exact rebuild, torn writes at every step, retention."""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import os
import signal
import uuid

import numpy as np
import pytest
from distributed.utils_test import captured_logger
from zarr.storage import LocalStore, WrapperStore

import dask_ftps
from dask_ftps import SGD, Adam, SpecMismatch, StoreFormatError, StoreLocked
from dask_ftps._core import ModelVersion, RunSpec, Update, UpdateKey, Version
from dask_ftps._journal import Journal, RunMeta
from dask_ftps._recovery import rebuild
from dask_ftps._state import ParameterServerState
from dask_ftps.models import MLP, SoftmaxRegression

from .conftest import digits

MODEL = MLP(n_features=64, hidden=(16,), n_classes=10, seed=0)


def not_alive(address, incarnation):
    async def answer():
        return False

    return answer()


def scripted_updates(state: ParameterServerState, spec: RunSpec, n: int):
    """Deterministic digits minibatch updates, computed from the live model."""
    X, _, y, _ = digits()
    parts = np.array_split(np.arange(len(X)), spec.n_shards)
    for _ in range(n):
        run = state.runs[-1]
        shard = min(range(spec.n_shards), key=lambda s: (run.clocks[s], s))
        epoch, step = run.next_step(shard)
        rows = parts[shard][
            np.array_split(np.arange(len(parts[shard])), spec.steps[shard])[step]
        ]
        _, grads, _ = MODEL.loss_and_grad(state.model.params, X[rows], y[rows])
        yield Update(UpdateKey(run.run, epoch, shard, step), f"tcp://w{shard}:1", grads)


SCENARIO_BATCHES = (1, 2, 3, 1, 2, 1, 3, 2)  # group commits of these sizes
SNAPSHOT_AFTER = (2, 5)  # after these batches: snapshot, then trim to one


async def scenario(store, mode: str = "async", stop_after: int | None = None):
    """Create, claim, begin a run, commit batches, snapshot and trim.

    Returns the live state at each commit point, keyed by ``(seq, runs)``.
    """
    optimizer = SGD(lr=0.1, momentum=0.9)
    state = ParameterServerState(MODEL, optimizer, mode=mode)
    journal = await Journal.create(
        store, RunMeta(MODEL, optimizer, mode, 0), state.model
    )
    await journal.claim("tcp://scheduler:1", not_alive)
    states = {(0, 0): _copy(state)}
    spec = RunSpec((600, 600, 147), batch_size=40, epochs=2)
    run = state.begin_run(spec)
    await journal.record_run(spec, int(run.base_version))
    states[0, 1] = _copy(state)
    updates = scripted_updates(state, spec, sum(SCENARIO_BATCHES))
    for b, size in enumerate(SCENARIO_BATCHES):
        batch = []
        for _ in range(size):
            update = next(updates)
            admission = state.admit(update)
            state.commit(admission, state.merge(admission))
            batch.append((update, int(admission.version)))
        await journal.append(
            [u for u, _ in batch], [v for _, v in batch], state.downloads
        )
        states[journal.doc.seq, 1] = _copy(state)
        if b in SNAPSHOT_AFTER:
            model, open_round, runs = state.snapshot_point()
            await journal.write_snapshot(model, journal.doc.seq - open_round, runs)
            await journal.trim(keep_snapshots=1)
    return states


def _copy(state: ParameterServerState):
    return (
        int(state.version),
        {k: v.copy() for k, v in state.model.params.items()},
        {k: v.copy() for k, v in state.model.opt_state.items()},
        [list(r.clocks) for r in state.runs],
    )


class CountingStore(WrapperStore):
    """Counts writes; at write ``crash_at`` leaves a stray temporary file and dies."""

    def __init__(self, store, crash_at=None, log=None):
        super().__init__(store)
        self.crash_at = crash_at
        self.writes = 0
        self.log = log if log is not None else []

    def _with_store(self, store):
        return type(self)(store, self.crash_at, self.log)

    async def _write(self, key, op, *args):
        self.writes += 1
        self.log.append(key)
        if self.writes == self.crash_at:
            stray = self._store.root / f"{key}.{uuid.uuid4().hex}.partial"
            stray.parent.mkdir(parents=True, exist_ok=True)
            stray.write_bytes(b"torn")
            os.kill(os.getpid(), signal.SIGKILL)
        return await getattr(self._store, op)(key, *args)

    async def set(self, key, value, byte_range=None):
        return await self._write(key, "set", value)

    async def set_if_not_exists(self, key, value):
        return await self._write(key, "set_if_not_exists", value)

    async def delete(self, key):
        return await self._write(key, "delete")

    async def delete_dir(self, prefix):
        return await self._write(prefix, "delete_dir")


def _crash_child(path: str, mode: str, crash_at: int) -> None:
    logging.disable(logging.CRITICAL)
    store = CountingStore(LocalStore(path), crash_at=crash_at)
    asyncio.run(scenario(store, mode))
    os._exit(0)  # the crash point was past the end


def _committed_seq(path) -> int:
    docs = sorted(os.listdir(os.path.join(path, "ftps", "commits")))
    return json.loads(open(os.path.join(path, "ftps", "commits", docs[-1])).read())[
        "seq"
    ]


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_crash_at_every_write_opens_at_the_last_commit_bit_exact(tmp_path, mode):
    """SIGKILL before write k, for every k, in a real child process; reopen.

    The last round, ``k = total + 1``, runs to the end without a crash.
    """
    reference_path = str(tmp_path / "reference.zarr")
    counter = CountingStore(LocalStore(reference_path))
    reference = asyncio.run(scenario(counter, mode))
    total = counter.writes
    assert total > 40  # commits, snapshots and trims are all in the sweep
    ctx = multiprocessing.get_context("fork")
    seen = set()
    for k in range(1, total + 2):
        path = str(tmp_path / f"crash{k}.zarr")
        child = ctx.Process(target=_crash_child, args=(path, mode, k))
        child.start()
        child.join(60)
        expected_exit = -signal.SIGKILL if k <= total else 0
        assert child.exitcode == expected_exit, (k, child.exitcode)
        journal = asyncio.run(Journal.open(path))
        if journal is None:  # died before the first commit point: start afresh
            assert not list(
                tmp_path.glob(f"crash{k}.zarr/ftps/commits/" + "[0-9]" * 16)
            )
            fresh = asyncio.run(scenario(path, mode))
            assert fresh.keys() == reference.keys()
            continue
        seq = journal.doc.seq
        rebuilt = asyncio.run(rebuild(journal)).state
        seen.add((seq, len(rebuilt.runs)))
        version, params, opt_state, clocks = reference[seq, len(rebuilt.runs)]
        assert int(rebuilt.version) == version, k
        for name, value in params.items():
            np.testing.assert_array_equal(rebuilt.model.params[name], value)
        for name, value in opt_state.items():
            np.testing.assert_array_equal(rebuilt.model.opt_state[name], value)
        assert [list(r.clocks) for r in rebuilt.runs] == clocks
        assert not list(tmp_path.glob(f"crash{k}.zarr/**/*.partial"))  # removed on open
        rows = asyncio.run(journal.read_rows(journal.floor, seq))
        assert len(rows) == seq - journal.floor
        assert _committed_seq(path) == seq
    assert seen == set(reference)  # every commit point was an outcome


def test_open_logs_and_discards_what_lies_past_the_commit_point(tmp_path):
    path = str(tmp_path / "run.zarr")
    states = asyncio.run(scenario(path))
    seq = max(states)[0]
    # Torn leftovers of a commit that never happened: payload and row chunks past
    # seq, and a stray temporary file.
    journal = asyncio.run(Journal.open(path))
    n = journal.params_layout.size

    async def tear():
        await journal._ensure_capacity(seq + 2)
        await journal._payloads.setitem(
            slice(seq, seq + 2), np.ones((2, n), np.float32)
        )
        await journal._rows.setitem(slice(seq, seq + 2), np.full((2, 6), 7))

    asyncio.run(tear())
    (tmp_path / "run.zarr" / "payloads" / "c" / "x.1234.partial").write_bytes(b"x")
    with captured_logger("dask_ftps._journal", level=logging.WARNING) as log:
        reopened = asyncio.run(Journal.open(path))
    text = log.getvalue()
    assert "discarded 4 torn payload/row chunks" in text, text
    assert "1 stray temporary files" in text, text
    assert reopened.doc.seq == seq
    assert not (tmp_path / "run.zarr" / "payloads" / "c" / str(seq)).exists()
    assert not list((tmp_path / "run.zarr").glob("**/*.partial"))
    state = asyncio.run(rebuild(reopened)).state
    np.testing.assert_array_equal(state.model.params["W0"], states[seq, 1][1]["W0"])


def test_recover_and_inspect_offline(tmp_path):
    path = str(tmp_path / "run.zarr")
    states = asyncio.run(scenario(path))
    seq = max(states)[0]
    version, params = dask_ftps.recover(path)
    assert version == states[seq, 1][0]
    for name, value in states[seq, 1][1].items():
        np.testing.assert_array_equal(params[name], value)
    info = dask_ftps.inspect(path)
    assert info["version"] == version
    assert info["updates"] == seq
    assert info["incarnation"] == 1
    assert info["snapshots"] == [states[info["first_row"], 1][0]]
    assert len(info["global"]) == seq - info["first_row"]
    assert {"update_id", "worker", "version"} == set(info["global"][0])
    assert [r["version"] for r in info["global"]][-1] == version
    assert info["model"]["kind"] == "MLP"
    for row in info["download"]:
        assert set(row) == {"worker", "version"}


def test_bad_stores_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        dask_ftps.recover(str(tmp_path / "missing.zarr"))
    empty = tmp_path / "empty.zarr"
    empty.mkdir()
    with pytest.raises(StoreFormatError, match="holds no committed dask_ftps run"):
        dask_ftps.inspect(str(empty))
    path = str(tmp_path / "run.zarr")
    asyncio.run(scenario(path))
    zarr_json = tmp_path / "run.zarr" / "zarr.json"
    meta = json.loads(zarr_json.read_text())
    meta["attributes"]["format"] = "something-else"
    zarr_json.write_text(json.dumps(meta))
    with pytest.raises(StoreFormatError, match="not a dask_ftps store"):
        dask_ftps.recover(path)


def test_a_payload_array_of_another_layout_is_refused(tmp_path):
    path = tmp_path / "run.zarr"
    asyncio.run(scenario(str(path)))
    payloads_json = path / "payloads" / "zarr.json"
    meta = json.loads(payloads_json.read_text())
    meta["codecs"].append({"name": "zstd", "configuration": {"level": 0}})
    payloads_json.write_text(json.dumps(meta))
    with pytest.raises(StoreFormatError, match="one raw little-endian chunk"):
        asyncio.run(Journal.open(str(path)))


def test_resuming_with_another_spec_is_refused(tmp_path):
    path = str(tmp_path / "run.zarr")
    asyncio.run(scenario(path))
    journal = asyncio.run(Journal.open(path))
    other = RunMeta(SoftmaxRegression(64, 10), SGD(lr=0.1, momentum=0.9), "async", 0)
    with pytest.raises(SpecMismatch, match="model"):
        journal.meta.check_same(other)
    other = RunMeta(MODEL, Adam(lr=0.01), "async", 0)
    with pytest.raises(SpecMismatch, match="optimizer"):
        journal.meta.check_same(other)


def test_a_live_owner_keeps_the_store(tmp_path):
    path = str(tmp_path / "run.zarr")
    asyncio.run(scenario(path))

    async def alive(address, incarnation):
        return address == "tcp://scheduler:1" and incarnation == 1

    async def claim_twice():
        journal = await Journal.open(path)
        with pytest.raises(StoreLocked, match="alive"):
            await journal.claim("tcp://other:2", alive)
        journal = await Journal.open(path)
        assert await journal.claim("tcp://other:2", not_alive) == 2
        return journal

    newer = asyncio.run(claim_twice())
    assert newer.doc.incarnation == 2

    async def fenced():
        # The old owner, unaware, tries to commit: it is refused, nothing is written.
        old = await Journal.open(path)
        old.owner = {"incarnation": 1}
        with pytest.raises(StoreLocked, match="took over"):
            await old.record_run(RunSpec((5,), 1, 1), 0)

    asyncio.run(fenced())
    assert dask_ftps.inspect(path)["incarnation"] == 2


def test_storage_stays_bounded_over_a_long_run(tmp_path):
    """Snapshots every 25 versions, one kept: files stay bounded as updates grow."""
    path = str(tmp_path / "run.zarr")
    optimizer = SGD(lr=0.05)
    model = SoftmaxRegression(64, 10)

    async def long_run(n):
        state = ParameterServerState(model, optimizer)
        journal = await Journal.create(
            path, RunMeta(model, optimizer, "async", 0), state.model
        )
        await journal.claim("tcp://s:1", not_alive)
        spec = RunSpec((10**6,), 1, 1)
        state.begin_run(spec)
        await journal.record_run(spec, 0)
        grads = {
            k: np.full(v.shape, 0.01, np.float32) for k, v in state.model.params.items()
        }
        files = []
        for i in range(n):
            update = Update(UpdateKey(0, 0, 0, i), "w", grads)
            admission = state.admit(update)
            state.commit(admission, state.merge(admission))
            await journal.append([update], [int(admission.version)], state.downloads)
            if state.version % 25 == 0:
                model_v, open_round, runs = state.snapshot_point()
                await journal.write_snapshot(
                    model_v, journal.doc.seq - open_round, runs
                )
                await journal.trim(keep_snapshots=1)
            if i % 100 == 99:
                files.append(sum(len(f) for _, _, f in os.walk(path)))
        return files

    files = asyncio.run(long_run(600))
    # One row and one payload chunk per update since the kept snapshot, plus a
    # constant number of metadata files: the count does not grow with the run.
    assert max(files) <= 2 * 25 + 30, files
    assert files[-1] <= files[0] + 10, files
    assert dask_ftps.inspect(path)["updates"] == 600


def test_of_two_writers_at_the_same_commit_point_the_second_fails(tmp_path):
    """A commit serial is taken once: a server that missed its fencing (its owner
    check passed just before another server claimed the store) cannot overwrite
    the other's commit document."""
    path = str(tmp_path / "run.zarr")
    asyncio.run(scenario(path))

    async def race():
        first, second = await Journal.open(path), await Journal.open(path)
        assert first.doc.serial == second.doc.serial
        state = (await rebuild(first)).state
        update = next(scripted_updates(state, state.runs[-1].spec, 1))
        admission = state.admit(update)
        state.commit(admission, state.merge(admission))
        await first.append([update], [int(admission.version)], state.downloads)
        with pytest.raises(StoreLocked, match="no longer owns the store"):
            await second.append([update], [int(admission.version)], state.downloads)
        return first.doc.seq

    seq = asyncio.run(race())
    assert asyncio.run(Journal.open(path)).doc.seq == seq


def test_a_snapshot_is_listed_as_stored_only_once_its_commit_point_is_written(
    tmp_path,
):
    seen = []

    class Watch(WrapperStore):
        journal = None

        def _with_store(self, store):
            return type(self)(store)

        async def set_if_not_exists(self, key, value):
            if key.startswith("ftps/commits/") and Watch.journal is not None:
                seen.append(Watch.journal.stored_snapshots)
            return await self._store.set_if_not_exists(key, value)

    async def run():
        optimizer = SGD(lr=0.1)
        state = ParameterServerState(MODEL, optimizer)
        journal = await Journal.create(
            Watch(LocalStore(str(tmp_path / "run.zarr"))),
            RunMeta(MODEL, optimizer, "async", 0),
            state.model,
        )
        Watch.journal = journal
        assert journal.stored_snapshots == (0,)
        later = ModelVersion(Version(5), state.model.params, state.model.opt_state)
        await journal.write_snapshot(later, 0, ())
        return journal.stored_snapshots

    assert asyncio.run(run()) == (0, 5)
    assert seen == [(0,)]  # while the document naming version 5 was written
