"""Runs that cannot mix: a run's identity on every message, one call per run,
the same call means the same run, and clear errors when a server or the
scheduler goes away."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
from distributed import Client
from distributed.comm import CommClosedError
from distributed.protocol.serialize import ToPickle
from distributed.utils_test import async_poll_for, gen_cluster

import dask_ftps
from dask_ftps import (
    SGD,
    InvalidRequest,
    ParameterServer,
    RunInUse,
    SchedulerLost,
    ServerReplaced,
    SpecMismatch,
)
from dask_ftps._core import Holder, RunSpec, Update, UpdateKey, WorkerId, check_reply
from dask_ftps._state import ParameterServerState
from dask_ftps.models import SoftmaxRegression
from dask_ftps.training import _driver as training_module

from .conftest import digits
from .test_plugin import (
    MODEL,
    SPEC,
    good_grads,
    holder_of,
    push,
    server_id,
    snapshot,
)

DIGITS = SoftmaxRegression(64, 10, seed=0)


def _state() -> ParameterServerState:
    return ParameterServerState(MODEL, SGD(lr=0.1), mode="async")


def _alive(*holders: str):
    return lambda holder: holder in holders


# -- the state machine: holders and the same call --------------------------------------


def test_a_run_a_live_call_holds_is_neither_resumed_nor_superseded_by_another():
    state = _state()
    spec = RunSpec((8, 8), batch_size=4, epochs=1)
    a, b = Holder("Client-a/1"), Holder("Client-b/1")
    run = state.begin_run(spec, holder=a)
    assert run.holder == a
    with pytest.raises(RunInUse, match="Client-a"):
        state.begin_run(spec, holder=b, alive=_alive(a))  # the same run
    with pytest.raises(RunInUse, match="supersedes"):
        state.begin_run(RunSpec((8, 8), 2, 1), "other", holder=b, alive=_alive(a))
    assert len(state.runs) == 1 and not run.superseded and run.holder == a
    # Its holder gone (client closed, call ended): resumed as before, by b.
    assert state.begin_run(spec, holder=b, alive=_alive()) is run
    assert run.holder == b
    state.release(0, a)  # not a's any more: a no-op
    assert run.holder == b
    state.release(0, b)
    assert run.holder is None
    assert state.held(_alive(a, b)) is None


def test_a_failed_run_start_leaves_the_current_runs_holder_alone():
    """A call starting a run that supersedes the one it holds, whose start is
    then rolled back (its record could not be made durable): the run it held
    is held as before, not left free for another client."""
    state = _state()
    a, b = Holder("Client-a/1"), Holder("Client-b/1")
    run = state.begin_run(RunSpec((8, 8), batch_size=4, epochs=1), holder=a)
    mark = state.mark()
    state.begin_run(RunSpec((8, 8), 2, 1), "other", holder=a, alive=_alive(a))
    assert run.superseded
    state.rollback(mark)
    assert not run.superseded and run.holder == a
    with pytest.raises(RunInUse, match="Client-a"):
        state.begin_run(RunSpec((8, 8), 2, 1), "b's", holder=b, alive=_alive(a))
    assert state.held(_alive(a)) is run


def test_a_finished_run_is_returned_for_the_same_spec_and_refused_for_another():
    state = _state()
    spec = RunSpec((8,), batch_size=4, epochs=1)
    run = state.begin_run(spec)
    for step in (0, 1):
        state.push(Update(UpdateKey(0, 0, 0, step), WorkerId("w"), good_grads()))
    assert run.finished
    assert state.begin_run(spec) is run
    for other in (
        RunSpec((4, 4), batch_size=4, epochs=1),  # shards
        RunSpec((8,), batch_size=2, epochs=1),  # batch size
        RunSpec((8,), batch_size=4, epochs=2),  # epochs
        RunSpec((8,), batch_size=4, epochs=1, seed=1),  # seed
        RunSpec((9,), batch_size=4, epochs=1),  # data size
    ):
        with pytest.raises(SpecMismatch, match="give another run_name"):
            state.begin_run(other)
    assert len(state.runs) == 1
    assert state.begin_run(RunSpec((4, 4), 4, 1), "more").run == 1


# -- the server: every message names its server -----------------------------------------


@gen_cluster(client=True)
async def test_messages_of_another_servers_run_are_refused_before_they_change_anything(
    c, s, a, b
):
    await c.register_plugin(ParameterServer(model=MODEL, mode="async"))
    begun = check_reply(await c.scheduler.ftps_begin_run(spec=SPEC), "begin")
    sid = begun["server_id"]
    assert sid == s.plugins["ftps"].server.server_id
    state = s.plugins["ftps"].state
    await push(c, server_id=sid)
    before = (state.version, state.updates, [list(r.clocks) for r in state.runs])
    pull = {"worker": "tcp://w:1", "run": 0, "shard": 1, "epoch": 0, "step": 0}
    for op, kwargs in [
        ("ftps_push", {"worker": "tcp://w:1", "update_id": "0:0:1:0",
                       "grads": ToPickle(good_grads()), "incarnation": 1}),
        ("ftps_pull", pull),
        ("ftps_next_step", {"run": 0, "shard": 1}),
        ("ftps_end_epoch", {"run": 0, "epoch": 0, "values": {"loss": 1.0}}),
    ]:  # fmt: skip
        for other, error in [
            ("another-server", ServerReplaced),
            (None, InvalidRequest),
        ]:
            if op != "ftps_end_epoch":
                kwargs = {"holder": holder_of(c), **kwargs}
            reply = await getattr(c.scheduler, op)(server_id=other, **kwargs)
            with pytest.raises(error, match=r"server_id|not served here"):
                check_reply(reply, op)
    assert (
        state.version,
        state.updates,
        [list(r.clocks) for r in state.runs],
    ) == before
    assert state.runs[0].history == {}
    # A fresh memory-only server shares no run with the one it replaced: the same
    # message, run 0 and incarnation 1 on both, is refused. (The pushes' call,
    # which holds run 0 since its first push, ends first: else no server replaces
    # the one it trains on.)
    check_reply(
        await c.scheduler.ftps_end_run(server_id=sid, run=0, holder=holder_of(c)),
        "end",
    )
    await c.register_plugin(ParameterServer(model=MODEL, mode="async"))
    check_reply(await c.scheduler.ftps_begin_run(spec=SPEC), "begin")
    assert await server_id(c) != sid
    with pytest.raises(ServerReplaced, match="not served here"):
        await push(c, "0:0:1:0", server_id=sid)
    assert s.plugins["ftps"].state.updates == 0


@gen_cluster(client=True)
async def test_a_server_on_the_same_store_goes_on_with_its_runs(c, s, a, b, tmp_path):
    store = str(tmp_path / "run.zarr")
    await c.register_plugin(ParameterServer(store, model=MODEL))
    begun = check_reply(await c.scheduler.ftps_begin_run(spec=SPEC), "begin")
    await push(c, server_id=begun["server_id"])
    await c.register_plugin(ParameterServer(store))  # a rebuild: the same runs
    assert await server_id(c) == begun["server_id"]
    await push(c, "0:0:1:0", server_id=begun["server_id"], incarnation=2)
    assert s.plugins["ftps"].state.updates == 2


@gen_cluster(client=True)
async def test_a_server_on_the_same_store_keeps_the_holds_of_its_runs(
    c, s, a, b, tmp_path
):
    """Registered again on the same store (a rebuild) while a connected
    client's call trains a run: that call still holds it, so another client can
    neither resume it nor supersede it."""
    store = str(tmp_path / "run.zarr")
    await c.register_plugin(ParameterServer(store, model=MODEL))
    holder = Holder(f"{c.id}/a1")
    begun = check_reply(
        await c.scheduler.ftps_begin_run(spec=SPEC, name="r", holder=holder), "begin"
    )
    await push(c, server_id=begun["server_id"], holder=holder)
    async with Client(s.address, asynchronous=True) as c2:
        await c2.register_plugin(ParameterServer(store))  # the same runs go on
        state = s.plugins["ftps"].state
        assert state.incarnation == 2 and state.runs[0].holder == holder
        other = Holder(f"{c2.id}/b2")
        for name, spec in (("r", SPEC), ("other", {**SPEC, "epochs": 2})):
            reply = await c2.scheduler.ftps_begin_run(
                spec=spec, name=name, holder=other, live=[other]
            )
            with pytest.raises(RunInUse, match=c.id):
                check_reply(reply, "begin")
        assert len(state.runs) == 1 and state.runs[0].holder == holder
    await push(c, "0:0:1:0", server_id=begun["server_id"], incarnation=2, holder=holder)
    assert s.plugins["ftps"].state.updates == 2


@gen_cluster(client=True)
async def test_a_client_that_goes_holds_no_run(c, s, a, b):
    """A client's call that never released its run (its begin_run reply was
    lost, or the client was reconnecting when it ended): once the client
    disconnects, the run is free, also when the same client comes back."""
    await c.register_plugin(ParameterServer(model=MODEL))
    state = s.plugins["ftps"].state
    async with Client(s.address, asynchronous=True) as c2:
        leaked = Holder(f"{c2.id}/1eaced")
        check_reply(
            await c2.scheduler.ftps_begin_run(spec=SPEC, holder=leaked), "begin"
        )
        assert state.runs[0].holder == leaked
        # The comm drops; the client reconnects with its id.
        await s.client_comms[c2.id].comm.close()
        await async_poll_for(lambda: state.runs[0].holder is None, timeout=10)
        await async_poll_for(lambda: c2.id in s.clients, timeout=20)
        await async_poll_for(lambda: c2.status == "running", timeout=20)
        other = Holder(f"{c.id}/2")
        begun = check_reply(
            await c.scheduler.ftps_begin_run(
                spec={**SPEC, "epochs": 2}, name="mine", holder=other
            ),
            "begin",
        )
        assert begun["run"] == 1 and state.runs[0].superseded
        check_reply(
            await c.scheduler.ftps_end_run(
                server_id=begun["server_id"], run=1, holder=other
            ),
            "end",
        )
        # A client that closes without releasing: free as well.
        check_reply(
            await c2.scheduler.ftps_begin_run(
                spec=SPEC, name="again", holder=leaked, live=[leaked]
            ),
            "begin",
        )
        assert state.runs[2].holder == leaked
    await async_poll_for(lambda: state.runs[2].holder is None, timeout=10)


@gen_cluster(client=True)
async def test_a_run_begun_while_its_server_is_replaced_is_refused(c, s, a, b):
    """A begin_run waiting for the old server's state when a new server passed
    its check: it takes no hold there (the retirement would end its run)."""
    await c.register_plugin(ParameterServer(model=MODEL))
    old = s.plugins["ftps"].server
    await old._lock.acquire()  # the old server is busy (a batch being written)
    released = False
    try:
        begin = asyncio.ensure_future(
            c.scheduler.ftps_begin_run(
                spec=SPEC, holder=f"{c.id}/1", server_id=old.server_id
            )
        )
        await async_poll_for(lambda: len(old._lock._waiters or ()) == 1, timeout=10)
        register = asyncio.ensure_future(
            c.register_plugin(ParameterServer(model=MODEL))
        )
        await async_poll_for(lambda: len(old._lock._waiters or ()) == 2, timeout=10)
        old._lock.release()  # the begin_run waited first: it goes first
        released = True
        with pytest.raises(ServerReplaced, match="being replaced"):
            check_reply(await begin, "begin")
        await register
    finally:
        if not released:
            old._lock.release()
    assert s.plugins["ftps"].server is not old
    assert old.state.runs == []


# -- two calls at once ----------------------------------------------------------------


def _relabelled(y: np.ndarray, shift: int) -> np.ndarray:
    return (y + shift) % 10


async def _train_waiting_for(
    c, y, other_done: threading.Event, reached: threading.Event | None = None, **kwargs
):
    """train() whose first epoch's callback waits (at most 30 s) for the other
    call to end: the two calls overlap whichever starts first. ``reached`` is
    set once the callback waits (no task of the call is running then)."""
    X_train, _, _, _ = digits()

    def wait(epoch, record):
        if reached is not None:
            reached.set()
        other_done.wait(30)

    return await dask_ftps.train(
        c, X_train, y, epochs=2, batch_size=32, progress=False, callbacks=[wait],
        **kwargs,
    )  # fmt: skip


async def _both(c1, c2, **kwargs):
    """Two train() calls at once, same settings, different labels: each result
    or error, and each call's labels."""
    _, _, y_train, _ = digits()
    labels = [y_train, _relabelled(y_train, 3)]
    done = [threading.Event(), threading.Event()]

    async def one(i, c):
        try:
            return await _train_waiting_for(c, labels[i], done[1 - i], **kwargs)
        except Exception as e:  # noqa: BLE001 - compared below
            return e
        finally:
            done[i].set()

    outcomes = await asyncio.gather(one(0, c1), one(1, c2))
    return outcomes, labels


