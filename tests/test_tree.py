"""The search tree (method="tree"): exact against the reference and brute force, valid bounds,
the Euclidean mode against scipy's cKDTree, persistence, telemetry and the "auto" rule."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
from conftest import KERNEL_CLASSES, assert_matches_reference, bound_test_problem, make_problem
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.spatial import cKDTree

import residual_gpu as rg
from residual_gpu import search
from residual_gpu.hilbert import hilbert_keys
from residual_gpu.reference import residual_rho_block
from residual_gpu.telemetry import SCHEMA, SCHEMA_VERSION
from residual_gpu.tree import arrays_digest, build_tree, euclidean_knn

CASES = [  # (d, kernel, lengthscale, m)
    (1, rg.Matern12, 0.2, 12),
    (2, rg.Matern52, 0.1, 30),
    (3, rg.RBF, 0.5, 40),
    (8, rg.Matern32, np.linspace(0.6, 1.6, 8), 25),  # ARD
]
CASE_IDS = [f"d{c[0]}-{c[1].__name__}" for c in CASES]


def tree_index(problem, leaf_size=8, tile_size=5):
    index = rg.ResidualIndex(problem, backend="cpu", method="tree", leaf_size=leaf_size, tile_size=tile_size)
    assert index.method == "tree"
    return index


def check(index, k, queries=None, query_coords=None, predecessor=False):
    """Tree result equals the float64 reference (and padding / tie rules)."""
    problem = index.problem
    res = index.query(k, queries=queries, query_coords=query_coords, predecessor=predecessor)
    assert_matches_reference(problem, res, k, queries=queries, query_coords=query_coords, predecessor=predecessor)
    return res


def same_as_brute(problem, res, k, **kw):
    """Tree and brute force return identical indices and bit-identical distances."""
    brute = rg.ResidualIndex(problem, backend="cpu", method="brute").query(k, **kw)
    np.testing.assert_array_equal(res.indices, brute.indices)
    np.testing.assert_array_equal(res.distances, brute.distances)


# -- exactness ------------------------------------------------------------------------------
@pytest.mark.parametrize("d,kernel,ls,m", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("predecessor", [False, True], ids=["plain", "pred"])
def test_all_points(seed, d, kernel, ls, m, predecessor):
    problem = make_problem(seed, 180, d, kernel(lengthscale=ls, variance=1.7), m)
    index = tree_index(problem)
    for k in (1, 7, 40):
        res = check(index, k, predecessor=predecessor)
    same_as_brute(problem, res, 40, predecessor=predecessor)


@pytest.mark.parametrize("d,kernel,ls,m", CASES, ids=CASE_IDS)
def test_query_indices_and_new_locations(seed, d, kernel, ls, m):
    problem = make_problem(seed, 150, d, kernel(lengthscale=ls), m)
    index = tree_index(problem, leaf_size=6, tile_size=4)
    rng = np.random.default_rng(seed + 10)
    queries = rng.integers(0, 150, 40)  # with repeats
    check(index, 9, queries=queries)
    res = check(index, 9, queries=queries, predecessor=True)
    small = queries < 9
    assert np.all((res.indices[small] >= 0).sum(axis=1) == queries[small])
    xnew = rng.random((30, d))
    xnew[:3] = problem.coords[:3]  # new locations on top of data points
    check(index, 11, query_coords=xnew)
    check(index, 150, query_coords=xnew)  # every point


@pytest.mark.parametrize("leaf_size,tile_size", [(1, 1), (2, 3), (5, 64), (64, 7), (400, 4), (16, 16)])
def test_leaf_and_tile_sizes(leaf_size, tile_size):
    problem = make_problem(11, 220, 2, rg.Matern32(lengthscale=0.08), 20, duplicates=15)
    index = tree_index(problem, leaf_size, tile_size)
    check(index, 6)
    check(index, 6, predecessor=True)
    check(index, 6, queries=np.array([219, 0, 5, 5, 77]))


@pytest.mark.parametrize("predecessor", [False, True], ids=["plain", "pred"])
def test_k_up_to_admissible_maximum(predecessor):
    problem = make_problem(3, 60, 2, rg.Matern32(lengthscale=0.3), 10)
    index = tree_index(problem, leaf_size=4, tile_size=3)
    for k in (1, 2, 30, 58, 59):
        res = check(index, k, predecessor=predecessor)
    if predecessor:
        assert np.all((res.indices >= 0).sum(axis=1) == np.minimum(np.arange(60), 59))


@pytest.mark.parametrize("kernel", KERNEL_CLASSES, ids=lambda c: c.__name__)
def test_duplicated_points_tie_by_index(kernel):
    problem = make_problem(4, 160, 2, kernel(lengthscale=0.2), 20, duplicates=60)
    index = tree_index(problem)
    check(index, 12)
    check(index, 12, predecessor=True)


def test_many_exact_ties_force_retries(monkeypatch):
    x = np.random.default_rng(5).random((120, 2))
    x[40:90] = x[40]
    problem = rg.ResidualProblem(x, kernel=rg.Matern52(lengthscale=0.3), inducing=15)
    index = tree_index(problem)
    res = check(index, 10)
    assert res.telemetry.recertified_queries > 0
    monkeypatch.setattr(search, "CANDIDATE_SLOTS", 64)  # retries go a few queries at a time
    check(index, 10, predecessor=True)


def test_minimal_keep_and_small_chunks(monkeypatch):
    """keep == k (no slack) and chunks of a few queries: thresholds and groups still exact."""
    monkeypatch.setattr(search, "initial_keep", lambda k: k)
    monkeypatch.setattr(search, "QUERY_CHUNK", 7)
    problem = make_problem(7, 150, 2, rg.Matern12(lengthscale=0.1), 12, duplicates=30)
    index = tree_index(problem)
    res = check(index, 5)
    assert res.telemetry.keep == 5
    check(index, 5, predecessor=True)


def test_clustered_data(seed):
    problem = make_problem(seed, 240, 3, rg.Matern52(lengthscale=0.05), 16, clustered=True)
    index = tree_index(problem)
    check(index, 15)
    check(index, 15, predecessor=True)


def test_tiny_residual_variance():
    """The gold regime: inducing points are data points, p ~ 1e-6; bounds are vacuous, results exact."""
    x = np.random.default_rng(42).normal(size=(400, 3))
    u = x[np.sort(np.random.default_rng(0).choice(400, 200, replace=False))]
    problem = rg.ResidualProblem(x, kernel=rg.RBF(lengthscale=1.0), inducing=u)
    assert np.median(problem.p) < 1e-5
    index = tree_index(problem)
    queries = np.random.default_rng(43).integers(0, 400, 64)
    check(index, 20, queries=queries)
    res = check(index, 20, queries=queries, predecessor=True)
    same_as_brute(problem, res, 20, queries=queries, predecessor=True)


def test_factors_without_inducing_points():
    """from_factors without U: the tree summarises V itself (identity transform), still exact."""
    base = make_problem(8, 200, 2, rg.Matern32(lengthscale=0.1), 20)
    problem = rg.ResidualProblem.from_factors(base.coords, v=base.v, p=base.p, kernel=base.kernel)
    index = tree_index(problem)
    assert index.tree.transform.size == 0
    check(index, 8)
    check(index, 8, predecessor=True)


def test_pruning_happens_and_stays_exact():
    """n = 3000: the tree evaluates well under 60% of the candidates, and equals brute force."""
    x = np.random.default_rng(12).random((3000, 2))
    problem = rg.ResidualProblem(x, kernel=rg.Matern52(lengthscale=0.03), inducing=100, seed=1)
    index = rg.ResidualIndex(problem, backend="cpu", method="tree", leaf_size=32, tile_size=32)
    res = index.query(20)
    tel = res.telemetry
    share = tel.distance_evaluations / (3000 * 2999)
    assert share < 0.6, share
    assert tel.prunes_bound > 0
    same_as_brute(problem, res, 20)
    pred = index.query(20, predecessor=True)
    assert pred.telemetry.prunes_predecessor > 0
    same_as_brute(problem, pred, 20, predecessor=True)


# -- bounds -----------------------------------------------------------------------------------
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), n=st.integers(12, 120), d=st.integers(1, 4),
       kernel=st.sampled_from(KERNEL_CLASSES), ls=st.floats(0.03, 2.0), m=st.integers(2, 30),
       ard=st.booleans(), dupes=st.integers(0, 10), leaf=st.integers(1, 16), tiny_p=st.booleans())
def test_bounds_never_below_true_rho(seed, n, d, kernel, ls, m, ard, dupes, leaf, tiny_p):
    """U(query, node) >= |rho(query, j)| for every point j of every node (dataset and new queries)."""
    problem, rng = bound_test_problem(seed, n, d, kernel, ls, m, ard, dupes, tiny_p)
    if problem is None:  # K(U, U) not positive definite (duplicated inducing points)
        return
    # float32 leaves: the bound products run in float32 in the traversal, float64 here unless fast
    index = rg.ResidualIndex(problem, backend="cpu", method="tree", leaf_size=leaf, tile_size=3,
                             precision="float32")
    tree = index.tree
    xq = np.concatenate([problem.coords, rng.random((5, d)) * 1.4 - 0.2])
    _, vq, pq = problem.factors_at(xq)
    rho = np.abs(residual_rho_block(xq, vq, pq, problem.coords, problem.v, problem.p, problem.kernel))
    for fast in (False, True):
        bound = index._searcher.node_bounds(xq, vq, pq, fast=fast)
        for nd in range(tree.nodes):
            pts = tree.perm[tree.node_start[nd]:tree.node_end[nd]]
            true = rho[:, pts].max(axis=1)
            assert np.all(bound[:, nd] >= true), (fast, nd, np.min(bound[:, nd] - true))


def test_tree_layout_invariants():
    problem = make_problem(2, 500, 3, rg.Matern52(lengthscale=0.1), 30, duplicates=20)
    tree = build_tree(problem, leaf_size=10)
    tree.validate(n=500, d=3, m=30)
    # every point is in exactly one leaf; leaves index-sorted; boxes contain their points
    leaves = np.flatnonzero(tree.node_left < 0)
    covered = np.concatenate([tree.perm[tree.node_start[nd]:tree.node_end[nd]] for nd in leaves])
    assert np.array_equal(np.sort(np.concatenate([covered, tree.dense])), np.arange(500))
    for nd in range(tree.nodes):
        pts = tree.perm[tree.node_start[nd]:tree.node_end[nd]]
        assert tree.node_min[nd] == pts.min()
        assert np.all(problem.coords[pts] >= tree.node_lo[nd]) and np.all(problem.coords[pts] <= tree.node_hi[nd])
        if tree.node_left[nd] < 0:
            assert pts.size <= 10 and np.all(np.diff(pts) > 0)
        else:
            a, b = tree.node_left[nd], tree.node_right[nd]
            assert a == nd + 1 and tree.node_start[a] == tree.node_start[nd] and tree.node_end[b] == tree.node_end[nd]
    assert np.all(np.diff(tree.root_lo) > 0)


def test_hilbert_keys_walk_adjacent_cells():
    for d, bits in [(1, 5), (2, 4), (3, 3), (5, 2)]:
        g = np.stack(np.meshgrid(*[np.arange(2**bits)] * d, indexing="ij"), -1).reshape(-1, d) + 0.5
        keys = hilbert_keys(g, np.zeros(d), np.full(d, 2.0**bits), bits=bits)
        assert np.array_equal(np.sort(keys), np.arange(2 ** (bits * d)))
        steps = np.abs(np.diff(g[np.argsort(keys)], axis=0)).sum(axis=1)
        assert np.all(steps == 1.0)


# -- Euclidean mode ---------------------------------------------------------------------------
@pytest.mark.parametrize("d", [1, 2, 3, 8])
def test_euclidean_equals_ckdtree(d):
    rng = np.random.default_rng(d)
    x = rng.random((700, d))
    idx, dist = euclidean_knn(x, 9, leaf_size=8, tile_size=6)
    ref_dist, ref_idx = cKDTree(x).query(x, 10)
    np.testing.assert_array_equal(idx, ref_idx[:, 1:])
    np.testing.assert_allclose(dist, ref_dist[:, 1:], rtol=0, atol=1e-12)
    xq = rng.random((50, d)) * 1.2 - 0.1
    idx, dist = euclidean_knn(x, 700, query_coords=xq)
    ref_dist, ref_idx = cKDTree(x).query(xq, 700)
    np.testing.assert_allclose(dist, ref_dist, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(idx, ref_idx)
    q = rng.integers(0, 700, 30)
    idx, dist = euclidean_knn(x, 5, queries=q)
    ref_dist, ref_idx = cKDTree(x).query(x[q], 6)
    np.testing.assert_array_equal(idx, ref_idx[:, 1:])


def test_euclidean_ties_go_to_the_smaller_index():
    rng = np.random.default_rng(3)
    x = np.round(rng.random((300, 2)) * 6) / 6  # a coarse grid: many equal distances
    idx, dist = euclidean_knn(x, 12, leaf_size=4, tile_size=5)
    d2 = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d2, np.inf)
    cols = np.broadcast_to(np.arange(300), d2.shape)
    order = np.lexsort((cols, d2), axis=1)[:, :12]
    np.testing.assert_array_equal(idx, order)
    np.testing.assert_allclose(dist, np.sqrt(np.take_along_axis(d2, order, axis=1)), rtol=0, atol=1e-15)


# -- persistence ------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["tree", "brute"])
def test_save_load_round_trip(tmp_path, method):
    problem = make_problem(5, 200, 2, rg.Matern52(lengthscale=0.1), 20)
    index = rg.ResidualIndex(problem, backend="cpu", method=method, leaf_size=8, tile_size=4)
    path = tmp_path / "index.npz"
    index.save(path)
    loaded = rg.ResidualIndex.load(path, backend="cpu")
    assert loaded.method == method and loaded.leaf_size == 8 and loaded.tile_size == 4
    xnew = np.random.default_rng(1).random((7, 2))
    for kw in ({}, {"predecessor": True}, {"query_coords": xnew}):
        a = index.query(9, **kw)
        b = loaded.query(9, **kw)
        np.testing.assert_array_equal(a.indices, b.indices)
        np.testing.assert_array_equal(a.distances, b.distances)
    if method == "tree":
        for name in ("perm", "node_lo", "node_mid", "node_rad", "transform", "dense"):
            np.testing.assert_array_equal(getattr(index.tree, name), getattr(loaded.tree, name))


def test_parity_preset_is_exact_persisted_and_validated(tmp_path):
    """The oracle's reference mode (fixed-order arithmetic) is an exact tree search too."""
    problem = make_problem(12, 400, 3, rg.Matern52(lengthscale=0.2), 24, duplicates=10)
    index = rg.ResidualIndex(problem, backend="cpu", method="tree", preset="parity")
    assert (index.preset, index.leaf_size, index.tile_size) == ("parity", 16, 32)
    default = rg.ResidualIndex(problem, backend="cpu", method="tree", leaf_size=16, tile_size=32)
    # same splits; the summaries differ only in the rounding of the transform
    np.testing.assert_array_equal(index.tree.perm, default.tree.perm)
    np.testing.assert_allclose(index.tree.node_mid, default.tree.node_mid, rtol=0, atol=1e-12)
    for predecessor in (False, True):
        res = index.query(7, predecessor=predecessor)
        assert_matches_reference(problem, res, 7, predecessor=predecessor)
        assert res.telemetry.brute_queries == 0  # the preset routes nothing to brute force
    path = tmp_path / "parity.npz"
    index.save(path)
    loaded = rg.ResidualIndex.load(path, backend="cpu")
    assert loaded.preset == "parity"
    a, b = index.query(5), loaded.query(5)
    np.testing.assert_array_equal(a.indices, b.indices)
    assert a.telemetry.block_pairs == b.telemetry.block_pairs
    with pytest.raises(rg.InvalidArgumentError, match="preset='parity'.*method='tree'"):
        rg.ResidualIndex(problem, backend="cpu", method="brute", preset="parity")
    with pytest.raises(rg.InvalidArgumentError, match="preset must be one of.*'fast'"):
        rg.ResidualIndex(problem, backend="cpu", method="tree", preset="fast")


