"""The comparison helper itself (conftest.assert_matches_reference): it must not hang on the last
ulp of the kernel, and it must still catch a wrong answer.

The reference's kernel values come from numpy's exp, whose last bit depends on the CPU's SIMD
level (AVX-512 numpy differs from libm in ~5% of values). Here the reference's kernel values are
nudged by a few ulp in a random direction (fixed seed), which is what another CPU's exp does; the
engine's result must still pass on the hardest cases (tiny residual variances, where 1 ulp of k
moves d by ~1e-10, and exact ties), and a result with one neighbour genuinely wrong, a distance
off by more than the bound, or a tie broken the wrong way must still fail.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_matches_reference, make_problem, reference_distance_rows, reference_tolerance

import residual_gpu as rg

#: ulps of k(x, y) the nudge moves each reference kernel value by, at most: several times what
#: two exps disagree by (<= 1 ulp for libm vs numpy's AVX-512 exp), well inside the documented
#: kernel_error (4d + 64) u * variance
NUDGE_ULPS = 4


class NudgedKernel:
    """The problem's kernel with every value moved by up to NUDGE_ULPS ulps (random direction)."""

    def __init__(self, kernel, seed: int):
        self.kernel = kernel
        self.rng = np.random.default_rng(seed)

    def __call__(self, x1, x2=None):
        k = self.kernel(x1, x2)
        steps = self.rng.integers(-NUDGE_ULPS, NUDGE_ULPS + 1, k.shape)
        for s in range(1, NUDGE_ULPS + 1):
            k = np.where(steps >= s, np.nextafter(k, np.inf), k)
            k = np.where(steps <= -s, np.nextafter(k, -np.inf), k)
        return k


def tiny_p_problem():
    """The gold regime: inducing points are data points, p ~ 1e-6, heavy cancellation."""
    x = np.random.default_rng(42).normal(size=(400, 3))
    u = x[np.sort(np.random.default_rng(0).choice(400, 200, replace=False))]
    problem = rg.ResidualProblem(x, kernel=rg.RBF(lengthscale=1.0), inducing=u)
    assert np.median(problem.p) < 1e-5
    return problem


def ties_problem():
    """Exact duplicates (ties at distance 0 and elsewhere) and a point repeated 30 times."""
    problem = make_problem(4, 160, 2, rg.Matern52(lengthscale=0.2), 20, duplicates=60)
    x = problem.coords.copy()
    x[100:130] = x[100]
    return rg.ResidualProblem(x, kernel=problem.kernel, inducing=20, seed=4)


CASES = {"tiny_p": (tiny_p_problem, 20), "ties": (ties_problem, 12)}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    make, k = CASES[request.param]
    return make(), k


@pytest.mark.parametrize("method", ["brute", "tree"])
@pytest.mark.parametrize("predecessor", [False, True], ids=["plain", "pred"])
def test_accepts_engine_results_against_a_nudged_reference(case, method, predecessor):
    problem, k = case
    queries = np.random.default_rng(43).integers(0, problem.n, 64)
    res = rg.ResidualIndex(problem, backend="cpu", method=method).query(k, queries=queries, predecessor=predecessor)
    # the nudge is real: the nudged reference's distances are not the reference's
    plain, _ = reference_distance_rows(problem, queries)
    moved, _ = reference_distance_rows(problem, queries, kernel=NudgedKernel(problem.kernel, seed=7))
    assert np.count_nonzero(plain != moved) > plain.size // 4
    for seed in (7, 8, 9):
        assert_matches_reference(problem, res, k, queries=queries, predecessor=predecessor,
                                 kernel=NudgedKernel(problem.kernel, seed=seed))


def _result(problem, k, queries):
    return rg.ResidualIndex(problem, backend="cpu", method="brute").query(k, queries=queries)


def _result_and_bounds(problem, k):
    """Every 9th point's result, the reference rows, which points they admit, their tolerances."""
    queries = np.arange(0, problem.n, 9)
    full, admissible = reference_distance_rows(problem, queries)
    return queries, _result(problem, k, queries), full, admissible, reference_tolerance(problem, full, queries)


def test_rejects_one_wrong_neighbour(case):
    problem, k = case
    queries, res, full, admissible, tol = _result_and_bounds(problem, k)
    # in some row, swap the k-th neighbour for an admissible point clearly beyond it, with that
    # point's own (correct) distance, keeping the row sorted
    for r in range(queries.size):
        kth = res.distances[r, -1]
        far = np.flatnonzero(admissible[r] & (full[r] > kth + 10 * tol[r].max()) & ~np.isin(np.arange(problem.n),
                                                                                          res.indices[r]))
        if far.size:
            break
    else:
        pytest.fail("no row with a point clearly beyond its k-th neighbour")
    j = far[np.argmin(full[r, far])]
    res.indices[r, -1] = j
    res.distances[r, -1] = full[r, j]
    with pytest.raises(AssertionError, match="missed|near-tie|position"):
        assert_matches_reference(problem, res, k, queries=queries, kernel=NudgedKernel(problem.kernel, seed=7))


def test_rejects_a_distance_beyond_its_bound(case):
    problem, k = case
    queries, res, _, _, tol = _result_and_bounds(problem, k)
    r = queries.size // 2
    res.distances[r, 0] += 3 * tol[r, res.indices[r, 0]]
    res.distances[r] = np.sort(res.distances[r])  # still sorted: only the value is wrong
    with pytest.raises(AssertionError, match="distances off the reference|sorted"):
        assert_matches_reference(problem, res, k, queries=queries)


def test_rejects_an_exact_tie_broken_by_the_larger_index():
    problem, k = ties_problem(), 12
    queries = np.array([100, 101, 120, 5])
    res = _result(problem, k, queries)
    # query 120 is one of 30 copies: its first neighbours are its twins at distance 0, by index
    twins = np.flatnonzero(np.all(problem.coords == problem.coords[120], axis=1))
    twins = twins[twins != 120]
    assert twins.size > k + 3 and np.all(res.distances[2, :k] == 0.0)
    np.testing.assert_array_equal(res.indices[2], twins[:k])
    swapped = res.indices.copy()
    swapped[2, [0, 1]] = swapped[2, [1, 0]]
    res.indices[:] = swapped
    with pytest.raises(AssertionError, match="sorted|twin"):
        assert_matches_reference(problem, res, k, queries=queries)
    # and replacing a twin by a larger-index twin that the reference did not list fails too
    res = _result(problem, k, queries)
    res.indices[2, -1] = twins[k + 2]
    with pytest.raises(AssertionError, match="twin"):
        assert_matches_reference(problem, res, k, queries=queries)
