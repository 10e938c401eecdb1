"""The ``dask-ftps`` command line."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest
from click.testing import CliRunner

from dask_ftps import cli


def _command() -> list[str]:
    """The installed console script, else ``python -m dask_ftps.cli``."""
    script = pathlib.Path(sys.executable).with_name("dask-ftps")
    return [str(script)] if script.exists() else [sys.executable, "-m", "dask_ftps.cli"]


def _line(pattern: str, text: str) -> re.Match | None:
    return re.search(pattern, text, re.MULTILINE)


def test_help_lists_commands() -> None:
    result = CliRunner().invoke(cli.main, ["--help"])
    assert result.exit_code == 0, result.output
    assert "demo" in result.output
    assert "train" in result.output


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


def test_exactly_once_check() -> None:
    rows = [{"update_id": f"0:0:0:{i}"} for i in range(3)]
    assert cli._exactly_once(rows, run=0, minibatches=3)["ok"]
    duplicated = cli._exactly_once([*rows, rows[1]], run=0, minibatches=3)
    assert duplicated["duplicates"] == 1
    assert not duplicated["ok"]
    missing = cli._exactly_once(rows[:2], run=0, minibatches=3)
    assert missing["missing"] == 1
    assert not missing["ok"]
    other_run = [{"update_id": "1:0:0:0"}]
    assert cli._exactly_once(rows + other_run, run=0, minibatches=3)["ok"]


def test_worker_killer_aims_mid_epoch() -> None:
    killer = cli._WorkerKiller(client=None, epochs=20)
    assert killer._threshold(880) == 8 * 44 + 22
    assert cli._WorkerKiller(client=None, epochs=1)._threshold(44) == 22


@pytest.mark.slow
def test_demo_quick_kills_a_worker_and_applies_each_update_once() -> None:
    proc = subprocess.run(
        [*_command(), "demo", "--quick"],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "SIGKILL worker" in out
    assert _line(r"^duplicate update ids\s+0$", out), out
    assert _line(r"^missing update ids\s+0$", out), out
    assert _line(r"^exactly once\s+yes$", out), out
    assert _line(r"^workers killed\s+1 ", out), out
    applied = _line(r"^updates applied / minibatches\s+(\d+) / (\d+)$", out)
    assert applied and applied[1] == applied[2], out
    ftps = _line(r"^FTPS MLP \S+ \(async\)\s+([\d.]+)$", out)
    sklearn = _line(r"^sklearn LogisticRegression\s+([\d.]+)$", out)
    assert ftps and float(ftps[1]) > 0.8, out
    assert sklearn and float(sklearn[1]) > 0.9, out


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
