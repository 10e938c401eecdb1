"""``train()``: minibatch loops on Dask workers, merged by the parameter server."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import numbers
import sys
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from dask.utils import parse_timedelta
from distributed import secede

from dask_ftps import config
from dask_ftps._client import require_server
from dask_ftps._core import RunSpec, UpdateKey, check_reply
from dask_ftps._exceptions import (
    DuplicateUpdate,
    FTPSError,
    InvalidRequest,
    OutOfOrder,
    StaleIncarnation,
    Voided,
)
from dask_ftps._worker_plugin import get_worker_plugin
from dask_ftps._xp import gpu_available, to_namespace, to_numpy
from dask_ftps.models import Model, model_from_dict

if TYPE_CHECKING:
    import dask.array as da
    from distributed import Client

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train` returns.

    Attributes
    ----------
    version
        The model version when this call returned (for a run found finished:
        the server's current version).
    minibatches
        Minibatch updates the run consists of (in ``"async"`` mode on a fresh
        server the final version equals it).
    history
        One dict per epoch: ``loss`` and ``accuracy`` of the training
        minibatches, ``val_loss`` and ``val_accuracy`` when ``validation`` was
        given, and ``seconds``.
    run
        The run number on the server.
    run_name
        The name the run was started with.
    trained
        Whether this call trained: False when it found its run finished (an
        earlier call trained it) and returned that.
    first_epoch
        The epoch this call started at (above 0 when it resumed the run; the
        epochs before it come from the earlier call, as the server stored them).
    """

    version: int
    minibatches: int
    history: list[dict[str, float]] = field(default_factory=list)
    run: int = 0
    n_shards: int = 0
    seconds: float = 0.0
    run_name: str = ""
    trained: bool = True
    first_epoch: int = 0


def train(
    client: Client,
    X: Any,
    y: Any,
    *,
    epochs: int,
    batch_size: int,
    seed: int = 0,
    n_shards: int | None = None,
    validation: tuple[Any, Any] | None = None,
    progress: bool | None = None,
    run_name: str = "",
) -> TrainResult:
    """Train the model of the registered :class:`~dask_ftps.ParameterServer`.

    The data is cut into ``n_shards`` shards, fixed for the run. Every epoch,
    one task per shard runs on a worker: it pulls the model, computes the
    gradient of each minibatch, and pushes it with the id
    ``run:epoch:shard:step``. A task that re-runs after its worker died asks the
    server where its shard stands and goes on from there, so every minibatch
    is applied exactly once.

    The call is idempotent: a run is known by ``run_name`` and its settings
    (number of samples, ``batch_size``, ``epochs``, ``seed``). The same call
    again resumes that run if it was interrupted, and returns it untouched if
    it finished (``TrainResult.trained`` is False then). To train more on top
    of a finished run, give another ``run_name``.

    Parameters
    ----------
    client
        A client of the cluster whose scheduler hosts the server.
    X, y
        Features (n_samples, n_features) and integer class labels, NumPy or
        Dask arrays.
    epochs, batch_size
        Passes over the data, and the most samples per minibatch: each shard
        is cut into ``ceil(len(shard) / batch_size)`` near-equal minibatches.
    seed
        Seed of the minibatch order.
    n_shards
        Default: the number of worker threads, at most one per minibatch; when
        the call resumes an unfinished run (same data size, ``batch_size``,
        ``epochs`` and ``seed``), that run's shard count.
    validation
        ``(X_val, y_val)`` scored after every epoch.
    progress
        Show a progress bar; default: when standard error is a terminal.
    run_name
        Names the run: another name starts another run on the current model.

    Returns
    -------
    TrainResult
    """
    return client.sync(
        _train,
        client,
        X,
        y,
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        n_shards=n_shards,
        validation=validation,
        progress=progress,
        run_name=run_name,
    )


