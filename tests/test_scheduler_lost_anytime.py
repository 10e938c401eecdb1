"""train() raises SchedulerLost within its documented grace whatever moment of the
call the scheduler dies at, and the same call on a scheduler restarted on the
same port (the preload, the same store) finishes the run exactly once.

A real ``dask scheduler`` process (the preload, a local store) and real worker
processes. Each moment is hit by a deterministic trigger, not a timer: the
scheduler SIGKILLs itself before its n-th log record (``dask_ftps.testing``'s
``kill_at`` preload), or the training process SIGKILLs it at one of train()'s
own steps.
"""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pytest
from distributed import Client
from distributed.utils import open_port

import dask_ftps
from dask_ftps import SGD, ParameterServer
from dask_ftps._core import RunSpec
from dask_ftps.training import _driver as training_module

from .conftest import digits
from .test_scheduler_loss import (
    MODEL,
    _same_model,
    scheduler,
    wait_for_workers,
    workers,
)

EPOCHS, BATCH = 2, 32
#: The documented grace ("at the latest 10 s after it did") and a margin for a
#: loaded two-core machine.
GRACE = training_module._RECONNECT_GRACE
LIMIT = GRACE + 20.0
#: One shard of the 1347 training digits: 43 minibatches, and with one push in
#: flight one commit record each.
ONE_SHARD_STEPS = 43
LOG = r"ftps/log/\d+$"  # every record of the journal: snapshot, claim, run, ...


@dataclass(frozen=True)
class Moment:
    """Where the scheduler dies, and what the store holds then."""

    #: ``"<regex>:<n>"``: the scheduler SIGKILLs itself before its n-th match.
    kill_at: str | None = None
    #: ``(request, n)``: the training process SIGKILLs it once train() has the
    #: n-th answer to ``request`` (``"scatter"``: before the scatter is sent).
    after: tuple[str, int] | None = None
    n_shards: int | None = None
    inflight: int = 1
    #: (updates, runs, epochs recorded) the store holds after the kill; None:
    #: anything strictly between no update and a whole epoch.
    left: tuple[int | None, int, int] | None = None
    #: train() returns its finished run (it had every answer it needed).
    returns: bool = False


MOMENTS = {
    # The client lost its scheduler (and knows it) before train() is called: the
    # one moment that waits out the grace (nothing listens at the address).
    "before-the-call": Moment(after=("call", 0), left=(0, 0, 0)),
    # train() has asked which run it resumes, and not yet begun one.
    "waiting-for-its-run": Moment(after=("ftps_find_run", 1), left=(0, 0, 0)),
    # Records 0 and 1 are the snapshot and claim of the registration; the third
    # is the run's: ftps_begin_run is in the scheduler, not answered.
    "begin-run": Moment(kill_at=f"{LOG}:3", left=(0, 0, 0)),
    # The run has begun; the request that scatters its shards meets a dead
    # scheduler the client has not noticed yet.
    "scatter": Moment(after=("scatter", 1), left=(0, 1, 0)),
    # The 12th record is a commit of epoch 0, with up to 4 pushes per shard in
    # flight.
    "mid-epoch": Moment(kill_at=f"{LOG}:12", inflight=4, left=None),
    # One shard, one push in flight: records 3..45 commit epoch 0's minibatches
    # one each, and record 46 is the epoch's: ftps_end_epoch is not answered.
    "epoch-end": Moment(
        kill_at=f"{LOG}:{3 + ONE_SHARD_STEPS + 1}",
        n_shards=1,
        left=(ONE_SHARD_STEPS, 1, 0),
    ),
    # The last epoch is recorded; train() has not yet read the final status.
    "after-last-epoch": Moment(
        after=("ftps_end_epoch", EPOCHS), left=(None, 1, EPOCHS)
    ),
    # train() has its final status (the second): all it has left is telling the
    # server it ended, which is best effort, so it returns the finished run.
    "after-the-final-status": Moment(
        after=("ftps_status", 2), left=(None, 1, EPOCHS), returns=True
    ),
}


def _train(client: Client, n_shards: int | None):
    X_train, _, y_train, _ = digits()
    return dask_ftps.train(
        client, X_train, y_train, epochs=EPOCHS, batch_size=BATCH,
        n_shards=n_shards, progress=False,
    )  # fmt: skip


def _expected_ids(n_samples: int, n_shards: int) -> set[str]:
    sizes = tuple(len(p) for p in np.array_split(np.arange(n_samples), n_shards))
    spec = RunSpec(sizes, BATCH, EPOCHS, 0)
    return {
        f"0:{e}:{s}:{t}"
        for e in range(EPOCHS)
        for s, steps in enumerate(spec.steps)
        for t in range(steps)
    }


