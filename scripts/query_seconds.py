"""Median seconds of repeated all-points predecessor queries, with the telemetry's phases:
the A/B between two commits, one process per commit, alternated (docs/benchmarks.md).

    PYTHONPATH=<checkout> python scripts/query_seconds.py --suite vif --n 131072 [--repeats 3]
    PYTHONPATH=<checkout> python scripts/query_seconds.py --method brute --precision float32 --n 32768

The index is built once; each repeat is one ``index.query(k, predecessor=True)`` (the first
one includes Numba's compilation when its cache is cold, so take the median of >= 3).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import residual_gpu as rg
from residual_gpu.suites import get_suite


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default="vif", choices=["vif", "spatial"])
    ap.add_argument("--n", type=int, default=131072)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--method", default="tree", choices=["tree", "brute"])
    ap.add_argument("--precision", default="auto", choices=["auto", "float64", "float32"])
    args = ap.parse_args()
    case = get_suite(args.suite, args.n)
    prob = rg.ResidualProblem(case.coords, kernel=case.kernel, inducing=case.inducing, seed=case.seed)
    index = rg.ResidualIndex(prob, method=args.method, precision=args.precision)
    seconds = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        res = index.query(case.k, predecessor=True, progress=False)
        seconds.append(time.perf_counter() - t0)
    phases = {name: round(sec, 2) for name, sec in dict(res.telemetry.seconds).items()}
    print(f"{rg.__file__}: suite={args.suite} n={case.n} {args.method} {index.precision} median {np.median(seconds):.2f} s of "
          f"{[round(s, 2) for s in seconds]}; last query's phases {phases}")


if __name__ == "__main__":
    main()