async def _train(
    client: Client,
    X: Any,
    y: Any,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    n_shards: int | None,
    validation: tuple[Any, Any] | None,
    progress: bool | None,
    run_name: str,
) -> TrainResult:
    _check_settings(epochs=epochs, batch_size=batch_size, seed=seed)
    if not isinstance(run_name, str):
        raise TypeError(f"run_name must be a string, got {type(run_name).__name__}")
    await require_server(client)
    status = check_reply(await client.scheduler.ftps_status(), "ftps_status")
    model = model_from_dict(status["model"])
    local = not any(hasattr(a, "dask") for a in (X, y))  # NumPy-like input
    X, y = _as_dask(X, y, model)
    await _check_values(client, X, y, model, local)  # before the server sees a thing
    n_samples = X.shape[0]
    if n_shards is None:
        n_shards = await _known_run_shards(
            client, run_name, n_samples, batch_size, epochs, seed
        )
    if n_shards is None:
        n_batches = n_samples // batch_size if isinstance(batch_size, int) else 1
        n_shards = max(1, min(status["nthreads"], n_batches))
    if not isinstance(n_shards, int) or not 1 <= n_shards <= n_samples:
        raise ValueError(
            f"n_shards must be an integer in [1, {n_samples}]: {n_shards!r}"
        )
    sizes = tuple(len(part) for part in np.array_split(np.arange(n_samples), n_shards))
    spec = RunSpec(sizes, batch_size, epochs, seed)
    begun = check_reply(
        await client.scheduler.ftps_begin_run(spec=spec.to_dict(), name=run_name),
        "ftps_begin_run",
    )
    run = begun["run"]
    if begun["finished"]:
        logger.info(
            "Run %d (%r) is finished: returning it, nothing trained", run, run_name
        )
        return TrainResult(
            version=begun["version"],
            minibatches=spec.minibatches,
            history=list(begun["history"]),
            run=run,
            n_shards=n_shards,
            run_name=run_name,
            trained=False,
            first_epoch=spec.epochs,
        )
    first_epoch = min(epoch for epoch, _ in begun["next"])
    if first_epoch > 0:
        logger.info("Resuming run %d at epoch %d", run, first_epoch)

    X = X.rechunk({0: sizes, 1: -1})
    y = y.rechunk({0: sizes})
    xs = client.compute(list(X.to_delayed().ravel()))
    ys = client.compute(list(y.to_delayed().ravel()))
    val = None if validation is None else _as_numpy(validation, model)
    bar = _progress_bar(progress, spec.minibatches, run)
    token = uuid.uuid4().hex[:8]
    history = list(begun["history"])[:first_epoch]
    start = time.perf_counter()
    try:
        for epoch in range(first_epoch, epochs):
            t0 = time.perf_counter()
            futures = [
                client.submit(
                    _train_shard,
                    xs[s],
                    ys[s],
                    model=model,
                    mode=status["mode"],
                    first=UpdateKey(run, epoch, s, 0),
                    n_steps=spec.steps[s],
                    seed=seed,
                    device=config.get("device"),
                    inflight=status.get("inflight", 1),
                    key=f"ftps-train-{run}-{epoch}-{s}-{token}",
                )
                for s in range(n_shards)
            ]
            stats = await _gather_with_progress(client, futures, bar)
            history.append(
                await _epoch_record(client, model, stats, val, time.perf_counter() - t0)
            )
            check_reply(
                await client.scheduler.ftps_end_epoch(
                    run=run, epoch=epoch, values=history[-1]
                ),
                "ftps_end_epoch",
            )
            logger.info("Run %d epoch %d: %s", run, epoch, history[-1])
            if bar is not None:
                bar.set_postfix(
                    {k: f"{v:.3f}" for k, v in history[-1].items() if k != "seconds"}
                )
        await _update_bar(client, bar)
    finally:
        if bar is not None:
            bar.close()
        for future in xs + ys:  # our references only: data the caller holds stays
            future.release()
    final = check_reply(await client.scheduler.ftps_status(), "ftps_status")
    return TrainResult(
        version=final["version"],
        minibatches=spec.minibatches,
        history=history,
        run=run,
        n_shards=n_shards,
        seconds=time.perf_counter() - start,
        run_name=run_name,
        first_epoch=first_epoch,
    )


async def _known_run_shards(
    client: Client, name: str, n_samples: int, batch_size: int, epochs: int, seed: int
) -> int | None:
    """The shard count of the run this call would resume or return, if any: a
    run keeps its shards even when the cluster has other workers now."""
    if not all(
        isinstance(v, int) and not isinstance(v, bool)
        for v in (batch_size, epochs, seed)
    ):
        return None  # refused with a clear error when the run is begun
    found = check_reply(
        await client.scheduler.ftps_find_run(
            name=name,
            n_samples=n_samples,
            batch_size=batch_size,
            epochs=epochs,
            seed=seed,
        ),
        "ftps_find_run",
    )
    return None if found["spec"] is None else len(found["spec"]["shard_sizes"])


