"""Tests of the pure parameter-server state machine (no I/O, no Dask)."""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np
import pytest

from dask_ftps._core import (
    RunSpec,
    Update,
    UpdateKey,
    Version,
    WorkerId,
    download_entries,
)
from dask_ftps._exceptions import (
    DuplicateUpdate,
    FTPSError,
    InvalidRequest,
    InvalidUpdate,
    StaleIncarnation,
)
from dask_ftps._state import ParameterServerState, RunState
from dask_ftps.models import MLP, Model
from dask_ftps.optim import SGD, Adam, Optimizer

# -- helpers -------------------------------------------------------------------


@functools.cache
def _digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits, X/16 float32: X_train, X_test, y_train, y_test."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X = (X / 16).astype(np.float32)
    return tuple(train_test_split(X, y, test_size=0.25, random_state=0, stratify=y))


def _shards(sizes: tuple[int, ...]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Consecutive slices of the digits training set with the given sizes."""
    X, _, y, _ = _digits()
    bounds = np.cumsum((0, *sizes))
    return [(X[a:b], y[a:b]) for a, b in itertools.pairwise(bounds)]


def _batch(spec: RunSpec, shard: int, epoch: int, step: int, n: int) -> np.ndarray:
    order = np.random.default_rng([spec.seed, epoch, shard]).permutation(n)
    return np.array_split(order, spec.steps[shard])[step]


SMALL = MLP(n_features=64, hidden=(8,), n_classes=10, seed=0)


def _state(
    mode: str = "async",
    optimizer: Optimizer | None = None,
    model: Model = SMALL,
    **kwargs,
) -> ParameterServerState:
    return ParameterServerState(
        model, optimizer or SGD(lr=0.1, momentum=0.5), mode=mode, **kwargs
    )


def _grads(state: ParameterServerState, seed: int | list[int]) -> dict:
    """Gradient of the state's current model on a 20-sample digits minibatch."""
    X, _, y, _ = _digits()
    rows = np.random.default_rng(seed).choice(len(X), size=20, replace=False)
    _, grads, _ = state.model_spec.loss_and_grad(state.model.params, X[rows], y[rows])
    return grads


def _update(
    state: ParameterServerState,
    key: UpdateKey,
    worker: str | None = None,
    grads: dict | None = None,
) -> Update:
    if grads is None:
        grads = _grads(state, seed=[key.run, key.epoch, key.shard, key.step])
    return Update(key, WorkerId(worker or f"w{key.shard}"), grads)


def _bytes(arrays: dict[str, np.ndarray]) -> dict[str, tuple]:
    return {k: (v.dtype.str, v.shape, v.tobytes()) for k, v in arrays.items()}


def _snapshot(state: ParameterServerState) -> dict:
    """Everything the state machine holds, as comparable plain values."""
    return {
        "version": int(state.version),
        "params": _bytes(state.model.params),
        "opt_state": _bytes(state.model.opt_state),
        "updates": state.summary()["updates"],
        "global_rows": list(state.global_rows),
        "downloads": list(state.downloads),
        "runs": [
            (r.run, r.spec, r.base_version, list(r.clocks), r.superseded)
            for r in state.runs
        ],
        "gradients": {
            w: [(uid, _bytes(g)) for uid, g, _ in entries]
            for w, entries in state.gradients.items()
        },
        "pending": {
            p: {s: u.key.id for s, u in d.items()} for p, d in state.pending.items()
        },
    }


def _drive(
    state: ParameterServerState,
    spec: RunSpec,
    schedule_seed: int = 0,
    limit: int | None = None,
    name: str = "",
) -> RunState:
    """Train ``spec`` on digits through the state as workers would.

    At each tick a seeded RNG picks one of the shards that may go on; a shard
    computes its gradient on the model it got from its last push (or, when it
    was not ready then, on the model it pulls once it is ready).
    """
    run = state.begin_run(spec, name)
    data = _shards(spec.shard_sizes)
    rng = np.random.default_rng(schedule_seed)
    copies: dict[int, dict | None] = dict.fromkeys(range(spec.n_shards))
    pushes = 0
    while not run.finished and (limit is None or pushes < limit):
        movable = [
            s
            for s in range(spec.n_shards)
            if run.clocks[s] < run.end and state.ready(run.run, s, *run.next_step(s))
        ]
        assert movable, f"deadlock at clocks {run.clocks}"
        shard = int(rng.choice(movable))
        epoch, step = run.next_step(shard)
        params = copies[shard] or state.model.params
        X, y = data[shard]
        rows = _batch(spec, shard, epoch, step, len(X))
        _, grads, _ = state.model_spec.loss_and_grad(params, X[rows], y[rows])
        key = UpdateKey(run.run, epoch, shard, step)
        state.push(Update(key, WorkerId(f"w{shard}"), grads))
        pushes += 1
        if run.clocks[shard] < run.end and state.ready(
            run.run, shard, *run.next_step(shard)
        ):
            copies[shard] = state.model.params
        else:
            copies[shard] = None
    return run


OPTIMIZERS = {
    "sgd": SGD(lr=0.1),
    "momentum": SGD(lr=0.1, momentum=0.9),
    "adam": Adam(lr=0.01),
}
MODES = ["async", "sync", "ssp"]
UNEVEN = RunSpec((110, 100, 90), batch_size=25, epochs=2, seed=3)  # steps (5, 4, 4)


# -- 1. determinism ------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("opt", list(OPTIMIZERS), ids=str)
def test_same_pushes_give_identical_bits(mode: str, opt: str) -> None:
    optimizer = OPTIMIZERS[opt]
    kwargs = {"staleness": 1} if mode == "ssp" else {}
    first = _state(mode, optimizer, **kwargs)
    second = _state(mode, optimizer, **kwargs)
    init = _bytes(first.model.params)
    _drive(first, UNEVEN, schedule_seed=7)
    _drive(second, UNEVEN, schedule_seed=7)

    a, b = _snapshot(first), _snapshot(second)
    for name in a["params"]:
        np.testing.assert_array_equal(
            first.model.params[name], second.model.params[name]
        )
    assert a == b  # params, optimizer state, rows, clocks: bit for bit
    assert a["params"] != init  # it did train
    assert set(a["opt_state"]) == set(optimizer.init_state(first.model.params))
    if opt != "sgd":
        assert any(np.any(v != 0) for v in first.model.opt_state.values()), (
            "optimizer state never moved"
        )
    rounds = UNEVEN.epochs * UNEVEN.rounds_per_epoch
    expected = rounds if mode == "sync" else UNEVEN.minibatches
    assert first.version == expected
    assert len(first.global_rows) == UNEVEN.minibatches


def test_async_merge_is_the_optimizer_step_per_push() -> None:
    """Each async push is one optimizer step, numbered by the new version."""
    optimizer = Adam(lr=0.01)
    state = _state("async", optimizer)
    state.begin_run(RunSpec((40, 40), batch_size=20, epochs=1))
    params, opt_state = state.model.params, state.model.opt_state
    for i, key in enumerate([(0, 0, 1, 0), (0, 0, 0, 0), (0, 0, 0, 1)], 1):
        update = _update(state, UpdateKey(*key), grads=_grads(state, seed=i))
        state.push(update)
        params, opt_state = optimizer.apply(params, opt_state, update.grads, step=i)
        assert state.version == i
        assert _bytes(state.model.params) == _bytes(params)
        assert _bytes(state.model.opt_state) == _bytes(opt_state)


def test_sync_merge_is_one_optimizer_step_per_round() -> None:
    optimizer = Adam(lr=0.01)
    state = _state("sync", optimizer)
    state.begin_run(RunSpec((40, 40), batch_size=20, epochs=1))
    params, opt_state = state.model.params, state.model.opt_state
    for step in range(2):
        grads = [_grads(state, seed=10 * step + s) for s in range(2)]
        for shard in (1, 0):
            state.push(_update(state, UpdateKey(0, 0, shard, step), grads=grads[shard]))
        mean = {k: (grads[0][k] + grads[1][k]) / 2 for k in grads[0]}
        params, opt_state = optimizer.apply(params, opt_state, mean, step=step + 1)
        assert state.version == step + 1
        assert _bytes(state.model.params) == _bytes(params)
        assert _bytes(state.model.opt_state) == _bytes(opt_state)


def test_async_bits_depend_on_the_push_order() -> None:
    """The determinism check above is sensitive: another order, other bits."""
    first, second = _state("async"), _state("async")
    _drive(first, UNEVEN, schedule_seed=1)
    _drive(second, UNEVEN, schedule_seed=2)
    assert [r[0] for r in first.global_rows] != [r[0] for r in second.global_rows]
    assert _bytes(first.model.params) != _bytes(second.model.params)


# -- 2. async --------------------------------------------------------------------


def test_async_versions_rows_and_accepted_ids() -> None:
    state = _state("async")
    run = state.begin_run(RunSpec((40, 40), batch_size=20, epochs=1))
    order = [(0, 0), (1, 0), (1, 1), (0, 1)]  # (shard, step)
    for i, (shard, step) in enumerate(order, 1):
        before = _bytes(state.model.params)
        admission = state.push(_update(state, UpdateKey(run.run, 0, shard, step)))
        assert admission.version == i
        assert state.version == i
        assert [u.key for u in admission.merge] == [UpdateKey(0, 0, shard, step)]
        assert _bytes(state.model.params) != before
    assert list(state.global_rows) == [
        ("0:0:0:0", "w0", 1),
        ("0:0:1:0", "w1", 2),
        ("0:0:1:1", "w1", 3),
        ("0:0:0:1", "w0", 4),
    ]
    ids = [row[0] for row in state.global_rows]
    assert len(set(ids)) == len(ids) == state.summary()["updates"] == 4
    assert run.finished


def test_async_repush_is_duplicate_and_changes_nothing() -> None:
    state = _state("async")
    run = state.begin_run(RunSpec((40, 40), batch_size=20, epochs=2))
    for shard, step in [(0, 0), (1, 0), (0, 1)]:
        state.push(_update(state, UpdateKey(run.run, 0, shard, step)))
    state.record_download(WorkerId("w0"), state.version)
    before = _snapshot(state)
    # the same id again, even from another worker with other gradients
    again = _update(state, UpdateKey(0, 0, 1, 0), worker="w9", grads=_grads(state, 99))
    with pytest.raises(DuplicateUpdate, match="0:0:1:0 was already accepted"):
        state.push(again)
    assert _snapshot(state) == before
    assert [row[0] for row in state.global_rows].count("0:0:1:0") == 1


@pytest.mark.parametrize(
    "key",
    [UpdateKey(0, 0, 0, 1), UpdateKey(0, 1, 0, 0), UpdateKey(0, 1, 1, 1)],
    ids=str,
)
def test_async_out_of_order_step_is_refused(key: UpdateKey) -> None:
    state = _state("async")
    state.begin_run(RunSpec((40, 40), batch_size=20, epochs=2))
    before = _snapshot(state)
    with pytest.raises(InvalidUpdate, match=rf"{key.id} out of order.*\(0, 0\)"):
        state.push(_update(state, key))
    assert _snapshot(state) == before


def test_admit_and_merge_change_nothing_until_commit() -> None:
    state = _state("async")
    state.begin_run(RunSpec((40,), batch_size=20, epochs=1))
    update = _update(state, UpdateKey(0, 0, 0, 0))
    before = _snapshot(state)
    admission = state.admit(update)
    model = state.merge(admission)
    assert _snapshot(state) == before
    assert model is not None
    assert model.version == 1
    state.commit(admission, model)
    assert state.model is model
    assert list(state.global_rows) == [("0:0:0:0", "w0", 1)]
    assert state.summary()["updates"] == 1


# -- 3. sync ---------------------------------------------------------------------


def test_sync_round_merges_only_when_all_shards_pushed() -> None:
    state = _state("sync")
    spec = RunSpec((40, 40), batch_size=20, epochs=2)  # steps (2, 2)
    run = state.begin_run(spec)
    init = _bytes(state.model.params)
    assert state.ready(0, 0, 0, 0)
    assert state.ready(0, 1, 0, 0)

    admission = state.push(_update(state, UpdateKey(0, 0, 1, 0)))
    assert admission.merge == ()
    assert state.version == 0
    assert _bytes(state.model.params) == init
    assert set(state.pending) == {0}
    assert not state.ready(0, 1, 0, 1)  # next step waits for the round

    # shard 1 may not push its next round before round 0 is complete
    before = _snapshot(state)
    with pytest.raises(InvalidUpdate, match="sync round is not open"):
        state.push(_update(state, UpdateKey(0, 0, 1, 1)))
    assert _snapshot(state) == before

    admission = state.push(_update(state, UpdateKey(0, 0, 0, 0)))
    assert [u.key.id for u in admission.merge] == ["0:0:0:0", "0:0:1:0"]  # shard order
    assert state.version == 1
    assert state.pending == {}
    assert _bytes(state.model.params) != init
    assert state.ready(0, 1, 0, 1)
    assert state.ready(0, 0, 0, 1)
    assert not state.ready(0, 0, 1, 0)

    for epoch, step in [(0, 1), (1, 0), (1, 1)]:
        for shard in (1, 0):
            state.push(_update(state, UpdateKey(0, epoch, shard, step)))
    assert run.finished
    assert state.version == spec.epochs * spec.rounds_per_epoch == 4
    for uid, _, version in state.global_rows:  # every row carries its round's version
        key = UpdateKey.parse(uid)
        assert version == spec.position(key.epoch, key.step) + 1


def test_sync_arrival_order_does_not_change_bits() -> None:
    optimizer = SGD(lr=0.1, momentum=0.9)
    reference = _state("sync", optimizer)
    grads = [_grads(reference, seed) for seed in range(3)]
    copies = [_bytes(g) for g in grads]
    # summation order matters in float32, so merging in arrival order would show
    assert any(
        ((grads[0][k] + grads[1][k]) + grads[2][k]).tobytes()
        != ((grads[2][k] + grads[1][k]) + grads[0][k]).tobytes()
        for k in grads[0]
    )
    mean = {k: (grads[0][k] + grads[1][k] + grads[2][k]) / 3 for k in grads[0]}
    expected, expected_state = optimizer.apply(
        reference.model.params, reference.model.opt_state, mean, step=1
    )

    results = []
    for order in itertools.permutations(range(3)):
        state = _state("sync", optimizer)
        state.begin_run(RunSpec((20, 20, 20), batch_size=20, epochs=1))
        for shard in order:
            state.push(_update(state, UpdateKey(0, 0, shard, 0), grads=grads[shard]))
        assert state.version == 1
        assert [row[2] for row in state.global_rows] == [1, 1, 1]
        assert [row[0] for row in state.global_rows] == [f"0:0:{s}:0" for s in order]
        results.append(state)
    for state in results:
        assert _bytes(state.model.params) == _bytes(expected)
        assert _bytes(state.model.opt_state) == _bytes(expected_state)
    assert [_bytes(g) for g in grads] == copies  # pushed arrays not modified


def test_sync_schedule_does_not_change_bits() -> None:
    states = [_state("sync", Adam(lr=0.01)) for _ in range(3)]
    for seed, state in enumerate(states):
        _drive(state, UNEVEN, schedule_seed=seed)
    orders = [[row[0] for row in s.global_rows] for s in states]
    assert len({tuple(o) for o in orders}) > 1  # the arrival orders did differ
    snaps = [_snapshot(s) for s in states]
    for snap in snaps[1:]:
        assert snap["params"] == snaps[0]["params"]
        assert snap["opt_state"] == snaps[0]["opt_state"]
        assert snap["version"] == snaps[0]["version"] == 10


def test_sync_uneven_shards_do_not_block_rounds_they_skip() -> None:
    state = _state("sync")
    spec = RunSpec((5, 4), batch_size=2, epochs=2)
    assert spec.steps == (3, 2)
    assert spec.rounds_per_epoch == 3
    run = state.begin_run(spec)
    for epoch in range(2):
        base = 3 * epoch
        for shard in (0, 1):
            state.push(_update(state, UpdateKey(0, epoch, shard, 0)))
        assert state.version == base + 1
        state.push(_update(state, UpdateKey(0, epoch, 1, 1)))
        assert state.version == base + 1
        assert run.next_step(1) == (epoch + 1, 0)
        state.push(_update(state, UpdateKey(0, epoch, 0, 1)))
        assert state.version == base + 2
        if epoch == 0:
            assert not state.ready(0, 1, 1, 0)  # waits for round 2 of shard 0
        admission = state.push(_update(state, UpdateKey(0, epoch, 0, 2)))
        assert [u.key.id for u in admission.merge] == [f"0:{epoch}:0:2"]
        assert state.version == base + 3  # merged without shard 1
        if epoch == 0:
            assert state.ready(0, 1, 1, 0)
            assert state.ready(0, 0, 1, 0)
    assert run.finished
    assert state.version == 6
    assert len(state.global_rows) == spec.minibatches == 10
    assert state.summary()["run"]["accepted"] == 10
    versions = [v for _, _, v in state.global_rows]
    assert versions == [1, 1, 2, 2, 3, 4, 4, 5, 5, 6]


# -- 4. ssp ----------------------------------------------------------------------


def test_ssp_staleness_bound() -> None:
    state = _state("ssp", staleness=1)
    spec = RunSpec((8, 8, 4), batch_size=2, epochs=1)  # steps (4, 4, 2)
    run = state.begin_run(spec)

    def push(shard: int, step: int) -> None:
        version = state.version
        state.push(_update(state, UpdateKey(0, 0, shard, step)))
        assert state.version == version + 1  # merged on arrival

    push(0, 0)
    assert state.ready(0, 0, 0, 1)  # 1 ahead of shards 1 and 2: within the bound
    push(0, 1)
    push(1, 0)
    assert run.clocks == [2, 1, 0]
    assert not state.ready(0, 0, 0, 2)  # 2 ahead of shard 2
    assert state.ready(0, 1, 0, 1)
    assert state.ready(0, 2, 0, 0)  # the slowest is always ready
    push(2, 0)
    assert state.ready(0, 0, 0, 2)  # the slow one caught up
    push(2, 1)
    assert run.clocks == [2, 1, 4]  # shard 2 is finished
    push(0, 2)
    assert not state.ready(0, 0, 0, 3)  # held back by shard 1, not by shard 2
    push(1, 1)
    assert state.ready(0, 0, 0, 3)
    push(0, 3)
    push(1, 2)
    push(1, 3)
    assert run.finished
    assert state.ready(0, 0, 0, 3)  # no unfinished shard: nothing holds back
    assert state.version == spec.minibatches == 10


def test_ssp_finished_shards_do_not_hold_others_back() -> None:
    state = _state("ssp", staleness=0)
    run = state.begin_run(RunSpec((2, 8), batch_size=2, epochs=1))  # steps (1, 4)
    state.push(_update(state, UpdateKey(0, 0, 0, 0)))
    assert run.clocks == [4, 0]  # shard 0 finished
    for step in range(4):
        assert state.ready(0, 1, 0, step)
        state.push(_update(state, UpdateKey(0, 0, 1, step)))
    assert run.finished


# -- 5. exactly once and resume -------------------------------------------------


def test_next_step_reports_where_a_shard_continues() -> None:
    state = _state("async")
    spec = RunSpec((6, 4), batch_size=2, epochs=2)  # steps (3, 2)
    run = state.begin_run(spec)
    assert [state.next_step(0, s) for s in (0, 1)] == [(0, 0), (0, 0)]
    for key in [(0, 0, 0, 0), (0, 0, 0, 1), (0, 0, 1, 0)]:
        state.push(_update(state, UpdateKey(*key)))
    assert state.next_step(0, 0) == (0, 2)
    assert state.next_step(0, 1) == (0, 1)
    state.push(_update(state, UpdateKey(0, 0, 1, 1)))
    assert state.next_step(0, 1) == (1, 0)  # short shard: straight to next epoch
    # a re-run task that pushes what was accepted is refused; nothing moves
    before = _snapshot(state)
    with pytest.raises(DuplicateUpdate):
        state.push(_update(state, UpdateKey(0, 0, 0, 1)))
    assert _snapshot(state) == before
    state.push(_update(state, UpdateKey(0, 0, 0, 2)))
    for key in [(0, 1, 0, 0), (0, 1, 0, 1), (0, 1, 0, 2), (0, 1, 1, 0), (0, 1, 1, 1)]:
        state.push(_update(state, UpdateKey(*key)))
    assert run.finished
    assert [state.next_step(0, s) for s in (0, 1)] == [(2, 0), (2, 0)]
    assert run.accepted == spec.minibatches == 10


def test_begin_run_resumes_unfinished_run_with_same_spec() -> None:
    state = _state("async")
    spec = RunSpec((40, 40), batch_size=20, epochs=2)
    run = state.begin_run(spec)
    state.push(_update(state, UpdateKey(0, 0, 0, 0)))
    again = state.begin_run(RunSpec((40, 40), batch_size=20, epochs=2))
    assert again is run
    assert len(state.runs) == 1
    assert again.clocks == [1, 0]
    assert state.next_step(0, 0) == (0, 1)


def test_begin_run_with_another_spec_supersedes() -> None:
    state = _state("async")
    old = state.begin_run(RunSpec((40, 40), batch_size=20, epochs=2))
    state.push(_update(state, UpdateKey(0, 0, 0, 0)))
    state.push(_update(state, UpdateKey(0, 0, 1, 0)))
    new = state.begin_run(RunSpec((40, 40), batch_size=10, epochs=1))
    assert new.run == 1
    assert old.superseded
    assert not new.superseded
    assert new.base_version == state.version == 2
    assert new.clocks == [0, 0]
    before = _snapshot(state)
    with pytest.raises(InvalidUpdate, match="run 0 was superseded"):
        state.push(_update(state, UpdateKey(0, 0, 0, 1)))
    assert _snapshot(state) == before
    state.push(_update(state, UpdateKey(1, 0, 0, 0)))
    assert state.version == 3


def test_begin_run_after_finished_run_starts_new_run_only_by_another_name() -> None:
    state = _state("sync")
    spec = RunSpec((20, 20), batch_size=20, epochs=2)  # one round per epoch
    first = _drive(state, spec)
    assert first.finished
    assert state.version == 2
    assert state.begin_run(spec) is first  # the same call: the finished run
    second = state.begin_run(spec, "more")
    assert second is not first
    assert second.run == 1
    assert second.base_version == 2
    assert second.clocks == [0, 0]
    assert not first.superseded
    assert state.ready(1, 0, 0, 0)
    assert not state.ready(1, 0, 1, 0)  # the new run's rounds count from version 2
    _drive(state, spec, name="more")
    assert second.finished
    assert state.version == 4
    assert sorted(row[0] for row in list(state.global_rows)[4:]) == [
        "1:0:0:0",
        "1:0:1:0",
        "1:1:0:0",
        "1:1:1:0",
    ]
    assert [row[2] for row in list(state.global_rows)[4:]] == [3, 3, 4, 4]


def test_sync_supersede_mid_round_does_not_leak_into_new_run() -> None:
    state = _state("sync")
    state.begin_run(RunSpec((40, 40), batch_size=20, epochs=1))
    state.push(_update(state, UpdateKey(0, 0, 0, 0)))  # round 0 half done
    new = state.begin_run(RunSpec((40, 40), batch_size=10, epochs=1))
    assert new.base_version == 0
    state.push(_update(state, UpdateKey(1, 0, 1, 0)))
    assert state.version == 0  # run 1's shard 0 has not pushed yet
    admission = state.push(_update(state, UpdateKey(1, 0, 0, 0)))
    assert [u.key.id for u in admission.merge] == ["1:0:0:0", "1:0:1:0"]
    assert state.version == 1


# -- 6. bad input changes nothing ------------------------------------------------


def _set(name: str, value):
    def change(grads: dict) -> dict:
        grads = dict(grads)
        grads[name] = value(grads[name]) if callable(value) else value
        return grads

    return change


def _poke(value: float):
    def change(g: np.ndarray) -> np.ndarray:
        g = g.copy()
        g.flat[3] = value
        return g

    return change


def _drop(name: str):
    return lambda grads: {k: v for k, v in grads.items() if k != name}


GOOD = UpdateKey(0, 0, 1, 0)
BAD_PUSHES = {
    "nan": (GOOD, _set("W0", _poke(np.nan)), InvalidUpdate, "W0 holds NaN or Inf"),
    "+inf": (GOOD, _set("b1", _poke(np.inf)), InvalidUpdate, "b1 holds NaN or Inf"),
    "-inf": (GOOD, _set("W1", _poke(-np.inf)), InvalidUpdate, "W1 holds NaN or Inf"),
    "shape": (
        GOOD,
        _set("W0", lambda g: g.T.copy()),
        InvalidUpdate,
        r"shape \(8, 64\)",
    ),
    "float64": (
        GOOD,
        _set("W1", lambda g: g.astype(np.float64)),
        InvalidUpdate,
        "dtype float64, expected .* float32",
    ),
    "unknown name": (
        GOOD,
        lambda g: {**g, "W9": g["W0"]},
        InvalidUpdate,
        r"unknown parameter names \['W9'\], missing \[\]",
    ),
    "missing name": (GOOD, _drop("b1"), InvalidUpdate, r"missing \['b1'\]"),
    "list": (GOOD, _set("b0", lambda g: g.tolist()), InvalidUpdate, "b0 is a list"),
    "not a dict": (
        GOOD,
        lambda g: list(g.values()),
        InvalidUpdate,
        "grads must be a dict",
    ),
    "unknown run": (UpdateKey(3, 0, 1, 0), None, InvalidUpdate, "unknown run 3"),
    "shard": (UpdateKey(0, 0, 2, 0), None, InvalidUpdate, "no such epoch or shard"),
    "epoch": (UpdateKey(0, 2, 1, 0), None, InvalidUpdate, "no such epoch or shard"),
    "step": (UpdateKey(0, 0, 1, 2), None, InvalidUpdate, "shard 1 has no such step"),
    "out of order": (UpdateKey(0, 0, 1, 1), None, InvalidUpdate, "out of order"),
    "duplicate": (UpdateKey(0, 0, 0, 0), None, DuplicateUpdate, "already accepted"),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(BAD_PUSHES), ids=str)
def test_bad_push_changes_nothing(mode: str, case: str) -> None:
    key, change, exc, match = BAD_PUSHES[case]
    state = _state(mode, Adam(lr=0.01), staleness=1)
    state.begin_run(RunSpec((40, 40), batch_size=20, epochs=2))  # steps (2, 2)
    state.push(_update(state, UpdateKey(0, 0, 0, 0)))  # sync: round 0 pending
    state.record_download(WorkerId("w0"), state.version)
    grads = _grads(state, seed=5)
    before = _snapshot(state)

    bad = grads if change is None else change(grads)
    with pytest.raises(exc, match=match):
        state.push(Update(key, WorkerId("w1"), bad))
    assert _snapshot(state) == before
    with pytest.raises(exc, match=match):
        state.admit(Update(key, WorkerId("w1"), bad))
    assert _snapshot(state) == before

    # the state is not poisoned: the good update still goes through
    state.push(Update(GOOD, WorkerId("w1"), grads))
    assert state.version == before["version"] + 1  # sync: this completes round 0
    assert state.global_rows[-1][0] == GOOD.id
    assert [row[0] for row in state.global_rows].count(GOOD.id) == 1


@pytest.mark.parametrize(
    "update_id",
    ["1-2-3", "a:b:c:d", "", None, "1:2:3", "1:2:3:4:5", "-1:0:0:0", "1:2:3:x", 7],
    ids=repr,
)
def test_bad_update_id_is_invalid(update_id: object) -> None:
    with pytest.raises(InvalidUpdate, match="not of the form 'run:epoch:shard:step'"):
        UpdateKey.parse(update_id)


def test_update_id_round_trips() -> None:
    key = UpdateKey.parse("12:3:4:5")
    assert key == UpdateKey(12, 3, 4, 5)
    assert key.id == "12:3:4:5"
    assert UpdateKey.parse(key.id) == key


@pytest.mark.parametrize("incarnation", [0, 2, None, "1"], ids=repr)
def test_stale_incarnation(incarnation: object) -> None:
    state = _state("async", incarnation=1)
    with pytest.raises(
        StaleIncarnation, match="this parameter server is incarnation 1"
    ):
        state.check_incarnation(incarnation)
    state.check_incarnation(1)  # the current one passes


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda s: s.next_step(5, 0), "unknown run 5"),
        (lambda s: s.next_step(-1, 0), "unknown run -1"),
        (lambda s: s.next_step("0", 0), "unknown run '0'"),
        (lambda s: s.next_step(0, 2), "unknown shard 2 of run 0"),
        (lambda s: s.next_step(0, -1), "unknown shard -1 of run 0"),
        (lambda s: s.next_step(0, None), "unknown shard None of run 0"),
        (lambda s: s.ready(1, 0, 0, 0), "unknown run 1"),
        (lambda s: s.get_run(None), "unknown run None"),
    ],
)
def test_unknown_run_or_shard_is_invalid_request(call, match: str) -> None:
    state = _state("async")
    state.begin_run(RunSpec((40, 40), batch_size=20, epochs=1))
    before = _snapshot(state)
    with pytest.raises(InvalidRequest, match=match):
        call(state)
    assert _snapshot(state) == before


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"batch_size": -4}, "batch_size must be a positive integer"),
        ({"batch_size": 2.0}, "batch_size must be a positive integer"),
        ({"shard_sizes": ()}, "shard_sizes must be positive integers"),
        ({"shard_sizes": (5, 0)}, "shard_sizes must be positive integers"),
        ({"shard_sizes": (5, True)}, "shard_sizes must be positive integers"),
        ({"epochs": True}, "epochs must be a positive integer"),
        ({"epochs": 0}, "epochs must be a positive integer"),
        ({"seed": -1}, "seed must be a non-negative integer"),
    ],
    ids=repr,
)
def test_bad_run_spec(kwargs: dict, match: str) -> None:
    args = {"shard_sizes": (5, 4), "batch_size": 2, "epochs": 2} | kwargs
    with pytest.raises(InvalidRequest, match=match):
        RunSpec(**args)


