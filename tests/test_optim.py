from __future__ import annotations

import json

import numpy as np
import pytest

from dask_ftps.optim import SGD, Adam, Optimizer, optimizer_from_dict

OPTIMIZERS = [
    SGD(lr=0.1),
    SGD(lr=0.05, momentum=0.9),
    Adam(lr=0.01),
    SGD(lr=0.1, momentum=0.5, schedule="exponential", decay=0.5),
    Adam(lr=0.01, schedule="inverse", decay=1.0),
]


def _problem(seed: int = 0):
    rng = np.random.default_rng(seed)
    params = {
        "W": rng.standard_normal((3, 4), dtype=np.float32),
        "b": rng.standard_normal(4, dtype=np.float32),
    }
    grads = [
        {k: rng.standard_normal(v.shape, dtype=np.float32) for k, v in params.items()}
        for _ in range(3)
    ]
    return params, grads


def _copy(d):
    return {k: v.copy() for k, v in d.items()}


@pytest.mark.parametrize("opt", OPTIMIZERS, ids=repr)
def test_apply_does_not_mutate_and_returns_new_arrays(opt: Optimizer) -> None:
    params, grads = _problem()
    state = opt.init_state(params)
    p0, s0, g0 = _copy(params), _copy(state), _copy(grads[0])
    new_p, new_s = opt.apply(params, state, grads[0], step=1)
    for before, after in [(p0, params), (s0, state), (g0, grads[0])]:
        assert list(before) == list(after)
        for k in before:
            np.testing.assert_array_equal(before[k], after[k])
    assert new_p is not params
    assert new_s is not state
    for k in params:
        assert not np.shares_memory(new_p[k], params[k])
        assert new_p[k].dtype == np.float32
    for k in state:
        assert not np.shares_memory(new_s[k], state[k])
        assert new_s[k].dtype == np.float32
    assert set(new_s) == set(state)


@pytest.mark.parametrize("opt", OPTIMIZERS, ids=repr)
def test_apply_is_deterministic(opt: Optimizer) -> None:
    params, grads = _problem()
    runs = []
    for _ in range(2):
        p, s = params, opt.init_state(params)
        for step, g in enumerate(grads, start=1):
            p, s = opt.apply(p, s, g, step)
        runs.append((p, s))
    (pa, sa), (pb, sb) = runs
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k])
    for k in sa:
        np.testing.assert_array_equal(sa[k], sb[k])


@pytest.mark.parametrize("opt", OPTIMIZERS, ids=repr)
def test_inplace_apply_gives_the_same_bits(opt: Optimizer) -> None:
    params, grads = _problem()
    p, s = params, opt.init_state(params)
    q, t = _copy(params), opt.init_state(params)
    for step, g in enumerate(grads, start=1):
        p, s = opt.apply(p, s, g, step)
        q, t = opt.apply(q, t, g, step, inplace=True)
    for k in p:
        assert p[k].tobytes() == q[k].tobytes()
    for k in s:
        assert s[k].tobytes() == t[k].tobytes()


def test_inplace_apply_writes_into_writable_arrays_only() -> None:
    opt = SGD(lr=0.05, momentum=0.9)
    params, grads = _problem()
    state = opt.init_state(params)
    new_p, new_s = opt.apply(params, state, grads[0], 1, inplace=True)
    assert all(new_p[k] is params[k] for k in params)
    assert all(new_s[k] is state[k] for k in state)
    frozen = _copy(params)
    for v in frozen.values():
        v.flags.writeable = False
    new_p, _ = opt.apply(frozen, state, grads[1], 2, inplace=True)
    assert all(not np.shares_memory(new_p[k], frozen[k]) for k in frozen)


def test_init_state_keys() -> None:
    params, _ = _problem()
    assert SGD(lr=0.1).init_state(params) == {}
    vel = SGD(lr=0.1, momentum=0.5).init_state(params)
    assert sorted(vel) == ["velocity/W", "velocity/b"]
    adam = Adam().init_state(params)
    assert sorted(adam) == ["m/W", "m/b", "v/W", "v/b"]
    for k, v in {**vel, **adam}.items():
        assert v.dtype == np.float32
        assert v.shape == params[k.split("/", 1)[1]].shape
        assert not v.any()


def test_sgd_step_exact() -> None:
    params = {"w": np.array([1.0, -2.0, 0.5], dtype=np.float32)}
    grads = {"w": np.array([0.5, 0.25, -1.0], dtype=np.float32)}
    new_p, new_s = SGD(lr=0.5).apply(params, {}, grads, step=1)
    assert new_s == {}
    np.testing.assert_array_equal(
        new_p["w"], np.array([0.75, -2.125, 1.0], dtype=np.float32)
    )
    assert new_p["w"].dtype == np.float32


def test_sgd_momentum_matches_reference() -> None:
    params, grads = _problem()
    lr, mu = 0.05, 0.9
    opt = SGD(lr=lr, momentum=mu)
    p, s = params, opt.init_state(params)
    ref_p = _copy(params)
    ref_v = {k: np.zeros_like(v) for k, v in params.items()}
    for step, g in enumerate(grads, start=1):
        p, s = opt.apply(p, s, g, step)
        for k in ref_p:
            ref_v[k] = np.float32(mu) * ref_v[k] + g[k]
            ref_p[k] = ref_p[k] - np.float32(lr) * ref_v[k]
    for k in ref_p:
        np.testing.assert_array_equal(p[k], ref_p[k])
        np.testing.assert_array_equal(s[f"velocity/{k}"], ref_v[k])


