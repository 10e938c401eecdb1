"""A model defined outside dask_ftps survives what the built-in models survive:
a real ``dask scheduler`` SIGKILLed and restarted with the preload rebuilds it
(when ``ftps.models.allowed`` lets it import the module), and refuses, in one
line, a store whose model's module is not allowed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pytest
from distributed import Client
from distributed.utils import open_port
from distributed.utils_test import gen_cluster

import dask_ftps
from dask_ftps import SGD, ModelNotAllowed, ParameterServer
from dask_ftps._processes import PACKAGE_ROOT, environment, start_workers
from dask_ftps._registry import MODELS_ALLOWED_ENV, importable_elsewhere
from dask_ftps.models import Model, model_from_dict

from .conftest import digits
from .test_scheduler_loss import kill_after, scheduler, wait_for_workers, workers
from .usermodels import LinearRidge

EPOCHS, BATCH = 3, 32
MODEL = LinearRidge(alpha=1e-3, seed=1)
ALLOWED = {MODELS_ALLOWED_ENV: json.dumps(["tests.usermodels"])}


def _train(client: Client):
    X_train, _, y_train, _ = digits()
    return dask_ftps.train(
        client, X_train, y_train, epochs=EPOCHS, batch_size=BATCH, progress=False
    )


def _minibatches() -> int:
    return EPOCHS * sum(-(-n // BATCH) for n in (674, 673))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["async", "sync"])
def test_a_user_model_survives_a_scheduler_sigkill(tmp_path, mode):
    """``tests.usermodels:LinearRidge`` trains on a preload scheduler, which is
    SIGKILLed a third of the way in and started again with the preload (and the
    module allowed): it serves the exact model the store holds, ``train()``
    again finishes the run, every minibatch applied once, and ``recover()``
    equals the live model bit for bit."""
    store = str(tmp_path / "run.zarr")
    port = open_port()
    address = f"tcp://127.0.0.1:{port}"
    total = _minibatches()
    with (
        scheduler(port, store, env=ALLOWED) as first,
        workers(address),
        Client(address, timeout="60s") as client,
    ):
        wait_for_workers(client, 2)
        client.register_plugin(
            ParameterServer(store, model=MODEL, optimizer=SGD(lr=0.1), mode=mode)
        )
        kill_after(client, first, total // 3)
        with pytest.raises(Exception):  # noqa: B017 - the scheduler is gone
            _train(client)
        first.wait(30)
        assert first.returncode == -signal.SIGKILL
        lost = dask_ftps.inspect(store)
        assert 0 < lost["updates"] < total
        assert lost["model"] == MODEL.to_dict()
        assert lost["model"]["kind"] == "tests.usermodels:LinearRidge"

        with scheduler(port, store, env=ALLOWED), workers(address):
            wait_for_workers(client, 2)
            status = dask_ftps.status(client)
            assert status["incarnation"] == 2
            assert status["version"] == lost["version"]  # nothing accepted is lost
            assert model_from_dict(status["model"]) == MODEL
            result = _train(client)  # the same call resumes the run
            info = dask_ftps.inspect(store)
            ids = [row["update_id"] for row in info["global"]]
            assert max(Counter(ids).values()) == 1  # none twice
            assert info["updates"] == len(ids) == result.minibatches == total
            if mode == "async":
                assert result.version == total
            version, params = dask_ftps.get_model(client)
            offline_version, offline = dask_ftps.recover(store)
            assert version == offline_version == result.version
            assert set(params) == {"weights", "bias"}
            for name, value in params.items():
                np.testing.assert_array_equal(offline[name], value)
            _, X_test, _, y_test = digits()
            assert (MODEL.predict(params, X_test) == y_test).mean() > 0.85


def _run_on(store: str, port: int) -> None:
    """A run of the user model on ``store``, by a preload scheduler that allows
    its module; the scheduler is stopped afterwards."""
    address = f"tcp://127.0.0.1:{port}"
    with (
        scheduler(port, store, env=ALLOWED),
        workers(address),
        Client(address, timeout="60s") as client,
    ):
        wait_for_workers(client, 2)
        client.register_plugin(ParameterServer(store, model=MODEL))
        X_train, _, y_train, _ = digits()
        dask_ftps.train(client, X_train[:256], y_train[:256], epochs=1, batch_size=64)


@pytest.mark.slow
def test_a_store_naming_a_module_not_allowed_stops_the_preload_scheduler(tmp_path):
    """Code named by stored data is not imported by default: a scheduler started
    with the preload on a store whose model's module is not in
    ``ftps.models.allowed`` refuses to start, with a line naming the module and
    the setting; offline ``recover()`` refuses the same way, and works once the
    module is allowed."""
    store = str(tmp_path / "run.zarr")
    port = open_port()
    _run_on(store, port)
    before = sorted(p.name for p in (tmp_path / "run.zarr" / "ftps" / "log").iterdir())
    with scheduler(port, store) as proc:
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("the scheduler started on a store naming a module not allowed")
    assert proc.returncode != 0
    lines = [
        line
        for line in out.decode(errors="replace").splitlines()
        if "dask_ftps preload" in line and "ModelNotAllowed" in line
    ]
    assert len(lines) == 1, out.decode(errors="replace")[-3000:]
    assert "'tests.usermodels'" in lines[0] and "ftps.models.allowed" in lines[0]
    # It served nothing and wrote nothing: no claim of a new incarnation.
    after = sorted(p.name for p in (tmp_path / "run.zarr" / "ftps" / "log").iterdir())
    assert after == before

    code = textwrap.dedent(
        f"""
        import dask_ftps
        try:
            version, params = dask_ftps.recover({store!r})
        except dask_ftps.ModelNotAllowed as e:
            print("REFUSED", e.module)
        else:
            print("RECOVERED", version, sorted(params))
        """
    )

    def recover_in_a_fresh_process(env: dict) -> str:
        done = subprocess.run(
            [sys.executable, "-c", code],
            env=environment(env),
            capture_output=True,
            timeout=120,
            check=True,
        )
        return done.stdout.decode().strip().splitlines()[-1]

    assert recover_in_a_fresh_process({}) == "REFUSED tests.usermodels"
    recovered = recover_in_a_fresh_process(ALLOWED)
    assert recovered.startswith("RECOVERED ") and "['bias', 'weights']" in recovered


def test_a_pattern_in_the_setting_allows_a_package(monkeypatch):
    """``ftps.models.allowed`` takes module names and patterns; a name allows its
    submodules; dask_ftps's own models are always allowed."""
    import dask

    from dask_ftps._registry import module_allowed

    with dask.config.set({"ftps.models.allowed": ["lab.*", "mymodels"]}):
        assert module_allowed("lab.nets")
        assert module_allowed("mymodels") and module_allowed("mymodels.cnn")
        assert not module_allowed("mymodelsx") and not module_allowed("lab")
        assert module_allowed("dask_ftps.models")
        assert not module_allowed("os")
    with dask.config.set({"ftps.models.allowed": []}):
        assert not module_allowed("tests.usermodels")
        with pytest.raises(ModelNotAllowed, match=r"ftps\.models\.allowed"):
            model_from_dict({"kind": "not_imported_anywhere:Net", "seed": 0})
        # A class this process defined is used as it is: nothing is imported.
        assert model_from_dict(MODEL.to_dict()) == MODEL
        # A module this process has imported but that defines no such model:
        with (
            pytest.raises(ValueError, match="no model class"),
            dask.config.set({"ftps.models.allowed": ["json"]}),
        ):
            model_from_dict({"kind": "json:loads"})
    with pytest.raises(ValueError, match="not an import path"):
        model_from_dict({"kind": "os:system; rm"})


