"""Bad input changes nothing; lifecycle; the checks our end-to-end tests used to miss.

Every handler gets hostile fields (hypothesis) and must refuse them with an
error that changes nothing; then the server still serves a normal run and its
store still rebuilds bit for bit. Each "blind spot" test here fails when the
code it protects is removed.
"""

from __future__ import annotations

import copy
import errno
import logging
import re
from collections import Counter

import dask
import numpy as np
import pytest
from distributed import Scheduler
from distributed.comm.core import CommClosedError
from distributed.protocol.serialize import ToPickle
from distributed.utils import sync
from distributed.utils_test import captured_logger, gen_cluster
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from zarr.storage import LocalStore, WrapperStore

import dask_ftps
from dask_ftps import SGD, NotDurable, ParameterServer
from dask_ftps._core import check_reply
from dask_ftps._store import _io
from dask_ftps._worker_plugin import ModelCopy
from dask_ftps.models import MLP, SoftmaxRegression

from .conftest import digits, same_as_offline
from .test_plugin import holder_of, server_id

MODEL = SoftmaxRegression(n_features=4, n_classes=3, seed=0)
SPEC = {"shard_sizes": [8, 8], "batch_size": 4, "epochs": 1, "seed": 0}


def good_grads(model=MODEL) -> dict[str, np.ndarray]:
    return {
        k: np.full(v, 0.01, dtype=np.float32) for k, v in model.param_shapes().items()
    }


def snapshot(plugin) -> dict:
    """Everything a refused request must leave as it was, in memory and stored."""
    state = plugin.state
    journal = plugin.journal
    return {
        "version": state.version,
        "published": plugin.server.published.version,
        "params": {k: v.tobytes() for k, v in state.model.params.items()},
        "opt": {k: v.tobytes() for k, v in state.model.opt_state.items()},
        "updates": state.updates,
        "global": list(state.global_rows),
        "downloads": list(state.downloads),
        "runs": [
            (r.name, r.spec, list(r.clocks), r.superseded, dict(r.history), r.holder)
            for r in state.runs
        ],
        "pending": copy.copy(state.pending),
        "status": {k: v for k, v in plugin.server.status().items() if k != "recovery"},
        "head": None if journal is None else journal.head.serial,
        "committed": None if journal is None else journal.committed,
    }


# -- hostile fields, every handler -----------------------------------------------------

HOSTILE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=700),
    st.binary(max_size=40),
    st.lists(st.integers(-3, 3), max_size=4),
    st.tuples(st.integers(-3, 3), st.text(max_size=3)),
    st.tuples(st.integers(0, 10**7), st.integers(0, 10**7)),
    st.dictionaries(st.text(max_size=4), st.integers(-3, 3), max_size=3),
    st.just(np.zeros(3, np.float32)),
    st.just(np.int64(1)),
    st.just({"W": np.zeros((4, 3), np.float64)}),
    st.just({"W": np.full((4, 3), np.nan, np.float32), "b": np.zeros(3, np.float32)}),
    st.just({"W": np.zeros((3, 4), np.float32), "b": np.zeros(3, np.float32)}),
    st.just({"W": [[0.0] * 3] * 4, "b": [0.0] * 3}),
    st.just({1: np.zeros(3)}),
    st.just(object()),
)


def _valid(plugin, handler: str) -> dict:
    """A valid request for ``handler`` against the server's current state."""
    state = plugin.state
    live = [r for r in state.runs if not r.superseded and not r.finished]
    run = live[-1] if live else state.runs[-1]
    epoch, step = run.next_step(0)
    server_id = plugin.server.server_id
    return {
        "begin_run": {
            "spec": SPEC,
            "name": "",
            "holder": "Client-a/1",
            "live": ["Client-a/1"],
            "server_id": server_id,
        },
        "find_run": {
            "name": "",
            "n_samples": 16,
            "batch_size": 4,
            "epochs": 1,
            "seed": 0,
        },
        "end_epoch": {
            "run": int(run.run),
            "epoch": 0,
            "values": {"loss": 1.0},
            "server_id": server_id,
        },
        "end_run": {"server_id": server_id, "run": int(run.run), "holder": "C/1"},
        "next_step": {
            "run": int(run.run),
            "shard": 0,
            "server_id": server_id,
            "holder": "Client-a/1",
        },
        "pull": {
            "server_id": server_id,
            "holder": "Client-a/1",
            "worker": "tcp://w:1",
            "run": int(run.run),
            "shard": 0,
            "epoch": epoch,
            "step": step,
            "have_version": -1,
            "have_server": None,
        },
        "push": {
            "server_id": server_id,
            "holder": "Client-a/1",
            "worker": "tcp://w:1",
            "update_id": f"{run.run}:{epoch}:0:{step}",
            "grads": good_grads(),
            "incarnation": state.incarnation,
            "next_step": None,
            "have_version": -1,
            "have_server": None,
        },
        "status": {},
        "get_model": {},
        "model_spec": {},
        "records": {},
        "shards": {},
    }[handler]