# -- float32 leaf blocks ------------------------------------------------------------------------
@pytest.mark.parametrize("kernel", KERNEL_CLASSES, ids=lambda c: c.__name__)
def test_float32_leaf_values_within_their_margin(kernel):
    """The leaf blocks' float32 values differ from the exact |rho| by less than the margin
    certification and pruning use for them (rows routed to float64 brute force excepted)."""
    from residual_gpu.backends.cpu import _dense_tile
    from residual_gpu.precision import FLOAT32_MAX_MARGIN

    problem = make_problem(21, 500, 2, kernel(lengthscale=0.15), 40)  # kmeans++: tiny p among the data
    index = rg.ResidualIndex(problem, backend="cpu", method="tree", leaf_size=8, precision="float32")
    searcher = index._searcher
    assert searcher.leaf_precision == "float32"
    batch = index._batch(None, None, False)
    routed = (batch.p < index.tree.dense_cut) | (searcher._float32_margins(batch.v_norms, batch.p) > FLOAT32_MAX_MARGIN)
    assert 0 < routed.sum() < problem.n // 4
    margin = searcher.margins(batch, routed)
    cols = index.tree.perm  # the candidates of the leaf blocks
    g = batch.v.astype(np.float32) @ problem.v[cols].astype(np.float32).T
    ip = 1.0 / np.sqrt(problem.p)
    fast = _dense_tile(problem.kernel.kernel_id, problem.kernel.variance, batch.coords, 1.0 / problem.lengthscales,
                       1.0 / np.sqrt(batch.p), np.ascontiguousarray(problem.coords[cols].T), ip[cols], g)
    exact = np.abs(residual_rho_block(batch.coords, batch.v, batch.p, problem.coords[cols], problem.v[cols],
                                      problem.p[cols], problem.kernel))
    err = np.abs(fast - exact)[~routed]
    assert np.all(err <= margin[~routed, None]), np.max(err / margin[~routed, None])
    assert np.max(err) > 1e-9  # float32 rounding is really there
    assert np.median(margin[~routed]) < 5e-3  # and the margin is useful, not vacuous


