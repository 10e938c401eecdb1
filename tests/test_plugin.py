"""The scheduler plugin's handlers, installation and error replies."""

from __future__ import annotations

import copy
import logging
import warnings

import numpy as np
import pytest
from distributed import Worker
from distributed.protocol.serialize import ToPickle
from distributed.utils_test import captured_logger, gen_cluster

import dask_ftps
from dask_ftps import (
    DuplicateUpdate,
    InvalidRequest,
    InvalidUpdate,
    NotRegistered,
    ParameterServer,
    StaleIncarnation,
)
from dask_ftps._core import check_reply
from dask_ftps.models import MLP, SoftmaxRegression

MODEL = SoftmaxRegression(n_features=4, n_classes=3, seed=0)
SPEC = {"shard_sizes": [8, 8], "batch_size": 4, "epochs": 1, "seed": 0}


def good_grads() -> dict[str, np.ndarray]:
    return {
        k: np.full(v, 0.5, dtype=np.float32) for k, v in MODEL.param_shapes().items()
    }


def snapshot(state) -> dict:
    """Everything a refused request must leave unchanged."""
    return {
        "version": state.version,
        "params": {k: v.tobytes() for k, v in state.model.params.items()},
        "opt": {k: v.tobytes() for k, v in state.model.opt_state.items()},
        "updates": state.updates,
        "global": list(state.global_rows),
        "downloads": list(state.downloads),
        "clocks": [list(r.clocks) for r in state.runs],
        "holders": [(r.holder, r.superseded) for r in state.runs],
        "pending": copy.copy(state.pending),
    }


async def server_id(c) -> str:
    """The id that every message of a run on the scheduler's server names."""
    return check_reply(await c.scheduler.ftps_status(), "status")["server_id"]


def holder_of(c) -> str:
    """The train() call that the raw pushes, pulls and next_steps of client
    ``c`` name (every one names its call: the run's holder, if it has one)."""
    return f"{c.id}/0"


async def push(c, update_id="0:0:0:0", grads=None, incarnation=1, **kwargs):
    kwargs.setdefault("server_id", await server_id(c))
    kwargs.setdefault("holder", holder_of(c))
    reply = await c.scheduler.ftps_push(
        worker="tcp://test:1",
        update_id=update_id,
        grads=ToPickle(good_grads() if grads is None else grads),
        incarnation=incarnation,
        **kwargs,
    )
    return check_reply(reply, "ftps_push")


@gen_cluster(client=True)
async def test_register_installs_handlers_and_worker_plugin(c, s, a, b):
    await c.register_plugin(ParameterServer(model=MODEL, mode="async"))
    assert isinstance(s.plugins["ftps"], ParameterServer)
    assert {"ftps_push", "ftps_pull", "ftps_status"} <= set(s.handlers)
    assert "ftps" in a.plugins and "ftps" in b.plugins
    async with Worker(s.address) as late:  # a worker that joins later gets it too
        assert "ftps" in late.plugins
    status = await dask_ftps.status(c)
    assert status["version"] == 0
    assert status["mode"] == "async"
    assert status["incarnation"] == 1
    assert status["updates"] == 0
    assert set(status["workers"]) == {a.address, b.address}
    version, params = await dask_ftps.get_model(c)
    assert version == 0
    for name, value in MODEL.init_params().items():
        np.testing.assert_array_equal(params[name], value)

    await s.plugins["ftps"].close()
    assert "ftps_push" not in s.handlers
    await s.plugins["ftps"].close()  # idempotent


@gen_cluster(client=True)
async def test_registering_again_replaces_without_a_warning(c, s, a, b):
    await c.register_plugin(ParameterServer(model=MODEL, mode="async"))
    first = s.plugins["ftps"]
    with (
        warnings.catch_warnings(record=True) as caught,
        captured_logger("dask_ftps._scheduler_plugin", level=logging.INFO) as log,
    ):
        warnings.simplefilter("always")
        await c.register_plugin(ParameterServer(model=MODEL, mode="sync"))
    assert not [w for w in caught if "already contains a plugin" in str(w.message)]
    assert "Replacing the registered parameter server" in log.getvalue()
    assert s.plugins["ftps"] is not first
    assert (await dask_ftps.status(c))["mode"] == "sync"