@st.composite
def requests(draw, plugin):
    handler = draw(st.sampled_from(sorted(plugin._handlers)))
    name = handler.removeprefix("ftps_")
    kwargs = _valid(plugin, name)
    fields = sorted(kwargs)
    bad = draw(st.lists(st.sampled_from(fields), unique=True)) if fields else []
    for field in bad:
        kwargs[field] = draw(HOSTILE)
    extra = not bad or draw(st.booleans())
    if extra:  # a key the handler does not take
        kwargs[draw(st.sampled_from(["extra", "stimulus_id", "x"]))] = draw(HOSTILE)
    return name, kwargs, True


@pytest.fixture(params=["memory", "store"])
def server(request, loop_in_thread, tmp_path):
    """A scheduler in a loop thread hosting a server with one run begun."""
    store = None if request.param == "memory" else str(tmp_path / "run.zarr")

    async def start():
        s = await Scheduler(port=0, dashboard_address=":0")
        await s.register_scheduler_plugin(
            ParameterServer(store, model=MODEL, optimizer=SGD(lr=0.1)),
            name="ftps",
            idempotent=False,
        )
        check_reply(await s.plugins["ftps"].begin_run(spec=SPEC), "begin")
        return s

    s = sync(loop_in_thread, start)
    yield loop_in_thread, s.plugins["ftps"], store
    sync(loop_in_thread, s.close)


@settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_hostile_fields_of_every_handler_are_refused_and_change_nothing(server, data):
    loop, plugin, _ = server
    name, kwargs, hostile = data.draw(requests(plugin))
    before = snapshot(plugin)
    reply = sync(loop, plugin._handlers[f"ftps_{name}"], **kwargs)
    assert isinstance(reply, dict) and reply.get("status") in ("OK", "error"), reply
    if reply["status"] != "OK":
        assert hostile  # a valid request is never refused
        assert snapshot(plugin) == before, (name, kwargs)


#: Who holds a run and which server a message names: hostile values, also
#: near misses of the valid forms.
HOSTILE_IDENTITY = st.one_of(
    HOSTILE,
    st.sampled_from(
        [
            "", "s" * 129, "Client-a/ended", "Client-a/1\n", "/1", "Client-a/",
            "Client a/1", "Client-a/" + "0" * 65, "C" * 129 + "/1", "Client-b/1",
            "Client-a/1/2", "Client-a/ABC",
        ]
    ),
    st.lists(
        st.sampled_from(["Client-a/1", "Client-a/2f", "Client-b/1", "Client-a/zz", 7]),
        max_size=3,
    ),
    st.just([f"Client-a/{i:x}" for i in range(65)]),
)  # fmt: skip
_HOLDER = re.compile(r"[A-Za-z0-9_.:-]{1,128}/[0-9a-f]{1,64}")