def _check_one_trained_and_one_refused(outcomes, labels, params, rows) -> None:
    trained = [i for i, o in enumerate(outcomes) if not isinstance(o, Exception)]
    refused = [i for i, o in enumerate(outcomes) if isinstance(o, Exception)]
    assert len(trained) == len(refused) == 1, outcomes
    (i,), (j,) = trained, refused
    assert isinstance(outcomes[j], RunInUse), outcomes[j]
    result = outcomes[i]
    assert result.trained
    # The global dataset: the run's minibatches, each once, nothing else.
    ids = [r["update_id"] for r in rows]
    assert len(ids) == len(set(ids)) == result.minibatches == result.version
    assert {u.split(":")[0] for u in ids} == {str(result.run)}
    # The model is the trainer's own: it learned its labels, not the other's.
    X_train, _, _, _ = digits()
    predicted = DIGITS.predict(params, X_train)
    assert (predicted == labels[i]).mean() > 0.8
    assert (predicted == labels[j]).mean() < 0.3


@gen_cluster(client=True, timeout=120)
async def test_two_clients_training_at_once_never_mix(c, s, a, b):
    await c.register_plugin(ParameterServer(model=DIGITS, optimizer=SGD(lr=0.5)))
    async with Client(s.address, asynchronous=True) as c2:
        outcomes, labels = await _both(c, c2)
    _, params = await dask_ftps.get_model(c)
    rows = (await dask_ftps.records(c))["global"]
    _check_one_trained_and_one_refused(outcomes, labels, params, rows)
    refused = next(o for o in outcomes if isinstance(o, Exception))
    assert "still connected" in str(refused)


