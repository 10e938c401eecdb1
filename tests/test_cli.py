"""The ``dask-ftps`` command line."""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

import dask_ftps
from dask_ftps import _demo, cli
from dask_ftps.models import MLP


def _command() -> list[str]:
    """The installed console script, else ``python -m dask_ftps.cli``."""
    script = pathlib.Path(sys.executable).with_name("dask-ftps")
    return [str(script)] if script.exists() else [sys.executable, "-m", "dask_ftps.cli"]


def _line(pattern: str, text: str) -> re.Match | None:
    return re.search(pattern, text, re.MULTILINE)


def test_help_lists_commands() -> None:
    result = CliRunner().invoke(cli.main, ["--help"])
    assert result.exit_code == 0, result.output
    for command in ("demo", "train", "inspect", "recover"):
        assert command in result.output


@pytest.mark.parametrize(
    ("text", "hidden"), [("128", (128,)), ("128,64", (128, 64)), ("", ())]
)
def test_parse_hidden(text: str, hidden: tuple[int, ...]) -> None:
    assert cli._parse_hidden(None, None, text) == hidden


@pytest.mark.parametrize("text", ["a", "0", "16,-1"])
def test_bad_hidden_is_a_usage_error(text: str) -> None:
    result = CliRunner().invoke(cli.main, ["train", "--hidden", text])
    assert result.exit_code == 2
    assert "Invalid value for '--hidden'" in result.output


def _checks(**kwargs) -> _demo.Checks:
    fields = {
        "updates": 3,
        "minibatches": 3,
        "retained_rows": 3,
        "first_row": 0,
        "duplicates": 0,
        "version": 3,
        "recovered_equal": True,
    }
    return _demo.Checks(**{**fields, **kwargs})


def test_exactly_once_check() -> None:
    assert _checks().exactly_once
    assert _checks(retained_rows=2, first_row=1).exactly_once  # older rows trimmed
    assert not _checks(duplicates=1).exactly_once
    assert not _checks(updates=4, retained_rows=4).exactly_once  # one applied twice
    assert not _checks(updates=2, retained_rows=2).exactly_once  # one missing
    assert not _checks(retained_rows=2).exactly_once  # a hole in the global dataset


def test_same_params_is_bit_for_bit() -> None:
    a = {"W": np.arange(4, dtype=np.float32), "b": np.zeros(2, np.float32)}
    assert _demo.same_params(a, {k: v.copy() for k, v in a.items()})
    assert not _demo.same_params(a, {**a, "b": np.array([0.0, -0.0], np.float32)})
    assert not _demo.same_params(a, {**a, "b": np.zeros(2, np.float64)})
    assert not _demo.same_params(a, {"W": a["W"]})


def test_kills_aim_mid_epoch() -> None:
    assert _demo.kill_threshold(0.3, 880, 20) == 6 * 44 + 22
    assert _demo.kill_threshold(0.6, 880, 20) == 12 * 44 + 22
    assert _demo.kill_threshold(0.6, 132, 3) == 44 + 22
    assert _demo.kill_threshold(0.4, 44, 1) == 22


def test_history_is_numbered_from_the_first_epoch_shown() -> None:
    history = [{"loss": 0.5, "seconds": 1.0}, {"loss": 0.25, "seconds": 1.0}]
    lines = _demo.format_history(history, first_epoch=12)
    assert lines[0].split() == ["epoch", "loss", "seconds"]
    assert [line.split()[0] for line in lines[1:]] == ["12", "13"]


def _report(lost: int = 0, **checks) -> _demo.DemoReport:
    recovery = _demo.Recovery(
        accepted_before=60,
        version_before=60,
        recovered=60 - lost,
        recovered_version=60,
        incarnation=2,
        source="snapshot",
        start_version=0,
        replayed=60 - lost,
        rebuild_seconds=0.05,
        served_seconds=1.5,
        children_exited=3,
        children_killed=0,
    )
    kill = _demo.Kill("scheduler", "tcp://127.0.0.1:1", 42, 59, 59, 3)
    return _demo.DemoReport(
        model=MLP(n_features=64, hidden=(8,), n_classes=10),
        mode="async",
        store="run.zarr",
        ftps_accuracy=0.9,
        sklearn_accuracy=0.95,
        attempt=_demo.Attempt(None, 1.0, [kill], [("worker", 0.3)]),
        recovery=recovery,
        result=dask_ftps.TrainResult(version=3, minibatches=3, seconds=1.0),
        checks=_checks(**checks),
        wall=10.0,
    )