def _malformed(name: str, kwargs: dict) -> bool:
    """Whether contract 8 refuses the identity fields of a ``name`` request."""
    sid = kwargs.get("server_id")
    if not (sid is None and name == "begin_run") and not (
        isinstance(sid, str) and 0 < len(sid) <= 128
    ):
        return True
    holder = kwargs.get("holder")

    def is_holder(h):
        return isinstance(h, str) and _HOLDER.fullmatch(h) is not None

    needs_holder = name != "begin_run" or holder is not None
    if needs_holder and not is_holder(holder):
        return True
    if name != "begin_run":
        return False
    live = kwargs.get("live")
    own = None if holder is None else holder.rpartition("/")[0]
    return (
        not isinstance(live, list | tuple)
        or len(live) > 64
        or not all(is_holder(h) and h.rpartition("/")[0] == own for h in live)
    )


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_malformed_holders_and_server_ids_are_invalid_requests(server, data):
    """Contract 8 for the fields that say who holds a run and which server a
    message is for: a malformed one is InvalidRequest (not ServerReplaced, not
    accepted), and changes nothing."""
    loop, plugin, _ = server
    name = data.draw(
        st.sampled_from(["begin_run", "end_run", "next_step", "pull", "push"])
    )
    kwargs = _valid(plugin, name)
    fields = [f for f in ("server_id", "holder", "live") if f in kwargs]
    for field in data.draw(st.lists(st.sampled_from(fields), min_size=1, unique=True)):
        kwargs[field] = data.draw(HOSTILE_IDENTITY)
    assume(_malformed(name, kwargs))
    before = snapshot(plugin)
    reply = sync(loop, plugin._handlers[f"ftps_{name}"], **kwargs)
    assert reply["status"] == "error", (name, kwargs)
    assert reply["exception_text"].startswith("InvalidRequest("), reply
    assert snapshot(plugin) == before, (name, kwargs)


def test_after_hostile_requests_the_server_trains_and_its_store_is_exact(server):
    """The same server after a storm of bad requests: a whole run goes through,
    and the store rebuilds the live model bit for bit."""
    loop, plugin, store = server
    for worker in (["a"], ("a", "b"), b"tcp://w:1", {"w": 1}, 17, None, "", "x" * 600):
        reply = sync(loop, plugin.push, **{**_valid(plugin, "push"), "worker": worker})
        assert reply["status"] == "error"
    spec = {**SPEC, "seed": 7}
    begun = check_reply(sync(loop, plugin.begin_run, spec=spec, name="after"), "begin")
    for shard in (0, 1):
        for step in (0, 1):
            check_reply(
                sync(loop, plugin.push, server_id=begun["server_id"],
                     holder="Client-a/1", worker=f"tcp://w{shard}:1",
                     update_id=f"{begun['run']}:0:{shard}:{step}", grads=good_grads(),
                     incarnation=plugin.state.incarnation),
                "push",
            )  # fmt: skip
    assert plugin.state.runs[begun["run"]].finished
    if store is not None:
        version, params = dask_ftps.recover(store)
        assert version == plugin.state.version
        for k, v in plugin.state.model.params.items():
            np.testing.assert_array_equal(params[k], v)
        assert dask_ftps.inspect(store)["updates"] == plugin.state.updates


HOSTILE_WORKERS = {
    "list": ["tcp://10.0.0.1:1"],
    "tuple": ("tcp://10.0.0.1", 1),
    "bytes": b"tcp://10.0.0.1:1",
    "dict": {"address": "tcp://10.0.0.1:1"},
    "empty": "",
    "long": "w" * 10_000,
}


@pytest.mark.parametrize("case", sorted(HOSTILE_WORKERS))
@gen_cluster(client=True)
async def test_a_hostile_worker_field_changes_nothing_and_bricks_nothing(
    c, s, a, b, tmp_path, case
):
    """The reported cases, over the real comm: a list or tuple worker was accepted
    and bricked the store; a bytes one broke the journal; a dict one was refused
    but counted. Each is refused, changes nothing, and the store opens again."""
    store = str(tmp_path / "run.zarr")
    await c.register_plugin(ParameterServer(store, model=MODEL))
    check_reply(await c.scheduler.ftps_begin_run(spec=SPEC), "begin")
    plugin = s.plugins["ftps"]
    before = snapshot(plugin)
    for op, kwargs in (
        ("ftps_push", {"update_id": "0:0:0:0", "grads": ToPickle(good_grads()),
                       "incarnation": 1}),
        ("ftps_pull", {"run": 0, "shard": 0, "epoch": 0, "step": 0}),
    ):  # fmt: skip
        reply = await getattr(c.scheduler, op)(
            worker=HOSTILE_WORKERS[case],
            server_id=await server_id(c),
            holder=holder_of(c),
            **kwargs,
        )
        with pytest.raises(dask_ftps.FTPSError, match="worker must be"):
            check_reply(reply, op)
    assert snapshot(plugin) == before
    reply = await c.scheduler.ftps_push(
        server_id=await server_id(c),
        holder=holder_of(c),
        worker="tcp://w:1", update_id="0:0:0:0", grads=ToPickle(good_grads()),
        incarnation=1,
    )  # fmt: skip
    check_reply(reply, "push")  # the server still works
    info = dask_ftps.inspect(store)
    assert info["updates"] == 1 and info["global"][0]["worker"] == "tcp://w:1"
    assert dask_ftps.recover(store)[0] == 1
    await c.register_plugin(ParameterServer(store))  # a restart opens the store
    assert (await dask_ftps.status(c))["updates"] == 1


