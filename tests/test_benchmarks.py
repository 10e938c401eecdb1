"""The benchmarks' ``--quick`` sizes, so that the scripts keep working.

These check that each script runs and writes sane JSON, not how fast anything
is: the numbers are in docs/benchmarks.md.
"""

from __future__ import annotations

import json
import math

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    """One results folder for the module, so that the plots test finds them all."""
    return tmp_path_factory.mktemp("bench-results")


@pytest.fixture
def stores(tmp_path):
    return str(tmp_path / "stores")


def load(out, name: str) -> dict:
    doc = json.loads((out / f"{name}.json").read_text())
    assert doc["benchmark"] == name
    assert doc["quick"] is True
    assert doc["machine"]["nproc"] >= 1
    assert doc["seconds"] > 0
    return doc


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_throughput_quick_via_main(out, stores, capsys):
    from benchmarks.__main__ import main

    main(
        [
            "--quick",
            "--only",
            "throughput",
            "--out",
            str(out),
            "--store-dir",
            stores,
            "--no-plots",
        ]
    )
    assert "b/a" in capsys.readouterr().out
    doc = load(out, "throughput")
    rows = doc["results"]
    assert {r["n_params"] for r in rows} == {10_000, 100_000}
    for row in rows:
        for v in "abc":
            assert positive(row[f"{v}_updates_per_s"])
            assert positive(row[f"{v}_mb_per_s"])
            assert all(positive(m["updates_per_s"]) for m in row["repeats"][v])
        assert positive(row["b_over_a"]) and positive(row["c_over_b"])
    assert [s["n_params"] for s in doc["summary"]] == [100_000]


def test_recovery_quick(out, stores):
    from benchmarks import recovery

    recovery.run(quick=True, out=str(out), store_dir=stores)
    (row,) = load(out, "recovery")["results"]
    assert row["exact"] is True  # the served model is recover()'s, bit for bit
    assert row["lost"] == 0
    assert row["version_served"] == row["committed"] == row["updates"]
    assert row["replayed"] == row["updates"] - row["snapshot_version"] > 0
    assert row["served_s"] > row["listen_s"] > 0
    assert positive(row["rebuild_s"]) and positive(row["lower_bound_s"])
    assert row["lower_bound"]["replayed_bytes"] == row["replayed"] * 4 * row["n_params"]


def check_checkpoint_loss(doc: dict) -> None:
    """The checkpoint baseline loses, by construction, every update since its
    newest checkpoint at or before the kill: it restarts from that checkpoint,
    and what it lost is the killed version less the checkpoint's."""
    rows = {(r["system"], r["scenario"]): r for r in doc["results"]}
    (run,) = [
        r
        for r in doc["runs"]
        if (r["system"], r["scenario"]) == ("checkpoint", "scheduler-loss")
    ]
    (kill,) = [e for e in run["events"] if e["kind"] == "scheduler"]
    assert kill["version"] >= run["kill_version"]
    taken = [c["version"] for c in run["checkpoints"]]
    saved = max([0] + [v for v in taken if v <= kill["version"]])
    assert kill["recovered_version"] == saved, (kill, run["checkpoints"])
    lost = rows["checkpoint", "scheduler-loss"]["lost_updates"]
    assert lost == run["lost_updates"][0] == kill["version"] - saved
    if saved < run["kill_version"]:  # killed after its checkpoint: work is lost
        assert lost >= run["kill_version"] - saved > 0


def test_the_checkpoint_loss_check_can_fail():
    """A baseline that lost nothing although it was killed past its checkpoint
    (as if it journalled), or that restarted from another version, is caught."""
    run = {
        "system": "checkpoint", "scenario": "scheduler-loss", "kill_version": 130,
        "checkpoints": [{"epoch": 1, "version": 100}, {"epoch": 2, "version": 200}],
        "events": [{"kind": "scheduler", "version": 131, "recovered_version": 100}],
        "lost_updates": [31],
    }  # fmt: skip

    def doc(run: dict) -> dict:
        row = {"system": "checkpoint", "scenario": "scheduler-loss"}
        return {
            "results": [{**row, "lost_updates": run["lost_updates"][0]}],
            "runs": [run],
        }

    check_checkpoint_loss(doc(run))
    journalled = {
        **run,
        "events": [{**run["events"][0], "recovered_version": 131}],
        "lost_updates": [0],
    }
    older = {**run, "events": [{**run["events"][0], "recovered_version": 0}]}
    for wrong in (journalled, older, {**run, "lost_updates": [0]}):
        with pytest.raises(AssertionError):
            check_checkpoint_loss(doc(wrong))


def test_failures_quick(out, stores):
    from benchmarks import failures

    failures.run(quick=True, out=str(out), store_dir=stores)
    doc = load(out, "failures")
    rows = {(r["system"], r["scenario"]): r for r in doc["results"]}
    assert set(rows) == {
        ("ftps", "none"),
        ("ftps", "worker-kills"),
        ("ftps", "scheduler-loss"),
        ("checkpoint", "scheduler-loss"),
    }
    assert all(r["exactly_once"] for r in rows.values())
    assert all(positive(r["time_to_target_s"]) for r in rows.values())
    assert rows["ftps", "scheduler-loss"]["lost_updates"] == 0
    check_checkpoint_loss(doc)
    (event,) = [
        e
        for r in doc["runs"]
        if (r["system"], r["scenario"]) == ("ftps", "scheduler-loss")
        for e in r["events"]
    ]
    assert event["recovered_version"] == event["committed_version"] >= event["version"]
    assert {s["system"] for s in doc["summary"]} == {"ftps", "checkpoint"}


