"""Optimizers applied on the parameter server (pure NumPy, non-mutating)."""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ._registry import Registry
from ._sparse import RowSparse, apply_rows
from ._xp import to_numpy

__all__ = ["SGD", "Adam", "Optimizer", "optimizer_from_dict"]

Arrays = dict[str, np.ndarray]

#: Learning-rate schedules: the rate an update of epoch ``e`` is merged with.
SCHEDULES = ("constant", "exponential", "inverse")

#: The optimizer kinds (dask_ftps's own only: a store names them by short name).
OPTIMIZERS: Registry[Optimizer] = Registry("optimizer", imports=False)


def _check_float(
    obj: Any, name: str, lo: float, hi: float, *, lo_open: bool, hi_open: bool
) -> None:
    """Validate ``obj.<name>`` lies in the given interval; store as ``float``."""
    v = getattr(obj, name)
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {v!r}")  # noqa: TRY004
    v = float(v)
    ok = math.isfinite(v)
    ok = ok and (v > lo if lo_open else v >= lo)
    ok = ok and (v < hi if hi_open else v <= hi)
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ValueError(f"{name} must be finite and in {interval}, got {v!r}")
    object.__setattr__(obj, name, v)


def _check_schedule(obj: Any) -> None:
    if obj.schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {obj.schedule!r}")
    if obj.schedule == "exponential":
        _check_float(obj, "decay", 0.0, 1.0, lo_open=True, hi_open=False)
    else:
        _check_float(obj, "decay", 0.0, math.inf, lo_open=False, hi_open=True)
    if (obj.schedule, obj.decay) in (("exponential", 1.0), ("inverse", 0.0)):
        # The same rate every epoch: the constant schedule, stored as such.
        object.__setattr__(obj, "schedule", "constant")
        object.__setattr__(obj, "decay", 0.0)


