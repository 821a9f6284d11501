"""How far the tree is from a perfect bound: the leaf-granular oracle share next to the tree's.

    python scripts/oracle_share.py --suite vif --n 32768 [--queries 48] [--seed 0]

An exact method that evaluates whole leaves must evaluate, per query, at least the leaves that
hold an admissible point whose |rho| reaches the query's k-th largest |rho|; with a perfect bound
it would evaluate exactly those. For a seeded sample of dataset queries (predecessor mode, the
suite's k) this computes |rho| to every admissible point with the float64 reference
(reference.residual_rho_block), and with the tree's own leaves (the default index's tree; the
dense points count as one-point leaves, which every query evaluates anyway) the oracle share:
the admissible points in those leaves over the admissible points. Next to it, the tree's
evaluated share ((block pairs + brute-routed evaluations) / admissible pairs) and work share
(bound dot products and the leaf filter's products added) of one all-points predecessor query, the figures
`residual-gpu bench --method tree` prints as `share` and `work`. Issue #16's table.

"with the k-th as floor": the same query again, each row given its own exact k-th distance as a
floor (`query_from_factors(floor=)`), so the tree prunes against the final threshold from its
first node: what "candidates first, then one certification sweep" could reach with a perfect
(and free) candidate pass. What it leaves is the bound's own looseness.
"""

from __future__ import annotations

import argparse

import numpy as np

import residual_gpu as rg
from residual_gpu.reference import residual_rho_block
from residual_gpu.suites import get_suite


def leaf_of_points(tree) -> np.ndarray:
    """Leaf id of every dataset point: kd leaves by their node id, dense points -(1 + j)."""
    leaf = np.empty(tree.n, dtype=np.int64)
    is_leaf = tree.node_left < 0
    for node in np.flatnonzero(is_leaf):
        leaf[tree.perm[tree.node_start[node]:tree.node_end[node]]] = node
    leaf[tree.dense] = -1 - tree.dense
    return leaf


def oracle_shares(problem, tree, k: int, queries: np.ndarray) -> np.ndarray:
    """Per query (predecessor mode): the admissible share of the leaves holding a top-k |rho|."""
    leaf = leaf_of_points(tree)
    shares = []
    for i in queries:
        cols = np.arange(i)
        rho = np.abs(residual_rho_block(problem.coords[i:i + 1], problem.v[i:i + 1], problem.p[i:i + 1],
                                        problem.coords[cols], problem.v[cols], problem.p[cols], problem.kernel))[0]
        kth = np.partition(rho, rho.size - k)[rho.size - k]
        needed = np.unique(leaf[cols[rho >= kth]])
        shares.append(np.isin(leaf[cols], needed).sum() / i)
    return np.asarray(shares)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default="vif", choices=["vif", "spatial"])
    ap.add_argument("--n", type=int, default=32768)
    ap.add_argument("--queries", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--filter-rank", type=int, default=0, help="TraversalFlags.filter_rank of the tree (0: off)")
    args = ap.parse_args()
    case = get_suite(args.suite, args.n)
    problem = rg.ResidualProblem(case.coords, kernel=case.kernel, inducing=case.inducing, seed=case.seed)
    index = rg.ResidualIndex(problem, backend="cpu", method="tree",
                             traversal=rg.TraversalFlags(filter_rank=args.filter_rank))
    k = case.k
    # queries with at least 4 k admissible points, so that the k-th |rho| is a neighbour's
    queries = np.sort(np.random.default_rng(args.seed).choice(np.arange(4 * k, case.n), args.queries, replace=False))
    oracle = oracle_shares(problem, index.tree, k, queries)
    res = index.query(k, predecessor=True)
    tel = res.telemetry
    pairs = case.n * (case.n - 1) // 2
    evaluated = (tel.block_pairs + tel.brute_evaluations) / pairs
    work = evaluated + (tel.bound_products + tel.filter_products) / pairs
    ids = np.arange(case.n)
    floored = index.query_from_factors(k, problem.coords, problem.v, problem.p, self_index=ids, limit=ids,
                                       floor=res.distances[:, -1])
    assert np.array_equal(floored.indices, res.indices), "a floor at the k-th distance changes no answer"
    ftel = floored.telemetry
    f_evaluated = (ftel.block_pairs + ftel.brute_evaluations) / pairs
    f_work = f_evaluated + (ftel.bound_products + ftel.filter_products) / pairs
    print(f"suite={args.suite} n={case.n} d={problem.d} m={problem.m} k={k} kernel={problem.kernel!r} "
          f"leaf_size={index.leaf_size} precision={index.precision} filter_rank={args.filter_rank} "
          f"queries={args.queries} (seed {args.seed})")
    print("oracle share (median, mean) | tree evaluated share | tree work share | evaluated / oracle | work / oracle "
          "| with the k-th as floor: evaluated, work | evaluated / oracle")
    med = float(np.median(oracle))
    print(f"{med:.4f}, {float(np.mean(oracle)):.4f} | {evaluated:.4f} | {work:.4f} | {evaluated / med:.0f}x | "
          f"{work / med:.0f}x | {f_evaluated:.4f}, {f_work:.4f} | {f_evaluated / med:.0f}x")


if __name__ == "__main__":
    main()