class _Death:
    """When a process died (reaped by a thread of its own the moment it does)."""

    def __init__(self, proc) -> None:
        self.proc = proc
        self.at: float | None = None
        self.event = threading.Event()
        threading.Thread(target=self._wait, daemon=True).start()

    def _wait(self) -> None:
        self.proc.wait()
        self.at = time.monotonic()
        self.event.set()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        assert self.event.wait(30), "the scheduler outlived its SIGKILL"


def _arm(monkeypatch, client: Client, death: _Death, after: tuple[str, int]) -> None:
    """SIGKILL the scheduler once train() has the n-th answer to a request."""
    request, nth = after
    if request == "scatter":
        real_scatter = client.scheduler.scatter

        async def scatter(**kwargs):
            death.kill()
            return await real_scatter(**kwargs)

        # An attribute of the rpc object shadows its __getattr__ (undone after).
        monkeypatch.setitem(vars(client.scheduler), "scatter", scatter)
        return
    real = training_module.check_reply
    seen = Counter()

    def check_reply(reply, name):
        out = real(reply, name)
        seen[name] += 1
        if name == request and seen[name] == nth:
            death.kill()
        return out

    monkeypatch.setattr(training_module, "check_reply", check_reply)


@pytest.mark.slow
@pytest.mark.parametrize("moment", list(MOMENTS))
def test_train_raises_scheduler_lost_in_its_grace_at_any_moment(
    tmp_path, monkeypatch, moment
):
    m = MOMENTS[moment]
    store = str(tmp_path / "run.zarr")
    port = open_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {"DASK_FTPS__INFLIGHT": str(m.inflight)}
    X_train = digits()[0]
    expected = _expected_ids(len(X_train), m.n_shards or 2)
    total = len(expected)

    with (
        scheduler(port, store, m.kill_at, env=env) as first,
        workers(address),
        Client(address, timeout="60s") as client,
    ):
        death = _Death(first)
        wait_for_workers(client, 2)
        client.register_plugin(
            ParameterServer(
                store,
                model=MODEL,
                optimizer=SGD(lr=0.05, momentum=0.5),
                snapshot_every=1000,  # no snapshot: every row stays in the log
            )
        )
        assert dask_ftps.status(client)["inflight"] == m.inflight
        with monkeypatch.context() as patch:
            if m.after == ("call", 0):
                death.kill()
                deadline = time.monotonic() + 60
                while client.status == "running":  # until the client noticed
                    assert time.monotonic() < deadline, "the client never noticed"
                    time.sleep(0.01)
            elif m.after is not None:
                _arm(patch, client, death, m.after)
            outcome: dict = {}

            def call() -> None:
                try:
                    outcome["result"] = _train(client, m.n_shards)
                except BaseException as e:  # noqa: BLE001 - read below
                    outcome["error"] = e
                outcome["at"] = time.monotonic()

            thread = threading.Thread(target=call, daemon=True)
            thread.start()
            assert death.event.wait(120), f"the scheduler was not killed: {outcome}"
            thread.join(LIMIT + 30)
            assert not thread.is_alive(), "train() hangs after the scheduler died"
        error = outcome.get("error")
        # (The watcher may reap a scheduler that killed itself a moment after
        # train() saw its connection break.)
        waited = max(0.0, outcome["at"] - death.at)
        if m.returns:
            assert error is None, repr(error)
            print(f"{moment}: returned {waited:.2f} s after the SIGKILL")
            assert outcome["result"].minibatches == total
        else:
            assert isinstance(error, dask_ftps.SchedulerLost), repr(
                outcome.get("result", error)
            )
            print(f"{moment}: SchedulerLost {waited:.2f} s after the SIGKILL")
        assert waited <= LIMIT, f"train() ended {waited:.1f} s after the scheduler died"
        assert first.returncode == -signal.SIGKILL

        lost = dask_ftps.inspect(store)
        if m.left is None:
            assert 0 < lost["updates"] < total // EPOCHS
            assert [len(r["history"]) for r in lost["runs"]] == [0]
        else:
            updates, runs, epochs = m.left
            assert lost["updates"] == (total if updates is None else updates)
            assert len(lost["runs"]) == runs
            assert [len(r["history"]) for r in lost["runs"]] == [epochs] * runs

        # The same port, preload and store; new workers (the old ones gave up).
        with scheduler(port, store, env=env), workers(address):
            wait_for_workers(client, 2, timeout=120)  # the client reconnected
            result = _train(client, m.n_shards)  # the same call
            finished = m.left is not None and m.left[2] == EPOCHS
            assert result.trained == (not finished)
            assert (result.run, result.minibatches) == (0, total)
            assert len(result.history) == EPOCHS
            info = dask_ftps.inspect(store)
            ids = [row["update_id"] for row in info["global"]]
            assert max(Counter(ids).values()) == 1  # no minibatch twice
            assert set(ids) == expected and info["first_row"] == 0  # every one
            assert info["updates"] == total
            assert len(info["runs"]) == 1 and len(info["runs"][0]["history"]) == EPOCHS
            assert _same_model(client, store) == total  # recover == live
