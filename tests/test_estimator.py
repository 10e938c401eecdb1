"""FTPSClassifier as scikit-learn users use it: the estimator checks, Pipeline,
GridSearchCV, labels of any type, the inputs they bring, and the errors."""

from __future__ import annotations

import pickle

import dask.array as da
import numpy as np
import pytest
from distributed import Client, LocalCluster
from sklearn.datasets import load_breast_cancer, load_iris, load_wine
from sklearn.model_selection import GridSearchCV, train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

import dask_ftps
from dask_ftps import FTPSClassifier, FTPSError


@pytest.fixture(scope="module", autouse=True)
def client():
    """One in-process cluster for the module, as the default client."""
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


def split(loader, labels=None, seed=0):
    X, y = loader(return_X_y=True)
    if labels is not None:
        y = np.asarray(labels)[y]
    return train_test_split(X, y, test_size=0.3, random_state=seed, stratify=y)


@parametrize_with_checks(
    [
        FTPSClassifier(),
        FTPSClassifier(hidden_layer_sizes=(), optimizer="adam", lr=0.05),
    ]
)
def test_scikit_learn_estimator_checks(estimator, check):
    check(estimator)


def test_a_pipeline_with_a_scaler_on_string_labels():
    Xtr, Xte, ytr, yte = split(load_wine, labels=["barolo", "grignolino", "barbera"])
    pipe = make_pipeline(StandardScaler(), FTPSClassifier(epochs=20, random_state=0))
    pipe.fit(Xtr, ytr)
    clf = pipe[-1]
    assert clf.classes_.tolist() == ["barbera", "barolo", "grignolino"]
    assert pipe.score(Xte, yte) > 0.9
    assert set(pipe.predict(Xte)) <= set(clf.classes_)
    proba = pipe.predict_proba(Xte)
    assert proba.shape == (len(Xte), 3)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-9)
    assert clf.n_iter_ == 20 == len(clf.loss_curve_)
    assert clf.loss_curve_[-1] < clf.loss_curve_[0]
    assert clf.version_ > 0


def test_grid_search_picks_among_settings():
    Xtr, Xte, ytr, yte = split(load_iris)
    search = GridSearchCV(
        make_pipeline(StandardScaler(), FTPSClassifier(epochs=30, random_state=0)),
        {
            "ftpsclassifier__lr": [0.001, 0.1],
            "ftpsclassifier__hidden_layer_sizes": [(), (16,)],
        },
        cv=3,
    ).fit(Xtr, ytr)
    # A rate of 0.001 for 30 epochs barely moves: the search must see it.
    assert search.best_params_["ftpsclassifier__lr"] == 0.1
    assert search.best_score_ > 0.85
    assert search.score(Xte, yte) > 0.85


@pytest.mark.parametrize(
    "labels",
    [[False, True], [1, 2], [-1, 1], ["benign", "malignant"], [2.0, -1.0]],
    ids=repr,
)
def test_any_label_type(labels):
    Xtr, Xte, ytr, yte = split(load_breast_cancer, labels=labels)
    pipe = make_pipeline(StandardScaler(), FTPSClassifier(epochs=5, random_state=0))
    pipe.fit(Xtr, ytr)
    assert pipe[-1].classes_.tolist() == sorted(labels)
    predicted = pipe.predict(Xte)
    assert predicted.dtype == np.asarray(labels).dtype
    assert (predicted == yte).mean() > 0.9


def test_unscaled_data_is_a_users_choice_but_a_pipeline_fixes_it():
    Xtr, Xte, ytr, yte = split(load_breast_cancer)
    scaled = make_pipeline(StandardScaler(), FTPSClassifier(epochs=5, random_state=0))
    assert scaled.fit(Xtr, ytr).score(Xte, yte) > 0.9


def test_dask_arrays_in_and_lazy_predictions_out():
    Xtr, Xte, ytr, yte = split(load_iris, labels=["a", "b", "c"])
    scaler = StandardScaler().fit(Xtr)
    Xtr, Xte = scaler.transform(Xtr), scaler.transform(Xte)
    clf = FTPSClassifier(epochs=20, random_state=0).fit(
        da.from_array(Xtr, chunks=40), da.from_array(ytr, chunks=40)
    )
    assert clf.classes_.tolist() == ["a", "b", "c"]
    lazy = clf.predict(da.from_array(Xte, chunks=20))
    assert isinstance(lazy, da.Array)  # nothing computed yet
    np.testing.assert_array_equal(lazy.compute(), clf.predict(Xte))
    proba = clf.predict_proba(da.from_array(Xte, chunks=20))
    assert isinstance(proba, da.Array)
    np.testing.assert_allclose(proba.compute(), clf.predict_proba(Xte))
    assert (clf.predict(Xte) == yte).mean() > 0.85


