"""The worker loop of ``train()``: one shard's minibatches for one epoch, pushed
through a window of unacknowledged pushes, resumed where the server says the
shard stands."""

from __future__ import annotations

import concurrent.futures
import logging
import statistics
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from dask.utils import parse_timedelta
from distributed import secede

from dask_ftps import config
from dask_ftps._core import Holder, ServerId, UpdateKey
from dask_ftps._exceptions import (
    DuplicateUpdate,
    FTPSError,
    OutOfOrder,
    StaleIncarnation,
    Voided,
)
from dask_ftps._factored import (
    Factored,
    factor_pays,
    product,
    to_host,
    use_factors,
)
from dask_ftps._sparse import RowSparse
from dask_ftps._worker_plugin import get_worker_plugin
from dask_ftps._xp import gpu_available, to_namespace
from dask_ftps.models import Model
from dask_ftps.models._check import (
    checked_loss_and_grad,
    checked_sparse_rows,
    has_sparse_rows,
)

from ._ingest import _is_sparse

logger = logging.getLogger(__name__)


class PushWindow:
    """Pushes in flight, oldest first: the worker loop's window of
    unacknowledged pushes (``ftps.inflight``), which the benchmarks reuse.

    Each push is a future of the server's reply and what the loop wants back
    with it (``info``). :meth:`settle` takes replies, oldest first, until few
    enough are in flight.
    """

    def __init__(self) -> None:
        self._pushes: deque[tuple[concurrent.futures.Future, Any]] = deque()

    def __len__(self) -> int:
        return len(self._pushes)

    def add(self, future: concurrent.futures.Future, info: Any = None) -> None:
        """A push sent: ``future`` of its reply."""
        self._pushes.append((future, info))

    def settle(self, until: int) -> tuple[list[tuple[Any, Any]], Exception | None]:
        """Take replies, oldest first, until at most ``until`` are in flight (and
        the ones already answered).

        Returns
        -------
        accepted : list of (reply, info)
            The pushes the server accepted, oldest first; the reply of one
            answered after the first refusal is None (it is not the newest
            model the loop may go on from).
        refusal : Exception or None
            The first refusal; every push after it is taken too (the window is
            empty then).
        """
        accepted: list[tuple[Any, Any]] = []
        refusal = None
        while self._pushes and (
            refusal is not None
            or len(self._pushes) > until
            or self._pushes[0][0].done()
        ):
            future, info = self._pushes.popleft()
            try:
                reply = future.result()
            except Exception as e:  # noqa: BLE001 - returned once the window is empty
                refusal = refusal or e
                continue
            accepted.append((reply if refusal is None else None, info))
        return accepted, refusal


#: The fixed-bits product (:func:`~dask_ftps._factored.product`) of a factored
#: update is paid on the server when it is merged and again when a recovery
#: replays it: ``replays`` counts the second one (0 for a memory-only server,
#: which never replays).
REPLAYS_WITH_STORE = 1

#: Bytes of a float32 number: only float32 matrices are sent as factors.
_ITEMSIZE = 4


@dataclass(frozen=True)
class Costs:
    """What sending a layer's update as factors costs and saves on a cluster,
    measured (see :func:`measure_costs`).

    Attributes
    ----------
    seconds_per_byte
        The time one more byte of a push takes to reach the server (half the
        extra round-trip time of an echo of a payload of that size).
    product_seconds
        The time of one fixed-bits product on this machine, by the layer's
        ``(batch, m, n)``.
    replays
        How many more times the server multiplies each factored update out
        after it merged it (a replay in a recovery): 1 with a store, 0 without.
    """

    seconds_per_byte: float
    product_seconds: Mapping[tuple[int, int, int], float]
    replays: int = REPLAYS_WITH_STORE


