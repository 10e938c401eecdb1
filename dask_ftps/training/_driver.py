"""``train()``: the call a user makes, and the driver that runs a run's epochs as
one task per shard on the workers."""

from __future__ import annotations

import asyncio
import inspect
import logging
import numbers
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from dask.utils import parse_timedelta
from distributed.client import FutureCancelledError
from distributed.comm import CommClosedError

from dask_ftps import config
from dask_ftps._client import model_spec, require_server
from dask_ftps._core import Holder, RunSpec, ServerId, UpdateKey, check_reply
from dask_ftps._exceptions import (
    InvalidRequest,
    SchedulerLost,
    ServerReplaced,
)
from dask_ftps._factored import UPDATE_FORMATS
from dask_ftps._xp import DEVICES
from dask_ftps.models import Model

from ._ingest import _Data, _Shards, _validation
from ._task import Classification
from ._worker import REPLAYS_WITH_STORE, _train_shard

if TYPE_CHECKING:
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
        server the final version equals it; fewer when it stopped early).
    history
        One dict per epoch: ``loss`` and ``accuracy`` of the training
        minibatches, ``val_loss`` and ``val_accuracy`` when ``validation`` was
        given, and ``seconds``; the last one holds ``stopped: 1.0`` when the run
        stopped early.
    run
        The run number on the server.
    n_shards
        The number of data shards of the run.
    seconds
        Wall time of this call's training (0.0 when it found the run finished).
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

    @property
    def stopped_early(self) -> bool:
        """Whether the run ended before its last epoch (early stopping or a
        callback)."""
        return bool(self.history and self.history[-1].get("stopped"))


