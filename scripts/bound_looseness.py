"""How far the tree's node bound is from the truth, by distance from the query.

    python scripts/bound_looseness.py [--n 32768] [--queries 5000 12000 20000 30000]

For a few `vif` queries: the exact |rho| to every point (float64 reference), the k-th
largest (the value a leaf must beat to matter), and per leaf of the default tree the true
largest |rho| in the leaf against the leaf's bound U (tree.searcher.TreeSearcher.node_bounds),
grouped by the gap between the query and the leaf's box in lengthscales. "alive" is the share
of leaves whose bound is at least the k-th value (they cannot be pruned even with the final
threshold). docs/tree.md quotes the output.
"""

from __future__ import annotations

import argparse

import numpy as np

import residual_gpu as rg
from residual_gpu.reference import residual_rho_block
from residual_gpu.suites import get_suite

SHELLS = [(0, 0.5), (0.5, 1), (1, 1.5), (1.5, 2), (2, 2.5), (2.5, 3), (3, 4)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=32768)
    ap.add_argument("--queries", type=int, nargs="+", default=[5000, 12000, 20000, 30000])
    args = ap.parse_args()
    case = get_suite("vif", args.n)
    prob = rg.ResidualProblem(case.coords, kernel=case.kernel, inducing=case.inducing, seed=case.seed)
    index = rg.ResidualIndex(prob, backend="cpu", method="tree", progress=False)
    tree = index.tree
    qs = np.asarray(args.queries, dtype=np.int64)
    bounds = index._searcher.node_bounds(prob.coords[qs], prob.v[qs], prob.p[qs])
    leaves = np.flatnonzero(tree.node_left < 0)
    scale = prob.lengthscales
    print(f"vif n={prob.n} m={prob.m} k={case.k} median p={np.median(prob.p):.3f}; leaves of "
          f"~{np.mean(tree.node_end[leaves] - tree.node_start[leaves]):.0f} points")
    print("query | p_q | k-th |rho| | gap (l) | leaves | median true max |rho| | median bound | alive")
    for qi, q in enumerate(qs):
        rho = np.abs(residual_rho_block(prob.coords[[q]], prob.v[[q]], prob.p[[q]], prob.coords, prob.v, prob.p,
                                        prob.kernel))[0]
        rho[q] = -1.0
        kth = np.sort(rho)[-case.k]
        gap = np.empty(leaves.size)
        true_max = np.empty(leaves.size)
        for li, nd in enumerate(leaves):
            pts = tree.perm[tree.node_start[nd]:tree.node_end[nd]]
            g = np.maximum(np.maximum(tree.node_lo[nd] - prob.coords[q], prob.coords[q] - tree.node_hi[nd]), 0.0)
            gap[li] = np.sqrt(np.sum((g / scale) ** 2))
            true_max[li] = rho[pts].max()
        u = bounds[qi, leaves]
        for a, b in SHELLS:
            sel = (gap >= a) & (gap < b)
            if sel.any():
                print(f"{q} | {prob.p[q]:.3f} | {kth:.3f} | {a}-{b} | {sel.sum()} | {np.median(true_max[sel]):.3f} | "
                      f"{np.median(u[sel]):.3f} | {np.mean(u[sel] >= kth):.2f}")


if __name__ == "__main__":
    main()
