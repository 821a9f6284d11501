"""The tree's traversal flags against the flags off, in one run (docs/benchmarks.md, "Traversal flags").

    PYTHONPATH=. python scripts/traversal_flags.py --suite vif --n 131072 [--repeats 2] [--config order=bound ...]

One problem and one all-points predecessor query per configuration, configurations alternated
``repeats`` times (so that drift on a shared machine hits all alike); prints the median seconds
of the query, the evaluations (block pairs), bound products, the leaf filter's products and
rounds, and whether the answers are the flags-off bits.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import residual_gpu as rg
from residual_gpu.suites import get_suite

# every flag off, the leaf filter included (on by default since it won here), and each one on
CONFIGS = {"off (box order)": rg.TraversalFlags(filter_rank=0),
           "order=bound": rg.TraversalFlags(order="bound", filter_rank=0),
           "schedule=blocks": rg.TraversalFlags(schedule="blocks", filter_rank=0),
           "filter_rank=16": rg.TraversalFlags(filter_rank=16),
           "filter_rank=8": rg.TraversalFlags(filter_rank=8), "filter_rank=24": rg.TraversalFlags(filter_rank=24)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default="vif", choices=["vif", "spatial"])
    ap.add_argument("--n", type=int, default=131072)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--config", action="append", choices=list(CONFIGS)[1:],
                    help="flags to run against the flags off (repeatable; default: all)")
    args = ap.parse_args()
    names = ["off (box order)"] + (args.config or list(CONFIGS)[1:])
    case = get_suite(args.suite, args.n)
    prob = rg.ResidualProblem(case.coords, kernel=case.kernel, inducing=case.inducing, seed=case.seed)
    indexes = {name: rg.ResidualIndex(prob, method="tree", traversal=CONFIGS[name]) for name in names}
    seconds = {name: [] for name in names}
    last = {}
    for _ in range(args.repeats):
        for name, index in indexes.items():
            t0 = time.perf_counter()
            last[name] = index.query(case.k, predecessor=True, progress=False)
            seconds[name].append(time.perf_counter() - t0)
    base = last["off (box order)"]
    print(f"suite={args.suite} n={case.n} k={case.k} precision={indexes['off (box order)'].precision}, "
          f"median of {args.repeats}")
    print("| flags | query s | vs off | evaluations | bound products | filter products | rounds | same bits |")
    print("|---|---|---|---|---|---|---|---|")
    t_off = float(np.median(seconds["off (box order)"]))
    for name, res in last.items():
        tel = res.telemetry
        same = np.array_equal(res.indices, base.indices) and np.array_equal(res.distances, base.distances)
        t = float(np.median(seconds[name]))
        print(f"| {name} | {t:.2f} | {t / t_off:.2f}x | {tel.block_pairs:.4g} | {tel.bound_products:.4g} | "
              f"{tel.filter_products:.4g} | {tel.rounds} | {same} |")


if __name__ == "__main__":
    main()