def test_run_spec_from_dict() -> None:
    spec = RunSpec((5, 4), batch_size=2, epochs=2, seed=1)
    assert RunSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(InvalidRequest, match="not a run spec"):
        RunSpec.from_dict({"shard_sizes": [5], "epochs": 1})
    with pytest.raises(InvalidRequest, match="batch_size must be a positive integer"):
        RunSpec.from_dict({"shard_sizes": [5], "batch_size": 0, "epochs": 1})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "bsp"}, "mode must be one of"),
        ({"mode": ""}, "mode must be one of"),
        ({"mode": None}, "mode must be one of"),
        ({"staleness": -1}, "staleness must be a non-negative integer"),
        ({"staleness": 1.5}, "staleness must be a non-negative integer"),
        ({"staleness": "2"}, "staleness must be a non-negative integer"),
    ],
    ids=repr,
)
def test_bad_state_settings(kwargs: dict, match: str) -> None:
    with pytest.raises(InvalidRequest, match=match):
        ParameterServerState(SMALL, SGD(lr=0.1), **kwargs)


def test_bool_staleness_is_refused() -> None:
    with pytest.raises(InvalidRequest, match="staleness"):
        ParameterServerState(SMALL, SGD(lr=0.1), mode="ssp", staleness=True)


def test_errors_are_ftps_errors() -> None:
    for exc in (InvalidUpdate, InvalidRequest, DuplicateUpdate, StaleIncarnation):
        assert issubclass(exc, FTPSError)
    assert issubclass(InvalidUpdate, ValueError)
    assert issubclass(InvalidRequest, ValueError)