@gen_cluster(client=True)
async def test_unregistered_server_is_a_clear_error(c, s, a, b):
    with pytest.raises(NotRegistered, match=r"register a dask_ftps\.ParameterServer"):
        await dask_ftps.status(c)
    # train() asks first: the scheduler logs no "No handler" traceback for it.
    with (
        captured_logger("distributed.core", level=logging.WARNING) as log,
        pytest.raises(NotRegistered, match="hosts no parameter server"),
    ):
        await dask_ftps.train(
            c, np.zeros((8, 4)), np.zeros(8, int), epochs=1, batch_size=4
        )
    assert "No handler" not in log.getvalue()


@gen_cluster(client=True)
async def test_push_pull_round_trip(c, s, a, b):
    await c.register_plugin(ParameterServer(model=MODEL, mode="async"))
    begun = check_reply(await c.scheduler.ftps_begin_run(spec=SPEC), "begin")
    assert begun["run"] == 0
    assert [tuple(n) for n in begun["next"]] == [(0, 0), (0, 0)]
    sid = begun["server_id"]
    assert sid == await server_id(c)
    pulled = check_reply(
        await c.scheduler.ftps_pull(
            worker="tcp://test:1",
            run=0,
            shard=0,
            epoch=0,
            step=0,
            server_id=sid,
            holder=holder_of(c),
        ),
        "pull",
    )
    assert pulled["version"] == 0 and isinstance(pulled["params"]["W"], np.ndarray)
    server = pulled["server"]
    reply = await push(c, next_step=(0, 1), have_version=0, have_server=server)
    assert reply["version"] == 1 and reply["server"] == server
    assert isinstance(reply["params"]["W"], np.ndarray)
    state = s.plugins["ftps"].state
    assert state.version == 1
    assert state.records()["global"] == [
        {"update_id": "0:0:0:0", "worker": "tcp://test:1", "version": 1}
    ]
    assert ("tcp://test:1", 1) in state.downloads
    # Not newer than what the caller has: no payload comes back.
    again = check_reply(
        await c.scheduler.ftps_pull(
            worker="tcp://test:1",
            run=0,
            shard=0,
            epoch=0,
            step=1,
            have_version=1,
            have_server=server,
            server_id=sid,
            holder=holder_of(c),
        ),
        "pull",
    )
    assert again["params"] is None
    # The same version number from another server object is another model.
    other = check_reply(
        await c.scheduler.ftps_pull(
            worker="tcp://test:1",
            run=0,
            shard=0,
            epoch=0,
            step=1,
            have_version=1,
            have_server="another server",
            server_id=sid,
            holder=holder_of(c),
        ),
        "pull",
    )
    assert isinstance(other["params"]["W"], np.ndarray)
    step = check_reply(
        await c.scheduler.ftps_next_step(
            run=0, shard=0, server_id=sid, holder=holder_of(c)
        ),
        "next",
    )
    assert (step["epoch"], step["step"]) == (0, 1)


BAD_PUSHES = {
    "nan": (
        {"grads": {**good_grads(), "W": np.full((4, 3), np.nan, np.float32)}},
        InvalidUpdate,
        "NaN or Inf",
    ),
    "inf": (
        {"grads": {**good_grads(), "b": np.array([1, np.inf, 0], np.float32)}},
        InvalidUpdate,
        "NaN or Inf",
    ),
    "shape": (
        {"grads": {**good_grads(), "W": np.zeros((3, 4), np.float32)}},
        InvalidUpdate,
        "shape",
    ),
    "dtype": (
        {"grads": {**good_grads(), "W": np.zeros((4, 3), np.float64)}},
        InvalidUpdate,
        "dtype",
    ),
    "unknown-name": (
        {"grads": {**good_grads(), "V": np.zeros(3, np.float32)}},
        InvalidUpdate,
        "unknown parameter names",
    ),
    "missing-name": (
        {"grads": {"W": np.zeros((4, 3), np.float32)}},
        InvalidUpdate,
        "missing",
    ),
    "id-format": (
        {"update_id": "epoch-0-step-1"},
        InvalidUpdate,
        "run:epoch:shard:step",
    ),
    "id-type": ({"update_id": 17}, InvalidUpdate, "run:epoch:shard:step"),
    "unknown-run": ({"update_id": "5:0:0:0"}, InvalidUpdate, "unknown run"),
    "no-such-step": ({"update_id": "0:0:0:9"}, InvalidUpdate, "no such step"),
    "out-of-order": ({"update_id": "0:0:0:1"}, InvalidUpdate, "out of order"),
    "stale-incarnation": ({"incarnation": 0}, StaleIncarnation, "incarnation"),
}