def test_a_model_a_restart_cannot_import_is_named_at_registration():
    """A store-backed server with a model class defined in a function (or a
    notebook, ``__main__``) warns in one line that a restarted scheduler could
    not import it; a memory-only server, or a model in a module, does not."""

    @dataclass(frozen=True)
    class Local(LinearRidge):
        pass

    assert "inside a function" in importable_elsewhere(Local)
    with pytest.warns(UserWarning, match="a restarted scheduler cannot import it"):
        ParameterServer("memory://never-opened.zarr", model=Local())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ParameterServer(None, model=Local())
        ParameterServer("memory://never-opened.zarr", model=MODEL)

    main = type("Net", (LinearRidge,), {"__module__": "__main__"})
    main = dataclass(frozen=True)(main)
    assert "__main__" in importable_elsewhere(main)


@dataclass(frozen=True)
class _Ridge2(LinearRidge):
    """A second user model, for the estimator (any Model subclass works)."""


def test_the_estimator_trains_a_user_model(tmp_path):
    """``FTPSClassifier(model=...)`` trains the user's model on labels of any
    type, predicts with it, and refuses a model with another number of classes."""
    from distributed import LocalCluster

    from dask_ftps import FTPSClassifier

    X_train, X_test, y_train, y_test = digits()
    names = np.array(list("abcdefghij"))
    with (
        LocalCluster(n_workers=1, threads_per_worker=2, processes=False) as cluster,
        Client(cluster) as client,
    ):
        clf = FTPSClassifier(
            model=MODEL, epochs=3, batch_size=32, lr=0.1, client=client
        ).fit(X_train, names[y_train])
        assert clf.model_ is MODEL
        assert (clf.predict(X_test) == names[y_test]).mean() > 0.85
        assert clf.predict_proba(X_test).shape == (len(X_test), 10)
        with pytest.raises(ValueError, match="n_classes=10, but y holds 2 classes"):
            FTPSClassifier(model=MODEL, epochs=1, client=client).fit(
                X_train, y_train % 2
            )
        with pytest.raises(ValueError, match="n_features=64, but X has 8 features"):
            FTPSClassifier(model=MODEL, epochs=1, client=client).fit(
                X_train[:, :8], y_train
            )