# -- a full disk -------------------------------------------------------------------------


class FullDisk(WrapperStore):
    """A store with no space left under ``part`` while ``full`` is set."""

    full = False
    part = "data/"

    def _with_store(self, store):
        return type(self)(store)

    async def set(self, key, value, byte_range=None):
        if FullDisk.full and key.startswith(FullDisk.part):
            raise OSError(errno.ENOSPC, "No space left on device", key)
        return await self._store.set(key, value)

    async def set_if_not_exists(self, key, value):
        if FullDisk.full and key.startswith(FullDisk.part):
            raise OSError(errno.ENOSPC, "No space left on device", key)
        return await self._store.set_if_not_exists(key, value)


@pytest.mark.parametrize("fails", ["payload", "record"])
@pytest.mark.parametrize("path", ["zarr-store", "local-files"])
@gen_cluster(client=True)
async def test_a_full_disk_refuses_the_update_and_counts_nothing(
    c, s, a, b, tmp_path, monkeypatch, path, fails
):
    """After ENOSPC the refused update is nowhere in the live server: not in
    status(), records() or the model. When its payload array got written whole
    but its record did not, the array stays (the server cannot know that no
    start adopted it meanwhile): a start, or recover(), would adopt it, and the
    update would count once, as the one its task pushes again. Once there is
    room again the server goes on with an array of another name, and the store
    and the live server agree bit for bit."""
    where = str(tmp_path / "run.zarr")
    part = "data/" if fails == "payload" else "ftps/log/"
    FullDisk.part = part
    store = FullDisk(LocalStore(where)) if path == "zarr-store" else where
    await c.register_plugin(ParameterServer(store, model=MODEL))
    check_reply(await c.scheduler.ftps_begin_run(spec=SPEC), "begin")
    plugin = s.plugins["ftps"]

    async def push(step):
        return await c.scheduler.ftps_push(
            server_id=await server_id(c),
            holder=holder_of(c),
            worker="tcp://w:1", update_id=f"0:0:0:{step}", grads=ToPickle(good_grads()),
            incarnation=1,
        )  # fmt: skip

    check_reply(await push(0), "push")
    status, records = await dask_ftps.status(c), await dask_ftps.records(c)
    before = snapshot(plugin)
    real_write, real_create = _io.write_file, _io.create_file

    def full(real):
        def no_space(p, value, **kwargs):
            if f"/{part}" in str(p):
                raise OSError(errno.ENOSPC, "No space left on device", str(p))
            return real(p, value, **kwargs)

        return no_space

    FullDisk.full = True
    # Both ways a local store writes a file: replaced (a temporary file renamed or
    # linked into place) and created in place (a payload array's files).
    monkeypatch.setattr(_io, "write_file", full(real_write))
    monkeypatch.setattr(_io, "create_file", full(real_create))
    with pytest.raises(NotDurable, match="No space left"):
        check_reply(await push(1), "push")
    FullDisk.full = False
    monkeypatch.setattr(_io, "write_file", real_write)
    monkeypatch.setattr(_io, "create_file", real_create)
    assert snapshot(plugin) == before
    assert await dask_ftps.status(c) == status
    assert await dask_ftps.records(c) == records
    whole = 2 if fails == "record" else 1  # a torn array is never adopted
    assert dask_ftps.inspect(where)["updates"] == whole
    assert dask_ftps.recover(where)[0] == whole
    assert plugin.state.version == 1
    check_reply(await push(1), "push")  # room again: the same update goes in
    assert (await dask_ftps.status(c))["updates"] == 2
    assert dask_ftps.inspect(where)["updates"] == 2
    assert (await same_as_offline(c, where))[0] == plugin.state.version == 2