def _train_shard(
    X: np.ndarray,
    y: np.ndarray,
    *,
    model: Model,
    mode: str,
    first: UpdateKey,
    n_steps: int,
    seed: int,
    device: str,
    inflight: int = 1,
) -> dict[str, float]:
    """One shard's minibatch loop for one epoch; runs in a task on a worker.

    Up to ``inflight`` pushes may be unacknowledged: the next gradient is
    computed from the newest model received while they are written. A refused
    push ends the window: the shard waits for the others and goes on from where
    the server says it stands (what was committed).
    """
    if mode != "async":
        secede()  # a waiting shard must never hold the thread another shard needs
    plugin = get_worker_plugin()
    run, epoch, shard = first.run, first.epoch, first.shard
    xp = _namespace(device)
    X = to_namespace({"X": np.asarray(X, dtype=np.float32)}, xp)["X"]
    y = to_namespace({"y": np.asarray(y, dtype=np.int64)}, xp)["y"]
    order = np.random.default_rng([seed, epoch, shard]).permutation(len(X))
    batches = np.array_split(order, n_steps)  # near-equal: no tiny last minibatch
    stats = {"loss_sum": 0.0, "correct": 0, "n": 0, "computed": 0, "skipped": 0}

    def resume() -> tuple[int, Any]:
        next_epoch, step = plugin.next_step(run, shard)
        if next_epoch < epoch:
            raise FTPSError(
                f"shard {shard} of run {run} has not finished epoch {next_epoch}"
            )
        if next_epoch > epoch:
            return n_steps, None
        return step, plugin.pull(run, shard, epoch, step)

    window: deque[tuple[concurrent.futures.Future, float, int, int]] = deque()

    def settle(until: int) -> Exception | None:
        """Take replies, oldest first, until at most ``until`` are in flight (and
        the ones already there); count what was accepted; the first refusal."""
        nonlocal copy
        refusal = None
        while window and (
            refusal is not None or len(window) > until or window[0][0].done()
        ):
            future, loss, correct, n = window.popleft()
            try:
                reply = future.result()
            except Exception as e:  # noqa: BLE001 - handled once the window is empty
                refusal = refusal or e
                continue
            if refusal is None and reply is not None:
                copy = reply
            stats["loss_sum"] += loss * n
            stats["correct"] += correct
            stats["n"] += n
            stats["computed"] += 1
        return refusal

    step, copy = resume()
    stats["skipped"] = step
    device_version, params = None, None
    while step < n_steps or window:
        refusal = settle(inflight - 1 if step < n_steps else 0)
        if isinstance(refusal, (DuplicateUpdate, OutOfOrder, Voided)):
            # Another attempt got there first, a push in flight was lost, or one
            # was undone with a batch that could not be made durable: go on from
            # where the server says the shard stands.
            step, copy = resume()
            continue
        if isinstance(refusal, StaleIncarnation):
            step, copy = _resume_after_rebuild(resume, copy.incarnation)
            continue
        if refusal is not None:
            raise refusal
        if step == n_steps:
            continue
        if device_version != (copy.server, copy.version):
            params = to_namespace(copy.params, xp)
            device_version = (copy.server, copy.version)
        batch = batches[step]
        loss, grads, correct = model.loss_and_grad(params, X[batch], y[batch])
        nxt = (epoch, step + 1) if step + 1 < n_steps else None
        future = plugin.push_async(
            UpdateKey(run, epoch, shard, step),
            {k: to_numpy(v) for k, v in grads.items()},
            copy.incarnation,
            nxt,
        )
        window.append((future, float(loss), int(correct), len(batch)))
        step += 1
    return stats


def _resume_after_rebuild(resume, incarnation: int):
    """``resume()`` once a new server incarnation serves (it may be rebuilding)."""
    deadline = time.monotonic() + parse_timedelta(config.get("wait-timeout"))
    while True:
        try:
            step, copy = resume()
            if copy is None or copy.incarnation != incarnation:
                return step, copy
        except StaleIncarnation:
            pass
        if time.monotonic() > deadline:
            raise StaleIncarnation(
                f"incarnation {incarnation} was replaced and no new server answered"
            )
        time.sleep(0.1)


def _namespace(device: str):
    if device == "gpu" or (device == "auto" and gpu_available()):
        import cupy

        return cupy
    return np


def _check_settings(**settings: object) -> None:
    """``epochs`` and ``batch_size`` positive integers, ``seed`` a non-negative one."""
    for name, value in settings.items():
        least = 0 if name == "seed" else 1
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):
            raise TypeError(f"{name} must be an integer, got {value!r:.40}")
        if value < least:
            raise InvalidRequest(f"{name} must be at least {least}, got {value}")


