"""Covariance functions (residual_gpu.kernels) against formulas written out here.

Each family is checked against the formula of DESIGN.md section 2, coded independently
of the package (explicit loops over pairs, math.exp / math.sqrt), with a scalar and a
per-dimension (ARD) lengthscale, plus a few values worked out by hand.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import residual_gpu as rg
from residual_gpu.errors import InvalidArgumentError, InvalidTypeError
from residual_gpu.kernels import KERNEL_IDS, KERNELS, make_kernel

SQRT3 = math.sqrt(3.0)
SQRT5 = math.sqrt(5.0)


def g_direct(name: str, r: float) -> float:
    """The correlation g(r) of DESIGN.md section 2, as a function of r (not r^2)."""
    if name == "rbf":
        return math.exp(-0.5 * r * r)
    if name == "matern12":
        return math.exp(-r)
    if name == "matern32":
        return (1.0 + SQRT3 * r) * math.exp(-SQRT3 * r)
    if name == "matern52":
        return (1.0 + SQRT5 * r + 5.0 * r * r / 3.0) * math.exp(-SQRT5 * r)
    raise AssertionError(name)


def k_direct(name: str, x1, x2, lengthscale, variance: float) -> np.ndarray:
    """K(x1, x2) pair by pair: variance * g(||(x - y) / l||)."""
    x1 = np.atleast_2d(np.asarray(x1, dtype=np.float64))
    x2 = np.atleast_2d(np.asarray(x2, dtype=np.float64))
    ls = np.broadcast_to(np.asarray(lengthscale, dtype=np.float64), (x1.shape[1],))
    out = np.empty((x1.shape[0], x2.shape[0]))
    for i in range(x1.shape[0]):
        for j in range(x2.shape[0]):
            r = math.sqrt(sum(((x1[i, t] - x2[j, t]) / ls[t]) ** 2 for t in range(x1.shape[1])))
            out[i, j] = variance * g_direct(name, r)
    return out


CLASSES = {"rbf": rg.RBF, "matern12": rg.Matern12, "matern32": rg.Matern32, "matern52": rg.Matern52}
NAMES = sorted(CLASSES)


def test_registry_lists_the_four_families():
    assert set(KERNELS) == set(NAMES)
    assert set(KERNEL_IDS) == set(NAMES)
    assert sorted(KERNEL_IDS.values()) == [0, 1, 2, 3]
    for name, cls in CLASSES.items():
        assert KERNELS[name] is cls
        assert cls.name == name
        assert cls(0.5).kernel_id == KERNEL_IDS[name]


# --------------------------------------------------------------------------------------
# Values against the direct formula
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("lengthscale", [0.05, 0.3, 1.0, 2.7])
def test_scalar_lengthscale_matches_direct_formula(name, lengthscale):
    rng = np.random.default_rng(7)
    x1 = rng.random((13, 3))
    x2 = rng.random((9, 3))
    kern = CLASSES[name](lengthscale=lengthscale, variance=1.7)
    got = kern(x1, x2)
    assert got.shape == (13, 9)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, k_direct(name, x1, x2, lengthscale, 1.7), rtol=1e-13, atol=1e-300)


@pytest.mark.parametrize("name", NAMES)
def test_ard_lengthscale_matches_direct_formula(name):
    rng = np.random.default_rng(8)
    ls = np.array([0.1, 0.7, 2.0])
    x1 = rng.random((11, 3))
    x2 = rng.random((6, 3))
    kern = CLASSES[name](lengthscale=ls, variance=0.4)
    np.testing.assert_allclose(kern(x1, x2), k_direct(name, x1, x2, ls, 0.4), rtol=1e-13, atol=1e-300)


@pytest.mark.parametrize("name", NAMES)
def test_ard_lengthscale_is_not_a_scalar_in_disguise(name):
    """Stretching one axis only changes the covariance along that axis."""
    kern = CLASSES[name](lengthscale=[1.0, 100.0])
    along_0 = kern(np.array([[0.0, 0.0]]), np.array([[0.5, 0.0]]))[0, 0]
    along_1 = kern(np.array([[0.0, 0.0]]), np.array([[0.0, 0.5]]))[0, 0]
    assert along_0 == pytest.approx(g_direct(name, 0.5), rel=1e-14)
    assert along_1 == pytest.approx(g_direct(name, 0.005), rel=1e-14)
    assert along_1 > along_0


@pytest.mark.parametrize("name", NAMES)
def test_ard_with_equal_entries_equals_scalar(name):
    rng = np.random.default_rng(9)
    x = rng.random((10, 2))
    a = CLASSES[name](lengthscale=0.4, variance=2.0)(x)
    b = CLASSES[name](lengthscale=[0.4, 0.4], variance=2.0)(x)
    np.testing.assert_allclose(a, b, rtol=1e-15, atol=0)


def test_hand_computed_values():
    # RBF, l = 1, s2 = 2, |x - y| = 5: 2 exp(-25/2)
    assert rg.RBF(1.0, 2.0)([[0.0, 0.0]], [[3.0, 4.0]])[0, 0] == pytest.approx(7.453306344157342e-06, rel=1e-14)
    # Matern 1/2, l = 2, |x - y| = 5: exp(-2.5)
    assert rg.Matern12(2.0)([[0.0, 0.0]], [[3.0, 4.0]])[0, 0] == pytest.approx(0.0820849986238988, rel=1e-14)
    # Matern 3/2 at r = 1: (1 + sqrt3) exp(-sqrt3)
    assert rg.Matern32(0.5)([[1.0]], [[1.5]])[0, 0] == pytest.approx(0.4833577245965077, rel=1e-14)
    # Matern 5/2 at r = 1: (1 + sqrt5 + 5/3) exp(-sqrt5)
    assert rg.Matern52(3.0)([[0.0, 0.0, 0.0]], [[0.0, 3.0, 0.0]])[0, 0] == pytest.approx(0.5239941088318203, rel=1e-14)
    # ARD RBF, l = (0.5, 4), x - y = (1, 2): r^2 = 4 + 1/4 = 4.25, exp(-2.125)
    assert rg.RBF([0.5, 4.0])([[0.0, 0.0]], [[1.0, 2.0]])[0, 0] == pytest.approx(0.11943296826671962, rel=1e-14)
    # ARD Matern 5/2 with s2 = 0.5 at r^2 = 4.25
    r = math.sqrt(4.25)
    expected = 0.5 * (1 + SQRT5 * r + 5 * 4.25 / 3) * math.exp(-SQRT5 * r)
    assert expected == pytest.approx(0.06317412777556887, rel=1e-15)
    assert rg.Matern52([0.5, 4.0], 0.5)([[0.0, 0.0]], [[1.0, 2.0]])[0, 0] == pytest.approx(expected, rel=1e-14)


@pytest.mark.parametrize("name", NAMES)
def test_correlation_function_of_r2(name):
    kern = CLASSES[name](0.5)
    assert kern.correlation(0.0) == 1.0
    r = np.array([0.0, 1e-8, 0.1, 1.0, 3.0, 40.0])
    np.testing.assert_allclose(kern.correlation(r * r), [g_direct(name, v) for v in r], rtol=1e-14, atol=1e-300)
    # monotone decreasing in r, and in [0, 1]
    vals = kern.correlation(np.linspace(0, 25, 200))
    assert np.all(np.diff(vals) < 0)
    assert np.all((vals >= 0) & (vals <= 1))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("lengthscale", [0.2, [0.2, 1.5, 0.05]])
def test_gram_matrix_symmetric_with_variance_on_the_diagonal(name, lengthscale):
    rng = np.random.default_rng(10)
    x = rng.normal(size=(25, 3))
    kern = CLASSES[name](lengthscale=lengthscale, variance=3.25)
    gram = kern(x)
    assert gram.shape == (25, 25)
    np.testing.assert_array_equal(gram, gram.T)
    np.testing.assert_array_equal(np.diag(gram), np.full(25, 3.25))
    np.testing.assert_array_equal(kern.diag(25), np.full(25, 3.25))
    assert np.all(gram <= 3.25) and np.all(gram >= 0)
    # K(x) and K(x, x) agree
    np.testing.assert_array_equal(kern(x, x), gram)
    # positive semi-definite up to rounding
    assert np.linalg.eigvalsh(gram).min() > -1e-10 * 3.25 * 25


def test_one_dimensional_coordinates_are_one_column():
    x = np.linspace(0, 1, 7)
    kern = rg.Matern32(0.3)
    np.testing.assert_array_equal(kern(x), kern(x[:, None]))
    np.testing.assert_allclose(kern(x), k_direct("matern32", x[:, None], x[:, None], 0.3, 1.0), rtol=1e-14)


def test_kernel_does_not_modify_its_inputs():
    rng = np.random.default_rng(11)
    x1 = rng.random((5, 2))
    x2 = rng.random((4, 2))
    c1, c2 = x1.copy(), x2.copy()
    ls = np.array([0.3, 0.6])
    ls_copy = ls.copy()
    kern = rg.RBF(ls)
    kern(x1, x2)
    np.testing.assert_array_equal(x1, c1)
    np.testing.assert_array_equal(x2, c2)
    np.testing.assert_array_equal(ls, ls_copy)
    assert ls.flags.writeable  # the kernel froze its own copy, not the caller's array
    ls[0] = 99.0
    assert kern.lengthscale[0] == 0.3


def test_lengthscales_helper():
    assert np.array_equal(rg.RBF(0.5).lengthscales(3), [0.5, 0.5, 0.5])
    ard = rg.RBF([0.5, 2.0])
    out = ard.lengthscales(2)
    assert np.array_equal(out, [0.5, 2.0])
    out[0] = 7.0  # a copy
    assert ard.lengthscales(2)[0] == 0.5


def test_equality_and_repr():
    assert rg.RBF(0.5, 2.0) == rg.RBF(0.5, 2.0)
    assert rg.RBF(0.5, 2.0) != rg.RBF(0.5, 1.0)
    assert rg.RBF(0.5) != rg.Matern12(0.5)
    assert rg.RBF([0.5, 1.0]) == rg.RBF(np.array([0.5, 1.0]))
    assert "Matern52" in repr(rg.Matern52(0.25)) and "0.25" in repr(rg.Matern52(0.25))


# --------------------------------------------------------------------------------------
# make_kernel
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_make_kernel_by_name(name):
    kern = make_kernel(name, lengthscale=0.3, variance=2.0)
    assert type(kern) is CLASSES[name]
    assert kern.lengthscale == 0.3 and kern.variance == 2.0
    assert make_kernel(name) == CLASSES[name](1.0, 1.0)


@pytest.mark.parametrize("spelling,cls", [("RBF", rg.RBF), ("Matern-52", rg.Matern52), ("matern_32", rg.Matern32),
                                          ("MATERN12", rg.Matern12)])
def test_make_kernel_spellings(spelling, cls):
    assert type(make_kernel(spelling)) is cls


def test_make_kernel_ard_and_instance():
    kern = make_kernel("matern52", lengthscale=np.array([0.2, 0.4]))
    assert np.array_equal(kern.lengthscale, [0.2, 0.4])
    inst = rg.RBF(0.7)
    assert make_kernel(inst) is inst
    with pytest.raises(InvalidArgumentError):
        make_kernel(inst, lengthscale=0.3)
    with pytest.raises(InvalidArgumentError):
        make_kernel(inst, variance=2.0)


def test_make_kernel_rejects_unknown_names_and_types():
    with pytest.raises(InvalidArgumentError, match=r"kernel.*'gaussianish'"):
        make_kernel("gaussianish")
    with pytest.raises(InvalidTypeError, match="kernel"):
        make_kernel(3.0)
    with pytest.raises(InvalidTypeError, match="kernel"):
        make_kernel(None)
    with pytest.raises(InvalidArgumentError, match="lengthscale"):
        make_kernel("rbf", lengthscale=-1.0)


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", list(CLASSES.values()))
@pytest.mark.parametrize("bad", [0.0, -0.5, float("nan"), float("inf"), -float("inf"), 0, -3])
def test_bad_scalar_lengthscale(cls, bad):
    with pytest.raises(InvalidArgumentError) as info:
        cls(lengthscale=bad)
    assert isinstance(info.value, ValueError)
    assert "lengthscale" in str(info.value)
    assert repr(bad) in str(info.value)


@pytest.mark.parametrize("bad", [[0.5, 0.0], [0.5, -1.0], [float("nan"), 1.0], [1.0, float("inf")]])
def test_bad_ard_lengthscale_entries(bad):
    with pytest.raises(InvalidArgumentError, match="lengthscale") as info:
        rg.Matern32(lengthscale=np.array(bad))
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("bad", ["0.5", None, True, [["a", "b"]], ["x", "y"], object()])
def test_non_numeric_lengthscale_is_a_type_error(bad):
    with pytest.raises(InvalidTypeError) as info:
        rg.RBF(lengthscale=bad)
    assert isinstance(info.value, TypeError)
    assert "lengthscale" in str(info.value)


def test_two_dimensional_lengthscale_rejected():
    with pytest.raises(InvalidArgumentError, match="lengthscale"):
        rg.RBF(lengthscale=[[0.5, 1.0]])


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_variance(bad):
    with pytest.raises(InvalidArgumentError) as info:
        rg.Matern52(0.5, variance=bad)
    assert isinstance(info.value, ValueError)
    assert "variance" in str(info.value) and repr(bad) in str(info.value)


@pytest.mark.parametrize("bad", ["1.0", None, False, [1.0]])
def test_non_numeric_variance_is_a_type_error(bad):
    with pytest.raises(InvalidTypeError, match="variance") as info:
        rg.RBF(0.5, variance=bad)
    assert isinstance(info.value, TypeError)


def test_numpy_scalars_accepted():
    kern = rg.RBF(np.float32(0.5), np.int64(2))
    assert kern.lengthscale == 0.5 and kern.variance == 2.0
    assert isinstance(kern.lengthscale, float) and isinstance(kern.variance, float)


def test_zero_dimensional_array_lengthscale_accepted():
    assert rg.RBF(lengthscale=np.array(0.5)) == rg.RBF(0.5)


@pytest.mark.parametrize("ls,d", [([0.2, 0.4], 3), ([0.2, 0.4, 0.1], 2), ([0.3], 2)])
def test_ard_length_must_match_coordinate_width(ls, d):
    kern = rg.RBF(lengthscale=ls)  # fine on its own: the width is not known yet
    x = np.zeros((4, d))
    with pytest.raises(InvalidArgumentError, match="lengthscale") as info:
        kern(x)
    assert isinstance(info.value, ValueError)
    assert f"d={d}" in str(info.value)
    with pytest.raises(InvalidArgumentError, match="lengthscale"):
        kern.lengthscales(d)
    with pytest.raises(InvalidArgumentError, match="lengthscale"):
        rg.ResidualProblem(np.random.default_rng(0).random((10, d)), kernel=kern, inducing=3)


def test_call_validates_coordinates():
    kern = rg.RBF(0.5)
    with pytest.raises(InvalidArgumentError, match="x2"):
        kern(np.zeros((3, 2)), np.zeros((3, 3)))
    with pytest.raises(InvalidArgumentError, match="x1"):
        kern(np.array([[0.0, np.nan]]))
    with pytest.raises(InvalidTypeError, match="x1"):
        kern("abc")


def test_error_classes_subclass_builtins():
    assert issubclass(rg.InvalidArgumentError, ValueError)
    assert issubclass(rg.InvalidTypeError, TypeError)
    assert issubclass(rg.InvalidArgumentError, rg.ResidualGPUError)
    assert issubclass(rg.InvalidTypeError, rg.ResidualGPUError)
    assert issubclass(rg.BackendUnavailableError, RuntimeError)