@gen_cluster(client=True)
async def test_a_start_that_loses_the_race_for_its_claim_reads_the_store_again(
    c, s, a, b, tmp_path, monkeypatch
):
    """Another server writes the log between this start's read and its claim: the
    claim fails, and the start reads the store again and claims after it."""
    import dask_ftps._recovery as plugin_module
    from dask_ftps._store import Journal

    store = str(tmp_path / "run.zarr")
    await c.register_plugin(ParameterServer(store, model=MODEL))
    await c.register_plugin(ParameterServer(store))  # incarnation 2
    real_rebuild = plugin_module.rebuild
    raced = []

    async def rebuild_then_race(journal, **kwargs):
        rebuilt = await real_rebuild(journal, **kwargs)
        if not raced:
            other = await Journal.open(store)
            raced.append(await other.claim("tcp://10.255.255.1:1"))  # gone at once
            await other.close()
        return rebuilt

    monkeypatch.setattr(plugin_module, "rebuild", rebuild_then_race)
    with captured_logger("dask_ftps._store._ownership", level=logging.WARNING) as log:
        await c.register_plugin(ParameterServer(store))
    assert raced == [3]
    assert "lost a race" in log.getvalue()
    assert (await dask_ftps.status(c))["incarnation"] == 4


@gen_cluster(client=True)
async def test_a_push_whose_next_step_is_not_a_step_is_refused_before_it_counts(
    c, s, a, b
):
    await c.register_plugin(ParameterServer(model=MODEL, mode="sync"))
    check_reply(await c.scheduler.ftps_begin_run(spec=SPEC), "begin")
    plugin = s.plugins["ftps"]
    before = snapshot(plugin)
    for next_step in ((10**6, 0), (0, 99), (1, 0)):
        reply = await c.scheduler.ftps_push(
            server_id=await server_id(c),
            holder=holder_of(c),
            worker="tcp://w:1", update_id="0:0:0:0", grads=ToPickle(good_grads()),
            incarnation=1, next_step=next_step,
        )  # fmt: skip
        with pytest.raises(dask_ftps.InvalidUpdate, match="not a step"):
            check_reply(reply, "push")
    assert snapshot(plugin) == before


# -- lifecycle ---------------------------------------------------------------------------


@gen_cluster(client=True)
async def test_a_replaced_or_closed_server_stops_its_tasks_and_closes_its_store(
    c, s, a, b, tmp_path
):
    store = str(tmp_path / "run.zarr")
    await c.register_plugin(ParameterServer(store, model=MODEL, snapshot_every=1))
    check_reply(await c.scheduler.ftps_begin_run(spec=SPEC), "begin")
    reply = await c.scheduler.ftps_push(
        server_id=await server_id(c),
        holder=holder_of(c),
        worker="tcp://w:1", update_id="0:0:0:0", grads=ToPickle(good_grads()),
        incarnation=1,
    )  # fmt: skip
    check_reply(reply, "push")
    old = s.plugins["ftps"].server
    await c.register_plugin(ParameterServer(store))
    assert old._merger.done()
    assert old._snapshot_task is None or old._snapshot_task.done()
    assert all(t.done() for t in old._tasks)
    assert old.journal.closed
    with pytest.raises(dask_ftps.StaleIncarnation):
        old.check_healthy()
    new = s.plugins["ftps"].server
    await s.plugins["ftps"].close()
    assert new._merger.done() and new.journal.closed
    assert "ftps_push" not in s.handlers
    # A clean close says so in the store: the next start need not ask the old
    # owner whether it is alive.
    from dask_ftps._store import Journal

    journal = await Journal.open(store, read_only=True)
    assert journal.head.kind == "release"
    assert journal.owner() is None


# -- blind spots: each test fails when the code it names is removed ----------------------


@gen_cluster(client=True, timeout=120)
async def test_a_push_whose_reply_is_lost_is_sent_again_and_applied_once(c, s, a, b):
    """End to end: every third push reaches the server but its reply is lost (the
    connection breaks); the worker sends it again, the server refuses the second
    copy as a duplicate, and each minibatch is applied exactly once. Without the
    server's duplicate check, ids would be applied twice."""
    X_train, _, y_train, _ = digits()
    await c.register_plugin(ParameterServer(model=MLP(64, (16,), 10), mode="async"))
    lost = Counter()
    for worker in (a, b):
        plugin = worker.plugins["ftps"]
        send = plugin._send

        # Each worker counts its own pushes: a push sent again is the next one
        # and goes through (one shared count could lose every attempt of one).
        async def flaky(op, _send=send, _mine=worker.address, **kwargs):
            reply = await _send(op, **kwargs)
            if op == "ftps_push":
                lost[_mine] += 1
                if lost[_mine] % 3 == 0:
                    lost["lost"] += 1
                    raise CommClosedError("the reply was lost")
            return reply

        plugin._send = flaky
    with captured_logger("dask_ftps.protocol", level=logging.INFO) as log:
        result = await dask_ftps.train(
            c, X_train, y_train, epochs=2, batch_size=64, progress=False
        )
    assert lost["lost"] > 5
    assert log.getvalue().count("was already accepted") >= lost["lost"]
    ids = [r["update_id"] for r in (await dask_ftps.records(c))["global"]]
    assert len(ids) == len(set(ids)) == result.minibatches
    assert result.version == result.minibatches