@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_leaf_precisions_are_exact(precision):
    problem = make_problem(22, 700, 3, rg.Matern52(lengthscale=0.2), 30, duplicates=20)
    index = rg.ResidualIndex(problem, backend="cpu", method="tree", leaf_size=8, tile_size=16,
                             precision=precision)
    xnew = np.random.default_rng(3).random((9, 3))
    for kw in ({}, {"predecessor": True}, {"query_coords": xnew}):
        res = index.query(12, **kw)
        assert res.telemetry.leaf_precision == precision
        assert_matches_reference(problem, res, 12, **kw)


def test_leaf_precision_auto_and_validation(tmp_path):
    moderate = make_problem(23, 500, 2, rg.Matern32(lengthscale=0.1), 20)
    index = rg.ResidualIndex(moderate, backend="cpu", method="tree")
    assert index._searcher.leaf_precision == index.precision == "float32" and "float32" in index.precision_reason
    x = np.random.default_rng(4).normal(size=(400, 3))
    tiny = rg.ResidualProblem(x, kernel=rg.RBF(lengthscale=1.0), inducing=x[::2].copy())  # gold-like: tiny p
    assert rg.ResidualIndex(tiny, backend="cpu", method="tree")._searcher.leaf_precision == "float64"
    assert rg.ResidualIndex(moderate, backend="cpu", method="tree", preset="parity")._searcher.leaf_precision == "float64"
    with pytest.raises(rg.InvalidArgumentError, match="precision must be one of.*'half'"):
        rg.ResidualIndex(moderate, backend="cpu", method="tree", precision="half")
    with pytest.raises(rg.InvalidArgumentError, match="float64 values only.*precision='float32'"):
        rg.ResidualIndex(moderate, backend="cpu", method="tree", preset="parity", precision="float32")
    index = rg.ResidualIndex(moderate, backend="cpu", method="tree", precision="float64")
    index.save(tmp_path / "f64.npz")
    assert rg.ResidualIndex.load(tmp_path / "f64.npz", backend="cpu")._searcher.leaf_precision == "float64"
    # the deprecated name still works, with a warning; a saved file from before (leaf_precision) still loads
    with pytest.warns(DeprecationWarning, match="leaf_precision is deprecated"):
        old = rg.ResidualIndex(moderate, backend="cpu", method="tree", leaf_precision="float64")
    assert old.precision == "float64"
    with np.load(tmp_path / "f64.npz", allow_pickle=False) as npz:
        data = {name: npz[name] for name in npz.files}
    data["leaf_precision"] = data.pop("precision")
    data["digest"] = np.asarray(arrays_digest({k: v for k, v in data.items()
                                               if k not in ("format", "format_version", "digest")}))
    with open(tmp_path / "legacy.npz", "wb") as fh:
        np.savez(fh, **data)
    assert rg.ResidualIndex.load(tmp_path / "legacy.npz", backend="cpu").precision == "float64"