def test_pandas_dask_dataframe_categorical_and_sparse_input():
    pd = pytest.importorskip("pandas")
    dd = pytest.importorskip("dask.dataframe")
    sparse = pytest.importorskip("scipy.sparse")
    X, y = load_iris(return_X_y=True, as_frame=True)
    X = pd.DataFrame(StandardScaler().fit_transform(X), columns=X.columns)
    y = pd.Series(pd.Categorical(np.array(["setosa", "versicolor", "virginica"])[y]))

    clf = FTPSClassifier(epochs=20, random_state=0).fit(X, y)
    assert clf.feature_names_in_.tolist() == X.columns.tolist()
    assert clf.score(X, y) > 0.85

    frame = FTPSClassifier(epochs=20, random_state=0).fit(
        dd.from_pandas(X, npartitions=3), dd.from_pandas(y, npartitions=3)
    )
    assert frame.classes_.tolist() == ["setosa", "versicolor", "virginica"]
    assert frame.feature_names_in_.tolist() == X.columns.tolist()
    # Early stopping holds out a share of a Dask DataFrame (chunks unknown).
    held = FTPSClassifier(epochs=3, early_stopping=True, random_state=0).fit(
        dd.from_pandas(X, npartitions=3), dd.from_pandas(y, npartitions=3)
    )
    assert all("val_loss" in r for r in held.history_)
    # Continuous Dask labels are refused as scikit-learn refuses NumPy ones.
    with pytest.raises(ValueError, match="Unknown label type"):
        FTPSClassifier().fit(
            da.from_array(X.to_numpy(), chunks=50),
            da.from_array(np.linspace(0, 1, len(X)), chunks=50),
        )
    assert frame.score(X, y) > 0.85

    sparse_clf = FTPSClassifier(epochs=20, random_state=0)
    sparse_clf.fit(sparse.csr_matrix(X.to_numpy()), y)
    assert sparse_clf.score(sparse.csr_matrix(X.to_numpy()), y) > 0.85


def test_early_stopping_holds_out_data_and_stops():
    Xtr, _, ytr, _ = split(load_wine)
    Xtr = StandardScaler().fit_transform(Xtr)
    clf = FTPSClassifier(
        epochs=50, early_stopping=True, n_iter_no_change=2, tol=10.0, random_state=0
    ).fit(Xtr, ytr)
    assert clf.n_iter_ == 3  # nothing beats tol=10 after the first epoch
    assert all("val_loss" in r for r in clf.history_)
    assert clf.history_[-1]["stopped"] == 1.0


def test_class_weight_by_label():
    Xtr, Xte, ytr, yte = split(load_wine, labels=["x", "y", "z"])
    scaler = StandardScaler().fit(Xtr)
    Xtr, Xte = scaler.transform(Xtr), scaler.transform(Xte)
    clf = FTPSClassifier(epochs=10, class_weight={"y": 0.0}, random_state=0)
    clf.fit(Xtr, ytr)
    assert (clf.predict(Xte[yte == "y"]) == "y").mean() < 0.2
    with pytest.raises(ValueError, match="names labels not in the data"):
        FTPSClassifier(class_weight={"w": 1.0}).fit(Xtr, ytr)
    balanced = FTPSClassifier(epochs=10, class_weight="balanced", random_state=0)
    assert balanced.fit(Xtr, ytr).score(Xte, yte) > 0.9


def test_partial_fit_goes_on_and_refuses_a_replaced_server():
    Xtr, _, ytr, _ = split(load_iris)
    Xtr = StandardScaler().fit_transform(Xtr)
    clf = FTPSClassifier(random_state=0)
    with pytest.raises(ValueError, match="classes must be given"):
        clf.partial_fit(Xtr, ytr)
    clf.partial_fit(Xtr, ytr, classes=[0, 1, 2])
    first = clf.version_
    clf.partial_fit(Xtr, ytr)
    assert clf.n_iter_ == 2 and clf.version_ > first
    with pytest.raises(ValueError, match="not among classes_"):
        clf.partial_fit(Xtr, np.full(len(ytr), 7))
    with pytest.raises(ValueError, match="does not support early_stopping"):
        FTPSClassifier(early_stopping=True).partial_fit(Xtr, ytr, classes=[0, 1, 2])
    FTPSClassifier(epochs=1).fit(Xtr, ytr)  # replaces the cluster's server
    with pytest.raises(FTPSError, match="no longer holds this estimator's model"):
        clf.partial_fit(Xtr, ytr)