@pytest.mark.parametrize("case", sorted(BAD_PUSHES))
@gen_cluster(client=True)
async def test_bad_push_is_refused_and_changes_nothing(c, s, a, b, case):
    kwargs, error, match = BAD_PUSHES[case]
    await c.register_plugin(ParameterServer(model=MODEL, mode="async"))
    check_reply(await c.scheduler.ftps_begin_run(spec=SPEC), "begin")
    state = s.plugins["ftps"].state
    before = snapshot(state)
    with pytest.raises(error, match=match):
        await push(c, **kwargs)
    assert snapshot(state) == before
    await push(c)  # the server still works
    assert state.version == 1


@gen_cluster(client=True)
async def test_duplicate_push_is_refused_and_changes_nothing(c, s, a, b):
    await c.register_plugin(ParameterServer(model=MODEL, mode="async"))
    check_reply(await c.scheduler.ftps_begin_run(spec=SPEC), "begin")
    await push(c)
    state = s.plugins["ftps"].state
    before = snapshot(state)
    with pytest.raises(DuplicateUpdate, match="already accepted"):
        await push(c)
    assert snapshot(state) == before


#: A valid push of run 0 but for the field a case spoils.
_PUSH = {
    "worker": "tcp://w:1",
    "update_id": "0:0:0:0",
    "grads": ToPickle(good_grads()),
    "incarnation": 1,
}