@gen_cluster(client=True, timeout=120)
async def test_a_rebuild_keeps_the_update_count_and_the_download_dataset(
    c, s, a, b, tmp_path
):
    """The rebuilt server counts every update and knows the downloads the log
    holds (those of its newest commit: a reply sent after it is not durable).
    Momentum keeps the rebuild on the snapshot, so that it replays."""
    store = str(tmp_path / "run.zarr")
    X_train, _, y_train, _ = digits()
    await c.register_plugin(
        ParameterServer(
            store,
            model=MLP(64, (16,), 10),
            optimizer=SGD(lr=0.05, momentum=0.5),
            snapshot_every=25,
        )
    )
    await dask_ftps.train(c, X_train, y_train, epochs=1, batch_size=32, progress=False)
    before = await dask_ftps.status(c)
    live = {r["worker"]: r["version"] for r in (await dask_ftps.records(c))["download"]}
    assert before["updates"] > 25 and live
    await c.register_plugin(ParameterServer(store))
    after = await dask_ftps.status(c)
    assert after["incarnation"] == before["incarnation"] + 1
    assert after["updates"] == before["updates"]
    assert after["recovery"]["start_version"] < before["version"]  # replayed some
    rebuilt = (await dask_ftps.records(c))["download"]
    assert {r["worker"] for r in rebuilt} == set(live)  # both workers pulled early
    assert all(0 < r["version"] <= live[r["worker"]] for r in rebuilt)


async def _trained_without_optimizer_state(c, s, tmp_path):
    """A stored run with plain SGD (the workers' copies can stand in for the
    snapshot): ``(store, journal)`` after one epoch."""
    store = str(tmp_path / "run.zarr")
    X_train, _, y_train, _ = digits()
    await c.register_plugin(
        ParameterServer(store, model=MLP(64, (16,), 10), optimizer=SGD(lr=0.05))
    )
    await dask_ftps.train(c, X_train, y_train, epochs=1, batch_size=32, progress=False)
    return store, s.plugins["ftps"].journal


def _plant(worker, **changes) -> None:
    """Replace the model copy a worker holds by a doctored one."""
    plugin = worker.plugins["ftps"]
    held = plugin.latest
    params = changes.pop("params", held.params)
    plugin.latest = ModelCopy(**{**held.__dict__, "params": params, **changes})


COPY_DOCTORING = {
    "another-run": lambda held, journal: {"run_id": "another"},
    "too-new": lambda held, journal: {"version": journal.version + 3},
    "older-than-its-row": lambda held, journal: {"version": 1},
    "other-bits": lambda held, journal: {
        "params": {k: v + np.float32(1e-3) for k, v in held.params.items()}
    },
}


@pytest.mark.parametrize("case", sorted(COPY_DOCTORING))
@gen_cluster(client=True, timeout=120)
async def test_a_workers_copy_is_used_only_if_the_store_vouches_for_it(
    c, s, a, b, tmp_path, case
):
    """The patent's recovery from a worker's model copy checks the copy's run,
    its version against its download row and the last commit, and its bits
    against the checksum that version's commit recorded."""
    store, journal = await _trained_without_optimizer_state(c, s, tmp_path)
    expected_version, expected = await dask_ftps.get_model(c)
    for worker in (a, b):
        _plant(worker, **COPY_DOCTORING[case](worker.plugins["ftps"].latest, journal))
    with captured_logger("dask_ftps._recovery", level=logging.WARNING) as log:
        await c.register_plugin(ParameterServer(store))
    assert log.getvalue().count("failed") == 2, log.getvalue()  # both refused
    status = await dask_ftps.status(c)
    assert status["recovery"]["source"] == "snapshot"
    version, params = await dask_ftps.get_model(c)
    assert version == expected_version
    for k, v in expected.items():
        np.testing.assert_array_equal(params[k], v)


