"""Does a residual-metric ball bound prune leaves? Leaf-level shares at the ideal threshold.

    PYTHONPATH=. python scripts/ball_bound.py --suite vif --n 32768 [--queries 32] [--leaf-size 64]

The residual kernel r(x, y) = k(x, y) - V_x . V_y is positive semi-definite, so the normalised
features phi_y / sqrt(p_y) are unit vectors with rho_xy their inner product, and the angle
theta_xy = arccos(rho_xy) is a metric (on the sphere). For a leaf with a centre c (the leaf point
nearest its coordinate mean) and angular radius Theta = max_y theta_cy, every y in the leaf has
theta_qy in [theta_qc - Theta, theta_qc + Theta], so |rho_qy| is at most the largest |cos| over
that interval: one exact rho per (query, leaf), a proven bound (the cover-tree / ball-tree idea
in the residual metric). For seeded dataset queries (predecessor mode, the suite's k) this
prints, at the ideal threshold (each query's exact k-th |rho|), the admissible share of the
leaves the bound keeps: the tree's interval bound (`TreeSearcher.node_bounds` at the leaves),
the ball bound, their minimum, and the leaf-granular oracle (scripts/oracle_share.py). Float64
reference values throughout; the rounding slack of a production bound is left out here because
the result is decided by the leaves' radii, not by the last ulp.
"""

from __future__ import annotations

import argparse

import numpy as np
from oracle_share import leaf_of_points

import residual_gpu as rg
from residual_gpu.reference import residual_rho_block
from residual_gpu.suites import get_suite


def leaf_balls(problem, tree):
    """(leaf node ids, sorted members per leaf, centre per leaf, angular radius per leaf)."""
    leaves = np.flatnonzero(tree.node_left < 0)
    members = [np.sort(tree.perm[tree.node_start[b]:tree.node_end[b]]) for b in leaves]
    centre = np.empty(leaves.size, dtype=np.int64)
    theta = np.empty(leaves.size)
    for b, pts in enumerate(members):
        x = problem.coords[pts]
        c = pts[np.argmin(((x - x.mean(axis=0)) ** 2).sum(axis=1))]
        rho = residual_rho_block(problem.coords[[c]], problem.v[[c]], problem.p[[c]], x, problem.v[pts],
                                 problem.p[pts], problem.kernel)[0]
        centre[b], theta[b] = c, np.arccos(np.clip(rho.min(), -1.0, 1.0))
    return leaves, members, centre, theta


def ball_bounds(rho_qc, theta):
    """max |cos| over [theta_qc - Theta, theta_qc + Theta] clipped to [0, pi], per leaf."""
    tq = np.arccos(np.clip(rho_qc, -1.0, 1.0))
    lo, hi = tq - theta, tq + theta
    inner = np.maximum(np.abs(np.cos(np.clip(lo, 0.0, np.pi))), np.abs(np.cos(np.clip(hi, 0.0, np.pi))))
    return np.where((lo <= 0.0) | (hi >= np.pi), 1.0, inner)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default="vif", choices=["vif", "spatial"])
    ap.add_argument("--n", type=int, default=32768)
    ap.add_argument("--queries", type=int, default=32)
    ap.add_argument("--leaf-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    case = get_suite(args.suite, args.n)
    prob = rg.ResidualProblem(case.coords, kernel=case.kernel, inducing=case.inducing, seed=case.seed)
    index = rg.ResidualIndex(prob, backend="cpu", method="tree", precision="float64", leaf_size=args.leaf_size)
    tree, k = index.tree, case.k
    leaves, members, centre, theta = leaf_balls(prob, tree)
    deg = np.degrees(np.quantile(theta, [0.1, 0.5, 0.9]))
    print(f"suite={args.suite} n={case.n} k={k} leaf_size={args.leaf_size}: {leaves.size} leaves, angular radius "
          f"(10%, median, 90%) {deg[0]:.0f}, {deg[1]:.0f}, {deg[2]:.0f} degrees")
    qs = np.sort(np.random.default_rng(args.seed).choice(np.arange(4 * k, case.n), args.queries, replace=False))
    leaf = leaf_of_points(tree)
    interval_all = index._searcher.node_bounds(prob.coords[qs], prob.v[qs], prob.p[qs])[:, leaves]
    shares = {"oracle": [], "interval": [], "ball": [], "min of both": []}
    kths = []
    for r, i in enumerate(qs):
        one = (prob.coords[i:i + 1], prob.v[i:i + 1], prob.p[i:i + 1])
        cols = np.arange(i)
        rho = np.abs(residual_rho_block(*one, prob.coords[cols], prob.v[cols], prob.p[cols], prob.kernel))[0]
        kth = np.partition(rho, rho.size - k)[rho.size - k]
        kths.append(kth)
        shares["oracle"].append(np.isin(leaf[cols], np.unique(leaf[cols[rho >= kth]])).sum() / i)
        rho_qc = residual_rho_block(*one, prob.coords[centre], prob.v[centre], prob.p[centre], prob.kernel)[0]
        ball = ball_bounds(rho_qc, theta)
        admissible = np.array([np.searchsorted(pts, i) for pts in members])
        dense = np.count_nonzero(tree.dense < i)  # evaluated by every query
        for name, u in (("interval", interval_all[r]), ("ball", ball),
                        ("min of both", np.minimum(interval_all[r], ball))):
            shares[name].append((admissible[u >= kth].sum() + dense) / i)
    print(f"k-th |rho| median {np.median(kths):.3f}; leaf-level share at the ideal threshold (median, mean):")
    for name, v in shares.items():
        print(f"  {name}: {np.median(v):.4f}, {np.mean(v):.4f}")


if __name__ == "__main__":
    main()