@pytest.mark.slow
def test_the_cli_reads_a_user_models_store(tmp_path):
    """``dask-ftps inspect`` and ``recover`` read a user model's store where the
    module is allowed, and say which setting to change where it is not."""
    store = str(tmp_path / "run.zarr")
    _run_on(store, open_port())
    cli = [sys.executable, "-m", "dask_ftps.cli"]
    refused = subprocess.run(
        [*cli, "inspect", store],
        env=environment(),
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert refused.returncode != 0
    assert b"ftps.models.allowed" in refused.stderr + refused.stdout
    out = tmp_path / "model.npz"
    done = subprocess.run(
        [*cli, "recover", store, "--output", str(out)],
        env=environment(ALLOWED),
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    _, params = dask_ftps.recover(store)
    with np.load(out) as saved:
        for name, value in params.items():
            np.testing.assert_array_equal(saved[name], value)


def test_a_model_class_of_the_same_name_as_a_builtin_is_not_taken_for_it():
    """Models are named by import path: a user class called ``MLP`` is not
    dask_ftps's MLP, in a description or when it is rebuilt."""

    @dataclass(frozen=True)
    class MLP(LinearRidge):
        pass

    from dask_ftps.models import MLP as BuiltinMLP

    assert MLP().to_dict()["kind"].endswith("<locals>.MLP")
    assert model_from_dict(BuiltinMLP(4, (2,), 3).to_dict()) == BuiltinMLP(4, (2,), 3)
    assert isinstance(model_from_dict(MLP().to_dict()), MLP)
    assert not isinstance(MLP(), BuiltinMLP)
    assert issubclass(MLP, Model)


EXAMPLES = PACKAGE_ROOT / "docs" / "examples"


def _examples_env() -> dict[str, str]:
    """Scheduler and workers import ``docs/examples`` (the CNN's module), and the
    scheduler may rebuild a run of it."""
    path = os.pathsep.join((str(EXAMPLES), environment()["PYTHONPATH"]))
    return {"PYTHONPATH": path, MODELS_ALLOWED_ENV: json.dumps(["cnn_digits"])}


def _kill_when(client: Client, updates: int, kill) -> threading.Thread:
    """Call ``kill()`` once the server holds ``updates`` updates."""

    def watch() -> None:
        while dask_ftps.status(client)["updates"] < updates:
            time.sleep(0.01)
        kill()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.mark.slow
def test_the_cnn_example_survives_a_worker_and_a_scheduler_kill(tmp_path):
    """``docs/examples/cnn_digits.py``'s ConvNet trains on two worker processes
    and a preload scheduler: one worker is SIGKILLed a quarter of the way in
    (its task runs again on the other, from where the server says its shard
    stands), then the scheduler, half-way. A scheduler restarted with the
    preload rebuilds the exact model; ``train()`` again finishes the run, every
    minibatch applied once; ``recover()`` equals the live model bit for bit."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        from cnn_digits import ConvNet
    finally:
        sys.path.remove(str(EXAMPLES))
    model = ConvNet(seed=0)
    env = _examples_env()
    store = str(tmp_path / "run.zarr")
    port = open_port()
    address = f"tcp://127.0.0.1:{port}"
    # 6 epochs: with a worker and the scheduler killed on the way, 4 left the
    # test accuracy at 0.89-0.95 (momentum 0.9): the bar below must hold every time.
    epochs = 6
    total = epochs * sum(-(-n // BATCH) for n in (674, 673))

    def train(client: Client):
        X_train, _, y_train, _ = digits()
        return dask_ftps.train(
            client, X_train, y_train, epochs=epochs, batch_size=BATCH, progress=False
        )

    with (
        scheduler(port, store, env=env) as first,
        start_workers(address, 1, tmp_path / "a.log", env) as doomed,
        start_workers(address, 1, tmp_path / "b.log", env),
        Client(address, timeout="60s") as client,
    ):
        wait_for_workers(client, 2)
        client.register_plugin(
            ParameterServer(store, model=model, optimizer=SGD(lr=0.05, momentum=0.9))
        )
        killers = [
            _kill_when(client, total // 4, doomed.kill_group),
            _kill_when(client, total // 2, lambda: first.send_signal(signal.SIGKILL)),
        ]
        with pytest.raises(Exception):  # noqa: B017 - the scheduler is gone
            train(client)
        first.wait(30)
        assert first.returncode == -signal.SIGKILL
        assert not doomed.alive
        for killer in killers:
            killer.join(5)
        lost = dask_ftps.inspect(store)
        assert total // 2 <= lost["updates"] < total
        assert lost["model"]["kind"] == "cnn_digits:ConvNet"

        with (
            scheduler(port, store, env=env),
            start_workers(address, 2, tmp_path / "c.log", env),
        ):
            wait_for_workers(client, 2)
            status = dask_ftps.status(client)
            assert status["version"] == lost["version"]  # nothing accepted is lost
            assert status["incarnation"] == 2
            result = train(client)  # the same call resumes the run
            info = dask_ftps.inspect(store)
            ids = [row["update_id"] for row in info["global"]]
            assert max(Counter(ids).values()) == 1  # none twice
            assert info["updates"] == result.minibatches == total
            assert len(ids) == total - info["first_row"]  # rows below snapshots go
            assert result.version == total
            version, params = dask_ftps.get_model(client)
            offline_version, offline = dask_ftps.recover(store)
            assert version == offline_version == total
            for name, value in params.items():
                np.testing.assert_array_equal(offline[name], value)
            _, X_test, _, y_test = digits()
            assert (model.predict(params, X_test) == y_test).mean() > 0.9


@gen_cluster(client=True, timeout=120)
async def test_the_dashboard_and_status_show_a_user_model(c, s, a, b, tmp_path):
    """The ``/ftps`` page's view and ``status()`` name a user model and count its
    parameters as it declares them."""
    from .test_dashboard import view

    await c.register_plugin(ParameterServer(str(tmp_path / "run.zarr"), model=MODEL))
    X_train, _, y_train, _ = digits()
    result = await dask_ftps.train(
        c, X_train, y_train, epochs=1, batch_size=64, progress=False
    )
    shown = await view(s.http_server.port)
    assert shown["model"] == "LinearRidge"
    assert shown["n_params"] == MODEL.n_params() == 64 * 10 + 10
    assert shown["version"] == result.version > 0
    status = await dask_ftps.status(c)
    assert status["model"] == MODEL.to_dict()


MAIN_SCRIPT = """
import numpy as np
from dataclasses import dataclass
from distributed import Client, LocalCluster
import dask_ftps
from dask_ftps.models import Model, array_namespace
from tests.usermodels import LinearRidge
from tests.conftest import digits


@dataclass(frozen=True)
class Frozen(LinearRidge):
    '''Overrides loss_and_grad: every gradient is zero, so the model stays.'''

    def loss_and_grad(self, params, X, y, sample_weight=None):
        loss, grads, correct = super().loss_and_grad(params, X, y, sample_weight)
        return loss, {k: g * 0 for k, g in grads.items()}, correct


@dataclass(frozen=True)
class Mean(Model):
    '''A direct Model subclass in __main__: predicts from class means.'''

    n_features: int = 64
    n_classes: int = 10

    def param_shapes(self):
        return {"means": (self.n_classes, self.n_features)}

    def init_params(self):
        return {"means": np.zeros((self.n_classes, self.n_features), np.float32)}

    def _scores(self, params, X):
        xp = array_namespace(X, *params.values())
        return xp, -((X[:, None, :] - params["means"][None]) ** 2).sum(axis=2)

    def loss_and_grad(self, params, X, y, sample_weight=None):
        xp, scores = self._scores(params, X)
        onehot = xp.eye(self.n_classes, dtype=X.dtype)[y]
        diff = params["means"] - (onehot.T @ X) / xp.maximum(onehot.sum(0), 1)[:, None]
        return float((diff**2).sum()), {"means": diff}, int((scores.argmax(1) == y).sum())

    def predict_proba(self, params, X):
        xp, scores = self._scores(params, X)
        e = xp.exp(scores - scores.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)


if __name__ == "__main__":
    X_train, X_test, y_train, y_test = digits()
    with LocalCluster(n_workers=2, threads_per_worker=1, processes={processes}) as cl:
        with Client(cl) as client:
            for model in (Frozen(), Mean()):
                client.register_plugin(
                    dask_ftps.ParameterServer(
                        model=model, optimizer=dask_ftps.SGD(lr=0.1)
                    )
                )
                dask_ftps.train(
                    client, X_train, y_train, epochs=1, batch_size=64, progress=False
                )
                _, params = dask_ftps.get_model(client)
                same = all(
                    np.array_equal(params[k], v) for k, v in model.init_params().items()
                )
                accuracy = (model.predict(params, X_test) == y_test).mean()
                print(type(model).__name__, "UNCHANGED" if same else "CHANGED",
                      round(float(accuracy), 3))
"""


@pytest.mark.parametrize("processes", [False, True])
def test_model_classes_defined_in_main_train_with_their_own_code(tmp_path, processes):
    """A model class defined in a script's ``__main__`` (as in a notebook) trains
    with its own code: a subclass's override of ``loss_and_grad`` is the one the
    workers run (all-zero gradients leave the model as it began), and a direct
    ``Model`` subclass trains. (Pickling such a class by value used to leave an
    empty skeleton class where the model was looked up by name.)"""
    script = tmp_path / "main_models.py"
    script.write_text(MAIN_SCRIPT.replace("{processes}", str(processes)))
    done = subprocess.run(
        [sys.executable, str(script)],
        env=environment(),
        capture_output=True,
        timeout=300,
        check=False,
    )
    lines = [
        line
        for line in done.stdout.decode().splitlines()
        if line.startswith(("Frozen", "Mean"))
    ]
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    frozen, mean = lines
    assert frozen.startswith("Frozen UNCHANGED")
    assert mean.startswith("Mean CHANGED") and float(mean.split()[-1]) > 0.8


@gen_cluster(client=True)
async def test_the_served_model_cannot_be_changed_through_a_reader(c, s, a, b):
    """In an in-process cluster, readers get the server's arrays themselves: they
    are read-only there, and ``get_model`` hands the caller its own copy, so
    writing into what it returned changes nothing served."""
    await c.register_plugin(ParameterServer(model=MODEL))
    _, params = await dask_ftps.get_model(c)
    params["weights"][...] = 7.0  # the caller's own copy
    _, again = await dask_ftps.get_model(c)
    np.testing.assert_array_equal(again["weights"], MODEL.init_params()["weights"])
    served = s.plugins["ftps"].server.published.params["weights"]
    with pytest.raises(ValueError, match="read-only"):
        served[0, 0] = 7.0


LOOKUP_SCRIPT = """
import sys
import dask
from dask_ftps import ModelNotAllowed
from dask_ftps.models import model_from_dict

before = set(sys.modules)
with dask.config.set({"ftps.models.allowed": []}):
    for kind in ("numpy:testing", "numpy:f2py"):
        try:
            model_from_dict({"kind": kind})
        except ModelNotAllowed:
            pass
print("NEW", sorted(m for m in set(sys.modules) - before if m.startswith("numpy")))
"""


def test_a_kind_not_allowed_looks_nothing_up_and_imports_nothing():
    """A store's kind naming a module that is loaded but not allowed is refused
    before anything is looked up on it: a module's lazy ``__getattr__`` (NumPy
    imports ``numpy.testing`` and ``numpy.f2py`` on first access) does not run.
    In a fresh process, where neither is imported yet."""
    done = subprocess.run(
        [sys.executable, "-c", LOOKUP_SCRIPT],
        env=environment(),
        capture_output=True,
        timeout=120,
        check=True,
    )
    assert done.stdout.decode().strip().splitlines()[-1] == "NEW []"


def test_an_optimizer_of_ones_own_is_refused_at_once():
    """Only dask_ftps's optimizers can be rebuilt from a store: another is
    refused where the server is made, not found 'damaged' at the next start."""
    from dask_ftps import SGD as BuiltinSGD

    @dataclass(frozen=True)
    class MySGD(BuiltinSGD):
        pass

    with pytest.raises(TypeError, match="not supported yet"):
        ParameterServer("memory://never-opened.zarr", model=MODEL, optimizer=MySGD(0.1))


def test_check_model_takes_classes_made_in_functions():
    """A class made in a function (a subclass without a decorator of its own, or
    one factory called twice) is checked like any other; a tuple field, which
    the store keeps as a list, is named as the reason it does not rebuild."""
    from dask_ftps.models import check_model

    def plain():
        class Plain(LinearRidge):
            pass

        return Plain()

    def factory(alpha):
        @dataclass(frozen=True)
        class Made(LinearRidge):
            pass

        return Made(alpha=alpha)

    check_model(plain())
    first, second = factory(0.1), factory(0.2)
    check_model(first)
    check_model(second)

    @dataclass(frozen=True)
    class WithTuple(LinearRidge):
        widths: tuple = (8,)

    with pytest.raises(dask_ftps.ModelError, match="tuple fields"):
        check_model(WithTuple())