# -- 7. records and retention ----------------------------------------------------


def test_download_dataset_keeps_newest_distinct_workers() -> None:
    state = _state("async", download_limit=3)
    for i in range(5):
        state.record_download(WorkerId(f"w{i}"), Version(i))
    assert state.downloads == [("w2", 2), ("w3", 3), ("w4", 4)]
    state.record_download(WorkerId("w2"), Version(7))
    assert state.downloads == [("w3", 3), ("w4", 4), ("w2", 7)]  # one row per worker
    state.record_download(WorkerId("w4"), Version(8))  # not the oldest row
    assert state.downloads == [("w3", 3), ("w2", 7), ("w4", 8)]
    state.record_download(WorkerId("w0"), Version(9))
    assert state.downloads == [("w2", 7), ("w4", 8), ("w0", 9)]
    state.forget_worker(WorkerId("w4"))
    assert state.downloads == [("w2", 7), ("w0", 9)]
    state.forget_worker(WorkerId("nobody"))
    assert state.downloads == [("w2", 7), ("w0", 9)]
    assert state.records()["download"] == [
        {"worker": "w2", "version": 7},
        {"worker": "w0", "version": 9},
    ]
    assert state.summary()["download_rows"] == 2


def test_default_download_limit_is_download_entries() -> None:
    state = _state("async")
    assert state.download_limit == download_entries(0.05, 1e-6) == 5
    for i in range(8):
        state.record_download(WorkerId(f"w{i}"), Version(0))
    assert [w for w, _ in state.downloads] == ["w3", "w4", "w5", "w6", "w7"]


