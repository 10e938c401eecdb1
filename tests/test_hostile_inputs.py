"""Hostile input to train() and FTPSClassifier, generated: whatever it is, the
call trains or raises a clear error (a ValueError or TypeError) before the
server changes, never anything else."""

from __future__ import annotations

import numpy as np
import pytest
from distributed import Client, LocalCluster
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import dask_ftps
from dask_ftps import SGD, FTPSClassifier, ParameterServer
from dask_ftps.models import SoftmaxRegression

N_FEATURES, N_CLASSES = 4, 3
MODEL = SoftmaxRegression(n_features=N_FEATURES, n_classes=N_CLASSES, seed=0)


@pytest.fixture(scope="module")
def client():
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


SPECIAL = st.sampled_from([np.nan, np.inf, -np.inf])

#: One thing wrong with otherwise good input (or nothing: "none").
FAULTS = (
    "none",
    "special value",
    "few features",
    "more features",
    "int features",
    "bool features",
    "object features",
    "complex features",
    "1-D X",
    "no samples",
    "label out of range",
    "negative label",
    "float labels",
    "string labels",
    "2-D y",
    "short y",
    "long y",
    "zero batch",
    "negative batch",
    "float batch",
    "bool batch",
    "zero epochs",
    "string epochs",
)


@st.composite
def hostile(draw):
    """``(X, y, batch_size, epochs, fault)``: good input with one fault."""
    fault = draw(st.sampled_from(("none",) * 6 + FAULTS))
    n = draw(st.integers(1, 12))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    d = {"few features": N_FEATURES - 1, "more features": N_FEATURES + 1}.get(
        fault, N_FEATURES
    )
    X = rng.standard_normal((n, d))
    y = rng.integers(0, N_CLASSES, n)
    batch_size, epochs = draw(st.integers(1, 6)), 1
    if fault == "special value":
        X[draw(st.integers(0, n - 1)), draw(st.integers(0, d - 1))] = draw(SPECIAL)
    elif fault == "int features":
        X = (X * 10).astype(np.int64)
    elif fault == "bool features":
        X = X > 0
    elif fault == "object features":
        X = X.astype(object)
        X[0, 0] = "x"
    elif fault == "complex features":
        X = X + 1j
    elif fault == "1-D X":
        X = X.ravel()
    elif fault == "no samples":
        X, y = X[:0], y[:0]
    elif fault == "label out of range":
        y[0] = N_CLASSES
    elif fault == "negative label":
        y[0] = -1
    elif fault == "float labels":
        y = y + 0.5
    elif fault == "string labels":
        y = np.array(["a", "b", "c"])[y]
    elif fault == "2-D y":
        y = np.stack([y, y], axis=1)
    elif fault == "short y":
        y = y[:-1]
    elif fault == "long y":
        y = np.append(y, 0)
    elif fault == "zero batch":
        batch_size = 0
    elif fault == "negative batch":
        batch_size = -1
    elif fault == "float batch":
        batch_size = 2.5
    elif fault == "bool batch":
        batch_size = True
    elif fault == "zero epochs":
        epochs = 0
    elif fault == "string epochs":
        epochs = "1"
    return X, y, batch_size, epochs, fault


#: Faults train() may accept: its input is numbers (FTPSClassifier encodes labels).
TRAIN_ACCEPTS = {"none", "int features", "bool features"}
#: Faults the estimator may accept: it takes labels of any type and builds its
#: model for the data's features.
ESTIMATOR_ACCEPTS = TRAIN_ACCEPTS | {
    "label out of range",
    "negative label",
    "string labels",
    "few features",
    "more features",
}


def state_of(client) -> tuple:
    status = dask_ftps.status(client)
    return status["version"], status["runs"], status["updates"]


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=hostile())
def test_train_trains_or_refuses_before_anything_changes(client, case):
    X, y, batch_size, epochs, fault = case
    client.register_plugin(ParameterServer(model=MODEL, optimizer=SGD(lr=0.1)))
    before = state_of(client)
    try:
        result = dask_ftps.train(
            client, X, y, epochs=epochs, batch_size=batch_size, progress=False
        )
    except (ValueError, TypeError) as e:
        event(f"refused: {fault}")
        assert fault not in TRAIN_ACCEPTS, e
        assert state_of(client) == before  # refused: nothing sent, nothing changed
        return
    event(f"trained: {fault}")
    assert fault in TRAIN_ACCEPTS
    assert result.version == result.minibatches == state_of(client)[2]


@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=hostile())
def test_the_estimator_fits_or_refuses_before_the_cluster_changes(client, case):
    X, y, batch_size, epochs, fault = case
    FTPSClassifier(epochs=1).fit(np.eye(N_FEATURES), [0, 1, 0, 1])  # a server there
    before = dask_ftps.status(client)
    clf = FTPSClassifier(epochs=epochs, batch_size=batch_size)
    try:
        clf.fit(X, y)
    except (ValueError, TypeError) as e:
        event(f"refused: {fault}")
        one_class = len(np.unique(np.asarray(y).ravel())) < 2
        assert fault not in ESTIMATOR_ACCEPTS or one_class, e
        after = dask_ftps.status(client)
        assert (after["version"], after["runs"], after["incarnation"]) == (
            before["version"],
            before["runs"],
            before["incarnation"],
        )
        return
    event(f"fitted: {fault}")
    assert fault in ESTIMATOR_ACCEPTS
    assert set(clf.predict(np.asarray(X, dtype=float)).tolist()) <= set(
        clf.classes_.tolist()
    )