BAD_REQUESTS = {
    "begin-not-dict": ("ftps_begin_run", {"spec": [1, 2]}, "must be a dict"),
    "begin-bad-batch": (
        "ftps_begin_run",
        {"spec": {**SPEC, "batch_size": 0}},
        "batch_size",
    ),
    "begin-no-shards": (
        "ftps_begin_run",
        {"spec": {**SPEC, "shard_sizes": []}},
        "shard_sizes",
    ),
    "begin-missing": ("ftps_begin_run", {}, "spec"),
    "next-unknown-run": ("ftps_next_step", {"run": 3, "shard": 0}, "unknown run"),
    "next-bad-shard": ("ftps_next_step", {"run": 0, "shard": 7}, "unknown shard"),
    "pull-unknown-run": (
        "ftps_pull",
        {"worker": "w", "run": 9, "shard": 0, "epoch": 0, "step": 0},
        "unknown run",
    ),
    "pull-missing-keys": ("ftps_pull", {"worker": "w"}, "ftps_pull|pull"),
    # Who holds a run, and which server a message names (contract 8).
    "begin-holder-not-hex": (
        "ftps_begin_run",
        {"spec": SPEC, "holder": "Client-a/ended"},
        "holder",
    ),
    "begin-holder-no-client": (
        "ftps_begin_run",
        {"spec": SPEC, "holder": "/1"},
        "holder",
    ),
    "begin-holder-long": (
        "ftps_begin_run",
        {"spec": SPEC, "holder": "C" * 129 + "/1"},
        "holder",
    ),
    "begin-holder-newline": (
        "ftps_begin_run",
        {"spec": SPEC, "holder": "Client-a/1\n"},
        "holder",
    ),
    "begin-live-another-client": (
        "ftps_begin_run",
        {"spec": SPEC, "holder": "Client-a/1", "live": ["Client-a/1", "Client-b/1"]},
        "own client",
    ),
    "begin-live-without-holder": (
        "ftps_begin_run",
        {"spec": SPEC, "live": ["Client-a/1"]},
        "own client",
    ),
    "begin-live-bad-entry": (
        "ftps_begin_run",
        {"spec": SPEC, "holder": "Client-a/1", "live": ["Client-a/1", "Client-a"]},
        "live holder",
    ),
    "begin-live-too-many": (
        "ftps_begin_run",
        {
            "spec": SPEC,
            "holder": "Client-a/1",
            "live": [f"Client-a/{i:x}" for i in range(65)],
        },
        "at most 64",
    ),
    "begin-server-id-int": (
        "ftps_begin_run",
        {"spec": SPEC, "server_id": 7},
        "server_id",
    ),
    "begin-server-id-empty": (
        "ftps_begin_run",
        {"spec": SPEC, "server_id": ""},
        "server_id",
    ),
    "next-server-id-long": (
        "ftps_next_step",
        {"run": 0, "shard": 0, "server_id": "s" * 129},
        "server_id",
    ),
    "next-server-id-bytes": (
        "ftps_next_step",
        {"run": 0, "shard": 0, "server_id": b"id"},
        "server_id",
    ),
    "end-run-holder-not-hex": (
        "ftps_end_run",
        {"run": 0, "holder": "Client-a/x"},
        "holder",
    ),
    "end-run-server-id-list": (
        "ftps_end_run",
        {"run": 0, "holder": "Client-a/1", "server_id": ["id"]},
        "server_id",
    ),
    "push-missing-keys": ("ftps_push", {"worker": "w"}, "push"),
    # Every push, pull and next_step names the train() call it belongs to.
    "next-holder-missing": ("ftps_next_step", {"run": 0, "shard": 0, "holder": None}, "holder"),
    "next-holder-not-hex": ("ftps_next_step", {"run": 0, "shard": 0, "holder": "Client-a/zz"}, "holder"),
    "pull-holder-missing": ("ftps_pull", {"worker": "w", "run": 0, "shard": 0, "epoch": 0, "step": 0, "holder": None}, "holder"),
    "pull-holder-int": ("ftps_pull", {"worker": "w", "run": 0, "shard": 0, "epoch": 0, "step": 0, "holder": 7}, "holder"),
    "pull-holder-no-token": ("ftps_pull", {"worker": "w", "run": 0, "shard": 0, "epoch": 0, "step": 0, "holder": "Client-a/"}, "holder"),
    "push-holder-missing": ("ftps_push", {**_PUSH, "holder": None}, "holder"),
    "push-holder-list": ("ftps_push", {**_PUSH, "holder": ["Client-a/1"]}, "holder"),
    "push-holder-long": ("ftps_push", {**_PUSH, "holder": "C" * 129 + "/1"}, "holder"),
    "push-holder-two-slashes": ("ftps_push", {**_PUSH, "holder": "Client-a/1/2"}, "holder"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
@gen_cluster(client=True)
async def test_bad_request_is_refused_and_changes_nothing(c, s, a, b, case):
    op, kwargs, match = BAD_REQUESTS[case]
    await c.register_plugin(ParameterServer(model=MODEL, mode="async"))
    check_reply(await c.scheduler.ftps_begin_run(spec=SPEC), "begin")
    state = s.plugins["ftps"].state
    before = snapshot(state)
    if op != "ftps_begin_run":
        kwargs = {"server_id": await server_id(c), **kwargs}
    if op in ("ftps_next_step", "ftps_pull", "ftps_push"):
        kwargs = {"holder": holder_of(c), **kwargs}
    with pytest.raises(InvalidRequest, match=match):
        check_reply(await getattr(c.scheduler, op)(**kwargs), op)
    assert snapshot(state) == before
    assert len(state.runs) == 1


def test_constructor_rejects_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        ParameterServer(model=MODEL, mode="hogwild")
    with pytest.raises(ValueError, match="staleness"):
        ParameterServer(model=MODEL, mode="ssp", staleness=-1)
    with pytest.raises(TypeError, match="model must be"):
        ParameterServer(model="mlp")
    with pytest.raises(TypeError, match="optimizer"):
        ParameterServer(model=MODEL, optimizer=0.1)


@gen_cluster(client=True)
async def test_train_rejects_bad_data(c, s, a, b):
    await c.register_plugin(ParameterServer(model=MODEL))
    X = np.zeros((16, 4), np.float32)
    y = np.zeros(16, np.int64)
    with pytest.raises(ValueError, match="features"):
        await dask_ftps.train(c, np.zeros((16, 5)), y, epochs=1, batch_size=4)
    with pytest.raises(ValueError, match="rows"):
        await dask_ftps.train(c, X, y[:10], epochs=1, batch_size=4)
    with pytest.raises(ValueError, match="integer class labels"):
        await dask_ftps.train(c, X, y.astype(float), epochs=1, batch_size=4)
    with pytest.raises(ValueError, match="n_shards"):
        await dask_ftps.train(c, X, y, epochs=1, batch_size=4, n_shards=0)
    with pytest.raises(InvalidRequest, match="epochs"):
        await dask_ftps.train(c, X, y, epochs=0, batch_size=4)
    assert s.plugins["ftps"].state.runs == []


@gen_cluster(client=True, config={"ftps.offload-threshold": 1})
async def test_large_merges_run_off_the_event_loop(c, s, a, b):
    model = MLP(n_features=4, hidden=(8,), n_classes=3)
    await c.register_plugin(ParameterServer(model=model))
    plugin = s.plugins["ftps"]
    threads = []
    merge = plugin.state.merge

    def spy(admission):
        import threading

        threads.append(threading.current_thread().name)
        return merge(admission)

    plugin.state.merge = spy
    check_reply(await c.scheduler.ftps_begin_run(spec=SPEC), "begin")
    grads = {k: np.zeros(v, np.float32) for k, v in model.param_shapes().items()}
    await push(c, grads=grads)
    assert threads and all("Offload" in t for t in threads), threads