@gen_cluster(client=True, timeout=120)
async def test_two_calls_of_one_client_at_once_never_mix(c, s, a, b):
    """Threads sharing one client: each call holds its run by its own id."""
    await c.register_plugin(ParameterServer(model=DIGITS, optimizer=SGD(lr=0.5)))
    outcomes, labels = await _both(c, c)
    _, params = await dask_ftps.get_model(c)
    rows = (await dask_ftps.records(c))["global"]
    _check_one_trained_and_one_refused(outcomes, labels, params, rows)


@gen_cluster(client=True, timeout=120)
async def test_a_call_after_one_that_ended_takes_its_run_over(c, s, a, b):
    """A call that ended without saying so (its release was lost) holds its run
    no more: the client's next call resumes it."""
    X_train, _, y_train, _ = digits()
    await c.register_plugin(ParameterServer(model=DIGITS, optimizer=SGD(lr=0.5)))
    plugin = s.plugins["ftps"]
    spec = RunSpec((len(y_train),), batch_size=32, epochs=1)
    stale = Holder(f"{c.id}/e0ded")
    check_reply(
        await c.scheduler.ftps_begin_run(spec=spec.to_dict(), holder=stale), "begin"
    )
    assert plugin.state.runs[0].holder == stale
    result = await dask_ftps.train(
        c, X_train, y_train, epochs=1, batch_size=32, n_shards=1, progress=False
    )
    assert (result.run, result.trained) == (0, True)
    assert plugin.state.runs[0].holder is None  # released at the end


