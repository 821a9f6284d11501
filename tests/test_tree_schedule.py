"""The tree's block schedule (tree.schedule.BlockSchedule) and the backends' block requests.

The schedule asks the index's backend for its leaf blocks (``select_blocks``) and its bound
products (``bound_products``), so ``method="tree"`` runs on every backend. Its answers are those of
the fused CPU traversal bit for bit (certification is the same; tests/test_traversal_flags.py
checks the corpus on the CPU), here on JAX and the emulated CUDA device too, and the requests
keep the select's contract (the ``keep`` largest of what they evaluated, the dropped maximum)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import CASE_IDS, CASES, fast_value_tolerance, make_problem

import residual_gpu as rg
from residual_gpu.backends import BlockList
from residual_gpu.backends.base import Backend

BLOCKS = rg.TraversalFlags(schedule="blocks")


def _runs(problem, d):
    rng = np.random.default_rng(d)
    return [{"predecessor": True}, {"queries": rng.choice(problem.n, 40, replace=False)},
            {"query_coords": rng.random((15, d))}]


def _assert_same(got, want, kw):
    np.testing.assert_array_equal(got.indices, want.indices)
    assert np.array_equal(got.distances, want.distances), f"distances differ in their bits ({kw})"


@pytest.mark.parametrize("precision", ["float64", "float32"])
@pytest.mark.parametrize("d,kernel,ls,m", CASES, ids=CASE_IDS)
def test_jax_tree_equals_the_cpu_tree(precision, d, kernel, ls, m):
    pytest.importorskip("jax")
    problem = make_problem(d, 500, d, kernel(lengthscale=ls), m, duplicates=10, clustered=d == 2)
    cpu = rg.ResidualIndex(problem, backend="cpu", method="tree", leaf_size=16, precision=precision)
    jax = rg.ResidualIndex(problem, backend="jax", method="tree", leaf_size=16, precision=precision)
    assert (cpu.schedule, jax.schedule) == ("fused", "blocks")
    searched = 0
    for kw in _runs(problem, d):
        want, got = cpu.query(7, **kw), jax.query(7, **kw)
        _assert_same(got, want, kw)
        tel = got.telemetry
        assert tel.method == "tree" and tel.backend == "jax"
        assert tel.tree_queries == want.telemetry.tree_queries  # the same rows routed to brute force
        if tel.tree_queries:
            assert tel.bound_evaluations > 0 and tel.leaves_evaluated > 0
        searched += tel.tree_queries
    assert searched > 0 or precision == "float32"  # small float32 problems may route every query


def test_block_schedule_prunes_and_counts():
    """Where the bound prunes (2-D, short lengthscale) the schedule evaluates a fraction of the pairs,
    its counters add up, and the floor of query_from_factors reaches it."""
    problem = make_problem(3, 4000, 2, rg.Matern32(lengthscale=0.03), 40)
    index = rg.ResidualIndex(problem, backend="cpu", method="tree", leaf_size=16, traversal=BLOCKS)
    res = index.query(10, predecessor=True)
    fused = rg.ResidualIndex(problem, backend="cpu", method="tree", leaf_size=16, _tree=index.tree).query(
        10, predecessor=True)
    _assert_same(res, fused, "predecessor")
    tel = res.telemetry
    assert tel.block_pairs < 0.5 * problem.n * (problem.n - 1) / 2
    assert tel.prunes_bound > 0 and tel.bound_products == 2 * tel.bound_evaluations
    assert tel.distance_evaluations >= tel.block_pairs >= tel.dense_pairs
    ids = np.arange(0, problem.n, 37)
    batch = index._batch(ids, None, False)
    k = 5
    plain = index.query(k, queries=ids)
    floor = plain.distances[:, 2]
    got = index.query_from_factors(k, batch.coords, batch.v, batch.p, self_index=ids, floor=floor)
    within = plain.distances <= floor[:, None]
    np.testing.assert_array_equal(np.where(within, got.indices, -1), np.where(within, plain.indices, -1))


def test_schedule_resolution_and_validation():
    problem = make_problem(0, 300, 2, rg.Matern32(lengthscale=0.1), 12)
    assert rg.ResidualIndex(problem, backend="cpu", method="tree").schedule == "fused"
    assert rg.ResidualIndex(problem, backend="cpu", method="tree", traversal=BLOCKS).schedule == "blocks"
    assert rg.ResidualIndex(problem, backend="cpu", method="tree", preset="parity").schedule == "fused"
    with pytest.raises(rg.InvalidArgumentError, match=r"TraversalFlags.schedule must be 'auto', 'fused' or "
                                                      r"'blocks', got schedule='gpu'"):
        rg.TraversalFlags(schedule="gpu")
    with pytest.raises(rg.InvalidArgumentError, match=r"preset='parity' fixes the traversal"):
        rg.ResidualIndex(problem, method="tree", preset="parity", traversal=BLOCKS)
    index = rg.ResidualIndex(problem, method="tree", traversal=BLOCKS)
    assert index.with_kernel(rg.Matern32(lengthscale=0.12)).schedule == "blocks"


def _block_list(n, q, rng, with_rows):
    """Random tiles over q rows, each with a few random disjoint column ranges (and row subsets)."""
    row_ptr = np.unique(np.r_[0, np.sort(rng.choice(np.arange(1, q), 3, replace=False)), q]).astype(np.int64)
    starts, ends, range_ptr, rows_ptr, rows = [], [], [0], [0], []
    for t in range(row_ptr.size - 1):
        cuts = np.sort(rng.choice(n, 6, replace=False))
        for a, b in zip(cuts[0::2], cuts[1::2]):
            starts.append(a)
            ends.append(b)
            own = np.flatnonzero(rng.random(row_ptr[t + 1] - row_ptr[t]) < 0.6) + row_ptr[t]
            rows.extend(own)
            rows_ptr.append(rows_ptr[-1] + own.size)
        range_ptr.append(len(starts))
    ids = rng.permutation(n).astype(np.int64)
    as_i = lambda a: np.asarray(a, dtype=np.int64)
    return BlockList(row_ptr, as_i(range_ptr), as_i(starts), as_i(ends), ids,
                     as_i(rows_ptr) if with_rows else None, as_i(rows) if with_rows else None)


def _evaluated(blocks, q):
    """(q, n) bool: the (row, position) pairs a backend must evaluate (named rows only)."""
    out = np.zeros((q, blocks.ids.size), dtype=bool)
    for t in range(blocks.tiles):
        for s in range(blocks.range_ptr[t], blocks.range_ptr[t + 1]):
            rows = (np.arange(blocks.row_ptr[t], blocks.row_ptr[t + 1]) if blocks.range_rows is None else
                    blocks.range_rows[blocks.range_rows_ptr[s]:blocks.range_rows_ptr[s + 1]])
            out[np.ix_(rows, np.arange(blocks.starts[s], blocks.ends[s]))] = True
    return out


@pytest.mark.parametrize("with_rows", [False, True], ids=["whole-tiles", "range-rows"])
@pytest.mark.parametrize("name", ["cpu", "jax", "default"])
def test_select_blocks_keeps_the_largest_evaluated(name, with_rows):
    """select_blocks against exact |rho|: the kept are the ``keep`` largest admissible evaluated values
    (within the fast values' tolerance), a_dropped bounds every evaluated one not kept, and whatever a
    backend evaluates beyond the named rows stays inside the ranges of the row's tile."""
    if name == "jax":
        pytest.importorskip("jax")
    problem = make_problem(5, 400, 3, rg.Matern52(lengthscale=0.3), 20)
    index = rg.ResidualIndex(problem, backend="cpu")
    rng = np.random.default_rng(11)
    ids_q = rng.choice(problem.n, 50, replace=False)
    batch = index._batch(ids_q, None, True)  # predecessor limits and self exclusion
    blocks = _block_list(problem.n, batch.size, rng, with_rows)
    view = rg.problem.ProblemView(problem, blocks.ids)
    backend = rg.get_backend("cpu" if name == "default" else name)
    select = (lambda *a: Backend.select_blocks(backend, *a)) if name == "default" else backend.select_blocks
    exact = np.abs(rg.get_backend("cpu").abs_rho_tile(backend_prep := rg.get_backend("cpu").prepare(view), batch,
                                                       np.arange(problem.n)))
    del backend_prep
    must = _evaluated(blocks, batch.size)
    tile_cols = _evaluated(BlockList(blocks.row_ptr, blocks.range_ptr, blocks.starts, blocks.ends, blocks.ids),
                           batch.size)
    adm = (blocks.ids[None, :] < batch.limit[:, None]) & (blocks.ids[None, :] != batch.self_index[:, None])
    tol = fast_value_tolerance(problem, batch)[:, 0]
    keep = 6
    cand = select(backend.prepare(view), batch, keep, blocks)
    pos = np.argsort(blocks.ids)  # dataset index -> position
    assert cand.evaluations >= int(np.count_nonzero(must & adm))
    assert cand.evaluations <= int(np.count_nonzero(tile_cols & adm))
    for r in range(batch.size):
        kept = cand.index[r][cand.index[r] >= 0]
        assert np.all(cand.abs_rho[r, cand.index[r] < 0] == -1.0)
        p = pos[kept]
        assert np.all(tile_cols[r, p] & adm[r, p]), "kept an inadmissible or unevaluated candidate"
        np.testing.assert_allclose(cand.abs_rho[r, cand.index[r] >= 0], exact[r, p], rtol=0, atol=tol[r])
        rest = must[r] & adm[r]
        rest[p] = False
        if rest.any():
            assert cand.a_dropped[r] >= exact[r, rest].max() - tol[r]
        need = int(np.count_nonzero(must[r] & adm[r]))
        assert kept.size >= min(keep, need)
        if need >= keep:  # nothing kept below the keep-th largest value it had to evaluate
            best = np.sort(exact[r, must[r] & adm[r]])[::-1][keep - 1]
            assert cand.abs_rho[r, cand.index[r] >= 0].min() >= best - 2 * tol[r]


@pytest.mark.parametrize("name", ["cpu", "jax"])
def test_bound_products_are_the_two_gemms(name):
    if name == "jax":
        pytest.importorskip("jax")
    rng = np.random.default_rng(3)
    mid, rad, a = rng.standard_normal((30, 12)), rng.random((30, 12)), rng.standard_normal((9, 12))
    backend = rg.get_backend(name)
    for dtype in (np.float64, np.float32):
        s0, sr = backend.bound_products(backend.prepare_bounds(mid.astype(dtype), rad.astype(dtype)), a)
        assert s0.dtype == sr.dtype == np.float64 and s0.shape == sr.shape == (9, 30)
        tol = 1e-12 if dtype == np.float64 else 1e-4
        np.testing.assert_allclose(s0, a @ mid.T, rtol=0, atol=tol * 12 * 4)
        np.testing.assert_allclose(sr, np.abs(a) @ rad.T, rtol=0, atol=tol * 12 * 4)