def factor_wins(
    shape: tuple[int, ...],
    batch: int,
    *,
    seconds_per_byte: float,
    product_seconds: float,
    replays: int = REPLAYS_WITH_STORE,
) -> bool:
    """Whether sending a float32 ``shape`` layer's update of ``batch`` samples
    as factors is faster than sending it dense: the bytes it saves, at
    ``seconds_per_byte``, take longer than the products it costs the server
    (``1 + replays`` of them, ``product_seconds`` each).

    A pure function of its measured inputs: :func:`factor_names` calls it with
    what :func:`measure_costs` measured on the cluster.

    Parameters
    ----------
    shape
        The weight's shape; only an ``(m, n)`` matrix can be factored.
    batch
        ``B``, the samples of a minibatch (rows of each factor).
    seconds_per_byte
        Push transfer time per byte (>= 0).
    product_seconds
        One product's time on the server (>= 0).
    replays
        Products paid again per update after its merge (>= 0).

    Returns
    -------
    bool
        False wherever the factors are not smaller
        (:func:`~dask_ftps._factored.factor_pays`).

    Examples
    --------
    >>> factor_wins((1024, 1024), 64, seconds_per_byte=1e-9, product_seconds=0.011)
    False
    >>> factor_wins((4096, 4096), 1, seconds_per_byte=1e-9, product_seconds=0.002)
    True
    """
    if not factor_pays(batch, shape):
        return False
    m, n = shape
    saved = _ITEMSIZE * (m * n - batch * (m + n))
    return saved * seconds_per_byte > (1 + replays) * product_seconds


def factor_names(
    model: Model,
    update_format: str,
    batch_size: int,
    costs: Costs | None = None,
    exclude: frozenset[str] = frozenset(),
) -> frozenset[str]:
    """The weights whose updates a worker sends as factors.

    Those the model can factor (:meth:`~dask_ftps.models.Model.factorable`),
    less ``exclude`` (weights sent as rows):
    every float32 matrix for ``"factored"``, none for ``"dense"``, and for
    ``"auto"`` those whose factors are smaller for minibatches of
    ``batch_size`` *and* faster to send on this cluster
    (:func:`factor_wins` with ``costs``; measured by :func:`measure_costs`
    when not given, which needs a worker's connection to the scheduler).
    """
    names = tuple(n for n in model.factorable() if n not in exclude)
    if not names:
        return frozenset()
    shapes, dtypes = model.param_shapes(), model.param_dtypes()
    smaller = frozenset(
        name
        for name in names
        if use_factors(update_format, batch_size, shapes[name], dtypes[name])
    )
    if update_format != "auto" or not smaller:
        return smaller
    if costs is None:
        costs = measure_costs(
            [tuple(shapes[name]) for name in sorted(smaller)], batch_size
        )
    chosen = frozenset(
        name
        for name in smaller
        if factor_wins(
            shapes[name],
            batch_size,
            seconds_per_byte=costs.seconds_per_byte,
            product_seconds=costs.product_seconds[(batch_size, *shapes[name])],
            replays=costs.replays,
        )
    )
    said = (batch_size, tuple(sorted(chosen)), tuple(sorted(smaller - chosen)))
    if said in _SAID:  # once per worker process, not once per task
        return chosen
    _SAID.add(said)
    logger.info(
        "ftps.update-format auto, minibatches of %d: factors for %s, dense for %s "
        "(%.3g ns per pushed byte, products %s ms, %d replay(s))",
        batch_size,
        sorted(chosen) or "none",
        sorted(smaller - chosen) or "none",
        1e9 * costs.seconds_per_byte,
        {
            f"{shapes[n][0]}x{shapes[n][1]}": round(
                1e3 * costs.product_seconds[(batch_size, *shapes[n])], 3
            )
            for n in sorted(smaller)
        },
        costs.replays,
    )
    return chosen


#: Measurements this worker process made: they hold as long as it runs on the
#: same machine and network (by scheduler address and payload size; by
#: ``(batch, m, n)``).
_MEASURED_BYTE_COST: dict[tuple[str, int], float] = {}
_MEASURED_PRODUCT: dict[tuple[int, int, int], float] = {}
_MEASURE_LOCK = threading.Lock()
#: Decisions already logged by this process.
_SAID: set[tuple] = set()
#: Echo payloads: at least this many bytes (below, fixed costs hide the
#: per-byte one), at most that many (enough to see the per-byte cost, small
#: enough not to load a scheduler that many workers measure at once).
_ECHO_BYTES = (1 << 18, 1 << 22)
_ECHO_REPEATS = 5
#: Longest one echo may take before the measurement gives up (and sends dense).
_ECHO_TIMEOUT = 10.0
_PRODUCT_REPEATS = 3