def test_gradient_dataset_keeps_newest_entries_per_worker() -> None:
    state = _state("async", gradient_entries=2)
    state.begin_run(RunSpec((80, 40), batch_size=20, epochs=1))  # steps (4, 2)
    pushed = {}
    for key in [(0, 0, 0, 0), (0, 0, 1, 0), (0, 0, 0, 1), (0, 0, 0, 2), (0, 0, 0, 3)]:
        update = _update(state, UpdateKey(*key))
        pushed[update.key.id] = _bytes(update.grads)
        state.push(update)
    w0 = [(uid, _bytes(g)) for uid, g, _ in state.gradients["w0"]]
    assert w0 == [("0:0:0:2", pushed["0:0:0:2"]), ("0:0:0:3", pushed["0:0:0:3"])]
    w1 = [(uid, _bytes(g)) for uid, g, _ in state.gradients["w1"]]
    assert w1 == [("0:0:1:0", pushed["0:0:1:0"])]
    assert state.summary()["gradient_entries"] == 3
    assert len(state.global_rows) == 5  # the global dataset keeps every row


def test_global_dataset_in_memory_keeps_newest_rows() -> None:
    state = _state("async", memory_rows=3)
    state.begin_run(RunSpec((100,), batch_size=20, epochs=1))  # 5 steps
    for step in range(5):
        state.push(_update(state, UpdateKey(0, 0, 0, step)))
    assert [(u, int(v)) for u, _, v in state.global_rows] == [
        ("0:0:0:2", 3),
        ("0:0:0:3", 4),
        ("0:0:0:4", 5),
    ]
    assert state.updates == 5
    # Exactly-once rests on the clocks, not on the rows kept in memory.
    with pytest.raises(DuplicateUpdate, match="0:0:0:0 was already accepted"):
        state.push(_update(state, UpdateKey(0, 0, 0, 0)))


