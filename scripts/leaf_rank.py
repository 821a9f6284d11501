"""Is the residual correlation low-rank inside a leaf? (A bound that keeps the cancellation.)

    python scripts/leaf_rank.py [--n 8192] [--ranks 8 16 32]

A bound that kept the cancellation between k(x_q, x_j) and V_q . V_j at the leaf scale could
come from the residual process itself: if, inside a leaf L, every normalised residual
W_j = (Y_j - E[Y_j | inducing]) / sqrt(p_j) were close to the span of r pivot points' W_p, then
for any query |rho_qj| <= |b_j . c_q| + eps_j, with c_q computed from the r exact values
rho_qp and eps_j the part of W_j outside the span (Cauchy-Schwarz; var W_q = 1). This script
measures eps_j: per leaf of the default `vif` tree, a greedy pivoted Cholesky of the leaf's
residual correlation matrix (float64 reference values), and the largest remaining eps_j
after r pivots. docs/tree.md (section 2) quotes the output: eps stays near 1 at every useful
rank, so this bound cannot prune where the interval bound fails.
"""

from __future__ import annotations

import argparse

import numpy as np

import residual_gpu as rg
from residual_gpu.reference import residual_rho_block
from residual_gpu.suites import get_suite


def pivoted_residuals(corr: np.ndarray, ranks: list[int]) -> dict[int, float]:
    """max_j eps_j (the residual standard deviation) after r greedy pivots, for each r."""
    n = corr.shape[0]
    diag = np.diag(corr).copy()
    cols = np.zeros((n, max(ranks)))
    out = {}
    for i in range(max(ranks)):
        if i < n:
            j = int(np.argmax(diag))
            col = (corr[:, j] - cols[:, :i] @ cols[j, :i]) / np.sqrt(max(diag[j], 1e-300))
            cols[:, i] = col
            diag = np.maximum(diag - col ** 2, 0.0)
        if i + 1 in ranks:
            out[i + 1] = float(np.sqrt(diag.max()))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 32])
    args = ap.parse_args()
    case = get_suite("vif", args.n)
    prob = rg.ResidualProblem(case.coords, kernel=case.kernel, inducing=case.inducing, seed=case.seed)
    tree = rg.ResidualIndex(prob, backend="cpu", method="tree", progress=False).tree
    leaves = np.flatnonzero(tree.node_left < 0)
    worst = {r: [] for r in args.ranks}
    for nd in leaves:
        pts = tree.perm[tree.node_start[nd]:tree.node_end[nd]]
        corr = residual_rho_block(prob.coords[pts], prob.v[pts], prob.p[pts], prob.coords[pts], prob.v[pts],
                                  prob.p[pts], prob.kernel)
        for r, e in pivoted_residuals(corr, args.ranks).items():
            worst[r].append(e)
    sizes = tree.node_end[leaves] - tree.node_start[leaves]
    print(f"vif n={prob.n}: {leaves.size} leaves of ~{sizes.mean():.0f} points; largest eps_j per leaf")
    print("pivots r | 10% of leaves | median | 90%")
    for r in args.ranks:
        q10, q50, q90 = np.quantile(worst[r], [0.1, 0.5, 0.9])
        print(f"{r} | {q10:.3f} | {q50:.3f} | {q90:.3f}")


if __name__ == "__main__":
    main()