def measure_costs(
    shapes: Sequence[tuple[int, ...]], batch: int, replays: int = REPLAYS_WITH_STORE
) -> Costs:
    """Measure, on the worker running the current task, what factors of
    ``shapes`` at ``batch`` samples would save and cost (once per worker
    process; later calls read what it measured).

    The per-byte cost is that of an echo to the scheduler, of about the bytes
    the factors would save (from 256 KiB to 4 MiB): half the difference of the
    fastest round trip of that payload and of a tiny one (the fastest: what
    the network can do, which favours sending dense). The product's is the
    median time of :func:`~dask_ftps._factored.product` of random factors of
    each shape here (the server's machine may differ: on one machine, or
    alike machines, it is the server's). Outside a worker nothing can be
    measured: the per-byte cost is taken as 0 (dense).
    """
    products = {(batch, *shape): _product_seconds(batch, shape) for shape in shapes}
    saved = sum(
        _ITEMSIZE * (m * n - batch * (m + n)) for m, n in (s[:2] for s in shapes)
    )
    size = min(max(saved, _ECHO_BYTES[0]), _ECHO_BYTES[1])
    return Costs(_byte_seconds(size), products, replays)


def _product_seconds(batch: int, shape: tuple[int, ...]) -> float:
    key = (batch, *shape)
    with _MEASURE_LOCK:
        if key in _MEASURED_PRODUCT:
            return _MEASURED_PRODUCT[key]
        rng = np.random.default_rng(0)
        u = rng.standard_normal((batch, shape[0]), dtype=np.float32)
        v = rng.standard_normal((batch, shape[1]), dtype=np.float32)
        times = []
        for _ in range(_PRODUCT_REPEATS):
            t0 = time.perf_counter()
            product(u, v)
            times.append(time.perf_counter() - t0)
        _MEASURED_PRODUCT[key] = seconds = statistics.median(times)
        return seconds