# -- a server replaced mid-training ---------------------------------------------------


async def _wait_updates(s, n: int) -> None:
    """Wait until the scheduler's server accepted ``n`` updates."""
    await async_poll_for(lambda: s.plugins["ftps"].server.accepted >= n, timeout=30)


@gen_cluster(client=True, timeout=120)
async def test_a_server_a_connected_client_trains_on_is_not_replaced(c, s, a, b):
    _, _, y_train, _ = digits()
    await c.register_plugin(ParameterServer(model=DIGITS, optimizer=SGD(lr=0.5)))
    old = s.plugins["ftps"]
    checked = threading.Event()  # the first epoch's callback waits for it
    task = asyncio.ensure_future(_train_waiting_for(c, y_train, checked))
    try:
        await _wait_updates(s, 5)
        async with Client(s.address, asynchronous=True) as c2:
            with pytest.raises(RunInUse, match=f"client {c.id!r}, which is still co"):
                await c2.register_plugin(ParameterServer(model=DIGITS))
        assert s.plugins["ftps"] is old
    finally:
        checked.set()
    result = await task
    assert result.trained and result.version == result.minibatches
    rows = (await dask_ftps.records(c))["global"]
    assert len({r["update_id"] for r in rows}) == len(rows) == result.minibatches
    await c.register_plugin(ParameterServer(model=DIGITS))  # the run is finished