def test_peers_quick(out, stores):
    from benchmarks import peers

    peers.run(quick=True, out=str(out), store_dir=stores)
    doc = load(out, "peers")
    systems = {r["system"]: r for r in doc["results"]}
    assert set(systems) == set(peers.SYSTEMS)
    assert positive(systems["dask_ftps"]["time_to_target_s"])
    assert positive(systems["sklearn MLP"]["best_accuracy"])
    kills = {r["system"]: r for r in doc["kills"]}
    assert kills["dask_ftps"]["completed"] is True
    assert kills["dask_ftps"]["exactly_once"] is True
    assert kills["dask_ftps"]["lost_updates"] == 0
    assert kills["dask_ftps"]["duplicated_updates"] == 0
    assert kills["sklearn MLP"]["completed"] is False


def test_storage_quick(out, stores):
    from benchmarks import storage

    storage.run(quick=True, out=str(out), store_dir=stores)
    rows = {r["retention"]: r for r in load(out, "storage")["results"]}
    off, on = rows[False], rows[True]
    assert off["bytes_per_update"] >= off["update_bytes"] == 4 * off["n_params"]
    assert off["written_per_update"] >= off["bytes_per_update"]
    assert on["final_allocated_mb"] < off["final_allocated_mb"]
    assert len(on["samples"]) > 2


def test_damage_quick(out, stores):
    """A store made under real kills, every object damaged three ways: the sweep
    runs, covers every kind and finds nothing silent."""
    from benchmarks import damage

    damage.run(quick=True, out=str(out), store_dir=stores)
    doc = load(out, "damage")
    assert doc["chaos"]["lost"] == 0 and doc["chaos"]["recoveries"] >= 1
    assert doc["totals"].get("silent", 0) == 0, [
        c for c in doc["cases"] if c["outcome"] == "silent"
    ]
    kinds = {r["kind"] for r in doc["rows"]}
    assert {"root", "log:claim", "log:commit", "log:snapshot", "payload",
            "snapshot"} <= kinds  # fmt: skip


def test_factored_quick(out, stores):
    """Dense and factored pushes of a 256 x 256 layer: factored payloads hold
    B(m+n) numbers, and the journal writes that much per update."""
    from benchmarks import factored

    factored.run(quick=True, out=str(out), store_dir=stores)
    rows = {r["batch"]: r for r in load(out, "factored")["results"]}
    assert set(rows) == {16, 64}
    for batch, row in rows.items():
        m = row["m"]
        assert row["dense"]["bytes_per_update"] == 4 * (m * m + m)
        assert row["factored"]["bytes_per_update"] == 4 * (batch * 2 * m + m)
        assert row["pays"] == (batch * 2 * m < m * m)
        # The journal's payload arrays: what was sent, and a CRC and metadata.
        for fmt in ("dense", "factored"):
            sent = row[fmt]["bytes_per_update"]
            assert sent <= row[fmt]["journal_bytes_per_update"] < 1.2 * sent + 2048
        assert positive(row["dense"]["updates_per_s"])
        assert positive(row["factored"]["updates_per_s"])
    assert rows[16]["bytes_ratio"] < rows[64]["bytes_ratio"] < 1


def test_gpu_check_script_runs_its_cpu_part(out, tmp_path):
    """benchmarks/gpu_check.sh in this environment (no install), small sizes: the
    GPU tests skip here, NumPy is measured, and the table comes last."""
    import os
    import subprocess
    import sys

    from benchmarks._common import REPO_ROOT

    env = {
        **os.environ,
        "FTPS_GPU_INSTALL": "0",
        "FTPS_GPU_QUICK": "1",
        "FTPS_GPU_OUT": str(out),
        "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}",
    }
    done = subprocess.run(
        ["bash", str(REPO_ROOT / "benchmarks" / "gpu_check.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    doc = load(out, "gpu")
    assert {(r["device"], r["format"]) for r in doc["gradient"]} >= {
        ("cpu", "dense"),
        ("cpu", "factored"),
    }
    assert all(positive(r["seconds"]) for r in doc["gradient"])
    assert all(positive(r["updates_per_s"]) for r in doc["runs"])
    if doc["gpu"] == "none":
        assert doc["agreement"] == []
    else:
        assert all(a["ok"] for a in doc["agreement"]), doc["agreement"]
    last = done.stdout.rstrip().splitlines()
    assert "runs, factored (updates/s)" in last[-1]  # the table is the last output


def test_plots(out, tmp_path):
    pytest.importorskip("matplotlib")
    from benchmarks.plots import make_plots

    written = make_plots(out, tmp_path / "img")
    names = {p.name for p in written}
    expected = {
        "throughput": "throughput_vs_size.png",
        "recovery": "recovery_vs_size.png",
        "failures": "accuracy_vs_time.png",
        "storage": "storage_size.png",
        "factored": "factored.png",
    }
    for name, png in expected.items():
        if (out / f"{name}.json").exists():
            assert png in names
            assert (tmp_path / "img" / png).stat().st_size > 1000


def test_versus_quick_against_this_checkout(out):
    """The old-against-new script, with this checkout on both sides."""
    from benchmarks._common import REPO_ROOT
    from benchmarks.versus import run

    doc = run(REPO_ROOT, quick=True, out=str(out))
    (row,) = doc["results"]
    assert all(positive(row[k]) for k in ("old_b", "old_c", "new_b", "new_c"))
    assert {r["code"] for r in doc["runs"]} == {"old", "new"}
    assert load(out, "versus")["results"] == doc["results"]
