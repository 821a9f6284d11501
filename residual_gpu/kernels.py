"""Stationary covariance functions k(x, y) = variance * g(r), r = ||(x - y) / lengthscale||.

This module is the one definition of the kernel family. The numpy code here is the
float64 reference; the backends evaluate the same g through ``KERNEL_IDS`` and must
agree with it (tests check they do).
"""

from __future__ import annotations

import math

import numpy as np

from ._validation import as_float_matrix, as_float_vector, as_positive_float
from .errors import InvalidArgumentError, InvalidTypeError

SQRT3 = math.sqrt(3.0)
SQRT5 = math.sqrt(5.0)

# Integer codes the compiled backends switch on; one row per kernel family.
KERNEL_IDS = {"rbf": 0, "matern12": 1, "matern32": 2, "matern52": 3}


class Kernel:
    """Base class: a stationary kernel with a scalar or per-dimension (ARD) lengthscale."""

    name: str = ""

    def __init__(self, lengthscale=1.0, variance=1.0):
        if np.ndim(lengthscale) == 0:
            self.lengthscale = as_positive_float(lengthscale, "lengthscale")
        else:
            self.lengthscale = as_float_vector(lengthscale, "lengthscale", positive=True)
            self.lengthscale.setflags(write=False)
        self.variance = as_positive_float(variance, "variance")

    @property
    def kernel_id(self) -> int:
        return KERNEL_IDS[self.name]

    def lengthscales(self, d: int) -> np.ndarray:
        """The lengthscale as a float64 array of length d, checking an ARD vector's length."""
        if isinstance(self.lengthscale, float):
            return np.full(d, self.lengthscale)
        if self.lengthscale.shape[0] != d:
            raise InvalidArgumentError(
                f"lengthscale has {self.lengthscale.shape[0]} entries but the coordinates have d={d} "
                f"columns, got lengthscale={self.lengthscale!r}"
            )
        return self.lengthscale.copy()

    def correlation(self, r2):
        """g as a function of the squared scaled distance r^2 (so g(0) = 1)."""
        raise NotImplementedError

    def __call__(self, x1, x2=None) -> np.ndarray:
        """The covariance matrix K(x1, x2) in float64, from direct coordinate differences."""
        a = as_float_matrix(x1, "x1")
        b = a if x2 is None else as_float_matrix(x2, "x2", ncols=a.shape[1])
        scale = self.lengthscales(a.shape[1])
        r2 = np.zeros((a.shape[0], b.shape[0]))
        for t in range(a.shape[1]):
            diff = (a[:, t, None] - b[None, :, t]) / scale[t]
            r2 += diff * diff
        return self.variance * self.correlation(r2)

    def diag(self, n: int) -> np.ndarray:
        """k(x_i, x_i) for n points: the variance, for every stationary kernel."""
        return np.full(n, self.variance)

    def __repr__(self) -> str:
        ls = self.lengthscale if isinstance(self.lengthscale, float) else self.lengthscale.tolist()
        return f"{type(self).__name__}(lengthscale={ls!r}, variance={self.variance!r})"

    def __eq__(self, other) -> bool:
        return (
            type(self) is type(other)
            and self.variance == other.variance
            and np.array_equal(np.asarray(self.lengthscale), np.asarray(other.lengthscale))
        )

    __hash__ = None


class RBF(Kernel):
    """Squared exponential: g = exp(-r^2 / 2)."""

    name = "rbf"

    def correlation(self, r2):
        return np.exp(-0.5 * np.asarray(r2, dtype=np.float64))


class Matern12(Kernel):
    """Matern nu = 1/2 (exponential): g = exp(-r)."""

    name = "matern12"

    def correlation(self, r2):
        return np.exp(-np.sqrt(np.asarray(r2, dtype=np.float64)))


class Matern32(Kernel):
    """Matern nu = 3/2: g = (1 + sqrt3 r) exp(-sqrt3 r)."""

    name = "matern32"

    def correlation(self, r2):
        sr = SQRT3 * np.sqrt(np.asarray(r2, dtype=np.float64))
        return (1.0 + sr) * np.exp(-sr)


class Matern52(Kernel):
    """Matern nu = 5/2: g = (1 + sqrt5 r + 5 r^2 / 3) exp(-sqrt5 r)."""

    name = "matern52"

    def correlation(self, r2):
        r2 = np.asarray(r2, dtype=np.float64)
        sr = SQRT5 * np.sqrt(r2)
        return (1.0 + sr + (5.0 / 3.0) * r2) * np.exp(-sr)


KERNELS = {cls.name: cls for cls in (RBF, Matern12, Matern32, Matern52)}


def make_kernel(kernel, lengthscale=None, variance=None) -> Kernel:
    """A Kernel from an instance, or from a family name plus parameters (CLI, suites)."""
    if isinstance(kernel, Kernel):
        if lengthscale is not None or variance is not None:
            raise InvalidArgumentError("pass lengthscale/variance either in the kernel object or separately, not both")
        return kernel
    if isinstance(kernel, str):
        key = kernel.lower().replace("_", "").replace("-", "")
        if key not in KERNELS:
            raise InvalidArgumentError(f"kernel must be one of {sorted(KERNELS)}, got kernel={kernel!r}")
        return KERNELS[key](1.0 if lengthscale is None else lengthscale, 1.0 if variance is None else variance)
    raise InvalidTypeError(f"kernel must be a residual_gpu kernel (e.g. rg.Matern52(...)) or a name, got kernel={kernel!r}")
