"""Determinism: results are bit-identical whatever the thread counts, the query batching and
order, and however the same queries are named.

Indices and distances are compared bitwise (``np.testing.assert_array_equal`` on the values
and on their raw bits), never with a tolerance. Every comparison runs for brute force (CPU,
and JAX where it can run), the tree with its default settings (precision "auto"), the
tree's "parity" preset and the tree with float32 leaf blocks, on three problems: a plain one,
one with duplicated points (exact ties, and a tie group larger than k, which forces
certification retries) and one with tiny residual variances (inducing points are data points)
that also has a tie group. The problems and indices are module-scoped; each query result is
computed once per (method, problem).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import numba
import numpy as np
import pytest
from conftest import make_problem
from threadpoolctl import threadpool_limits

import residual_gpu as rg

K = 10
#: uneven batch sizes; the last batch takes the rest
BATCHES = (1, 7, 64)
#: batch sizes of new locations queried under 1 and 2 threads
ODD_BATCHES = (2, 9, 10, 37)
#: new locations queried per problem
NEW_POINTS = 200
DATASET_MODES = ("plain", "pred")
MODES = (*DATASET_MODES, "coords")


# -- problems -------------------------------------------------------------------------------
@dataclass
class Problem:
    name: str
    problem: rg.ResidualProblem
    xnew: np.ndarray  # (NEW_POINTS, d) new locations, a few of them on data points


def _with_new_points(name, problem, xnew):
    xnew[:3] = problem.coords[[0, problem.n // 2, problem.n - 1]]  # new locations on data points
    return Problem(name, problem, xnew)


def _plain():
    problem = make_problem(0, 800, 2, rg.Matern52(lengthscale=0.1), 30)
    return _with_new_points("matern52-d2", problem, np.random.default_rng(100).random((NEW_POINTS, 2)))


def _ties():
    base = make_problem(1, 700, 3, rg.RBF(lengthscale=0.3), 30, duplicates=200)
    x = np.array(base.coords)
    x[300:340] = x[300]  # 40 copies of one point: the tie group straddles k, certification retries
    problem = rg.ResidualProblem(x, kernel=base.kernel, inducing=30, seed=1)
    xnew = np.random.default_rng(101).random((NEW_POINTS, 3))
    xnew[3] = x[300]  # a new location on top of the tie group
    return _with_new_points("rbf-d3-ties", problem, xnew)


def _tiny_p():
    """The gold regime: 200 inducing points (kmeans++ from the data) for 600 points, p ~ 1e-5."""
    x = np.random.default_rng(42).normal(size=(600, 3))
    x[100:125] = x[100]  # a tie group larger than k (retries in plain mode)
    problem = rg.ResidualProblem(x, kernel=rg.RBF(lengthscale=1.0), inducing=200, seed=0)
    assert np.median(problem.p) < 1e-4
    xnew = np.random.default_rng(102).normal(size=(NEW_POINTS, 3))
    xnew[3] = x[100]
    return _with_new_points("tiny-p", problem, xnew)


PROBLEMS = {"matern52-d2": _plain, "rbf-d3-ties": _ties, "tiny-p": _tiny_p}


# -- methods --------------------------------------------------------------------------------
def _config(name, marks=()):
    return pytest.param(name, marks=list(marks), id=name)


_JAX_OK, _JAX_WHY = rg.available_backends()["jax"]
CONFIGS = {
    "brute-cpu": {"backend": "cpu", "method": "brute"},
    "tree": {"backend": "cpu", "method": "tree"},  # precision "auto"
    "tree-parity": {"backend": "cpu", "method": "tree", "preset": "parity"},
    "tree-float32": {"backend": "cpu", "method": "tree", "precision": "float32"},
    "brute-jax": {"backend": "jax", "method": "brute"},
}
CONFIG_PARAMS = [_config(name) for name in CONFIGS if name != "brute-jax"] + [
    _config("brute-jax", [pytest.mark.skipif(not _JAX_OK, reason=f"backend 'jax' unavailable: {_JAX_WHY}")])]


@dataclass
class Case:
    """One index over one problem, with its all-at-once results cached per mode."""

    config: str
    prob: Problem
    index: rg.ResidualIndex
    _base: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return self.prob.problem.n

    def query(self, mode: str, rows=None, index=None):
        """Mode "plain"/"pred": dataset queries ``rows`` (None: all points); "coords": the
        problem's new locations ``xnew[rows]`` (None: all of them)."""
        index = self.index if index is None else index
        if mode == "coords":
            xq = self.prob.xnew if rows is None else self.prob.xnew[rows]
            return index.query(K, query_coords=xq, progress=False)
        return index.query(K, queries=rows, predecessor=mode == "pred", progress=False)

    def base(self, mode: str):
        if mode not in self._base:
            self._base[mode] = self.query(mode)
        return self._base[mode]

    def size(self, mode: str) -> int:
        return self.prob.xnew.shape[0] if mode == "coords" else self.n