@dataclass(frozen=True)
class Optimizer(ABC):
    """Abstract optimizer spec.

    ``apply`` never mutates its inputs: it returns new dicts of new arrays, so
    readers may keep using the old parameters concurrently.

    Every optimizer has a learning rate ``lr`` and a schedule over the epochs of
    a run: ``schedule="constant"`` (``lr``), ``"exponential"``
    (``lr * decay ** epoch``) or ``"inverse"`` (``lr / (1 + decay * epoch)``).
    The epoch is the one in the update's id, so a replay merges each update
    with the rate it was merged with live.
    """

    #: The class's name in descriptions (see dask_ftps._registry).
    kind: ClassVar[str] = ""
    # Every subclass has the fields lr, schedule and decay (last, with defaults,
    # so that positional arguments keep their meaning).

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        OPTIMIZERS.defines(cls)

    @abstractmethod
    def _state_prefixes(self) -> tuple[str, ...]:
        """Return the state-slot prefixes, e.g. ``("m", "v")``."""

    @abstractmethod
    def _update(
        self,
        p: np.ndarray,
        g: np.ndarray,
        slots: list[np.ndarray],
        step: int,
        lr: float,
        inplace: bool = False,
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """Return the new parameter and new slots for one tensor; with
        ``inplace``, ``p`` and ``slots`` may be overwritten (same bits)."""

    def lr_at(self, epoch: int) -> float:
        """The learning rate of an update of epoch ``epoch`` (0-based).

        Parameters
        ----------
        epoch : int
            The epoch in the update's id.

        Returns
        -------
        float
        """
        if self.schedule == "exponential":
            return self.lr * self.decay**epoch
        if self.schedule == "inverse":
            return self.lr / (1.0 + self.decay * epoch)
        return self.lr

    def init_state(self, params: Arrays) -> Arrays:
        """Return the initial optimizer state (zeros) for ``params``.

        Parameters
        ----------
        params : dict of str to ndarray
            Model parameters.

        Returns
        -------
        dict of str to ndarray
            Keys ``"<slot>/<param name>"``; empty for stateless optimizers.
        """
        return {
            f"{prefix}/{name}": np.zeros(np.shape(p), dtype=_float_dtype(p))
            for prefix in self._state_prefixes()
            for name, p in params.items()
        }

    def apply(
        self,
        params: Arrays,
        state: Arrays,
        grads: dict[str, Any],
        step: int,
        *,
        epoch: int = 0,
        inplace: bool = False,
    ) -> tuple[Arrays, Arrays]:
        """Apply one update.

        Parameters
        ----------
        params : dict of str to ndarray
            Current parameters (not modified).
        state : dict of str to ndarray
            Current optimizer state from :meth:`init_state` (not modified).
        grads : dict of str to array or RowSparse
            Gradients, same keys and shapes as ``params``; a
            :class:`~dask_ftps.RowSparse` one changes only its rows (and their
            state: the lazy form of momentum and Adam, see
            :mod:`dask_ftps._sparse`).
        step : int
            1-based index of this update.
        epoch : int, default 0
            The epoch of the update (its id's), for the learning-rate schedule.
        inplace : bool, default False
            Allow writing into the writable arrays of ``params`` and ``state``
            (a replay, where nobody holds the intermediate models). The bits are
            those of the default.

        Returns
        -------
        new_params, new_state : dict of str to ndarray
            New dicts holding new arrays (or, with ``inplace``, possibly the
            given ones).
        """
        if isinstance(step, bool) or not isinstance(step, numbers.Integral):
            raise ValueError(f"step must be an int, got {step!r}")  # noqa: TRY004
        if step < 1:
            raise ValueError(f"step must be >= 1, got {step}")
        if isinstance(epoch, bool) or not isinstance(epoch, numbers.Integral):
            raise ValueError(f"epoch must be an int, got {epoch!r}")  # noqa: TRY004
        lr = self.lr_at(int(epoch))
        if set(grads) != set(params):
            raise ValueError(
                f"grads keys {sorted(grads)} do not match params {sorted(params)}"
            )
        expected = {f"{x}/{n}" for x in self._state_prefixes() for n in params}
        if set(state) != expected:
            raise ValueError(
                f"state keys {sorted(state)} do not match expected {sorted(expected)}"
            )
        new_params: Arrays = {}
        new_state: Arrays = {}
        for name, p in params.items():
            p = np.asarray(p)
            g = grads[name]
            if not isinstance(g, RowSparse):
                g = to_numpy(g)
            if g.shape != p.shape:
                raise ValueError(
                    f"grad {name!r} has shape {g.shape}, expected {p.shape}"
                )
            slots = [np.asarray(state[f"{x}/{name}"]) for x in self._state_prefixes()]
            reuse = inplace and all(a.flags.writeable for a in (p, *slots))
            if isinstance(g, RowSparse):
                new_p, new_slots = apply_rows(
                    self._update, p, g, slots, int(step), lr, reuse
                )
            else:
                g = g.astype(p.dtype, copy=False)
                new_p, new_slots = self._update(p, g, slots, int(step), lr, reuse)
            new_params[name] = new_p
            for prefix, s in zip(self._state_prefixes(), new_slots, strict=True):
                new_state[f"{prefix}/{name}"] = s
        return new_params, new_state

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable description (see ``optimizer_from_dict``).

        A constant rate is described without ``schedule`` and ``decay``, as
        before schedules existed: stores written either way read the same.
        """
        d = OPTIMIZERS.describe(self)
        if d["schedule"] == "constant" and d["decay"] == 0.0:
            del d["schedule"], d["decay"]
        return d


def _float_dtype(p: Any) -> np.dtype:
    dt = np.asarray(p).dtype
    return dt if np.issubdtype(dt, np.floating) else np.dtype(np.float32)


@OPTIMIZERS.builtin
@dataclass(frozen=True)
class SGD(Optimizer):
    """Stochastic gradient descent with optional heavy-ball momentum.

    ``v = momentum * v + g; p = p - lr * v`` (plain ``p - lr * g`` when
    ``momentum == 0``).

    Parameters
    ----------
    lr : float
        Learning rate (> 0).
    momentum : float, default 0.0
        Momentum coefficient in ``[0, 1)``.
    schedule : {"constant", "exponential", "inverse"}, default "constant"
        How the rate changes over a run's epochs (see :class:`Optimizer`).
    decay : float, default 0.0
        The schedule's factor: in ``(0, 1]`` for ``"exponential"``, ``>= 0`` for
        ``"inverse"``.
    """

    lr: float
    momentum: float = 0.0
    schedule: str = "constant"
    decay: float = 0.0

    def __post_init__(self) -> None:
        _check_float(self, "lr", 0.0, math.inf, lo_open=True, hi_open=True)
        _check_float(self, "momentum", 0.0, 1.0, lo_open=False, hi_open=True)
        _check_schedule(self)

    def _state_prefixes(self) -> tuple[str, ...]:
        return ("velocity",) if self.momentum > 0 else ()

    def _update(
        self,
        p: np.ndarray,
        g: np.ndarray,
        slots: list[np.ndarray],
        step: int,
        lr: float,
        inplace: bool = False,
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        if inplace:  # the same operations, in the same order, into p and v
            if slots:
                v = slots[0]
                v *= self.momentum
                v += g
                g = v
            p -= lr * g
            return p, slots
        if not slots:
            return p - lr * g, []
        v = self.momentum * slots[0] + g
        return p - lr * v, [v]


@OPTIMIZERS.builtin
@dataclass(frozen=True)
class Adam(Optimizer):
    """Adam with bias correction (Kingma & Ba, 2015).

    Parameters
    ----------
    lr : float, default 1e-3
        Learning rate (> 0).
    beta1 : float, default 0.9
        Decay rate of the first moment, in ``[0, 1)``.
    beta2 : float, default 0.999
        Decay rate of the second moment, in ``[0, 1)``.
    eps : float, default 1e-8
        Denominator offset (> 0).
    schedule : {"constant", "exponential", "inverse"}, default "constant"
        How the rate changes over a run's epochs (see :class:`Optimizer`).
    decay : float, default 0.0
        The schedule's factor: in ``(0, 1]`` for ``"exponential"``, ``>= 0`` for
        ``"inverse"``.
    """

    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    schedule: str = "constant"
    decay: float = 0.0

    def __post_init__(self) -> None:
        _check_float(self, "lr", 0.0, math.inf, lo_open=True, hi_open=True)
        _check_float(self, "beta1", 0.0, 1.0, lo_open=False, hi_open=True)
        _check_float(self, "beta2", 0.0, 1.0, lo_open=False, hi_open=True)
        _check_float(self, "eps", 0.0, math.inf, lo_open=True, hi_open=True)
        _check_schedule(self)

    def _state_prefixes(self) -> tuple[str, ...]:
        return ("m", "v")

    def _update(
        self,
        p: np.ndarray,
        g: np.ndarray,
        slots: list[np.ndarray],
        step: int,
        lr: float,
        inplace: bool = False,
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        m = self.beta1 * slots[0] + (1.0 - self.beta1) * g
        v = self.beta2 * slots[1] + (1.0 - self.beta2) * (g * g)
        m_hat = m / (1.0 - self.beta1**step)
        v_hat = v / (1.0 - self.beta2**step)
        return p - lr * m_hat / (np.sqrt(v_hat) + self.eps), [m, v]


def optimizer_from_dict(d: dict[str, Any]) -> Optimizer:
    """Rebuild an optimizer from :meth:`Optimizer.to_dict` output.

    Raises
    ------
    ValueError
        For an unknown kind or bad fields.
    """
    return OPTIMIZERS.rebuild(d)
