"""Run every benchmark: ``python -m benchmarks [--quick] [--out bench-results]``.

Each benchmark prints its tables and writes ``<out>/<name>.json``; the plots go
to ``<out>/img/``. ``--only throughput,recovery`` runs a subset. The kernel
timings (``benchmarks.KERNELS``) run at their own sizes, ``--quick`` or not.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time

from benchmarks import BENCHMARKS, KERNELS
from benchmarks._common import add_common_arguments, print_header, setup_logging

logger = logging.getLogger("benchmarks")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description="Run the dask_ftps benchmarks."
    )
    add_common_arguments(parser)
    every = BENCHMARKS + KERNELS
    parser.add_argument(
        "--only",
        default=",".join(every),
        help=f"comma-separated subset of {', '.join(every)}",
    )
    parser.add_argument("--no-plots", action="store_true", help="write no PNGs")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(names) - set(every))
    if unknown:
        parser.error(f"unknown benchmarks {unknown}; choose from {list(every)}")
    setup_logging(args.verbose)
    started = time.perf_counter()
    failed = []
    for name in names:
        print_header(name, args.quick)
        t0 = time.perf_counter()
        steal = ""
        try:
            module = importlib.import_module(f"benchmarks.{name}")
            if name in KERNELS:
                module.main(["--out", args.out])
            else:
                result = module.run(
                    quick=args.quick, out=args.out, store_dir=args.store_dir
                )
                if "cpu" in result:
                    steal = f", CPU steal {100 * result['cpu'].get('steal', 0):.0f}%"
        except Exception:  # the others still run; the exit status says it
            logger.exception("Benchmark %s failed", name)
            failed.append(name)
        print(f"# {name}: {time.perf_counter() - t0:.1f} s{steal}\n", flush=True)
    if not args.no_plots:
        from benchmarks.plots import make_plots

        try:
            for path in make_plots(args.out):
                print(f"# plot: {path}")
        except ImportError as e:
            logger.warning("No plots (%s): pip install matplotlib", e)
    print(f"# all benchmarks: {time.perf_counter() - started:.1f} s")
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