def test_adam_matches_reference() -> None:
    params, grads = _problem()
    lr, b1, b2, eps = 0.01, 0.8, 0.99, 1e-7
    opt = Adam(lr=lr, beta1=b1, beta2=b2, eps=eps)
    p, s = params, opt.init_state(params)
    ref_p = {k: v.astype(np.float64) for k, v in params.items()}
    m = {k: np.zeros(v.shape) for k, v in params.items()}
    v = {k: np.zeros(v.shape) for k, v in params.items()}
    names = list(params)
    for t, g in enumerate(grads, start=1):
        p, s = opt.apply(p, s, g, t)
        for k in names:
            g64 = g[k].astype(np.float64)
            m[k] = b1 * m[k] + (1 - b1) * g64
            v[k] = b2 * v[k] + (1 - b2) * g64**2
            m_hat = m[k] / (1 - b1**t)
            v_hat = v[k] / (1 - b2**t)
            ref_p[k] = ref_p[k] - lr * m_hat / (np.sqrt(v_hat) + eps)
    for k in names:
        assert p[k].dtype == np.float32
        np.testing.assert_allclose(p[k], ref_p[k], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(s[f"m/{k}"], m[k], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(s[f"v/{k}"], v[k], rtol=1e-5, atol=1e-7)


def test_adam_first_step_is_lr_sign() -> None:
    params = {"w": np.zeros(3, dtype=np.float32)}
    grads = {"w": np.array([2.0, -0.5, 3.0], dtype=np.float32)}
    opt = Adam(lr=0.1, eps=1e-12)
    new_p, _ = opt.apply(params, opt.init_state(params), grads, step=1)
    np.testing.assert_allclose(new_p["w"], [-0.1, 0.1, -0.1], rtol=1e-6)


@pytest.mark.parametrize("opt", OPTIMIZERS, ids=repr)
def test_to_dict_round_trip(opt: Optimizer) -> None:
    d = opt.to_dict()
    assert d["kind"] == type(opt).__name__
    assert optimizer_from_dict(json.loads(json.dumps(d))) == opt


@pytest.mark.parametrize(
    "make",
    [
        lambda: SGD(lr=0.0),
        lambda: SGD(lr=-1.0),
        lambda: SGD(lr=float("nan")),
        lambda: SGD(lr=float("inf")),
        lambda: SGD(lr="0.1"),
        lambda: SGD(lr=0.1, momentum=1.0),
        lambda: SGD(lr=0.1, momentum=-0.1),
        lambda: Adam(lr=0.0),
        lambda: Adam(beta1=1.0),
        lambda: Adam(beta2=-0.5),
        lambda: Adam(eps=0.0),
        lambda: SGD(lr=0.1, schedule="cosine"),
        lambda: SGD(lr=0.1, schedule="exponential", decay=0.0),
        lambda: SGD(lr=0.1, schedule="exponential", decay=1.5),
        lambda: Adam(schedule="inverse", decay=-1.0),
        lambda: Adam(schedule="inverse", decay=float("nan")),
    ],
)
def test_bad_hyper_parameters_raise(make) -> None:
    with pytest.raises(ValueError, match="must be"):
        make()


@pytest.mark.parametrize(
    "d", [{"kind": "RMSProp", "lr": 0.1}, {"lr": 0.1}, {"kind": "SGD", "foo": 1}]
)
def test_optimizer_from_dict_rejects_bad_input(d) -> None:
    with pytest.raises(ValueError, match=r"kind|fields"):
        optimizer_from_dict(d)


def test_apply_rejects_bad_inputs() -> None:
    params, grads = _problem()
    opt = Adam()
    state = opt.init_state(params)
    with pytest.raises(ValueError, match="step"):
        opt.apply(params, state, grads[0], step=0)
    with pytest.raises(ValueError, match="grads keys"):
        opt.apply(params, state, {"W": grads[0]["W"]}, step=1)
    with pytest.raises(ValueError, match="state keys"):
        opt.apply(params, {}, grads[0], step=1)
    with pytest.raises(ValueError, match="shape"):
        opt.apply(params, state, {**grads[0], "b": np.zeros(5, np.float32)}, step=1)


@pytest.mark.parametrize(
    ("opt", "rates"),
    [
        (SGD(lr=0.1), [0.1, 0.1, 0.1]),
        (SGD(lr=0.1, schedule="exponential", decay=0.5), [0.1, 0.05, 0.025]),
        (Adam(lr=0.1, schedule="inverse", decay=1.0), [0.1, 0.05, 0.1 / 3]),
    ],
    ids=repr,
)
def test_schedule_rates(opt: Optimizer, rates: list[float]) -> None:
    assert [opt.lr_at(e) for e in range(3)] == pytest.approx(rates, rel=1e-12)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_an_update_is_merged_with_its_epochs_rate(momentum: float) -> None:
    """The scheduled optimizer at epoch e gives the bits of a constant one at
    the rate of epoch e, in place or not."""
    params, grads = _problem()
    scheduled = SGD(lr=0.1, momentum=momentum, schedule="exponential", decay=0.5)
    constant = SGD(lr=0.025, momentum=momentum)
    for inplace in (False, True):
        got = scheduled.apply(
            _copy(params),
            scheduled.init_state(params),
            grads[0],
            step=1,
            epoch=2,
            inplace=inplace,
        )
        want = constant.apply(_copy(params), constant.init_state(params), grads[0], 1)
        for name in params:
            np.testing.assert_array_equal(got[0][name], want[0][name])
    with pytest.raises(ValueError, match="epoch must be an int"):
        scheduled.apply(params, scheduled.init_state(params), grads[0], 1, epoch=1.5)


def test_a_schedule_that_never_changes_the_rate_is_the_constant_one() -> None:
    assert SGD(lr=0.1, schedule="inverse", decay=0.0) == SGD(lr=0.1)
    assert Adam(schedule="exponential", decay=1.0).to_dict() == Adam().to_dict()
