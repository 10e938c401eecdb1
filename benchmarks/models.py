"""Models of one's own: test accuracy of the ConvNet example, the MLP and
LogisticRegression on scikit-learn's digits, seed by seed.

For each seed ``s`` (0 to 4; ``--quick``: 0 only) the digits (X/16) are split
75/25, stratified, with ``random_state=s``: the seed changes the train/test
split, and also the networks' initial weights (``seed=s``) and the minibatch
order (``train(seed=s)``). On that split, ``cnn_digits.compare`` (in
``docs/examples/cnn_digits.py``, imported by path) trains

- ``cnn_digits.ConvNet()`` (3x3 convolution, 64 channels, 2x2 max pooling, a
  dense layer of 256, softmax) and
- ``dask_ftps.models.MLP(64, (128,), 10)``

with dask_ftps on a ``LocalCluster`` of two worker processes (one thread
each), one after the other, the same way: a fresh memory-only server in async
mode, the same optimizer, epochs and batch size. It also fits scikit-learn's
``LogisticRegression(max_iter=1000)`` on the same split. Recorded: each
model's test accuracy and seconds, and the ConvNet's margin over the better of
the other two.

    python -m benchmarks.models [--quick] [--out bench-results]
"""

from __future__ import annotations

import sys
import time
from typing import Any

from benchmarks._common import (
    REPO_ROOT,
    Column,
    cpu_snapshot,
    cpu_usage,
    format_table,
    local_cluster,
    script_main,
    write_json,
)

NAME = "models"
EXAMPLES = REPO_ROOT / "docs" / "examples"
MODELS = ("ConvNet", "MLP", "LogisticRegression")


def _cnn_digits() -> Any:
    """The example module, imported by path (set before the cluster starts: its
    worker processes inherit ``sys.path`` and import the model from there)."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    import cnn_digits

    return cnn_digits


def run(quick: bool = False, out: str = "bench-results", store_dir=None) -> dict:
    """Compare the three models on each seed's split; write ``models.json``."""
    from dask_ftps.models import MLP

    del store_dir  # memory-only servers: nothing is stored
    cnn = _cnn_digits()
    seeds = [0] if quick else [0, 1, 2, 3, 4]
    epochs = 4 if quick else cnn.EPOCHS
    started = time.perf_counter()
    cpu = cpu_snapshot()
    rows = []
    with local_cluster(2) as client:
        for seed in seeds:
            results = cnn.compare(client, seed=seed, epochs=epochs)
            row: dict[str, Any] = {"seed": seed}
            for name in MODELS:
                row[name] = results[name]["accuracy"]
                row[f"{name}_seconds"] = results[name]["seconds"]
            row["margin"] = row["ConvNet"] - max(row["MLP"], row["LogisticRegression"])
            rows.append(row)
            print(
                f"seed {seed}: "
                + "  ".join(f"{name} {row[name]:.4f}" for name in MODELS),
                flush=True,
            )
    summary = {
        "convnet_wins": sum(r["margin"] > 0 for r in rows),
        "seeds": len(rows),
        "min_margin": min(r["margin"] for r in rows),
        **{f"mean_{name}": sum(r[name] for r in rows) / len(rows) for name in MODELS},
    }
    doc = {
        "quick": quick,
        "seeds": seeds,
        "seed_changes": "the train/test split (random_state), the networks' "
        "initial weights and the minibatch order",
        "data": "sklearn.datasets.load_digits, X/16 as float32, 75/25 stratified",
        "config": {
            "epochs": epochs,
            "batch_size": cnn.BATCH_SIZE,
            "optimizer": cnn.optimizer().to_dict(),
            "mode": "async",
            "workers": "LocalCluster(n_workers=2, threads_per_worker=1, "
            "processes=True)",
            "logistic_regression": "LogisticRegression(max_iter=1000)",
        },
        # As at seed 0; each seed's models have that seed.
        "models": {
            "ConvNet": cnn.ConvNet().to_dict(),
            "MLP": MLP(64, (128,), 10).to_dict(),
        },
        "results": rows,
        "summary": summary,
        "seconds": time.perf_counter() - started,
        "cpu": cpu_usage(cpu),
    }
    write_json(out, NAME, doc)
    print(format_table(TITLE.format(epochs=epochs), COLUMNS, rows))
    return doc


TITLE = "Test accuracy on the digits, {epochs} epochs (seed: split, init, order)"
COLUMNS = (
    Column("seed", "seed"),
    Column("ConvNet", "ConvNet", "{:.4f}"),
    Column("MLP", "MLP", "{:.4f}"),
    Column("LogisticRegression", "LogisticRegression", "{:.4f}"),
    Column("margin", "ConvNet margin", "{:+.4f}"),
    Column("ConvNet_seconds", "ConvNet s", "{:.1f}"),
    Column("MLP_seconds", "MLP s", "{:.1f}"),
)


def main(argv: list[str] | None = None) -> None:
    script_main(NAME, __doc__, run, argv)


if __name__ == "__main__":
    main()