@gen_cluster(client=True, timeout=120)
async def test_sync_mode_has_one_version_live_in_the_store_and_recovered(
    c, s, a, b, tmp_path
):
    """A sync round left open (some shards pushed, not all): the live server,
    inspect() and recover() name the same model version."""
    store = str(tmp_path / "run.zarr")
    await c.register_plugin(ParameterServer(store, model=MODEL, mode="sync"))
    spec = {"shard_sizes": [8, 8, 8], "batch_size": 4, "epochs": 1, "seed": 0}
    check_reply(await c.scheduler.ftps_begin_run(spec=spec), "begin")
    for shard in (0, 1, 2, 0):  # round 0 complete; round 1 open with one update
        step = 1 if shard == 0 and s.plugins["ftps"].state.version else 0
        check_reply(
            await c.scheduler.ftps_push(
                server_id=await server_id(c),
                holder=holder_of(c),
                worker=f"tcp://w{shard}:1", update_id=f"0:0:{shard}:{step}",
                grads=ToPickle(good_grads()), incarnation=1,
            ),
            "push",
        )  # fmt: skip
    status = await dask_ftps.status(c)
    assert status["updates"] == 4
    assert status["version"] == dask_ftps.inspect(store)["version"] == 1
    assert dask_ftps.recover(store)[0] == 1
    await c.register_plugin(ParameterServer(store))
    assert (await dask_ftps.status(c))["version"] == 1


@gen_cluster(client=True, timeout=120)
async def test_each_check_of_a_workers_copy_refuses_on_its_own(c, s, a, b, tmp_path):
    """Each check alone: a copy with the right bits but another run's id, a
    version outside its bounds, and a version whose bits differ."""
    from dask_ftps._recovery import checked_copy as _checked_copy

    _, journal = await _trained_without_optimizer_state(c, s, tmp_path)
    version, params = await dask_ftps.get_model(c)
    good = {"status": "OK", "run_id": journal.meta.run_id, "version": version,
            "params": params}  # fmt: skip
    assert _checked_copy(journal, good, version).version == version
    with pytest.raises(dask_ftps.FTPSError, match="another store's run"):
        _checked_copy(journal, {**good, "run_id": "x"}, version)
    with pytest.raises(dask_ftps.FTPSError, match="outside"):
        _checked_copy(journal, good, version + 1)  # older than its download row
    with pytest.raises(dask_ftps.FTPSError, match="outside"):
        _checked_copy(journal, {**good, "version": version + 1}, version)
    other = {k: v.copy() for k, v in params.items()}
    other["W0"][0, 0] += 1
    with pytest.raises(dask_ftps.FTPSError, match="differs from the model"):
        _checked_copy(journal, {**good, "params": other}, version)
    with pytest.raises(dask_ftps.FTPSError, match="arrays"):
        _checked_copy(journal, {**good, "params": {"W0": params["W0"]}}, version)


@gen_cluster(client=True, timeout=120)
async def test_worker_copies_off_rebuilds_from_the_store_alone(c, s, a, b, tmp_path):
    """``ftps.store.worker-copies: false``: workers hold copies the store vouches
    for, yet the recovery starts from the snapshot; on (the default), the same
    recovery starts from a worker's copy. Both give the same model."""
    store, _journal = await _trained_without_optimizer_state(c, s, tmp_path)
    expected_version, expected = await dask_ftps.get_model(c)
    with dask.config.set({"ftps.store.worker-copies": False}):
        await c.register_plugin(ParameterServer(store))
    assert (await dask_ftps.status(c))["recovery"]["source"] == "snapshot"
    await same_as_offline(c, store)
    await c.register_plugin(ParameterServer(store))
    assert (await dask_ftps.status(c))["recovery"]["source"] in (a.address, b.address)
    version, params = await dask_ftps.get_model(c)
    assert version == expected_version
    for k, v in expected.items():
        np.testing.assert_array_equal(params[k], v)
    with (
        dask.config.set({"ftps.store.worker-copies": "no"}),
        pytest.raises(dask_ftps.FTPSError, match="worker-copies must be"),
    ):
        await c.register_plugin(ParameterServer(store))
    assert (await dask_ftps.get_model(c))[0] == expected_version  # still serving