#: ``callback(epoch, record) -> bool | None``: called after every epoch with
#: the epoch's history record; a true return stops the run.
Callback = Callable[[int, dict[str, float]], Any]


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
    class_weight: Any = None,
    early_stopping: int | None = None,
    tol: float = 1e-4,
    callbacks: Sequence[Callback] = (),
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
    it finished or stopped early (``TrainResult.trained`` is False then). To
    train more on top of a finished run, give another ``run_name``: a call that
    names a finished run but differs from it in anything that shapes training
    (``n_shards``, ``batch_size``, ``epochs``, ``seed``, the number of samples)
    is refused with :class:`SpecMismatch`.

    A run is trained by one call at a time: while a ``train()`` of a connected
    client trains a run, another call that would resume it, or start a run
    that supersedes it, is refused with :class:`RunInUse` before it sends any
    update. Every message of the run names the server it began on: if that
    server is replaced (by a fresh memory-only one, or another store's), the
    call raises :class:`ServerReplaced` and none of its updates reach the new
    server.

    Everything is checked here, before the server sees a thing: shapes, NaN
    and infinite values, empty data, labels outside the model's classes, the
    settings. NumPy (and SciPy sparse, pandas) input is scattered to the
    workers in one piece per shard, not embedded in the task graph.

    Parameters
    ----------
    client
        A client of the cluster whose scheduler hosts the server.
    X
        Features, shape (n_samples, n_features): a NumPy array, SciPy sparse
        matrix, pandas DataFrame, Dask array (chunk sizes are computed when
        unknown) or Dask DataFrame.
    y
        Integer class labels in ``[0, n_classes)``, shape (n_samples,): NumPy,
        pandas or Dask. :class:`~dask_ftps.FTPSClassifier` takes labels of any
        type.
    epochs
        Passes over the data.
    batch_size
        The most samples per minibatch: each shard is cut into
        ``ceil(len(shard) / batch_size)`` near-equal minibatches.
    seed
        Seed of the minibatch order.
    n_shards
        Default: the number of worker threads, at most one per minibatch; when
        the call resumes an unfinished run (same data size, ``batch_size``,
        ``epochs`` and ``seed``), that run's shard count.
    validation
        ``(X_val, y_val)`` scored after every epoch.
    progress
        Show a progress bar (updates, and the epoch); default: when standard
        error is a terminal.
    run_name
        Names the run: another name starts another run on the current model.
    class_weight
        ``None`` (every sample weighs 1), ``"balanced"`` (class ``c`` weighs
        ``n_samples / (n_present_classes * count(c))``), or a mapping from
        class to weight (classes left out weigh 1). Each sample's loss is
        multiplied by its class's weight.
    early_stopping
        Stop when ``val_loss`` has not improved by more than ``tol`` for this
        many epochs in a row (needs ``validation``). The run is then finished:
        the same call again returns it.
    tol
        The least improvement of ``val_loss`` that counts, for
        ``early_stopping``.
    callbacks
        Called after every epoch as ``callback(epoch, record)`` with a copy of
        the epoch's history record; one that returns a true value stops the
        run there, as ``early_stopping`` does.

    Returns
    -------
    TrainResult

    Raises
    ------
    InvalidRequest
        For bad data or settings (nothing is sent to the server).
    NotRegistered
        If the scheduler hosts no parameter server.
    SpecMismatch
        If ``run_name`` names a finished run with other settings.
    RunInUse
        If another call of a connected client trains the run now.
    ServerReplaced
        If the server the run began on was replaced while it trained.
    SchedulerLost
        If the client lost its scheduler, at the latest ``10 s`` after it did
        (``train()`` again resumes a run with a store).
    """
    return _train_call(
        client,
        X,
        y,
        _Settings(
            epochs=epochs,
            batch_size=batch_size,
            seed=seed,
            n_shards=n_shards,
            progress=progress,
            run_name=run_name,
            class_weight=class_weight,
            early_stopping=early_stopping,
            tol=tol,
            callbacks=tuple(callbacks),
        ),
        validation,
    )


def _train_call(
    client: Client,
    X: Any,
    y: Any,
    settings: _Settings,
    validation: tuple[Any, Any] | None,
) -> TrainResult:
    """:func:`train` with its settings made (the estimator's way in)."""
    return client.sync(_train, client, X, y, settings=settings, validation=validation)


@dataclass(frozen=True)
class _Settings:
    """:func:`train`'s keyword arguments, checked by :meth:`check`."""

    epochs: int
    batch_size: int
    seed: int
    n_shards: int | None
    progress: bool | None
    run_name: str
    class_weight: Any
    early_stopping: int | None
    tol: float
    callbacks: tuple[Callback, ...]
    #: The ``ParameterServer.registration`` the caller registered and means to
    #: train on (the estimator's), or None for whatever server is there.
    registration: str | None = None

    def check(self, validation: object) -> None:
        _check_settings(epochs=self.epochs, batch_size=self.batch_size, seed=self.seed)
        if not isinstance(self.run_name, str):
            raise TypeError(
                f"run_name must be a string, got {type(self.run_name).__name__}"
            )
        if self.early_stopping is not None:
            _check_settings(early_stopping=self.early_stopping)
            if validation is None:
                raise InvalidRequest(
                    "early_stopping watches val_loss: give validation=(X_val, y_val)"
                )
        if (
            isinstance(self.tol, bool)
            or not isinstance(self.tol, numbers.Real)
            or not np.isfinite(self.tol)
            or self.tol < 0
        ):
            raise InvalidRequest(f"tol must be a finite number >= 0, got {self.tol!r}")
        for callback in self.callbacks:
            if not callable(callback):
                raise TypeError(f"callbacks must be callables, got {callback!r:.60}")


@dataclass
class _Stopper:
    """Early stopping on ``val_loss``: epochs in a row without an improvement
    of more than ``tol``."""

    patience: int | None
    tol: float
    best: float = float("inf")
    waited: int = 0

    def update(self, record: dict[str, float]) -> bool:
        """Take an epoch's record; whether the run should stop."""
        if self.patience is None:
            return False
        loss = record.get("val_loss")
        if loss is not None and np.isfinite(loss) and loss < self.best - self.tol:
            self.best, self.waited = loss, 0
        else:
            self.waited += 1
        return self.waited >= self.patience


#: How often train() looks whether its client still has a scheduler, and how
#: long it lets a client reconnect (a blip, or a call made while the client
#: still reconnects to a restarted scheduler) before it gives up the run.
_WATCH_INTERVAL = 0.1
_RECONNECT_GRACE = 10.0


@dataclass
class _Lease:
    """The ``train()`` call: its holder id, and the run it holds once begun."""

    holder: Holder
    server: ServerId | None = None
    run: int | None = None


#: The holders of this process's train() calls still running, by client id: a
#: run held by a call of the same client that is not among them is held by a
#: call that ended without saying so (a lost connection), and is free.
_LIVE: dict[str, set[str]] = {}
_LIVE_LOCK = threading.Lock()


def _live_holders(client_id: str) -> list[str]:
    with _LIVE_LOCK:
        return sorted(_LIVE.get(client_id, ()))


async def _train(client: Client, X: Any, y: Any, **kwargs: Any) -> TrainResult:
    """:func:`_run` as one call holding its run, watched by :func:`_watched`."""
    await _connected(client)
    lease = _Lease(Holder(f"{client.id}/{uuid.uuid4().hex[:16]}"))
    with _LIVE_LOCK:
        _LIVE.setdefault(client.id, set()).add(lease.holder)
    try:
        return await _watched(client, _run(client, X, y, lease=lease, **kwargs))
    finally:
        with _LIVE_LOCK:
            live = _LIVE.get(client.id, set())
            live.discard(lease.holder)
            if not live:
                _LIVE.pop(client.id, None)
        await _release(client, lease)


async def _watched(client: Client, coro: Any) -> TrainResult:
    """Run ``coro``, given up with :class:`SchedulerLost` once the client has
    been without its scheduler for ``_RECONNECT_GRACE`` seconds, or at once if
    it fails meanwhile or on a broken connection to the scheduler: a call in
    flight (a scatter, a request to the server) would wait out the client's
    whole timeout, and with it the time a restarted scheduler has to be
    reconnected to."""
    body = asyncio.ensure_future(coro)
    loop = asyncio.get_running_loop()
    lost_since: float | None = None
    try:
        while not body.done():
            await asyncio.wait({body}, timeout=_WATCH_INTERVAL)
            if client.status == "running":
                lost_since = None
            elif lost_since is None:
                lost_since = loop.time()
            elif loop.time() - lost_since > _RECONNECT_GRACE:
                break
        if body.done() and not body.cancelled():
            error = body.exception()
            if error is None:
                return body.result()
            if client.status == "running" and not _lost_scheduler(error):
                raise error
        body.cancel()  # given up: lost for longer than the grace
        await asyncio.wait({body}, timeout=1.0)
        cause = body.exception() if body.done() and not body.cancelled() else None
        raise SchedulerLost(
            f"the client lost its scheduler (client {client.status}) during "
            "train(); call train() again once a scheduler serves: the run resumes "
            "from its store"
        ) from cause
    finally:
        body.cancel()  # a no-op once it is done


def _lost_scheduler(error: BaseException) -> bool:
    """Whether ``error`` says the connection to the scheduler broke (before the
    client noticed, maybe)."""
    return isinstance(error, CommClosedError) or (
        isinstance(error, FutureCancelledError)
        and getattr(error, "reason", None) == "scheduler-connection-lost"
    )


async def _release(client: Client, lease: _Lease) -> None:
    """Tell the server the call ended (best effort: a scheduler that is gone
    forgot the call anyway, and the client's next call takes over a run an
    ended call of its still holds)."""
    if lease.run is None or client.status != "running":
        return
    try:
        await asyncio.wait_for(
            client.scheduler.ftps_end_run(
                server_id=lease.server, run=lease.run, holder=lease.holder
            ),
            _RELEASE_TIMEOUT,
        )
    except Exception as e:  # noqa: BLE001 - best effort
        logger.debug("Run %s not released: %r", lease.run, e)


#: The longest train() waits to tell the server it ended.
_RELEASE_TIMEOUT = 5.0


async def _connected(client: Client) -> None:
    """Wait for a client that is still reconnecting (to a restarted scheduler,
    say): what it sends meanwhile waits in its buffer, which is no state to
    start a run in. It waits up to the client's own timeout while something
    listens at the scheduler's address (a restarted scheduler the client will
    reach), but gives up after ``_RECONNECT_GRACE`` seconds in a row with
    nothing there: a scheduler that is gone is said so without the client's
    whole timeout."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + parse_timedelta(getattr(client, "_timeout", 30) or 30)
    absent_since: float | None = None
    while client.status != "running":
        now = loop.time()
        if client.status in ("closing", "closed") or now > deadline:
            raise SchedulerLost(
                f"train() needs a client connected to a scheduler; this one is "
                f"{client.status}"
            )
        if await _scheduler_listens(client):
            absent_since = None
        elif absent_since is None:
            absent_since = now
        elif now - absent_since > _RECONNECT_GRACE:
            raise SchedulerLost(
                f"train() needs a client connected to a scheduler; this one is "
                f"{client.status} and nothing has listened at "
                f"{client.scheduler.address} for {_RECONNECT_GRACE:g} s: call "
                "train() again once a scheduler serves"
            )
        await asyncio.sleep(_WATCH_INTERVAL)


async def _scheduler_listens(client: Client) -> bool:
    """Whether something accepts connections at the client's scheduler address
    (True where that cannot be told: another protocol)."""
    from dask_ftps._recovery import listening as _listening

    try:
        return await _listening(client.scheduler.address, 1.0)
    except Exception:  # noqa: BLE001 - an address we cannot probe: assume so
        return True


async def _run(
    client: Client,
    X: Any,
    y: Any,
    *,
    settings: _Settings,
    validation: tuple[Any, Any] | None,
    lease: _Lease,
) -> TrainResult:
    settings.check(validation)
    device, update_format = _device_settings()
    scale_stale = _window_scaling()
    epochs, batch_size, seed = settings.epochs, settings.batch_size, settings.seed
    run_name = settings.run_name
    await require_server(client)
    status = check_reply(await client.scheduler.ftps_status(), "ftps_status")
    if (
        settings.registration is not None
        and status.get("registration") != settings.registration
    ):
        raise ServerReplaced(
            "the scheduler's parameter server is not the one this call registered: "
            "another client registered its own in between, before any update was "
            "sent; fit again once that client's training ended, or use another "
            "scheduler"
        )
    model = await model_spec(client, status["server_id"])
    task = Classification.of(model)
    data = await _Data.of(client, X, y, task)
    counts = await data.check(client, task)  # before the server sees a thing
    weights = task.class_weights(settings.class_weight, counts)
    val = None if validation is None else await _validation(client, validation, task)
    n_samples = data.n_samples
    n_shards = settings.n_shards
    if n_shards is None:
        n_shards = await _known_run_shards(
            client, run_name, n_samples, batch_size, epochs, seed
        )
    if n_shards is None:
        n_shards = max(1, min(status["nthreads"], n_samples // batch_size))
    if (
        isinstance(n_shards, bool)
        or not isinstance(n_shards, int)
        or not 1 <= n_shards <= n_samples
    ):
        raise InvalidRequest(
            f"n_shards must be an integer in [1, {n_samples}]: {n_shards!r}"
        )
    sizes = tuple(len(part) for part in np.array_split(np.arange(n_samples), n_shards))
    spec = RunSpec(sizes, batch_size, epochs, seed)
    begun = check_reply(
        await client.scheduler.ftps_begin_run(
            spec=spec.to_dict(),
            name=run_name,
            holder=lease.holder,
            live=_live_holders(client.id),
            server_id=status["server_id"],  # the server whose model was read
        ),
        "ftps_begin_run",
    )
    run = begun["run"]
    server = ServerId(begun["server_id"])
    lease.server, lease.run = server, run
    recorded = list(begun["history"])
    stopped = bool(recorded and recorded[-1].get("stopped"))
    if begun["finished"] and (stopped or len(recorded) >= epochs):
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
    # An epoch whose updates were all committed but whose record was not (the
    # driver died in between) is run again: its tasks find nothing left to push,
    # and its record is taken now (without training loss: that was lost).
    first_epoch = min(min(epoch for epoch, _ in begun["next"]), len(recorded))
    if first_epoch > 0:
        logger.info("Resuming run %d at epoch %d", run, first_epoch)
    history = recorded[:first_epoch]
    stopper = _Stopper(settings.early_stopping, float(settings.tol))
    for record in history:  # a resumed run goes on counting where it was
        stopper.update(record)

    # A sharded server's shard servers run on the workers with its resource:
    # the training tasks (and their data) go to the others, where there are any
    # (a paused or busy shard server then holds up no task).
    compute = await _compute_workers(client, status)
    shards = await data.shards(client, sizes, compute)
    bar = _progress_bar(settings.progress, spec.minibatches, run)
    token = uuid.uuid4().hex[:8]
    start = time.perf_counter()
    try:
        for epoch in range(first_epoch, epochs):
            t0 = time.perf_counter()
            if compute is not None:  # workers that joined since (a restarted one)
                compute = await _compute_workers(client, status)
            if bar is not None:
                bar.set_description(f"ftps run {run} epoch {epoch + 1}/{epochs}")

            def submit(s: int, attempt: int, epoch: int = epoch, where=compute):
                return client.submit(
                    _train_shard,
                    shards.xs[s],
                    shards.ys[s],
                    model=model,
                    mode=status["mode"],
                    first=UpdateKey(run, epoch, s, 0),
                    server=server,
                    holder=lease.holder,
                    n_steps=spec.steps[s],
                    seed=seed,
                    device=device,
                    update_format=update_format,
                    batch_size=spec.batch_size,
                    inflight=status.get("inflight", 1),
                    # A memory-only server never replays what it merged.
                    replays=0 if status.get("store") is None else REPLAYS_WITH_STORE,
                    class_weight=weights,
                    scale_stale=scale_stale,
                    key=f"ftps-train-{run}-{epoch}-{s}-{token}-{attempt}",
                    workers=where,
                    allow_other_workers=where is not None,
                )

            stats = await _run_epoch(client, submit, shards, n_shards, bar)
            record = await _epoch_record(
                client, model, task, stats, val, time.perf_counter() - t0
            )
            stop = stopper.update(record)
            if stop:
                logger.info(
                    "Run %d: val_loss has not improved by more than %g for %d "
                    "epochs: stopping after epoch %d",
                    run,
                    stopper.tol,
                    stopper.patience,
                    epoch,
                )
            for callback in settings.callbacks:
                # In a thread: the callback may use the blocking client API (this
                # runs on the client's event loop); an async one is awaited.
                verdict = await asyncio.to_thread(callback, epoch, dict(record))
                if inspect.isawaitable(verdict):
                    verdict = await verdict
                if verdict:
                    logger.info(
                        "Run %d: a callback stops it after epoch %d", run, epoch
                    )
                    stop = True
            if stop and epoch + 1 < epochs:
                record["stopped"] = 1.0
            history.append(record)
            check_reply(
                await client.scheduler.ftps_end_epoch(
                    run=run, epoch=epoch, values=record, server_id=server
                ),
                "ftps_end_epoch",
            )
            logger.info("Run %d epoch %d: %s", run, epoch, record)
            if bar is not None:
                bar.set_postfix(
                    {k: f"{v:.3f}" for k, v in record.items() if k != "seconds"}
                )
            if record.get("stopped"):
                break
        await _update_bar(client, bar)
    finally:
        if bar is not None:
            bar.close()
        shards.release()
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


async def _compute_workers(client: Client, status: dict) -> list[str] | None:
    """The workers without a sharded server's resource (None: any worker)."""
    resource = status.get("resource")
    if not status.get("shards") or not resource:
        return None
    info = await client.scheduler.identity()
    others = [
        address
        for address, worker in info.get("workers", {}).items()
        if not (worker.get("resources") or {}).get(resource)
    ]
    return sorted(others) or None


async def _known_run_shards(
    client: Client, name: str, n_samples: int, batch_size: int, epochs: int, seed: int
) -> int | None:
    """The shard count of the run this call would resume or return, if any: a
    run keeps its shards even when the cluster has other workers now."""
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


def _device_settings() -> tuple[str, str]:
    """``ftps.device`` and ``ftps.update-format``, checked on the client."""
    device, update_format = config.get("device"), config.get("update-format")
    if device not in DEVICES:
        raise InvalidRequest(f"ftps.device must be one of {DEVICES}, got {device!r}")
    if update_format not in UPDATE_FORMATS:
        raise InvalidRequest(
            f"ftps.update-format must be one of {UPDATE_FORMATS}, got {update_format!r}"
        )
    return device, update_format


def _window_scaling() -> bool:
    """``ftps.window-scaling``, checked on the client."""
    value = config.get("window-scaling")
    if not isinstance(value, bool):
        raise InvalidRequest(
            f"ftps.window-scaling must be true or false, got {value!r}"
        )
    return value


def _check_settings(**settings: object) -> None:
    """``epochs`` and ``batch_size`` positive integers, ``seed`` a non-negative one."""
    for name, value in settings.items():
        least = 0 if name == "seed" else 1
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):
            raise TypeError(f"{name} must be an integer, got {value!r:.40}")
        if value < least:
            raise InvalidRequest(f"{name} must be at least {least}, got {value}")


async def _epoch_record(
    client: Client,
    model: Model,
    task: Classification,
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
        loss, accuracy = await asyncio.to_thread(
            task.score, model, reply["params"], *val
        )
        record["val_loss"] = loss
        record["val_accuracy"] = accuracy
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


async def _run_epoch(
    client: Client, submit: Callable[[int, int], Any], shards: _Shards, n: int, bar
) -> list[dict[str, float]]:
    """Run each shard's task of an epoch until all have finished.

    A task that fails because its scattered shard was lost with its worker is
    submitted again at once (the others may wait for it: a sync round) on the
    shard scattered again: it goes on where the server says the shard stands.
    Any other failure is raised.
    """

    async def outcome(future) -> tuple[bool, Any]:
        try:
            return True, await future
        except Exception as e:  # noqa: BLE001 - raised below unless data was lost
            return False, e

    futures = {s: submit(s, 0) for s in range(n)}
    tasks = {s: asyncio.ensure_future(outcome(f)) for s, f in futures.items()}
    stats: dict[int, dict[str, float]] = {}
    attempts = 0
    try:
        while tasks:
            await asyncio.wait(
                tasks.values(), timeout=0.5, return_when=asyncio.FIRST_COMPLETED
            )
            await _update_bar(client, bar)
            for s, task in list(tasks.items()):
                if not task.done():
                    continue
                ok, value = task.result()
                del tasks[s]
                if ok:
                    stats[s] = value
                    continue
                # The scheduler, not a worker, was lost: nothing to scatter to;
                # the caller calls train() again once a scheduler serves.
                gone = client.status != "running" or (
                    isinstance(value, FutureCancelledError)
                    and value.reason == "scheduler-connection-lost"
                )
                lost = not gone and (
                    shards.lost(s)
                    or (
                        shards.parts is not None
                        and isinstance(value, FutureCancelledError)
                    )
                )
                if not lost or attempts >= _MAX_RESUBMITS * n:
                    raise value
                attempts += 1
                logger.warning(
                    "Shard %d's data was lost with its worker: scattering it again", s
                )
                await shards.scatter(client, s)
                futures[s] = submit(s, attempts)
                tasks[s] = asyncio.ensure_future(outcome(futures[s]))
    finally:
        if tasks:  # a failure or an interruption (Ctrl-C): nothing left running
            for task in tasks.values():
                task.cancel()
            await client.cancel([futures[s] for s in tasks], asynchronous=True)
    return [stats[s] for s in range(n)]


#: Resubmissions per shard of an epoch whose scattered data was lost.
_MAX_RESUBMITS = 3