@gen_cluster(client=True, timeout=120)
async def test_a_fresh_server_never_receives_a_replaced_runs_updates(c, s, a, b):
    """A run whose server was replaced anyway (its holder gone, its tasks still
    running): its pushes reach the new server, which refuses every one, and the
    call raises ServerReplaced at once, not after ftps.wait-timeout."""
    _, _, y_train, _ = digits()
    await c.register_plugin(ParameterServer(model=DIGITS, optimizer=SGD(lr=0.5)))
    old = s.plugins["ftps"]
    replaced = threading.Event()  # the first epoch's callback waits for it
    reached = threading.Event()
    task = asyncio.ensure_future(_train_waiting_for(c, y_train, replaced, reached))
    try:
        # Held by its first epoch's callback: no task pushes (a push of its call
        # would take the run again, its client being connected).
        await async_poll_for(reached.is_set, timeout=60)
        assert not task.done()
        old.state.runs[0].holder = None  # as if its client had gone
        await c.register_plugin(ParameterServer(model=DIGITS, optimizer=SGD(lr=0.5)))
    finally:
        replaced.set()
    new = s.plugins["ftps"]
    assert new is not old
    t0 = time.monotonic()
    with pytest.raises(ServerReplaced, match="not served here"):
        await task
    assert time.monotonic() - t0 < 120  # not ftps.wait-timeout (300 s)
    assert new.state.updates == 0 and len(new.state.runs) == 0
    assert len((await dask_ftps.records(c))["global"]) == 0


@gen_cluster(client=True, timeout=180)
async def test_a_run_freed_by_a_dropped_connection_is_taken_again_by_its_call(
    c, s, a, b
):
    """A train() call's client connection drops briefly: the scheduler frees its
    run's hold (``remove_client``) while the call goes on. Its tasks' next
    next_step, pull or push takes the run again for it, so another client's
    train() of the same run is refused with RunInUse rather than merged into
    the same model; the first call finishes its own model, each minibatch once."""
    X_train, _, y_train, _ = digits()
    await c.register_plugin(ParameterServer(model=DIGITS, optimizer=SGD(lr=0.5)))
    plugin = s.plugins["ftps"]
    kwargs = {"epochs": 3, "batch_size": 64, "progress": False, "run_name": "r"}
    seen = {}
    async with Client(s.address, asynchronous=True) as c2:

        async def callback(epoch, record):  # awaited on the event loop
            run = plugin.state.runs[0]
            if epoch == 0:
                assert run.holder.startswith(f"{c.id}/")
                seen["holder"] = run.holder
                plugin.remove_client(s, c.id)  # as a dropped connection frees it
                assert run.holder is None
            elif epoch == 1:
                # The call's tasks trained epoch 1: its run is its own again.
                seen["retaken"] = run.holder
                try:
                    seen["other"] = await dask_ftps.train(
                        c2, X_train, y_train, **kwargs
                    )
                except Exception as e:  # noqa: BLE001 - checked below
                    seen["other"] = e

        result = await dask_ftps.train(
            c, X_train, y_train, callbacks=[callback], **kwargs
        )
    assert isinstance(seen["other"], RunInUse), seen["other"]
    assert seen["retaken"] == seen["holder"]
    assert result.trained and result.run == 0 and len(plugin.state.runs) == 1
    assert result.version == result.minibatches == plugin.state.updates
    rows = (await dask_ftps.records(c))["global"]
    assert len({r["update_id"] for r in rows}) == len(rows) == result.minibatches
    assert plugin.state.runs[0].holder is None  # released when the call ended


@gen_cluster(client=True)
async def test_messages_of_another_call_are_refused_before_they_change_anything(
    c, s, a, b
):
    """Every push, pull and next_step names the train() call it belongs to: one
    of a call that does not hold the run (another client's, or another call
    of the same client) is refused with RunInUse and changes nothing, the
    hold included."""
    await c.register_plugin(ParameterServer(model=MODEL, mode="async"))
    mine = Holder(f"{c.id}/a1")
    sid = check_reply(
        await c.scheduler.ftps_begin_run(spec=SPEC, holder=mine), "begin"
    )["server_id"]
    await push(c, holder=mine)
    state = s.plugins["ftps"].state
    before = snapshot(state)
    async with Client(s.address, asynchronous=True) as c2:
        for other in (Holder(f"{c2.id}/b2"), Holder(f"{c.id}/c3")):
            for op, kwargs in [
                ("ftps_push", {"worker": "tcp://w:1", "update_id": "0:0:1:0",
                               "grads": ToPickle(good_grads()), "incarnation": 1,
                               "next_step": (0, 1)}),
                ("ftps_pull", {"worker": "tcp://w:1", "run": 0, "shard": 1,
                               "epoch": 0, "step": 0}),
                ("ftps_next_step", {"run": 0, "shard": 1}),
            ]:  # fmt: skip
                reply = await getattr(c2.scheduler, op)(
                    server_id=sid, holder=other, **kwargs
                )
                with pytest.raises(RunInUse, match="held by another train"):
                    check_reply(reply, op)
                assert snapshot(state) == before, op
    assert state.runs[0].holder == mine
    await push(c, "0:0:1:0", holder=mine)  # its own call's goes on
    assert state.updates == 2