def _byte_seconds(size: int) -> float:
    from distributed import get_worker
    from distributed.protocol.serialize import ToPickle
    from distributed.utils import sync

    try:
        worker = get_worker()
    except ValueError:
        logger.info("Not on a worker: no push to measure, sending dense")
        return 0.0
    key = (worker.scheduler.address, size)
    with _MEASURE_LOCK:
        if key in _MEASURED_BYTE_COST:
            return _MEASURED_BYTE_COST[key]
        payloads = {
            "small": np.zeros(1, np.float32),
            "large": np.zeros(size // _ITEMSIZE, np.float32),
        }
        fastest = dict.fromkeys(payloads, float("inf"))
        try:
            for _ in range(_ECHO_REPEATS):
                for kind, payload in payloads.items():
                    t0 = time.perf_counter()
                    sync(
                        worker.loop,
                        worker.scheduler.echo,
                        data=ToPickle([payload]),
                        callback_timeout=_ECHO_TIMEOUT,
                    )
                    fastest[kind] = min(fastest[kind], time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001 - a measurement is never worth a failure
            logger.warning("Push cost not measured (%r): sending dense", e)
            _MEASURED_BYTE_COST[key] = 0.0  # not again for every task
            return 0.0
        seconds = max(0.0, fastest["large"] - fastest["small"]) / (2 * size)
        _MEASURED_BYTE_COST[key] = seconds
        return seconds


def _train_shard(
    X: np.ndarray,
    y: np.ndarray,
    *,
    model: Model,
    mode: str,
    first: UpdateKey,
    server: ServerId,
    holder: Holder,
    n_steps: int,
    seed: int,
    device: str,
    update_format: str = "auto",
    batch_size: int | None = None,
    inflight: int = 1,
    replays: int = REPLAYS_WITH_STORE,
    class_weight: np.ndarray | None = None,
    scale_stale: bool = False,
) -> dict[str, float]:
    """One shard's minibatch loop for one epoch; runs in a task on a worker.

    Up to ``inflight`` pushes may be unacknowledged: the next gradient is
    computed from the newest model received while they are written. A refused
    push ends the window: the shard waits for the others and goes on from where
    the server says it stands (what was committed). Every call names
    ``server``, the server the run began on, and ``holder``, the train() call
    it belongs to (a run another call holds refuses it with RunInUse).

    What the model returns is checked before it is pushed
    (:func:`~dask_ftps.models._check.checked_loss_and_grad`): a model that
    misbehaves raises :class:`~dask_ftps.ModelError` here, and nothing of that
    minibatch reaches the server.
    """
    if mode != "async":
        secede()  # a waiting shard must never hold the thread another shard needs
    plugin = get_worker_plugin()
    run, epoch, shard = first.run, first.epoch, first.shard
    xp = _namespace(device)
    # Sparse data stays sparse. On the host, a model that says which rows a
    # minibatch reads (sparse_rows) is sent only those rows and sends only
    # theirs back; on a GPU or with ftps.update-format "dense" each minibatch
    # is made dense (and so is everything sent).
    sparse = _is_sparse(X)
    if sparse:
        X = X.tocsr().astype(np.float32)
    else:
        X = to_namespace({"X": np.asarray(X, dtype=np.float32)}, xp)["X"]
    y = to_namespace({"y": np.asarray(y, dtype=np.int64)}, xp)["y"]
    weight = (
        None
        if class_weight is None
        else to_namespace({"w": np.asarray(class_weight, dtype=np.float32)}, xp)["w"]
    )
    order = np.random.default_rng([seed, epoch, shard]).permutation(X.shape[0])
    batches = np.array_split(order, n_steps)  # near-equal: no tiny last minibatch
    batch_size = batch_size or max(len(b) for b in batches)
    by_rows = (
        sparse and xp is np and update_format != "dense" and has_sparse_rows(model)
    )
    rows = _Rows(model, X, batches, inflight) if by_rows else None
    # A weight sent as rows is not weighed for factors (nor its product timed).
    as_rows = frozenset(rows.of(0)) if rows and n_steps else frozenset()
    factors = factor_names(
        model,
        update_format,
        batch_size,
        _costs(model, update_format, batch_size, replays, as_rows),
        exclude=as_rows,
    )
    stats = {"loss_sum": 0.0, "correct": 0, "n": 0, "computed": 0, "skipped": 0}

    def resume() -> tuple[int, Any]:
        next_epoch, step = plugin.next_step(run, shard, server=server, holder=holder)
        if next_epoch < epoch:
            raise FTPSError(
                f"shard {shard} of run {run} has not finished epoch {next_epoch}"
            )
        if next_epoch > epoch:
            return n_steps, None
        return step, plugin.pull(
            run,
            shard,
            epoch,
            step,
            server=server,
            holder=holder,
            rows=rows.wanted(step) if rows else None,
        )

    window = PushWindow()

    def settle(until: int) -> Exception | None:
        """Take replies until at most ``until`` are in flight; count what was
        accepted; the first refusal."""
        nonlocal copy
        accepted, refusal = window.settle(until)
        for reply, (loss, correct, n) in accepted:
            if reply is not None:
                copy = reply
            stats["loss_sum"] += loss * n
            stats["correct"] += correct
            stats["n"] += n
            stats["computed"] += 1
        return refusal

    step, copy = resume()
    stats["skipped"] = step
    computed_from, params = None, None
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
        if copy is not computed_from:
            params = rows.patch(copy) if rows else to_namespace(copy.params, xp)
            computed_from = copy
        batch = batches[step]
        xb = X[batch]
        if sparse and not by_rows:
            xb = to_namespace({"X": xb.toarray()}, xp)["X"]
        yb = y[batch]
        loss, grads, correct = checked_loss_and_grad(
            model,
            params,
            xb,
            yb,
            None if weight is None else weight[yb],
            factors,
            rows.of(step) if rows else None,
        )
        if scale_stale and window:
            # Computed from a model that lacks this shard's pushes still in
            # flight: a step that much smaller. The scaled update is what the
            # store records, so a replay merges the same bits.
            grads = scaled(grads, stale_scale(len(window)))
        nxt = (epoch, step + 1) if step + 1 < n_steps else None
        future = plugin.push_async(
            UpdateKey(run, epoch, shard, step),
            to_host(grads),  # only the update leaves the device
            copy.incarnation,
            nxt,
            server=server,
            holder=holder,
            rows=rows.wanted(step + 1) if rows and nxt else None,
        )
        window.add(future, (loss, correct, len(batch)))
        step += 1
    return stats


def _costs(
    model: Model,
    update_format: str,
    batch_size: int,
    replays: int,
    exclude: frozenset[str] = frozenset(),
) -> Costs | None:
    """What :func:`factor_names` weighs for ``"auto"`` (None: nothing to
    weigh), with the server's ``replays``; not the weights in ``exclude``."""
    if update_format != "auto":
        return None
    shapes, dtypes = model.param_shapes(), model.param_dtypes()
    smaller = [
        tuple(shapes[name])
        for name in sorted(set(model.factorable()) - exclude)
        if use_factors("auto", batch_size, shapes[name], dtypes[name])
    ]
    return measure_costs(smaller, batch_size, replays) if smaller else None


def stale_scale(outstanding: int) -> float:
    """The factor of an update computed while ``outstanding`` earlier pushes of
    its shard were unacknowledged (``ftps.window-scaling``): ``1 / (1 +
    outstanding)``, so a window of 1 changes nothing.

    Examples
    --------
    >>> stale_scale(0), stale_scale(1), stale_scale(3)
    (1.0, 0.5, 0.25)
    """
    if outstanding < 0:
        raise ValueError(f"outstanding pushes must be >= 0, got {outstanding}")
    return 1.0 / (1 + outstanding)


def scaled(grads: dict[str, Any], factor: float) -> dict[str, Any]:
    """``grads`` times ``factor`` (rounded to float32), in their own arrays
    (NumPy or CuPy); a factored weight by scaling its second factor."""
    if factor == 1.0:
        return grads
    f = np.float32(factor)
    out: dict[str, Any] = {}
    for name, g in grads.items():
        if isinstance(g, Factored):
            out[name] = Factored(g.u, g.v * f)
        elif isinstance(g, RowSparse):
            out[name] = RowSparse(g.indices, g.rows * f.astype(g.rows.dtype), g.n_rows)
        else:
            out[name] = g * f.astype(g.dtype)
    return out


class _Rows:
    """A shard's sparse minibatches and the rows of the model each reads.

    A pull (or a push's reply) for step ``s`` asks for the rows that steps
    ``s .. s + inflight - 1`` read: the copy a step computes from comes from the
    reply to the push ``inflight`` steps before it. The rows received are
    written into this task's own arrays of the whole matrices (zeros where
    nothing was received yet), which the model reads: every row a minibatch
    reads is then the row of the version it was received at, and the others
    are not read.
    """

    def __init__(self, model: Model, X: Any, batches: list, inflight: int) -> None:
        self.model, self.X, self.batches = model, X, batches
        self.inflight = max(1, int(inflight))
        self._of: dict[int, dict[str, np.ndarray]] = {}
        self._whole: dict[str, np.ndarray] = {}

    def of(self, step: int) -> dict[str, np.ndarray]:
        """What ``model.sparse_rows`` says minibatch ``step`` reads (cached,
        checked: :class:`~dask_ftps.ModelError` names the model)."""
        rows = self._of.get(step)
        if rows is None:
            rows = self._of[step] = checked_sparse_rows(
                self.model, self.X[self.batches[step]]
            )
            for old in [s for s in self._of if s < step - self.inflight]:
                del self._of[old]
        return rows

    def wanted(self, step: int) -> dict[str, np.ndarray] | None:
        """The rows to ask for to compute ``step`` and the steps up to the
        window after it (None: the whole model)."""
        steps = range(step, min(step + self.inflight, len(self.batches)))
        parts = [self.of(s) for s in steps]
        # A matrix some step of the window reads whole is pulled whole.
        names = set.intersection(*(set(p) for p in parts)) if parts else set()
        if not names:
            return None
        return {
            name: np.unique(
                np.concatenate([p[name] for p in parts if name in p])
            ).astype(np.int32, copy=False)
            for name in sorted(names)
        }

    def patch(self, copy: Any) -> dict[str, Any]:
        """The parameters to compute from: ``copy``'s whole arrays, and for its
        :class:`~dask_ftps.RowSparse` entries this task's arrays with the rows
        written in."""
        params = {}
        for name, value in copy.params.items():
            if isinstance(value, RowSparse):
                whole = self._whole.get(name)
                if whole is None or whole.shape != value.shape:
                    whole = self._whole[name] = np.zeros(value.shape, value.dtype)
                whole[value.indices] = value.rows
                params[name] = whole
            else:
                params[name] = value
        return params


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
    """The array module a worker computes with for ``ftps.device``: CuPy on a
    GPU (``"gpu"``, or ``"auto"`` where one is usable), else NumPy."""
    if device == "gpu" or (device == "auto" and gpu_available()):
        try:
            import cupy
        except ImportError as e:
            raise FTPSError(
                "ftps.device is 'gpu' but CuPy does not import on this worker "
                f"({e}); install dask_ftps[gpu] or set ftps.device to 'auto'"
            ) from e
        if not gpu_available():
            raise FTPSError(
                "ftps.device is 'gpu' but CuPy sees no usable CUDA device on this "
                "worker; set ftps.device to 'auto' to compute with NumPy there"
            )
        return cupy
    return np
