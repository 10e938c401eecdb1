"""End-to-end training throughput: ``train()`` against the same loop elsewhere.

Every variant trains the same MLP on scikit-learn's digits with minibatches of
64, one shard per worker process, one task per shard and epoch, and computes
the same gradients:

- (a) a bare Dask round trip: the minibatch loop of ``train()`` on Dask workers,
  each gradient sent to a scheduler handler that answers with the model (no
  merge, nothing kept), with the window ``train()`` uses;
- (b) ``train()`` on ``ParameterServer(store=None)``;
- (c) ``train()`` on ``ParameterServer(store)``, the Zarr journal on local disk;
- (r) Ray's canonical actor parameter server (an actor applies each gradient
  and returns the weights; remote tasks run the same minibatch loop), when
  ``ray`` is installed. It keeps nothing: a lost actor loses the model.

Each measurement gives two rates (``benchmarks._common``, the one home of the
rule): minibatch updates per second over the warm window (:func:`warm_window`:
from the moment every shard has had ``warmup`` updates answered to the moment the
first shard is done, each update stamped by its server when it answers: the
scheduler's handler for (a), (b), (c), the actor for (r)), and over the whole
call (``call_updates_per_s``: every update over the call's wall time, data
placement, task start and the last shard's tail included).
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from distributed import get_worker
from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.protocol.serialize import ToPickle

from benchmarks._common import (
    WARMUP,
    clocked_window,
    remove_plugin,
    warm_window,
    with_call_rate,
    worker_addresses,
)

logger = logging.getLogger("benchmarks.throughput")

BATCH = 64
LR = 0.05


def mlp_for(n_params: int) -> Any:
    """An MLP for digits (64 features, 10 classes) with about ``n_params``
    parameters: one hidden layer of ``(n - 10) / 75`` units."""
    from dask_ftps.models import MLP

    return MLP(n_features=64, hidden=(max(1, (n_params - 10) // 75),), n_classes=10)


#: Copies of digits in the training set: an epoch of one copy is only 28
#: minibatches, so that the per-epoch work (tasks, epoch records) would weigh as
#: much as the updates.
COPIES = 8


def digits_data() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits, scaled to [0, 1], ``COPIES`` times over."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = np.tile((X / 16.0).astype(np.float32), (COPIES, 1))
    return X, np.tile(y.astype(np.int64), COPIES)


def shard_batches(n: int, n_shards: int, epoch: int, seed: int = 0) -> list[list]:
    """Each shard's minibatches in ``epoch`` (rows of the shard), as ``train()``
    cuts them."""
    out = []
    for shard, rows in enumerate(np.array_split(np.arange(n), n_shards)):
        steps = -(-len(rows) // BATCH)
        order = np.random.default_rng([seed, epoch, shard]).permutation(len(rows))
        out.append(np.array_split(order, steps))
    return out


def minibatch_loop(
    model: Any,
    X: np.ndarray,
    y: np.ndarray,
    batches: list,
    params: dict,
    send: Any,
    inflight: int,
) -> int:
    """``train()``'s loop: gradient of each minibatch from the newest model
    received, ``send(grads)`` a future of the next model, at most ``inflight``
    unanswered (the worker loop's own :class:`PushWindow`). Returns the number
    of updates."""
    from dask_ftps.training._worker import PushWindow

    window = PushWindow()
    for batch in batches:
        accepted, refusal = window.settle(inflight - 1)
        if refusal is not None:
            raise refusal
        if accepted:
            params = accepted[-1][0]
        _, grads, _ = model.loss_and_grad(params, X[batch], y[batch])
        window.add(send(grads))
    _, refusal = window.settle(0)
    if refusal is not None:
        raise refusal
    return len(batches)


# -- (a) the bare Dask round trip ---------------------------------------------------


class EchoServer(SchedulerPlugin):
    """(a): a handler with the push signature that answers with the model it
    holds (no merge, nothing kept); both throughput tables use it."""

    name = "ftps-bench-echo"
    idempotent = False

    def __init__(self, model: Any) -> None:
        self.model = model

    async def start(self, scheduler: Any) -> None:
        self.params = self.model.init_params()
        scheduler.handlers["ftps_bench_echo"] = self.echo

    async def echo(
        self,
        worker: str,
        update_id: str,
        grads: dict,
        incarnation: int,
        next_step: tuple[int, int] | None = None,
        have_version: int = -1,
        have_server: str | None = None,
    ) -> dict:
        return {
            "status": "OK",
            "server": "echo",
            "store": None,
            "incarnation": incarnation,
            "version": have_version + 1,
            "params": ToPickle(self.params),
        }


def echo_shard(
    X: np.ndarray,
    y: np.ndarray,
    model: Any,
    batches: list,
    inflight: int,
    shard: int = 0,
    epoch: int = 0,
) -> int:
    """(a) on a worker: ``train()``'s minibatch loop against the echo handler;
    each update named like ``train()``'s (``0:epoch:shard:step``)."""
    worker = get_worker()
    params = model.init_params()
    steps = iter(range(len(batches)))

    async def call(grads: dict, step: int) -> dict:
        reply = await worker.scheduler.ftps_bench_echo(
            worker=worker.address,
            update_id=f"0:{epoch}:{shard}:{step}",
            grads=ToPickle(grads),
            incarnation=1,
            next_step=(0, 1),
            have_version=-1,
            have_server="echo",
        )
        return reply["params"]

    def send(grads: dict) -> Any:
        return asyncio.run_coroutine_threadsafe(
            call(grads, next(steps)), worker.loop.asyncio_loop
        )

    return minibatch_loop(model, X, y, batches, params, send, inflight)


def run_echo(
    client: Any,
    model: Any,
    data: tuple,
    n_shards: int,
    epochs: int,
    inflight: int,
    warmup: int = WARMUP,
) -> dict:
    """(a): ``epochs`` epochs of the minibatch loop against the echo handler,
    one task per shard and epoch. The call (timed whole) places each shard's
    rows on its worker, as ``train()`` does, then runs the epochs.

    Returns
    -------
    dict
        The warm window's and the whole call's rates
        (:func:`benchmarks._common.with_call_rate`).
    """
    client.run_on_scheduler(remove_plugin, name=EchoServer.name)
    client.register_plugin(EchoServer(model))
    X, y = data
    parts = np.array_split(np.arange(len(X)), n_shards)
    workers = worker_addresses(client)

    def call() -> int:
        placed = [
            (client.scatter(X[p], workers=[w]), client.scatter(y[p], workers=[w]))
            for p, w in zip(parts, workers, strict=False)
        ]
        updates = 0
        for epoch in range(epochs):
            batches = shard_batches(len(X), n_shards, epoch)
            futures = [
                client.submit(
                    echo_shard,
                    *placed[s],
                    model,
                    batches[s],
                    inflight,
                    s,
                    epoch,
                    workers=[workers[s % len(workers)]],
                    pure=False,
                )
                for s in range(n_shards)
            ]
            updates += sum(client.gather(futures))
        return updates

    updates, rates = clocked_window(client, call, warmup)
    client.run_on_scheduler(remove_plugin, name=EchoServer.name)
    if updates != rates["call_updates"]:
        raise RuntimeError(f"echo: {updates} updates, {rates['call_updates']} stamped")
    return rates


# -- (b), (c) train() -------------------------------------------------------------


def run_train(
    client: Any,
    model: Any,
    data: tuple,
    n_shards: int,
    epochs: int,
    mode: str,
    store: Path | None,
    warmup: int = WARMUP,
) -> dict:
    """(b) with ``store=None``, (c) with a store: ``train()`` of ``epochs``
    epochs on a fresh server, timed whole and over the warm window.

    Returns
    -------
    dict
        The warm window's and the whole call's rates
        (:func:`benchmarks._common.with_call_rate`), ``train()``'s own
        ``train_seconds`` and the last epoch's ``accuracy``.
    """
    import dask_ftps
    from benchmarks._common import register_fresh
    from dask_ftps import SGD, ParameterServer

    register_fresh(
        client,
        ParameterServer(
            store=None if store is None else str(store),
            model=model,
            optimizer=SGD(lr=LR),
            mode=mode,
        ),
    )
    X, y = data
    result, rates = clocked_window(
        client,
        lambda: dask_ftps.train(
            client,
            X,
            y,
            epochs=epochs,
            batch_size=BATCH,
            n_shards=n_shards,
            progress=False,
        ),
        warmup,
    )
    client.run_on_scheduler(remove_plugin)
    if rates["call_updates"] != result.minibatches:
        logger.warning(
            "train(): %d minibatches, %d pushes answered",
            result.minibatches,
            rates["call_updates"],
        )
    if store is not None:
        import shutil

        shutil.rmtree(store, ignore_errors=True)
    return {
        **rates,
        "minibatches": result.minibatches,
        "train_seconds": result.seconds,
        "accuracy": result.history[-1]["accuracy"],
    }


# -- (r) Ray's actor parameter server ------------------------------------------------


class RayPeer:
    """Ray's canonical parameter server: one actor owns the weights and applies
    each gradient as it arrives (async); ``n_shards`` remote tasks per epoch run
    the minibatch loop. Started once, reused for every measurement.

    The actor stamps each update it answers with the time and its shard (one
    ``time.perf_counter()`` and a list append, as the scheduler's clock does for
    the Dask variants), for the warm window's rule.
    """

    def __init__(self, n_workers: int) -> None:
        import ray

        ray.init(
            num_cpus=n_workers + 1,
            include_dashboard=False,
            logging_level=logging.ERROR,
            log_to_driver=False,
        )
        self.ray = ray

        @ray.remote(num_cpus=1)
        class ParameterServerActor:
            def __init__(self, model: Any) -> None:
                from dask_ftps import SGD

                self.model = model
                self.optimizer = SGD(lr=LR)
                self.params = model.init_params()
                self.state = self.optimizer.init_state(self.params)
                self.version = 0
                self.stamps: list[tuple[float, int]] = []

            def apply(self, grads: dict, shard: int = 0) -> dict:
                self.version += 1
                self.params, self.state = self.optimizer.apply(
                    self.params, self.state, grads, step=self.version
                )
                self.stamps.append((time.perf_counter(), shard))
                return self.params

            def get(self) -> dict:
                return self.params

            def clock(self) -> list[tuple[float, int]]:
                return self.stamps

        @ray.remote(num_cpus=1)
        def shard(
            ps: Any,
            X: np.ndarray,
            y: np.ndarray,
            model: Any,
            batches: list,
            inflight: int,
            index: int,
        ) -> int:
            params = ray.get(ps.get.remote())

            class Reply:
                def __init__(self, ref: Any) -> None:
                    self.ref = ref

                def done(self) -> bool:
                    return bool(ray.wait([self.ref], timeout=0)[0])

                def result(self) -> dict:
                    return ray.get(self.ref)

            return minibatch_loop(
                model,
                X,
                y,
                batches,
                params,
                lambda grads: Reply(ps.apply.remote(grads, index)),
                inflight,
            )

        self._actor = ParameterServerActor
        self._shard = shard

    def run(
        self,
        model: Any,
        data: tuple,
        n_shards: int,
        epochs: int,
        inflight: int,
        warmup: int = WARMUP,
    ) -> dict:
        """``epochs`` epochs on a fresh actor (started before the timing, as
        the Dask variants' servers are); the call, timed whole, puts each
        shard's rows in the object store, then runs the epochs.

        Returns
        -------
        dict
            The warm window's and the whole call's rates
            (:func:`benchmarks._common.with_call_rate`).
        """
        ray = self.ray
        ps = self._actor.remote(model)
        X, y = data
        parts = np.array_split(np.arange(len(X)), n_shards)
        ray.get(ps.get.remote())  # the actor is up
        t0 = time.perf_counter()
        xs = [ray.put(X[p]) for p in parts]
        ys = [ray.put(y[p]) for p in parts]
        updates = 0
        for epoch in range(epochs):
            batches = shard_batches(len(X), n_shards, epoch)
            updates += sum(
                ray.get(
                    [
                        self._shard.remote(
                            ps,
                            xs[s],
                            ys[s],
                            model,
                            batches[s],
                            inflight,
                            s,
                        )
                        for s in range(n_shards)
                    ]
                )
            )
        seconds = time.perf_counter() - t0
        stamps = ray.get(ps.clock.remote())
        ray.kill(ps)
        if updates != len(stamps):
            raise RuntimeError(f"ray: {updates} updates, {len(stamps)} stamped")
        return with_call_rate(warm_window(stamps, warmup), updates, seconds)

    def close(self) -> None:
        self.ray.shutdown()


def ray_peer(n_workers: int) -> RayPeer | None:
    """The Ray peer, or None when ``ray`` is not installed."""
    try:
        import ray  # noqa: F401
    except ImportError:
        logger.info("ray is not installed: no Ray column (pip install -e '.[bench]')")
        return None
    return RayPeer(n_workers)


def ray_version() -> str | None:
    try:
        import ray
    except ImportError:
        return None
    return ray.__version__