def test_report_table_and_failures() -> None:
    report = _report()
    assert report.ok
    out = "\n".join(_demo.report_lines(report))
    assert _line(r"^accepted updates lost\s+0$", out), out
    assert _line(r"^worker killed\s+no$", out), out
    assert _line(r"^scheduler killed\s+pid 42 at v59 \(59/3 accepted\)$", out), out
    assert _line(r"^training time \(train\(\) calls\)\s+2.0 s$", out), out
    assert _report(lost=1).failures() == ["accepted updates lost: 1"]
    assert not _report(recovered_equal=False).ok
    assert not _report(duplicates=1).ok


def test_demo_refuses_a_store_that_exists(tmp_path) -> None:
    (tmp_path / "old.zarr").mkdir()
    (tmp_path / "old.zarr" / "zarr.json").write_text("{}")
    result = CliRunner().invoke(
        cli.main, ["demo", "--store", str(tmp_path / "old.zarr")]
    )
    assert result.exit_code == 2
    assert "already exists" in result.output


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, pathlib.Path]:
    """One ``dask-ftps demo --quick`` run, and the store it leaves."""
    tmp = tmp_path_factory.mktemp("demo")
    store = tmp / "run.zarr"
    proc = subprocess.run(
        [*_command(), "demo", "--quick", "--store", str(store)],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        env={**os.environ, "TMPDIR": str(tmp)},  # the cluster logs go there too
    )
    return proc, store


@pytest.mark.slow
def test_demo_quick_loses_a_worker_and_the_scheduler_and_no_update(demo_run) -> None:
    proc, store = demo_run
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert f"store: {store}" in out
    assert _line(r"^SIGKILL worker tcp://\S+ \(pid \d+\)", out), out
    assert _line(r"^SIGKILL scheduler tcp://\S+ \(pid \d+\)", out), out
    assert "accepted updates lost: 0" in out
    assert _line(r"^worker killed\s+tcp://\S+ at v\d+", out), out
    assert _line(r"^scheduler killed\s+pid \d+ at v\d+", out), out
    assert _line(r"^accepted updates lost\s+0$", out), out
    assert _line(r"^duplicate update ids\s+0$", out), out
    assert _line(r"^exactly once\s+yes$", out), out
    assert _line(r"^recover\(store\) == live model\s+yes$", out), out
    applied = _line(r"^updates applied / minibatches\s+(\d+) / (\d+)$", out)
    assert applied and applied[1] == applied[2] == "132", out
    before = _line(r"^accepted before the scheduler kill\s+(\d+) \(store\)$", out)
    recovered = _line(r"^recovered\s+(\d+) \(version (\d+)\)$", out)
    assert before and recovered and before[1] == recovered[1], out
    assert 0 < int(before[1]) < 132, out
    assert _line(r"^recovered from\s+snapshot at version \d+$", out), out
    assert _line(r"^recovery: rebuild\s+[\d.]+ s$", out), out
    assert _line(r"^recovery: scheduler start to model served\s+[\d.]+ s$", out), out
    ftps = _line(r"^FTPS MLP \S+ \(async\)\s+([\d.]+)$", out)
    sklearn = _line(r"^sklearn LogisticRegression\s+([\d.]+)$", out)
    assert ftps and float(ftps[1]) > 0.8, out
    assert sklearn and float(sklearn[1]) > 0.9, out