def test_a_queued_update_of_a_run_another_call_took_is_refused_at_admission():
    """A push admitted once the run was taken by another call (its own call's
    hold freed while it was queued) is refused there, before it changes
    anything; a free run is taken again only by a call whose client is
    connected, and never once finished."""
    state = _state()
    a, b = Holder("Client-a/1"), Holder("Client-b/1")
    run = state.begin_run(RunSpec((8, 8), batch_size=4, epochs=1), holder=a)
    state.push(Update(UpdateKey(0, 0, 0, 0), WorkerId("w"), good_grads(), a))
    run.holder = b  # a's hold freed, b began the run
    update = Update(UpdateKey(0, 0, 0, 1), WorkerId("w"), good_grads(), a)
    with pytest.raises(RunInUse, match="held by another"):
        state.admit(update)
    with pytest.raises(RunInUse, match="held by another"):
        state.check_holder(0, a, _alive(a))
    assert (state.updates, list(run.clocks), run.holder) == (1, [1, 0], b)
    run.holder = None  # b's client dropped its connection too
    state.check_holder(0, a, _alive())  # a's client is gone as well: not taken
    assert run.holder is None
    assert state.check_holder(0, a, _alive(a)) is run and run.holder == a
    state.check_holder(0, a, _alive(a, b))  # its own: goes on
    assert run.holder == a


# -- the same call means the same run -----------------------------------------------------


@gen_cluster(client=True, timeout=120)
async def test_train_with_other_settings_after_a_finished_run_is_refused(c, s, a, b):
    X_train, _, y_train, _ = digits()
    await c.register_plugin(ParameterServer(model=DIGITS, optimizer=SGD(lr=0.5)))
    kwargs = {"epochs": 1, "batch_size": 64, "progress": False}
    first = await dask_ftps.train(c, X_train, y_train, n_shards=2, **kwargs)
    before = await dask_ftps.status(c)
    for other in ({"n_shards": 3}, {"seed": 1}, {"batch_size": 32}, {"epochs": 2}):
        with pytest.raises(SpecMismatch, match="give another run_name"):
            await dask_ftps.train(c, X_train, y_train, **{**kwargs, **other})
    with pytest.raises(SpecMismatch, match="samples"):
        await dask_ftps.train(c, X_train[:-5], y_train[:-5], **kwargs)
    assert await dask_ftps.status(c) == before
    again = await dask_ftps.train(c, X_train, y_train, **kwargs)  # its own shards
    assert (again.trained, again.run, again.version) == (False, 0, first.version)
    more = await dask_ftps.train(c, X_train, y_train, run_name="more", **kwargs)
    assert (more.trained, more.run) == (True, 1)


# -- clear errors when the scheduler goes --------------------------------------------------


def test_a_broken_connection_after_the_last_epoch_is_scheduler_lost():
    """The scheduler killed right after the last epoch: the final request fails
    with CommClosedError before the client notices; train() says SchedulerLost."""
    client = SimpleNamespace(status="running")

    async def body():
        raise CommClosedError("in <TCP (closed)>: Stream is closed")

    async def main():
        with pytest.raises(SchedulerLost, match="call train\\(\\) again") as info:
            await training_module._watched(client, body())
        assert isinstance(info.value.__cause__, CommClosedError)

    asyncio.run(main())


def test_a_call_made_while_nothing_listens_at_the_scheduler_gives_up_in_its_grace(
    monkeypatch,
):
    """A client still 'connecting' to a scheduler that is gone: train() raises
    SchedulerLost after its grace, not after the client's (90 s) timeout; while
    something listens there (a restarted scheduler), it waits."""
    monkeypatch.setattr(training_module, "_RECONNECT_GRACE", 0.5)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: refused
        gone = SimpleNamespace(
            status="connecting",
            _timeout=90,
            scheduler=SimpleNamespace(address=f"tcp://127.0.0.1:{port}"),
        )

        async def main():
            t0 = time.monotonic()
            with pytest.raises(SchedulerLost, match="nothing has listened"):
                await training_module._connected(gone)
            return time.monotonic() - t0

        assert asyncio.run(main()) < 10
        sock.listen()
        restarting = SimpleNamespace(**{**vars(gone), "_timeout": 2})

        async def waits():
            t0 = time.monotonic()
            with pytest.raises(SchedulerLost, match="connecting"):
                await training_module._connected(restarting)
            return time.monotonic() - t0

        assert asyncio.run(waits()) >= 1.5  # the client's timeout, not the grace


# -- the estimator ----------------------------------------------------------------------