def test_records_rows() -> None:
    state = _state("async")
    state.begin_run(RunSpec((20, 20), batch_size=20, epochs=1))
    state.push(_update(state, UpdateKey(0, 0, 1, 0)))
    state.record_download(WorkerId("w1"), state.version)
    state.push(_update(state, UpdateKey(0, 0, 0, 0)))
    records = state.records()
    assert records == {
        "global": [
            {"update_id": "0:0:1:0", "worker": "w1", "version": 1},
            {"update_id": "0:0:0:0", "worker": "w0", "version": 2},
        ],
        "download": [{"worker": "w1", "version": 1}],
    }
    assert all(type(row["version"]) is int for row in records["global"])


def test_summary() -> None:
    state = _state("ssp", staleness=2, incarnation=4)
    assert state.summary()["run"] is None
    spec = RunSpec((5, 4), batch_size=2, epochs=1)
    _drive(state, spec, limit=3)
    summary = state.summary()
    assert summary["version"] == 3
    assert summary["incarnation"] == 4
    assert summary["updates"] == 3
    assert summary["mode"] == "ssp"
    assert summary["staleness"] == 2
    assert summary["model"] == SMALL.to_dict()
    assert summary["optimizer"] == {"kind": "SGD", "lr": 0.1, "momentum": 0.5}
    assert summary["n_params"] == 64 * 8 + 8 + 8 * 10 + 10
    assert summary["run"] == {
        "run": 0,
        "name": "",
        "n_shards": 2,
        "finished": False,
        "accepted": 3,
        "minibatches": 5,
        "base_version": 0,
        "spec": spec.to_dict(),
    }
    assert summary["global_rows"] == 3