@pytest.fixture(scope="module", params=list(PROBLEMS))
def prob(request) -> Problem:
    return PROBLEMS[request.param]()


@pytest.fixture(scope="module", params=CONFIG_PARAMS)
def case(request, prob) -> Case:
    index = rg.ResidualIndex(prob.problem, progress=False, **CONFIGS[request.param])
    return Case(request.param, prob, index)


# -- helpers --------------------------------------------------------------------------------
def _diff_summary(expected, got) -> str:
    """Where two results differ: rows, positions, largest distance difference (for the report)."""
    ei, ed, gi, gd = expected.indices, expected.distances, got.indices, got.distances
    if ei.shape != gi.shape:
        return f"shapes differ: {ei.shape} vs {gi.shape}"
    bad_i = ei != gi
    bad_d = ed.view(np.uint64) != gd.view(np.uint64)
    rows = np.flatnonzero((bad_i | bad_d).any(axis=1))
    same_idx = ~bad_i & bad_d
    both = np.isfinite(ed) & np.isfinite(gd) & same_idx
    gap = float(np.max(np.abs(ed[both] - gd[both]), initial=0.0))
    return (f"{rows.size} of {ei.shape[0]} rows differ (first rows {rows[:8].tolist()}); "
            f"{int(bad_i.sum())} index entries and {int(bad_d.sum())} distance entries differ; "
            f"largest distance difference at an equal index {gap:.3e}")


def assert_bitwise_equal(expected, got, what: str):
    """Same indices, same distances bit for bit (also -0.0 vs 0.0 and NaN payloads)."""
    msg = f"{what}: {_diff_summary(expected, got)}"
    assert got.indices.dtype == np.int64 and got.distances.dtype == np.float64
    np.testing.assert_array_equal(got.indices, expected.indices, err_msg=msg, strict=True)
    np.testing.assert_array_equal(got.distances, expected.distances, err_msg=msg, strict=True)
    np.testing.assert_array_equal(got.distances.view(np.uint64), expected.distances.view(np.uint64), err_msg=msg)


@dataclass
class _Joined:
    indices: np.ndarray
    distances: np.ndarray


def _join(parts, order=None) -> _Joined:
    """Concatenate batch results; with ``order`` (the queried rows), put row order[i] back at i."""
    idx = np.concatenate([p.indices for p in parts])
    dist = np.concatenate([p.distances for p in parts])
    if order is not None:
        out_i, out_d = np.empty_like(idx), np.empty_like(dist)
        out_i[order], out_d[order] = idx, dist
        idx, dist = out_i, out_d
    return _Joined(idx, dist)


def _uneven_batches(total: int) -> list:
    cuts = np.cumsum(BATCHES)
    assert cuts[-1] < total
    return np.split(np.arange(total), cuts)


@contextmanager
def thread_counts(n: int):
    """n Numba threads and at most n threads in every native pool (BLAS, OpenMP); restored after."""
    previous = numba.get_num_threads()
    numba.set_num_threads(n)
    try:
        with threadpool_limits(limits=n):
            yield
    finally:
        numba.set_num_threads(previous)


# -- 1. thread counts -----------------------------------------------------------------------
@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="Numba has fewer than 2 threads here")
@pytest.mark.parametrize("mode", MODES)
def test_one_and_two_threads(case, mode):
    before = numba.get_num_threads()
    with thread_counts(1):
        one = case.query(mode)
    with thread_counts(2):
        two = case.query(mode)
    assert numba.get_num_threads() == before
    assert_bitwise_equal(one, two, f"{case.config}/{case.prob.name}/{mode}: 1 vs 2 threads")
    assert_bitwise_equal(case.base(mode), one, f"{case.config}/{case.prob.name}/{mode}: default vs 1 thread")


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="Numba has fewer than 2 threads here")
def test_one_and_two_threads_odd_batches_of_new_locations(case):
    """Batches whose size is odd or not a multiple of the thread count: the factors of new
    locations (a triangular solve in BLAS) are formed per batch."""
    batches = np.split(np.arange(sum(ODD_BATCHES)), np.cumsum(ODD_BATCHES)[:-1])
    results = {}
    for threads in (1, 2):
        with thread_counts(threads):
            results[threads] = _join([case.query("coords", rows) for rows in batches])
    assert_bitwise_equal(results[1], results[2],
                         f"{case.config}/{case.prob.name}/coords: batches {list(ODD_BATCHES)}, 1 vs 2 threads")


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="Numba has fewer than 2 threads here")
def test_problem_built_with_one_and_two_threads():
    """V and p (a triangular solve in BLAS over all n points, n odd here) and the results of a
    problem built under 1 and under 2 threads are the same bits."""
    x = np.random.default_rng(3).random((1001, 2))
    built = {}
    for threads in (1, 2):
        with thread_counts(threads):
            problem = rg.ResidualProblem(x, kernel=rg.Matern52(lengthscale=0.1), inducing=30, seed=0)
            built[threads] = problem, rg.ResidualIndex(problem, backend="cpu", method="brute").query(K)
    (p1, r1), (p2, r2) = built[1], built[2]
    rows = np.flatnonzero((p1.v != p2.v).any(axis=1))
    cause = f"V differs in rows {rows.tolist()[:8]}, p at {np.flatnonzero(p1.p != p2.p).tolist()[:8]}"
    assert_bitwise_equal(r1, r2, f"problem built under 1 vs 2 threads (brute-cpu, all points; {cause})")
    np.testing.assert_array_equal(p1.inducing, p2.inducing, strict=True)
    np.testing.assert_array_equal(p1.chol, p2.chol, strict=True)
    np.testing.assert_array_equal(p1.v, p2.v, strict=True, err_msg=cause)
    np.testing.assert_array_equal(p1.p, p2.p, strict=True, err_msg=cause)