@pytest.fixture
def cluster_client():
    from distributed import LocalCluster

    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0"
        ) as cluster,
        Client(cluster, set_as_default=False) as client,
    ):
        yield client


def _iris():
    from sklearn.datasets import load_iris
    from sklearn.preprocessing import StandardScaler

    X, y = load_iris(return_X_y=True)
    return StandardScaler().fit_transform(X), y


@pytest.mark.parametrize(
    "class_weight",
    [{0: -1.0}, {1: float("nan")}, {2: "2"}, {0: True}],
    ids=["negative", "nan", "string", "bool"],
)
def test_a_bad_class_weight_leaves_the_clusters_server_alone(
    cluster_client, class_weight
):
    from dask_ftps import FTPSClassifier

    X, y = _iris()
    FTPSClassifier(epochs=1, client=cluster_client, random_state=0).fit(X, y)
    registration = cluster_client.run_on_scheduler(
        lambda dask_scheduler: dask_scheduler.plugins["ftps"].registration
    )
    before = dask_ftps.status(cluster_client)
    with pytest.raises(ValueError, match="class_weight"):
        FTPSClassifier(client=cluster_client, class_weight=class_weight).fit(X, y)
    assert dask_ftps.status(cluster_client) == before
    assert (
        cluster_client.run_on_scheduler(
            lambda dask_scheduler: dask_scheduler.plugins["ftps"].registration
        )
        == registration
    )


def test_a_fit_whose_server_another_client_replaced_never_trains_it(
    cluster_client, monkeypatch
):
    """Another client registers its server between this fit's registration and
    its first update: the fit is refused, and the other server is untouched."""
    from dask_ftps import FTPSClassifier, _estimator

    X, y = _iris()
    real = _estimator._train_call

    def other_client_registers_first(client, *args):
        with Client(client.scheduler.address, set_as_default=False) as other:
            other.register_plugin(ParameterServer(model=SoftmaxRegression(4, 3)))
        return real(client, *args)

    monkeypatch.setattr(_estimator, "_train_call", other_client_registers_first)
    with pytest.raises(ServerReplaced, match="not the one this call registered"):
        FTPSClassifier(epochs=2, client=cluster_client).fit(X, y)
    status = dask_ftps.status(cluster_client)
    assert (status["updates"], status["runs"]) == (0, 0)


def test_partial_fit_goes_on_on_a_server_registered_again_on_its_store(
    cluster_client, tmp_path
):
    """Another ParameterServer registered on the estimator's store (or a
    scheduler restarted with a preload) goes on with the same runs: partial_fit
    trains it; a server of another store is refused."""
    from dask_ftps import FTPSClassifier

    X, y = _iris()
    store = str(tmp_path / "iris.zarr")
    clf = FTPSClassifier(store=store, client=cluster_client, random_state=0)
    clf.partial_fit(X, y, classes=np.unique(y))
    cluster_client.register_plugin(ParameterServer(store))  # a new registration
    version = clf.version_
    clf.partial_fit(X, y)
    assert clf.n_iter_ == 2 and clf.version_ > version
    cluster_client.register_plugin(
        ParameterServer(str(tmp_path / "other.zarr"), model=clf.model_)
    )
    with pytest.raises(ServerReplaced, match="not the one this estimator trained"):
        clf.partial_fit(X, y)


def test_a_grid_search_in_threads_fits_each_clone_its_own_model(cluster_client):
    from joblib import parallel_backend
    from sklearn.model_selection import GridSearchCV

    from dask_ftps import FTPSClassifier

    X, y = _iris()
    search = GridSearchCV(
        FTPSClassifier(epochs=3, client=cluster_client, random_state=0),
        {"hidden_layer_sizes": [(), (8,)]},
        cv=2,
        n_jobs=2,
        error_score="raise",
    )
    with parallel_backend("threading", n_jobs=2):
        search.fit(X, y)
    assert np.isfinite(search.cv_results_["mean_test_score"]).all()
    best = search.best_estimator_
    # The refit's model is the one the cluster's server trained last.
    _, params = dask_ftps.get_model(cluster_client)
    assert set(params) == set(best.params_)
    for k, v in best.params_.items():
        np.testing.assert_array_equal(np.asarray(params[k]), v)


