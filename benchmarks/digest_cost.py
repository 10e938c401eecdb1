"""What a stronger check of a model copy would cost: digests of a model's bytes.

Every commit record holds a CRC-32C of the model after it (``model_crc``); a
recovery from a worker's model copy (the patent's path) accepts the copy only if
its CRC matches the commit of its version. A CRC catches accidents (a wrong
version, another run, damaged bytes) but not a worker that forges weights to
match it. A cryptographic digest would, at the price of computing it for every
commit on the scheduler. This measures, per model size, the time of

- ``copy``: one copy of the model's bytes (the floor of any commit);
- ``crc32c``: what each commit computes today (google-crc32c, native);
- ``sha256`` and ``blake2b``: hashlib's, over the same bytes;

interleaved, the median of ``--repeats`` rounds, in one process.

    python -m benchmarks.digest_cost [--sizes 10000,100000,1000000] [--out DIR]
"""

from __future__ import annotations

import argparse
import hashlib

import numpy as np

from benchmarks._common import interleaved_ms, write_json

NAME = "digest_cost"


def _kinds(a: np.ndarray, scratch: np.ndarray) -> dict:
    from dask_ftps._store._format import model_crc

    arrays, names = {"w": a}, ("w",)
    view = a.view(np.uint8)
    return {
        "copy": lambda: np.copyto(scratch, a),
        "crc32c": lambda: model_crc(arrays, names),
        "sha256": lambda: hashlib.sha256(view).digest(),
        "blake2b": lambda: hashlib.blake2b(view, digest_size=32).digest(),
    }


def measure(sizes: list[int], repeats: int) -> list[dict]:
    rows = []
    rng = np.random.default_rng(0)
    for n in sizes:
        a = rng.standard_normal(n).astype(np.float32)
        kinds = _kinds(a, np.empty_like(a))
        row = {"params": n, "bytes": 4 * n}
        for kind, ms in interleaved_ms(kinds, repeats, max(1, 2_000_000 // n)).items():
            row[f"{kind}_ms"] = ms
        for kind in ("crc32c", "sha256", "blake2b"):
            row[f"{kind}_over_copy"] = row[f"{kind}_ms"] / row["copy_ms"]
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.digest_cost")
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--out", default="bench-results")
    args = parser.parse_args(argv)
    rows = measure([int(s) for s in args.sizes.split(",")], args.repeats)
    print(f"{'params':>9} {'copy':>9} {'crc32c':>9} {'sha256':>9} {'blake2b':>9}  (ms)")
    for r in rows:
        print(
            f"{r['params']:>9} {r['copy_ms']:>9.3f} {r['crc32c_ms']:>9.3f} "
            f"{r['sha256_ms']:>9.3f} {r['blake2b_ms']:>9.3f}"
        )
    write_json(args.out, NAME, {"repeats": args.repeats, "rows": rows})


if __name__ == "__main__":
    main()
