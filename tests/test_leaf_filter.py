"""The low-rank leaf filter (TraversalFlags(filter_rank=r), tree/leaf_filter.py): its bound holds
for every (query, point) pair, and it drops pairs without changing an answer (the bitwise
invariance on the corpus is in test_traversal_flags.py)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import KERNEL_CLASSES, bound_test_problem, make_problem
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import residual_gpu as rg
from residual_gpu._numba_math import row_norms
from residual_gpu.backends.base import QueryBatch
from residual_gpu.reference import dot2_block, residual_rho_block
from residual_gpu.tree.bounds import _U


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), n=st.integers(12, 150), d=st.integers(1, 4),
       kernel=st.sampled_from(KERNEL_CLASSES), ls=st.floats(0.03, 2.0), m=st.integers(2, 40),
       ard=st.booleans(), dupes=st.integers(0, 10), leaf=st.integers(1, 24), rank=st.integers(1, 12),
       tiny_p=st.booleans(), precision=st.sampled_from(["float32", "float64"]))
def test_filter_bound_never_below_true_rho(seed, n, d, kernel, ls, m, ard, dupes, leaf, rank, tiny_p, precision):
    """For every point j of every leaf and every query (dataset and new locations):
    |fl(fl(Q V_q) . c_j) - V_q . V_j| / sqrt(p_q p_j) <= w_q e_j + o_j / sqrt(p_q) (the product's part,
    against a compensated V_q . V_j), and F_qj + E_q >= |rho_qj| (the whole filter value, with the
    exact kernel: the transform's own error is E_q's)."""
    problem, rng = bound_test_problem(seed, n, d, kernel, ls, m, ard, dupes, tiny_p)
    if problem is None:  # K(U, U) not positive definite (duplicated inducing points)
        return
    index = rg.ResidualIndex(problem, backend="cpu", method="tree", leaf_size=leaf, precision=precision,
                             traversal=rg.TraversalFlags(filter_rank=rank))
    searcher = index._searcher
    lf = searcher.leaf_filter
    tree = index.tree
    fast = np.dtype(precision)
    xq = np.concatenate([problem.coords, rng.random((5, d)) * 1.4 - 0.2])
    _, vq, pq = problem.factors_at(xq)
    rho = np.abs(residual_rho_block(xq, vq, pq, problem.coords, problem.v, problem.p, problem.kernel))
    ipq = 1.0 / np.sqrt(pq)
    wq = row_norms(vq) * ipq * (1.0 + (problem.m + 8) * _U)  # as TreeSearcher.run computes it
    q = xq.shape[0]
    margin = searcher.margins(QueryBatch(coords=xq, v=vq, p=pq, v_norms=row_norms(vq), self_index=np.full(q, -1),
                                         limit=np.full(q, n)))
    kval = problem.kernel(xq, problem.coords)
    vq_fast = vq.astype(fast)
    for nd in np.flatnonzero(tree.node_left < 0):
        s, e = tree.node_start[nd], tree.node_end[nd]
        pts = tree.perm[s:e]
        r = lf.rank[lf.slot[nd]]
        proj = vq_fast @ lf.basis[lf.slot[nd], :r].T             # in the leaf precision, BLAS's order
        approx = (proj @ lf.coef[s:e, :r].T).astype(np.float64)
        hi, lo = dot2_block(vq, problem.v[pts])
        ip = 1.0 / np.sqrt(problem.p[pts])
        slack = wq[:, None] * lf.tail[None, s:e] + ipq[:, None] * lf.under[None, s:e]
        err = np.abs(approx - hi - lo) * ipq[:, None] * ip[None, :]
        assert np.all(err <= slack), (nd, np.max(err - slack))
        f = np.minimum(1.0, np.abs(kval[:, pts] - approx) * ipq[:, None] * ip[None, :]) + slack
        assert np.all(f + margin[:, None] >= rho[:, pts]), (nd, np.min(f + margin[:, None] - rho[:, pts]))


@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_filter_drops_pairs_and_keeps_the_answers(precision):
    """Where the bounds cannot prune the leaves near a query (2-D, short lengthscale), the filter
    drops most of their points before their products, and the answers stay the brute-force ones."""
    problem = make_problem(3, 3000, 2, rg.Matern32(lengthscale=0.03), 40)
    base = rg.ResidualIndex(problem, backend="cpu", method="tree", leaf_size=32, precision=precision,
                            traversal=rg.TraversalFlags(filter_rank=0))
    filt = rg.ResidualIndex(problem, backend="cpu", method="tree", leaf_size=32, precision=precision,
                            traversal=rg.TraversalFlags(filter_rank=6))
    brute = rg.ResidualIndex(problem, backend="cpu", method="brute", precision=precision)
    want, got = brute.query(10, predecessor=True), filt.query(10, predecessor=True)
    np.testing.assert_array_equal(got.indices, want.indices)
    assert np.array_equal(got.distances, want.distances)
    tel, tel0 = got.telemetry, base.query(10, predecessor=True).telemetry
    assert tel.filter_drops > 0.5 * tel.filter_pairs > 0
    # every screened pair is either dropped or evaluated: the evaluations fall by the drops
    assert tel.block_pairs < tel0.block_pairs
    assert tel.filter_products > 0 and tel0.filter_pairs == tel0.filter_drops == tel0.filter_products == 0


def test_filter_is_on_by_default_and_off_where_it_cannot_run():
    problem = make_problem(0, 300, 2, rg.Matern32(lengthscale=0.1), 12)
    assert rg.TraversalFlags().filter_rank == rg.tree.traversal.FILTER_RANK > 0
    assert rg.ResidualIndex(problem, method="tree")._searcher.leaf_filter is not None
    off = rg.ResidualIndex(problem, method="tree", traversal=rg.TraversalFlags(filter_rank=0))
    assert off._searcher.leaf_filter is None
    # the block schedule (every backend other than cpu) evaluates whole leaves: no bases built
    blocks = rg.ResidualIndex(problem, method="tree", traversal=rg.TraversalFlags(schedule="blocks"))
    assert blocks._searcher.leaf_filter is None and blocks.traversal.filter_rank > 0
    # the parity preset evaluates whole leaves (the Rust oracle's traversal), and fixes the flags
    assert rg.ResidualIndex(problem, method="tree", preset="parity")._searcher.leaf_filter is None
    with pytest.raises(rg.InvalidArgumentError, match=r"preset='parity' fixes the traversal"):
        rg.ResidualIndex(problem, method="tree", preset="parity", traversal=rg.TraversalFlags(filter_rank=4))


@pytest.mark.parametrize("rank", [-1, 1.5, True, "4"])
def test_filter_rank_validation(rank):
    with pytest.raises(rg.InvalidArgumentError, match=r"TraversalFlags.filter_rank must be an int >= 0, got "
                                                      rf"filter_rank={rank!r}"):
        rg.TraversalFlags(filter_rank=rank)
