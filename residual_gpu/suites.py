"""Benchmark and test problems, defined once (used by the CLI, asv and the tests).

See DESIGN.md section 5. Each suite builds a ``SuiteCase``: the coordinates, the kernel,
the inducing points (an int for kmeans++ or an array), the queries and k, and the modes
(plain and/or predecessor) it is measured in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InvalidArgumentError
from .kernels import RBF, Kernel, Matern12, Matern52


@dataclass(frozen=True)
class SuiteCase:
    name: str
    coords: np.ndarray
    kernel: Kernel
    inducing: object          # int (kmeans++ count) or (m, d) array
    queries: np.ndarray | None  # dataset indices, None = every point
    k: int
    modes: tuple              # predecessor flags to run
    seed: int = 0

    @property
    def n(self) -> int:
        return self.coords.shape[0]


def gold(n: int | None = None) -> SuiteCase:
    """The suite the field quotes: tiny residual variances, float32 gets ~55% recall."""
    n = 32768 if n is None else n
    coords = np.random.default_rng(42).normal(size=(n, 3))
    queries = np.random.default_rng(43).integers(0, n, min(1024, n))
    m = min(512, n)
    inducing = coords[np.sort(np.random.default_rng(0).choice(n, m, replace=False))]
    return SuiteCase("gold", coords, RBF(lengthscale=1.0, variance=1.0), inducing, queries, min(50, n - 1),
                     (False, True))


def vif(n: int | None = None, k: int = 50, m: int = 512) -> SuiteCase:
    """The realistic Vecchia workload: uniform [0,1]^3, Matern 5/2, l = 0.1, kmeans++ inducing."""
    n = 32768 if n is None else n
    coords = np.random.default_rng(1).random((n, 3))
    return SuiteCase("vif", coords, Matern52(lengthscale=0.1, variance=1.0), min(m, n), None, min(k, n - 1),
                     (True,))


def scale(n: int | None = None) -> SuiteCase:
    """``vif`` at 10^6 points and beyond, k = 30, m = 256."""
    case = vif(1_000_000 if n is None else n, k=30, m=256)
    return SuiteCase("scale", case.coords, case.kernel, case.inducing, None, case.k, case.modes)


def spatial(n: int | None = None) -> SuiteCase:
    """Most spatial GP data is 2-D: uniform [0,1]^2, Matern 1/2 (GPBoost's default
    "exponential"), l = 0.05, 256 kmeans++ inducing points, k = 20, predecessor, all points."""
    n = 131072 if n is None else n
    coords = np.random.default_rng(2).random((n, 2))
    return SuiteCase("spatial", coords, Matern12(lengthscale=0.05, variance=1.0), min(256, n), None, min(20, n - 1),
                     (True,))


def smoke(n: int | None = None) -> SuiteCase:
    """``vif`` at n = 2048, k = 10: seconds, for CI and the README."""
    case = vif(2048 if n is None else n, k=10)
    return SuiteCase("smoke", case.coords, case.kernel, case.inducing, None, case.k, case.modes)


SUITES = {"smoke": smoke, "gold": gold, "vif": vif, "scale": scale, "spatial": spatial}


def get_suite(name: str, n: int | None = None) -> SuiteCase:
    if name not in SUITES:
        raise InvalidArgumentError(f"suite must be one of {sorted(SUITES)}, got suite={name!r}")
    if n is not None and n < 2:
        raise InvalidArgumentError(f"n must be >= 2, got n={n!r}")
    return SUITES[name](n)
