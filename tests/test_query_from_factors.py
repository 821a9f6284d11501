"""ResidualIndex.query_from_factors: queries given as factors, with per-query exclusions and limits."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_problem

import residual_gpu as rg


@pytest.mark.parametrize("method", ["brute", "tree"])
def test_equals_query_for_dataset_and_new_points(method):
    prob = make_problem(3, 700, 2, rg.Matern32(lengthscale=0.2), 25)
    index = rg.ResidualIndex(prob, backend="cpu", method=method, leaf_size=16)
    ids = np.array([0, 1, 5, 333, 699, 333])
    for predecessor in (False, True):
        want = index.query(7, queries=ids, predecessor=predecessor)
        args = (prob.coords[ids], prob.v[ids], prob.p[ids])
        got = index.query_from_factors(7, *args, self_index=ids, limit=ids if predecessor else None)
        np.testing.assert_array_equal(got.indices, want.indices)
        np.testing.assert_array_equal(got.distances, want.distances)
    xq = np.random.default_rng(0).random((9, 2))
    want = index.query(7, query_coords=xq)
    got = index.query_from_factors(7, *prob.factors_at(xq))
    np.testing.assert_array_equal(got.indices, want.indices)
    np.testing.assert_array_equal(got.distances, want.distances)


def test_limits_and_padding():
    """Arbitrary per-query limits (not the query's own index) and k = n: rows hold exactly the
    admissible points, the rest padded with -1 and inf."""
    prob = make_problem(1, 60, 3, rg.RBF(lengthscale=0.4), 10)
    index = rg.ResidualIndex(prob, backend="cpu", method="brute")
    ids = np.array([10, 20, 59])
    limit = np.array([0, 5, 60])
    res = index.query_from_factors(60, prob.coords[ids], prob.v[ids], prob.p[ids], self_index=ids, limit=limit)
    assert np.all(res.indices[0] == -1) and np.all(np.isinf(res.distances[0]))
    assert sorted(res.indices[1, :5]) == [0, 1, 2, 3, 4] and np.all(res.indices[1, 5:] == -1)
    assert 59 not in res.indices[2] and sorted(res.indices[2, :59]) == list(range(59)) and res.indices[2, 59] == -1
    plain = index.query(5, queries=ids)
    np.testing.assert_array_equal(res.indices[2, :5], plain.indices[2])


def test_bad_input_and_inputs_untouched():
    prob = make_problem(2, 80, 2, rg.Matern52(lengthscale=0.3), 8)
    index = rg.ResidualIndex(prob, backend="cpu", method="brute")
    x, v, p = prob.factors_at(np.random.default_rng(1).random((4, 2)))
    copies = [a.copy() for a in (x, v, p)]
    index.query_from_factors(3, x, v, p, self_index=np.array([-1, 0, 1, 2]), limit=np.array([80, 3, 4, 80]))
    for a, b in zip((x, v, p), copies):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(rg.InvalidArgumentError, match=r"v must have 8 column\(s\), got v.shape=\(4, 3\)"):
        index.query_from_factors(3, x, v[:, :3], p)
    with pytest.raises(rg.InvalidArgumentError, match=r"v must have one row per query \(q=4\)"):
        index.query_from_factors(3, x, v[:2], p)
    with pytest.raises(rg.InvalidArgumentError, match=r"p must be finite and > 0, got p\[1\]=0.0"):
        index.query_from_factors(3, x, v, np.array([1.0, 0.0, 1.0, 1.0]))
    with pytest.raises(rg.InvalidArgumentError, match=r"limit must be in \[0, 80\], got limit\[2\]=81"):
        index.query_from_factors(3, x, v, p, limit=np.array([1, 2, 81, 3]))
    with pytest.raises(rg.InvalidArgumentError, match=r"self_index must be 1-D with one entry per query"):
        index.query_from_factors(3, x, v, p, self_index=np.array([1, 2]))
    with pytest.raises(rg.InvalidTypeError, match=r"limit must hold integers, got limit.dtype=float64"):
        index.query_from_factors(3, x, v, p, limit=np.ones(4))
    with pytest.raises(rg.InvalidArgumentError, match=r"k must be in \[1, 80\], got k=81"):
        index.query_from_factors(81, x, v, p)


def _within(res, floor):
    """Per row, the (indices, distances) at distance <= floor."""
    return [(res.indices[r][res.distances[r] <= floor[r]], res.distances[r][res.distances[r] <= floor[r]])
            for r in range(floor.size)]


@pytest.mark.parametrize("method,precision", [("brute", "float64"), ("tree", "float64"), ("tree", "float32"),
                                              ("brute", "float32")])
@pytest.mark.parametrize("case", range(4))
def test_floor_keeps_the_top_k_within_it(method, precision, case):
    """With a floor, every row holds exactly the no-floor row's neighbours at distance <= floor,
    the same bits, in the same order: floors at a neighbour's distance (ties inclusive), between
    two, at 0, at 1 and beyond, inf; plain, predecessor and new locations, duplicates and tiny p."""
    d, kern, ls, m = [(1, rg.Matern12, 0.2, 12), (2, rg.Matern52, 0.1, 30), (3, rg.RBF, 0.5, 40),
                      (8, rg.Matern32, np.linspace(0.6, 1.6, 8), 25)][case]
    prob = make_problem(case, 900, d, kern(lengthscale=ls), m, duplicates=20, clustered=case == 1)
    index = rg.ResidualIndex(prob, backend="cpu", method=method, leaf_size=16, precision=precision)
    rng = np.random.default_rng(case)
    ids = np.concatenate([rng.choice(prob.n, 40, replace=False), np.argsort(prob.p)[:5]])
    k = 12
    kinds = [(prob.coords[ids], prob.v[ids], prob.p[ids], ids, None),
             (prob.coords[ids], prob.v[ids], prob.p[ids], ids, ids)]
    kinds.append((*prob.factors_at(rng.random((20, d))), None, None))
    for x, v, p, own, limit in kinds:
        full = index.query_from_factors(k, x, v, p, self_index=own, limit=limit)
        q = x.shape[0]
        col = rng.integers(0, k, q)
        floor = full.distances[np.arange(q), col].copy()
        floor[::6] = np.nextafter(floor[::6], 0.0)  # just below a neighbour's distance
        floor[1::6] = 0.0
        floor[2::6] = np.inf
        floor[3::6] = 1.5
        res = index.query_from_factors(k, x, v, p, self_index=own, limit=limit, floor=floor)
        assert res.indices.shape == (q, k)
        for (wi, wd), (gi, gd) in zip(_within(full, floor), _within(res, floor)):
            np.testing.assert_array_equal(gi, wi)
            np.testing.assert_array_equal(gd, wd)
        # no floor and an infinite one are the same search
        np.testing.assert_array_equal(res.indices[2::6], full.indices[2::6])


def test_floor_prunes_the_tree():
    """A floor well inside the query's own neighbourhood (its 3rd distance of 30) saves tree
    evaluations: the bound prunes against it from the first node on."""
    prob = make_problem(5, 6000, 2, rg.Matern32(lengthscale=0.05), 64)
    index = rg.ResidualIndex(prob, backend="cpu", method="tree", leaf_size=32)
    ids = np.arange(0, prob.n, 10)
    args = (prob.coords[ids], prob.v[ids], prob.p[ids])
    full = index.query_from_factors(30, *args, self_index=ids)
    res = index.query_from_factors(30, *args, self_index=ids, floor=full.distances[:, 2])
    np.testing.assert_array_equal(res.indices[:, :3], full.indices[:, :3])
    assert res.telemetry.distance_evaluations < 0.8 * full.telemetry.distance_evaluations


def test_floor_bad_input():
    prob = make_problem(2, 80, 2, rg.Matern52(lengthscale=0.3), 8)
    index = rg.ResidualIndex(prob, backend="cpu", method="brute")
    x, v, p = prob.factors_at(np.random.default_rng(1).random((4, 2)))
    with pytest.raises(rg.InvalidArgumentError, match=r"floor must be >= 0 \(inf: no floor\), got floor\[1\]=nan"):
        index.query_from_factors(3, x, v, p, floor=np.array([0.5, np.nan, 1.0, 1.0]))
    with pytest.raises(rg.InvalidArgumentError, match=r"floor must be >= 0 \(inf: no floor\), got floor\[3\]=-0.1"):
        index.query_from_factors(3, x, v, p, floor=np.array([0.5, 0.2, 1.0, -0.1]))
    with pytest.raises(rg.InvalidArgumentError, match=r"floor must be 1-D with one entry per query \(q=4\)"):
        index.query_from_factors(3, x, v, p, floor=np.ones(3))
    with pytest.raises(rg.InvalidTypeError, match=r"floor must hold real numbers, got floor.dtype=bool"):
        index.query_from_factors(3, x, v, p, floor=np.ones(4, dtype=bool))
    floor = np.array([0.5, 0.2, 1.0, np.inf])
    index.query_from_factors(3, x, v, p, floor=floor)
    np.testing.assert_array_equal(floor, [0.5, 0.2, 1.0, np.inf])
