"""The distributed search's building blocks without a cluster: shards, shard factors, the shard bound."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import KERNEL_CLASSES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import residual_gpu as rg
from residual_gpu.reference import residual_rho_block

pytest.importorskip("distributed")
from residual_gpu.distributed.bounds import prunable, shard_bounds, summarize
from residual_gpu.distributed.shards import kd_shards, nearest_box
from residual_gpu.distributed.tasks import build_shard


@pytest.mark.parametrize("parts", [1, 2, 7, 64])
def test_kd_shards_partition(parts):
    x = np.random.default_rng(0).random((500, 3))
    x[:50] = x[0]  # duplicates
    shards = kd_shards(x, parts)
    assert len(shards) == parts
    allrows = np.concatenate(shards)
    np.testing.assert_array_equal(np.sort(allrows), np.arange(500))
    sizes = [s.size for s in shards]
    assert max(sizes) - min(sizes) <= 1
    assert all(np.all(np.diff(s) > 0) for s in shards)
    lo = np.array([x[s].min(axis=0) for s in shards])
    hi = np.array([x[s].max(axis=0) for s in shards])
    # a point's own shard box contains it, so its nearest box is at distance 0
    home = nearest_box(x, lo, hi)
    gap = np.maximum(np.maximum(lo[home] - x, x - hi[home]), 0.0)
    assert np.all(gap == 0.0)


def test_kd_shards_rejects_empty_shards():
    with pytest.raises(rg.InvalidArgumentError, match=r"shards must be in \[1, 5\].*got shards=6"):
        kd_shards(np.zeros((5, 2)), 6)


@pytest.mark.parametrize("kernel", [rg.Matern52(lengthscale=0.2), rg.RBF(lengthscale=np.array([0.3, 0.6]))])
def test_shard_factors_are_the_global_rows_bitwise(kernel):
    """A shard built from the inducing points alone has exactly the global V and p rows."""
    x = np.random.default_rng(4).random((900, 2))
    prob = rg.ResidualProblem(x, kernel=kernel, inducing=30, seed=2)
    for rows in kd_shards(x / prob.lengthscales, 5):
        shard = build_shard(x[rows], rows, kernel, prob.inducing, prob.jitter, prob.p_floor, {"method": "brute"}, 8)
        sp = shard.index.problem
        assert np.array_equal(sp.v, prob.v[rows]) and np.array_equal(sp.p, prob.p[rows])
        assert np.array_equal(sp.chol, prob.chol)
        xq = np.random.default_rng(5).random((7, 2))
        assert all(np.array_equal(a, b) for a, b in zip(sp.factors_at(xq), prob.factors_at(xq)))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10**6), d=st.integers(1, 4), family=st.sampled_from(KERNEL_CLASSES),
       ard=st.booleans(), parts=st.integers(1, 6), leaves=st.integers(1, 9), new=st.booleans(),
       predecessor=st.booleans(), tiny=st.booleans())
def test_shard_bound_never_below_true_rho(seed, d, family, ard, parts, leaves, new, predecessor, tiny):
    """U_qs >= |rho_qj| for every admissible point j of the shard (dataset and new queries, all
    kernels, ARD, inducing points among the data: tiny p), and a shard the rule prunes holds no
    member of the query's exact top k."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(40, 260))
    x = rng.random((n, d))
    ls = rng.uniform(0.1, 0.8, d) if ard else float(rng.uniform(0.1, 0.8))
    kern = family(lengthscale=ls, variance=float(rng.uniform(0.5, 2.0)))
    m = int(rng.integers(2, 25))
    # tiny: inducing points are data points (p ~ jitter there), otherwise points off the data
    inducing = x[rng.choice(n, m, replace=False)] if tiny else rng.random((m, d))
    prob = rg.ResidualProblem(x, kernel=kern, inducing=inducing)
    if new:
        qx, qv, qp = prob.factors_at(rng.random((12, d)))
        limit = np.full(12, n)
        self_ids = np.full(12, -1)
    else:
        self_ids = rng.choice(n, 12, replace=False)
        qx, qv, qp = prob.coords[self_ids], prob.v[self_ids], prob.p[self_ids]
        limit = self_ids.copy() if predecessor else np.full(12, n)
    k = min(5, n - 1)
    res = rg.ResidualIndex(prob, backend="cpu", method="brute").query_from_factors(
        k, qx, qv, qp, self_index=None if new else self_ids, limit=limit)
    rho = np.abs(residual_rho_block(qx, qv, qp, x, prob.v, prob.p, kern))
    for rows in kd_shards(x / prob.lengthscales, parts):
        shard = rg.ResidualProblem(x[rows], kernel=kern, inducing=inducing)
        summary = summarize(shard, rows, leaves)
        bound = shard_bounds(summary, qx, qv, qp, limit)
        admissible = rows[None, :] < limit[:, None]
        true = np.where(admissible, rho[:, rows], -1.0).max(axis=1)
        assert np.all(bound >= true), f"bound below |rho| by {np.max(true - bound):.3g}"
        assert np.all((bound == -1.0) == ~admissible.any(axis=1))
        cut = prunable(bound, summary, np.linalg.norm(qv, axis=1), qp, res.distances[:, -1])
        for r in np.flatnonzero(cut):
            assert not np.isin(res.indices[r], rows).any(), f"query {r}: pruned a shard holding a neighbour"


def test_pruning_fires_and_keeps_every_neighbour():
    """On a spread-out problem most (query, far shard) pairs are pruned, never one with a neighbour."""
    x = np.random.default_rng(7).random((3000, 2))
    kern = rg.Matern32(lengthscale=0.05)
    prob = rg.ResidualProblem(x, kernel=kern, inducing=60, seed=0)
    q = np.arange(0, 3000, 25)
    res = rg.ResidualIndex(prob, backend="cpu", method="brute").query(10, queries=q)
    pruned = 0
    shards = kd_shards(x / prob.lengthscales, 8)
    for rows in shards:
        summary = summarize(rg.ResidualProblem(x[rows], kernel=kern, inducing=prob.inducing), rows)
        bound = shard_bounds(summary, prob.coords[q], prob.v[q], prob.p[q], np.full(q.size, 3000))
        cut = prunable(bound, summary, prob.v_norms[q], prob.p[q], res.distances[:, -1])
        assert not np.isin(res.indices[cut], rows).any()
        pruned += int(cut.sum())
    assert pruned > 0.5 * q.size * (len(shards) - 1)