@pytest.mark.parametrize(
    ("p", "eps", "n"),
    [
        (0.05, 1e-6, 5),
        (0.5, 0.25, 2),
        (0.5, 0.3, 2),
        (0.9, 0.5, 7),
        (0.5, 0.6, 1),
        (0.2, 1e-3, 5),
        (0.3, 0.05, 3),
        (0.01, 1e-6, 3),
    ],
)
def test_download_entries(p: float, eps: float, n: int) -> None:
    assert download_entries(p, eps) == n
    # the smallest N with p**N <= eps (within float rounding of exact powers)
    assert p**n <= eps * (1 + 1e-12)
    assert n == 1 or p ** (n - 1) > eps
    assert n == max(1, math.ceil(math.log(eps) / math.log(p) - 1e-9))


def test_download_entries_exact_power() -> None:
    assert 0.01**4 <= 1e-8
    assert download_entries(0.01, 1e-8) == 4


@pytest.mark.parametrize(("p", "eps"), [(0, 0.1), (1, 0.1), (0.5, 0), (0.5, 1.5)])
def test_download_entries_rejects_bad_probabilities(p: float, eps: float) -> None:
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        download_entries(p, eps)


# -- 8. it trains ----------------------------------------------------------------


def test_digits_async_run_trains() -> None:
    X_train, X_test, _, y_test = _digits()
    model = MLP(n_features=64, hidden=(32,), n_classes=10, seed=0)
    state = ParameterServerState(model, SGD(lr=0.05, momentum=0.5), mode="async")
    sizes = tuple(len(part) for part in np.array_split(np.arange(len(X_train)), 2))
    spec = RunSpec(sizes, batch_size=16, epochs=10, seed=0)
    run = _drive(state, spec, schedule_seed=0)
    assert run.finished
    assert state.version == spec.minibatches == state.summary()["updates"]
    assert len({row[0] for row in state.global_rows}) == spec.minibatches
    accuracy = float((model.predict(state.model.params, X_test) == y_test).mean())
    assert accuracy > 0.93, accuracy
