"""TraversalFlags: the traversal's scheduling choices change the work, never the answers.

The flags off (the defaults) include the leaf filter at FILTER_RANK, so filter_rank=0 is the
filter off and filter_rank=1 another rank than each leaf's default pick.

Each flag on gives indices and distances bitwise those of the flags off, on the randomised corpus
(kernels, d in {1, 2, 3, 8}, ARD, duplicates, clustered data, tiny p), for every query kind and
both precisions of the fast pass."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import CASE_IDS, CASES, make_problem

import residual_gpu as rg

FLAGS = [rg.TraversalFlags(order="bound"), rg.TraversalFlags(schedule="blocks"), rg.TraversalFlags(filter_rank=0),
         rg.TraversalFlags(filter_rank=1)]


@pytest.mark.parametrize("flags", FLAGS, ids=repr)
@pytest.mark.parametrize("precision", ["float64", "float32"])
@pytest.mark.parametrize("d,kernel,ls,m", CASES, ids=CASE_IDS)
def test_flags_keep_the_answers_bitwise(flags, precision, d, kernel, ls, m):
    problem = make_problem(d, 700, d, kernel(lengthscale=ls), m, duplicates=15, clustered=d == 2)
    base = rg.ResidualIndex(problem, backend="cpu", method="tree", leaf_size=16, tile_size=32, precision=precision)
    flagged = rg.ResidualIndex(problem, backend="cpu", method="tree", leaf_size=16, tile_size=32,
                               precision=precision, traversal=flags)
    rng = np.random.default_rng(d)
    ids = rng.choice(problem.n, 60, replace=False)
    xq = rng.random((25, d))
    runs = [{"predecessor": True}, {"queries": ids}, {"query_coords": xq}]
    for kw in runs:
        want, got = base.query(9, **kw), flagged.query(9, **kw)
        np.testing.assert_array_equal(got.indices, want.indices)
        assert np.array_equal(got.distances, want.distances), f"distances differ in their bits ({kw})"
    assert flagged.traversal == flags


@pytest.mark.parametrize("flags", FLAGS, ids=repr)
def test_each_flag_reaches_the_traversal(flags):
    """Where the bounds prune (2-D, a short lengthscale), a flag changes the work done."""
    problem = make_problem(3, 3000, 2, rg.Matern32(lengthscale=0.03), 40)
    base = rg.ResidualIndex(problem, backend="cpu", method="tree", leaf_size=16)
    flagged = rg.ResidualIndex(problem, backend="cpu", method="tree", leaf_size=16, traversal=flags)
    want, got = base.query(10, predecessor=True), flagged.query(10, predecessor=True)
    np.testing.assert_array_equal(got.indices, want.indices)
    assert got.telemetry.block_pairs != want.telemetry.block_pairs


def test_flags_validation_and_with_kernel():
    problem = make_problem(0, 200, 2, rg.Matern32(lengthscale=0.1), 12)
    with pytest.raises(rg.InvalidArgumentError, match=r"TraversalFlags.order must be 'box' or 'bound', got order='depth'"):
        rg.TraversalFlags(order="depth")
    with pytest.raises(rg.InvalidTypeError, match=r"traversal must be a residual_gpu.TraversalFlags"):
        rg.ResidualIndex(problem, method="tree", traversal={"order": "bound"})
    with pytest.raises(rg.InvalidArgumentError, match=r"preset='parity' fixes the traversal"):
        rg.ResidualIndex(problem, method="tree", preset="parity", traversal=rg.TraversalFlags(order="bound"))
    index = rg.ResidualIndex(problem, method="tree", traversal=rg.TraversalFlags(order="bound"))
    assert index.with_kernel(rg.Matern32(lengthscale=0.12)).traversal == index.traversal