def test_a_grid_search_on_dask_workers_fits_each_clone_its_own_model():
    """Joblib's ``dask`` backend runs each fit as a task on the cluster's workers:
    the fits take turns on the scheduler's server (no fit holds a worker thread
    its training needs: they waited for each other for ever before), and each
    scores exactly as in a search that fits one clone after the other."""
    from distributed import LocalCluster
    from joblib import parallel_backend
    from sklearn.model_selection import GridSearchCV

    from dask_ftps import FTPSClassifier

    X, y = _iris()

    def search():
        return GridSearchCV(
            FTPSClassifier(epochs=3, random_state=0),
            {"hidden_layer_sizes": [(), (8,)]},
            cv=2,
            n_jobs=2,
            error_score="raise",
        )

    with (
        LocalCluster(
            n_workers=2, threads_per_worker=2, processes=False, dashboard_address=":0"
        ) as cluster,
        Client(cluster),
    ):
        on_workers = search()
        with parallel_backend("dask"):
            on_workers.fit(X, y)
        one_by_one = search()
        with parallel_backend("threading", n_jobs=1):
            one_by_one.fit(X, y)
    np.testing.assert_array_equal(
        on_workers.cv_results_["mean_test_score"],
        one_by_one.cv_results_["mean_test_score"],
    )


# -- real processes ------------------------------------------------------------------------

_CHILD = """
import json, pathlib, sys, time
import numpy as np
from distributed import Client
import dask_ftps
from tests.conftest import digits

address, shift, me, other, out = sys.argv[1:]
X, _, y, _ = digits()
y = (y + int(shift)) % 10
with Client(address, timeout="30s") as client:
    pathlib.Path(me + ".ready").touch()
    while not pathlib.Path(out + ".go").exists():
        time.sleep(0.05)

    def wait(epoch, record):  # overlap the other call, whoever starts first
        deadline = time.monotonic() + 30
        while not pathlib.Path(other).exists() and time.monotonic() < deadline:
            time.sleep(0.05)

    try:
        r = dask_ftps.train(client, X, y, epochs=2, batch_size=32, progress=False,
                            callbacks=[wait])
        result = {"trained": r.trained, "run": r.run, "version": r.version,
                  "minibatches": r.minibatches}
    except Exception as e:
        result = {"error": type(e).__name__, "message": str(e)}
    finally:
        pathlib.Path(me).touch()
pathlib.Path(out).write_text(json.dumps(result))
"""


@pytest.mark.slow
def test_two_processes_training_at_once_on_one_scheduler_never_mix(tmp_path):
    """Two client processes, same settings, other labels, at once against one
    scheduler (with worker processes): one trains its own model, the other is
    refused before any update; the global dataset holds the one run, once."""
    import json
    import subprocess
    import sys

    from distributed.utils import open_port

    from dask_ftps._processes import PACKAGE_ROOT, environment

    from .test_scheduler_loss import scheduler, wait_for_workers, workers

    port = open_port()
    address = f"tcp://127.0.0.1:{port}"
    env = environment({"PYTHONPATH": f"{PACKAGE_ROOT}"})
    with scheduler(port), workers(address), Client(address, timeout="30s") as client:
        wait_for_workers(client, 2)
        client.register_plugin(ParameterServer(model=DIGITS, optimizer=SGD(lr=0.5)))
        go = tmp_path / "out"
        names = [str(tmp_path / f"p{i}") for i in (0, 1)]
        children = [
            subprocess.Popen(
                [
                    *(sys.executable, "-c", _CHILD, address, str(3 * i)),
                    *(names[i], names[1 - i], f"{go}{i}"),
                ],
                env=env,
                cwd=str(PACKAGE_ROOT),
            )
            for i in (0, 1)
        ]
        try:
            deadline = time.monotonic() + 60
            while not all(os.path.exists(n + ".ready") for n in names):
                assert time.monotonic() < deadline, "the clients did not connect"
                time.sleep(0.05)
            for i in (0, 1):
                (tmp_path / f"out{i}.go").touch()
            for child in children:
                assert child.wait(120) == 0
        finally:
            for child in children:
                child.kill()
        outcomes = [json.loads((tmp_path / f"out{i}").read_text()) for i in (0, 1)]
        _, params = dask_ftps.get_model(client)
        rows = dask_ftps.records(client)["global"]
    trained = [i for i, o in enumerate(outcomes) if "error" not in o]
    assert len(trained) == 1, outcomes
    (i,) = trained
    j = 1 - i
    assert outcomes[j]["error"] == "RunInUse", outcomes[j]
    assert outcomes[i]["trained"]
    ids = [r["update_id"] for r in rows]
    assert len(ids) == len(set(ids)) == outcomes[i]["minibatches"]
    assert outcomes[i]["version"] == len(ids)
    X_train, _, y_train, _ = digits()
    predicted = DIGITS.predict(params, X_train)
    assert (predicted == (y_train + 3 * i) % 10).mean() > 0.8
    assert (predicted == (y_train + 3 * j) % 10).mean() < 0.3