@pytest.mark.slow
def test_inspect_shows_the_demo_store(demo_run) -> None:
    _, store = demo_run
    result = CliRunner().invoke(cli.main, ["inspect", str(store), "--rows", "5"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert _line(r"^version\s+132 \(model after the last commit\)$", out), out
    assert _line(r"^run id\s+[0-9a-f]{32}$", out), out
    assert _line(r"^incarnation\s+2$", out), out  # the restarted scheduler's
    assert _line(r"^updates\s+132 committed$", out), out
    assert _line(r"^mode\s+async \(staleness \d+\)$", out), out
    assert "SGD(lr=0.05, momentum=0.5)" in out
    shown = re.findall(r"^\s+\d+\s+0:2:\d:\d+\s+\d+\s+tcp://", out, re.MULTILINE)
    assert len(shown) == 5, out
    assert _line(r"^download dataset: \d+ rows$", out), out


@pytest.mark.slow
def test_inspect_json_has_every_row(demo_run) -> None:
    _, store = demo_run
    result = CliRunner().invoke(cli.main, ["inspect", "--json", str(store)])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info == json.loads(json.dumps(dask_ftps.inspect(store)))
    ids = [row["update_id"] for row in info["global"]]
    assert len(ids) == len(set(ids)) == info["updates"] - info["first_row"]
    assert info["model"]["kind"] == "MLP"
    assert info["runs"][0]["epochs"] == 3


@pytest.mark.slow
def test_recover_saves_the_exact_model(demo_run, tmp_path) -> None:
    _, store = demo_run
    output = tmp_path / "model.npz"
    result = CliRunner().invoke(cli.main, ["recover", str(store), "-o", str(output)])
    assert result.exit_code == 0, result.output
    assert "model version 132, 9610 parameters" in result.output
    assert _line(r"^\s+W0\s+float32\s+\(64, 128\)$", result.output), result.output
    version, params = dask_ftps.recover(store)
    assert version == 132
    with np.load(output) as saved:
        assert _demo.same_params({k: saved[k] for k in saved.files}, params)


@pytest.mark.parametrize("command", ["inspect", "recover"])
def test_a_path_without_a_run_is_a_clear_error(tmp_path, command) -> None:
    result = CliRunner().invoke(cli.main, [command, str(tmp_path)])
    assert result.exit_code == 1
    assert "Error: cannot read a dask_ftps run from" in result.output
    assert "holds no committed dask_ftps run" in result.output
    assert "Traceback" not in result.output


@pytest.mark.slow
def test_train_softmax_on_a_fresh_local_cluster() -> None:
    result = CliRunner().invoke(cli.main, ["train", "--epochs", "2", "--hidden", ""])
    assert result.exit_code == 0, result.output
    assert _line(r"^\s+1\s+[\d.]+", result.output), result.output
    accuracy = re.search(r"SoftmaxRegression: test accuracy ([\d.]+)", result.output)
    assert accuracy and float(accuracy[1]) > 0.7, result.output


@pytest.mark.slow
def test_train_against_a_scheduler_address() -> None:
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0"
    ) as cluster:
        result = CliRunner().invoke(
            cli.main,
            [
                "train",
                "--scheduler",
                cluster.scheduler_address,
                "--mode",
                "sync",
                "--epochs",
                "1",
                "--hidden",
                "16,8",
            ],
        )
    assert result.exit_code == 0, result.output
    assert f"Connected to {cluster.scheduler_address}" in result.output
    assert re.search(r"MLP: test accuracy [\d.]+ at model version 22;", result.output)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_sync_demo_passes_every_time(tmp_path, seed) -> None:
    """Sync mode's version is one across the live server, inspect() and recover():
    the sync demo once failed 2 of 3 runs ("recovered version 38, the store held
    39"). It runs here with three seeds (other kill points)."""
    proc = subprocess.run(
        [*_command(), "demo", "--quick", "--mode", "sync", "--seed", str(seed),
         "--store", str(tmp_path / "run.zarr")],
        capture_output=True, text=True, timeout=240, check=False,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "accepted updates lost: 0" in proc.stdout
    assert _line(r"^exactly once\s+yes$", proc.stdout), proc.stdout


def test_storage_options_must_be_a_json_object(tmp_path) -> None:
    for command in ("inspect", "recover"):
        result = CliRunner().invoke(
            cli.main, [command, "s3://b/run.zarr", "--storage-options", "[1]"]
        )
        assert result.exit_code == 2 and "JSON object" in result.output
        result = CliRunner().invoke(
            cli.main, [command, str(tmp_path), "--storage-options", '{"anon": true}']
        )
        assert result.exit_code == 1 and "storage_options apply to an fsspec URL" in (
            result.output
        ), result.output


@pytest.mark.slow
def test_chaos_kills_real_processes_and_every_check_holds(tmp_path) -> None:
    """A short ``dask-ftps chaos``: real scheduler and worker processes SIGKILLed at
    seeded random moments, some schedulers inside a commit or a snapshot."""
    report = tmp_path / "chaos.json"
    proc = subprocess.run(
        [*_command(), "chaos", "--seconds", "25", "--seed", "5", "--json", str(report),
         "--store", str(tmp_path / "run.zarr")],
        capture_output=True, text=True, timeout=400, check=False,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    doc = json.loads(report.read_text())
    assert doc["failures"] == []
    assert len(doc["recoveries"]) >= 3
    assert doc["lost"] == doc["duplicates"] == 0
    assert all(r["exact"] for r in doc["recoveries"]) and doc["final_exact"]
    assert doc["accuracy"] >= 0.9
    assert _line(r"^committed updates lost\s+0$", proc.stdout), proc.stdout