# -- 2. batch size and order ----------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_permuted_queries(case, mode):
    perm = np.random.default_rng(7).permutation(case.size(mode))
    got = _join([case.query(mode, perm)], order=perm)
    assert_bitwise_equal(case.base(mode), got, f"{case.config}/{case.prob.name}/{mode}: permuted vs at once")


@pytest.mark.parametrize("mode", MODES)
def test_uneven_batches(case, mode):
    batches = _uneven_batches(case.size(mode))
    got = _join([case.query(mode, rows) for rows in batches])
    sizes = [b.size for b in batches]
    assert_bitwise_equal(case.base(mode), got, f"{case.config}/{case.prob.name}/{mode}: batches {sizes} vs at once")


# -- 3. naming the queries ------------------------------------------------------------------
@pytest.mark.parametrize("mode", DATASET_MODES)
def test_arange_equals_default(case, mode):
    got = case.query(mode, np.arange(case.n))
    assert_bitwise_equal(case.base(mode), got, f"{case.config}/{case.prob.name}/{mode}: arange(n) vs None")


@pytest.mark.parametrize("mode", DATASET_MODES)
def test_subset_equals_rows(case, mode):
    rng = np.random.default_rng(9)
    rows = np.concatenate([[0, case.n - 1, 1], rng.integers(0, case.n, 94)])  # with repeats
    got = case.query(mode, rows)
    base = case.base(mode)
    assert_bitwise_equal(_Joined(base.indices[rows], base.distances[rows]), got,
                         f"{case.config}/{case.prob.name}/{mode}: subset vs rows of all points")


def test_subset_of_new_locations(case):
    rows = np.random.default_rng(10).integers(0, case.size("coords"), 37)
    got = case.query("coords", rows)
    base = case.base("coords")
    assert_bitwise_equal(_Joined(base.indices[rows], base.distances[rows]), got,
                         f"{case.config}/{case.prob.name}/coords: subset vs rows of all new locations")


# -- 4. a rebuilt index, and the other methods ---------------------------------------------
def test_rebuilt_problem_and_index(case):
    """A problem and index built again from the same inputs answer with the same bits."""
    fresh = rg.ResidualIndex(PROBLEMS[case.prob.name]().problem, progress=False, **CONFIGS[case.config])
    for mode in MODES:
        assert_bitwise_equal(case.base(mode), case.query(mode, index=fresh),
                             f"{case.config}/{case.prob.name}/{mode}: rebuilt problem and index")


@pytest.mark.parametrize("mode", MODES)
def test_same_bits_as_cpu_brute_force(case, mode):
    """Every method returns the reference ranking with the accurate distances: the same bits."""
    if case.config == "brute-cpu":
        pytest.skip("the baseline itself")
    brute = rg.ResidualIndex(case.prob.problem, backend="cpu", method="brute")
    assert_bitwise_equal(case.query(mode, index=brute), case.base(mode),
                         f"{case.config}/{case.prob.name}/{mode}: vs brute force on the CPU")


def test_paths_exercised(case):
    """The problems reach what they are meant to: retries on tie groups, tiny p."""
    tel = [case.base(mode).telemetry for mode in MODES]
    if case.prob.name in ("rbf-d3-ties", "tiny-p"):  # the tie groups straddle k in every mode
        assert all(t.recertified_queries > 0 for t in tel), [t.recertified_queries for t in tel]
    if case.prob.name == "tiny-p":
        assert np.median(case.prob.problem.p) < 1e-4
    if case.config == "tree-float32":
        assert case.index.precision == "float32"
        assert tel[0].leaf_precision == "float32"
    if case.config == "tree-parity":
        assert tel[0].leaf_precision == "float64"