def test_a_fitted_estimator_pickles_without_the_cluster():
    Xtr, Xte, ytr, _ = split(load_iris)
    clf = FTPSClassifier(epochs=3, random_state=0).fit(Xtr, ytr)
    copy = pickle.loads(pickle.dumps(clf))
    np.testing.assert_array_equal(copy.predict_proba(Xte), clf.predict_proba(Xte))


@pytest.mark.parametrize(
    ("X", "match"),
    [
        (np.full((10, 4), np.nan), "NaN"),
        (np.zeros((0, 4)), "0 sample"),
        (np.zeros(10), "2D array"),
        (np.full((10, 4), 1j), "Complex data"),
    ],
    ids=["nan", "empty", "1-D", "complex"],
)
def test_bad_input_fails_before_the_server_is_touched(client, X, match):
    Xtr, _, ytr, _ = split(load_iris)
    FTPSClassifier(epochs=1).fit(Xtr, ytr)
    before = dask_ftps.status(client)
    with pytest.raises(ValueError, match=match):
        FTPSClassifier().fit(X, np.arange(len(X)) % 2)
    after = dask_ftps.status(client)
    assert (after["version"], after["runs"]) == (before["version"], before["runs"])


def test_bad_parameters_are_clear_errors(client):
    Xtr, _, ytr, _ = split(load_iris)
    FTPSClassifier(epochs=1).fit(Xtr, ytr)
    for params, match in [
        ({"hidden_layer_sizes": (0,)}, "hidden_layer_sizes"),
        ({"optimizer": "rmsprop"}, "optimizer must be"),
        ({"lr": -1.0}, "lr must be"),
        ({"lr_schedule": "cosine"}, "schedule must be"),
        ({"early_stopping": True, "validation_fraction": 1.5}, "validation_fraction"),
        ({"batch_size": 0}, "batch_size must be"),
        ({"epochs": 2.5}, "epochs must be"),
        ({"n_iter_no_change": 0}, "n_iter_no_change must be"),
        ({"tol": float("nan")}, "tol must be"),
        ({"mode": "hogwild"}, "mode must be"),
        ({"class_weight": {"w": 1.0}}, "names labels not in the data"),
        ({"class_weight": [1.0, 2.0]}, "class_weight must be"),
    ]:
        before = dask_ftps.status(client)
        with pytest.raises(ValueError, match=match):
            FTPSClassifier(**params).fit(Xtr, ytr)
        # Refused before the cluster is touched: the server there is the same.
        after = dask_ftps.status(client)
        assert after == before
    with pytest.raises(TypeError, match="client must be"):
        FTPSClassifier(client=3).fit(Xtr, ytr)


def test_a_fit_on_a_store_resumes_its_run(tmp_path):
    Xtr, Xte, ytr, _ = split(load_iris)
    store = str(tmp_path / "iris.zarr")
    first = FTPSClassifier(epochs=4, store=store, random_state=0).fit(Xtr, ytr)
    # The same fit again (after a lost driver, say): the store's run is returned.
    again = FTPSClassifier(epochs=4, store=store, random_state=0).fit(Xtr, ytr)
    assert again.version_ == first.version_
    np.testing.assert_array_equal(again.predict_proba(Xte), first.predict_proba(Xte))
    assert len(again.history_) == 4
    with pytest.raises(dask_ftps.SpecMismatch):
        FTPSClassifier(hidden_layer_sizes=(8,), store=store).fit(Xtr, ytr)


def test_an_address_as_client(client):
    Xtr, _, ytr, _ = split(load_iris)
    Xtr = StandardScaler().fit(Xtr).transform(Xtr)
    clf = FTPSClassifier(epochs=5, client=client.scheduler.address, random_state=0)
    clf.fit(Xtr, ytr)
    assert dask_ftps.status(client)["version"] == clf.version_


def test_a_callback_may_use_the_blocking_client_api(client):
    """Callbacks run in a thread, not on the client's event loop: the blocking
    API works in them, and an async callback is awaited."""
    Xtr, _, ytr, _ = split(load_iris)
    versions = []

    def watch(epoch, record):
        version, _ = dask_ftps.get_model(client)
        versions.append((epoch, version))

    async def stop_at_second(epoch, record):
        return epoch == 1

    FTPSClassifier(epochs=4, callbacks=[watch, stop_at_second], random_state=0).fit(
        StandardScaler().fit_transform(Xtr), ytr
    )
    assert [e for e, _ in versions] == [0, 1]
    assert 0 < versions[0][1] < versions[1][1]
