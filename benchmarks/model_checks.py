"""What the worker's checks of a model's output cost, beside the gradient.

Every minibatch, the worker checks what ``loss_and_grad`` returned before it
pushes it (the names, shapes and dtypes of the gradients, that they are finite,
the loss and the count of right answers): a model that misbehaves is named on
the worker and nothing of it is pushed. This times, per model size, one
minibatch's

- ``raw``: ``model.loss_and_grad(...)`` alone (what the worker did before the
  checks);
- ``checked``: ``checked_loss_and_grad(...)``, what the worker calls now;

interleaved (the same warm window), the median of ``--repeats`` rounds of wall
time (run it on a quiet machine: BLAS's threads make CPU time say more than
the wall), with the update format the workers use by default (``auto``).

    python -m benchmarks.model_checks [--sizes 10000,100000,1000000] [--out DIR]
"""

from __future__ import annotations

import argparse

import numpy as np

from benchmarks._common import interleaved_ms, machine_info, write_json

NAME = "model_checks"
BATCH = 64


def _model(n_params: int):
    from dask_ftps.models import MLP

    return MLP(n_features=64, hidden=(max(1, (n_params - 10) // 75),), n_classes=10)


def measure(sizes: list[int], repeats: int) -> list[dict]:
    from dask_ftps.models._check import checked_loss_and_grad
    from dask_ftps.training._worker import factor_names

    rows = []
    rng = np.random.default_rng(0)
    for n in sizes:
        model = _model(n)
        params = model.init_params()
        X = rng.random((BATCH, 64), dtype=np.float32)
        y = rng.integers(0, 10, BATCH)
        factors = factor_names(model, "auto", BATCH)
        kwargs = {"factors": factors} if factors else {}

        def raw(m=model, p=params, X=X, y=y, kw=kwargs):
            return m.loss_and_grad(p, X, y, None, **kw)

        def checked(m=model, p=params, X=X, y=y, f=factors):
            return checked_loss_and_grad(m, p, X, y, None, f)

        kinds = {"raw": raw, "checked": checked}
        inner = max(1, 200_000 // n)
        for fn in kinds.values():
            fn()  # warm
        row = {"params": model.n_params(), "factored": sorted(factors)}
        for kind, ms in interleaved_ms(kinds, repeats, inner).items():
            row[f"{kind}_ms"] = ms
        row["checked_over_raw"] = row["checked_ms"] / row["raw_ms"]
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.model_checks")
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--repeats", type=int, default=31)
    parser.add_argument("--out", default="bench-results")
    args = parser.parse_args(argv)
    rows = measure([int(s) for s in args.sizes.split(",")], args.repeats)
    print(f"{'params':>9} {'raw ms':>9} {'checked ms':>11} {'ratio':>7}")
    for r in rows:
        print(
            f"{r['params']:>9} {r['raw_ms']:>9.3f} {r['checked_ms']:>11.3f} "
            f"{r['checked_over_raw']:>7.3f}"
        )
    write_json(
        args.out,
        NAME,
        {
            "repeats": args.repeats,
            "batch": BATCH,
            "machine": machine_info(),
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