async def _check_values(
    client: Client, X: da.Array, y: da.Array, model: Model, local: bool
) -> None:
    """Refuse data the run would fail on half-way: no samples, NaN or infinite
    features, labels outside the model's classes. One pass over the data, here
    for NumPy input (``local``) and on the cluster for Dask input, before any
    update is sent."""
    import dask
    import dask.array as da

    if X.shape[0] == 0:
        raise InvalidRequest("X has no samples: there is nothing to train on")
    checks = [da.isfinite(X).all(), y.min(), y.max()]
    if local:
        finite, low, high = dask.compute(*checks, scheduler="sync")
    else:
        finite, low, high = await client.gather(
            client.compute(checks), asynchronous=True
        )
    if not finite:
        raise InvalidRequest(
            "X holds NaN or infinite values: impute or drop them first"
        )
    n_classes = model.n_classes
    if low < 0 or high >= n_classes:
        bad = low if low < 0 else high
        raise InvalidRequest(
            f"y holds the label {bad}, but the server's model has {n_classes} classes: "
            f"labels must be integers in [0, {n_classes})"
        )


def _as_dask(X: Any, y: Any, model: Model) -> tuple[da.Array, da.Array]:
    import dask.array as da  # here, not at import: the scheduler preload stays light

    X = X if isinstance(X, da.Array) else da.from_array(np.asarray(X))
    y = y if isinstance(y, da.Array) else da.from_array(np.asarray(y))
    if X.ndim != 2 or y.ndim != 1:
        raise ValueError(f"X must be 2-D and y 1-D, got {X.ndim}-D and {y.ndim}-D")
    if any(np.isnan(c) for c in X.chunks[0] + y.chunks[0]):
        raise ValueError("X and y need known chunk sizes: call compute_chunk_sizes()")
    if X.shape[0] != y.shape[0]:
        raise ValueError(f"X has {X.shape[0]} rows but y has {y.shape[0]}")
    if X.shape[1] != model.n_features:
        raise ValueError(
            f"X has {X.shape[1]} features, the server's model expects {model.n_features}"
        )
    if y.dtype.kind not in "iu":
        raise ValueError(f"y must hold integer class labels, not {y.dtype}")
    return X, y


def _as_numpy(
    validation: tuple[Any, Any], model: Model
) -> tuple[np.ndarray, np.ndarray]:
    Xv, yv = (
        np.asarray(a.compute() if hasattr(a, "compute") else a) for a in validation
    )
    if Xv.ndim != 2 or Xv.shape[1] != model.n_features or len(Xv) != len(yv):
        raise ValueError(
            f"validation must be (X, y) with {model.n_features} features and one label "
            f"per row, got shapes {Xv.shape} and {yv.shape}"
        )
    return Xv.astype(np.float32), yv.astype(np.int64)


async def _epoch_record(
    client: Client,
    model: Model,
    stats: list[dict[str, float]],
    val: tuple[np.ndarray, np.ndarray] | None,
    seconds: float,
) -> dict[str, float]:
    n = sum(s["n"] for s in stats)
    record = {
        "loss": sum(s["loss_sum"] for s in stats) / n if n else float("nan"),
        "accuracy": sum(s["correct"] for s in stats) / n if n else float("nan"),
    }
    if val is not None:
        reply = check_reply(await client.scheduler.ftps_get_model(), "ftps_get_model")
        loss, _, correct = model.loss_and_grad(reply["params"], *val)
        record["val_loss"] = float(loss)
        record["val_accuracy"] = correct / len(val[1])
    record["seconds"] = seconds
    return record


def _progress_bar(progress: bool | None, total: int, run: int):
    if progress is None:
        progress = sys.stderr.isatty()
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"ftps run {run}", unit="update")


async def _update_bar(client: Client, bar) -> None:
    if bar is not None:
        status = check_reply(await client.scheduler.ftps_status(), "ftps_status")
        bar.update((status["run"] or {}).get("accepted", 0) - bar.n)


async def _gather_with_progress(client: Client, futures: list, bar) -> list:
    gathered = asyncio.ensure_future(client.gather(futures, asynchronous=True))
    try:
        while True:
            done, _ = await asyncio.wait({gathered}, timeout=0.5)
            await _update_bar(client, bar)
            if done:
                return gathered.result()
    finally:
        gathered.cancel()  # interrupted (Ctrl-C): no gather left unretrieved