def _rewrite(src, dst, **changes):
    with np.load(src, allow_pickle=False) as npz:
        data = {name: npz[name] for name in npz.files}
    data.update(changes)
    with open(dst, "wb") as fh:
        np.savez(fh, **data)


def test_corrupted_and_mismatched_files_raise(tmp_path):
    problem = make_problem(6, 150, 2, rg.Matern32(lengthscale=0.1), 15)
    index = rg.ResidualIndex(problem, backend="cpu", method="tree", leaf_size=8)
    good = tmp_path / "good.npz"
    index.save(good)
    raw = good.read_bytes()
    # flipped bytes in the middle of the data, a truncated file, and not a zip at all
    flipped = bytearray(raw)
    for off in range(len(raw) // 3, len(raw) // 3 + 64):
        flipped[off] ^= 0xFF
    cases = {"flipped.npz": bytes(flipped), "truncated.npz": raw[: len(raw) // 2], "garbage.npz": b"not an index"}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(rg.IndexFormatError):
            rg.ResidualIndex.load(tmp_path / name)
    # well-formed files with the wrong version, the wrong format id, or edited arrays
    _rewrite(good, tmp_path / "v99.npz", format_version=np.asarray(99))
    _rewrite(good, tmp_path / "fmt.npz", format=np.asarray("something.else"))
    perm = np.load(good)["tree_perm"].copy()
    perm[[0, 1]] = perm[[1, 0]]
    _rewrite(good, tmp_path / "edited.npz", tree_perm=perm)
    for name in ("v99.npz", "fmt.npz", "edited.npz"):
        with pytest.raises(rg.IndexFormatError):
            rg.ResidualIndex.load(tmp_path / name)
    # a consistent digest does not make a broken tree acceptable
    from residual_gpu.tree import arrays_digest

    with np.load(good) as npz:
        data = {name: npz[name] for name in npz.files}
    data["tree_node_left"] = data["tree_node_left"].copy()
    data["tree_node_left"][0] = 10**6
    body = {k: v for k, v in data.items() if k not in ("format", "format_version", "digest")}
    data["digest"] = np.asarray(arrays_digest(body))
    with open(tmp_path / "badtree.npz", "wb") as fh:
        np.savez(fh, **data)
    with pytest.raises(rg.IndexFormatError):
        rg.ResidualIndex.load(tmp_path / "badtree.npz")
    with pytest.raises(FileNotFoundError):
        rg.ResidualIndex.load(tmp_path / "missing.npz")
    assert zipfile.is_zipfile(good)  # plain .npz, readable without pickle


# -- telemetry ----------------------------------------------------------------------------------
def test_telemetry_is_consistent_and_written_as_jsonl(tmp_path):
    x = np.random.default_rng(9).random((900, 2))
    u = x[:30]  # inducing points that are data points: tiny p, dense set and brute-routed queries
    problem = rg.ResidualProblem(x, kernel=rg.Matern52(lengthscale=0.05), inducing=u)
    index = tree_index(problem, leaf_size=16, tile_size=8)
    path = tmp_path / "tel.jsonl"
    for predecessor in (False, True):
        tel = index.query(10, predecessor=predecessor, telemetry_path=path).telemetry
        assert tel.method == "tree" and tel.queries == 900
        assert tel.distance_evaluations == tel.block_pairs + tel.brute_evaluations
        assert tel.brute_queries > 0 and tel.tree_queries + tel.brute_queries >= 900
        assert tel.dense_points >= 30 and tel.dense_pairs > 0
        assert tel.bound_products == 2 * tel.bound_evaluations
        assert tel.blocks >= tel.leaves_evaluated > 0
        # the leaf filter (on by default) screened pairs, dropped some, passed the rest to block_pairs
        assert tel.filter_pairs >= tel.filter_drops and tel.filter_products > 0
        assert 0 < tel.block_pairs_max <= tel.block_pairs
        assert tel.yields <= tel.rounds and tel.frontier_max <= tel.frontier_sum
        assert tel.prunes_bound > 0
        assert (tel.prunes_predecessor > 0) == predecessor
        assert tel.nodes_visited > 0 and tel.tree_nodes == index.tree.nodes
        assert {"select", "certify", "query", "tree_traverse"} <= set(tel.seconds)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert row["schema"] == SCHEMA and row["schema_version"] == SCHEMA_VERSION
        assert row["distance_evaluations"] == row["block_pairs"] + row["brute_evaluations"]
    brute = rg.ResidualIndex(problem, backend="cpu", method="brute").query(10, telemetry_path=path).telemetry
    assert brute.blocks == 0 and brute.bound_evaluations == 0
    assert json.loads(path.read_text().splitlines()[-1])["method"] == "brute"


# -- method selection ---------------------------------------------------------------------------
def test_auto_picks_brute_force_when_bounds_are_vacuous():
    """The gold regime (inducing points among the data, p ~ 1e-6): auto chooses brute force."""
    n = 4096
    x = np.random.default_rng(42).normal(size=(n, 3))
    u = x[np.sort(np.random.default_rng(0).choice(n, 256, replace=False))]
    problem = rg.ResidualProblem(x, kernel=rg.RBF(lengthscale=1.0), inducing=u)
    index = rg.ResidualIndex(problem, backend="cpu")
    assert index.method == "brute" and index.tree is None
    est = index.auto_estimate
    assert "brute" in index.auto_reason
    assert est["precheck_work_share"] >= 0.9 or est["work_share"] >= rg.index.AUTO_MAX_SHARE[index.precision]


def test_auto_picks_the_tree_where_it_prunes():
    x = np.random.default_rng(1).random((6000, 2))
    problem = rg.ResidualProblem(x, kernel=rg.Matern52(lengthscale=0.02), inducing=64, seed=0)
    index = rg.ResidualIndex(problem, backend="cpu", method="auto")
    assert index.method == "tree", index.auto_reason
    res = index.query(10, queries=np.arange(0, 6000, 50), predecessor=True)
    same_as_brute(problem, res, 10, queries=np.arange(0, 6000, 50), predecessor=True)


def test_auto_answers_small_queries_by_brute_force_without_estimating():
    """The gold regime with 64 queries: deciding would cost more than brute force for them, so
    auto answers by brute force, estimates nothing and builds no tree; reading index.method then
    decides as for all points."""
    n = 4096
    x = np.random.default_rng(42).normal(size=(n, 3))
    u = x[np.sort(np.random.default_rng(0).choice(n, 256, replace=False))]
    problem = rg.ResidualProblem(x, kernel=rg.RBF(lengthscale=1.0), inducing=u)
    index = rg.ResidualIndex(problem, backend="cpu")
    queries = np.arange(0, n, 64)
    assert index.method_for(queries=queries) == "brute"
    res = index.query(20, queries=queries)
    assert res.telemetry.method == "brute" and index.tree is None
    assert "auto_estimate" not in index.build_seconds_by_phase and "undecided" in index.auto_reason
    assert "undecided" in repr(index)
    same_as_brute(problem, res, 20, queries=queries)
    assert index.method == "brute" and "auto_estimate" in index.build_seconds_by_phase


def test_auto_decides_at_the_first_query_large_enough(monkeypatch):
    import residual_gpu.index as index_module

    monkeypatch.setattr(index_module, "AUTO_BUILD_PAIRS", 100)  # 10 x 100 x 6000 pairs suffice
    x = np.random.default_rng(1).random((6000, 2))
    problem = rg.ResidualProblem(x, kernel=rg.Matern52(lengthscale=0.02), inducing=64, seed=0)
    index = rg.ResidualIndex(problem, backend="cpu", method="auto")
    few = np.arange(0, 6000, 300)
    small = index.query(10, queries=few)
    assert small.telemetry.method == "brute" and index.tree is None
    full = index.query(10, predecessor=True)
    assert full.telemetry.method == "tree" and index.method == "tree" and index.tree is not None
    assert index.build_seconds >= index.build_seconds_by_phase["auto_estimate"] > 0
    same_as_brute(problem, full, 10, predecessor=True)
    again = index.query(10, queries=few)  # decided: every query now uses the tree
    assert again.telemetry.method == "tree"
    assert np.array_equal(again.indices, small.indices) and np.array_equal(again.distances, small.distances)


def test_auto_decides_once_many_small_queries_add_up(monkeypatch):
    """Batches (a sharded or chunked search) count together: the call that brings the pairs queried
    while undecided to the threshold decides; asking (method_for) counts nothing."""
    import residual_gpu.index as index_module

    monkeypatch.setattr(index_module, "AUTO_BUILD_PAIRS", 10)  # decide at 10 x 10 x 6000 = 6e5 pairs
    x = np.random.default_rng(1).random((6000, 2))
    problem = rg.ResidualProblem(x, kernel=rg.Matern52(lengthscale=0.02), inducing=64, seed=0)
    index = rg.ResidualIndex(problem, backend="cpu", method="auto")
    batch = np.arange(0, 6000, 150)  # 40 queries: 2.4e5 pairs
    for _ in range(3):
        assert index.method_for(queries=batch) == "brute"
    first, second = index.query(10, queries=batch), index.query(10, queries=batch + 1)
    assert first.telemetry.method == second.telemetry.method == "brute" and index.tree is None
    third = index.query(10, queries=batch + 2)  # 7.2e5 pairs in all: decides
    assert third.telemetry.method == "tree" and index.tree is not None
    same_as_brute(problem, third, 10, queries=batch + 2)


def test_auto_expect_counts_pairs_before_the_queries_come(monkeypatch):
    """expect(pairs): the queries a caller is about to send in small calls count at once, so the
    first of them already uses the decided method; fewer pairs than the threshold stay undecided."""
    import residual_gpu.index as index_module

    monkeypatch.setattr(index_module, "AUTO_BUILD_PAIRS", 10)  # decide at 10 x 10 x 6000 = 6e5 pairs
    x = np.random.default_rng(1).random((6000, 2))
    problem = rg.ResidualProblem(x, kernel=rg.Matern52(lengthscale=0.02), inducing=64, seed=0)
    index = rg.ResidualIndex(problem, backend="cpu", method="auto")
    assert index.expect(100_000) == "brute" and index.tree is None
    assert index.expect(600_000) == "tree" and index.tree is not None
    batch = np.arange(0, 6000, 150)
    res = index.query(10, queries=batch)
    assert res.telemetry.method == "tree"
    same_as_brute(problem, res, 10, queries=batch)
    with pytest.raises(rg.InvalidArgumentError, match=r"pairs must be in \[0, .*\], got pairs=-1"):
        index.expect(-1)
    assert rg.ResidualIndex(problem, backend="cpu", method="brute").expect(10**12) == "brute"


def test_auto_small_problems_use_brute_force_and_bad_methods_are_rejected():
    problem = make_problem(0, 100, 2, rg.Matern52(lengthscale=0.1), 10)
    assert rg.ResidualIndex(problem, backend="cpu").method == "brute"
    with pytest.raises(rg.InvalidArgumentError):
        rg.ResidualIndex(problem, method="kdtree")
    with pytest.raises(rg.InvalidArgumentError):
        rg.ResidualIndex(problem, method="tree", leaf_size=0)


def test_index_with_kernel_reuses_the_tree_layout_and_answers_as_a_fresh_index():
    """index.with_kernel: the old tree's kd layout where the dense set is unchanged (a new
    variance scales every p alike), a fresh split where it moved (new lengthscales move p near
    the inducing points across the cut), and in both cases a fresh index's answers."""
    from residual_gpu.tree import LAYOUT_FIELDS

    x = np.random.default_rng(4).random((3000, 2))
    problem = rg.ResidualProblem(x, kernel=rg.Matern32(lengthscale=0.05), inducing=64, seed=1)
    index = rg.ResidualIndex(problem, backend="cpu", method="tree", leaf_size=16)
    xnew = np.random.default_rng(5).random((40, 2))
    for kernel, reused in ((rg.Matern32(lengthscale=0.05, variance=2.5), True),
                           (rg.Matern32(lengthscale=np.array([0.06, 0.08])), False)):
        new = index.with_kernel(kernel)
        fresh = rg.ResidualIndex(problem.with_kernel(kernel), backend="cpu", method="tree", leaf_size=16)
        assert new.method == "tree" and new.leaf_size == 16
        assert np.array_equal(new.tree.dense, index.tree.dense) == reused
        assert all((getattr(new.tree, name) is getattr(index.tree, name)) == reused for name in LAYOUT_FIELDS)
        assert not np.array_equal(new.tree.node_ymax, index.tree.node_ymax)  # the new kernel's summaries
        for kind in ({"predecessor": True}, {"queries": np.arange(0, 3000, 37)}, {"query_coords": xnew}):
            a, b = new.query(12, **kind), fresh.query(12, **kind)
            assert np.array_equal(a.indices, b.indices) and np.array_equal(a.distances, b.distances)
        same_as_brute(new.problem, new.query(12, predecessor=True), 12, predecessor=True)
    brute = rg.ResidualIndex(problem, backend="cpu", method="brute").with_kernel(kernel)
    assert brute.method == "brute" and brute.tree is None
