"""ResidualProblem: the float64 host-side description of one residual-correlation search.

From coordinates X (n, d), a kernel and m inducing points U it holds
    L = chol(K(U, U) + jitter * variance * I),   V = (L^-1 K(U, X))^T  (n, m, row-major),
    p_i = max(k(x_i, x_i) - ||V_i||^2, p_floor * variance),
so that V_i . V_j = k(x_i, U) (K(U, U) + jitter I)^-1 k(U, x_j) and the residual correlation is
rho_ij = (k(x_i, x_j) - V_i . V_j) / sqrt(p_i p_j). Every backend copies these arrays once.
"""

from __future__ import annotations

import numpy as np

from ._linalg import cholesky_lower
from ._numba_math import row_norms
from ._validation import as_float_matrix, as_float_vector, as_int, check_scaled_spread
from .backends import get_backend
from .errors import InvalidArgumentError, InvalidTypeError
from .inducing import kmeans_centres, kmeanspp_indices
from .kernels import Kernel, make_kernel

#: Diagonal jitter added to K(U, U), relative to the kernel variance (GPBoost's default scale).
DEFAULT_JITTER = 1e-6
#: Smallest residual variance kept, relative to the kernel variance; p below it is rounding noise.
DEFAULT_P_FLOOR = 1e-12
#: The default inducing count's cap (see default_inducing).
DEFAULT_MAX_INDUCING = 256
#: How a count of inducing points is chosen from the data (inducing.py).
INDUCING_METHODS = ("kmeans++", "kmeans")


def default_inducing(n: int) -> int:
    """The inducing count used when none is given: min(256, n // 2), at least 1.

    256 is the `scale` suite's m (V costs 2 KiB per point, the build n m^2 / 2 multiply-adds).
    Below 512 points, half of them: with every point an inducing point (m = n) the residual
    variances are all ~ jitter and the residual correlations rounding noise; with m <= n / 2 at
    least half of the points keep a residual the inducing points do not explain.
    """
    return max(1, min(DEFAULT_MAX_INDUCING, n // 2))


def _frozen(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


class ResidualProblem:
    """Coordinates, kernel and low-rank factors (V, p) of a residual-correlation problem.

    Parameters
    ----------
    coords : array (n, d)
        Point coordinates; any real dtype, copied to float64. Together with the inducing points
        (and later query locations) they may span at most sum_t (extent_t / l_t)^2 <= 1e280
        (``_validation.MAX_SCALED_SQ_DISTANCE``): farther apart the kernel overflows float64 and
        InvalidArgumentError is raised.
    kernel : Kernel
        ``RBF``, ``Matern12``, ``Matern32`` or ``Matern52``.
    inducing : int, array (m, d) or None
        Number of inducing points chosen from the data (``inducing_method``), or the points;
        None: ``default_inducing(n)`` = min(256, n // 2) of them.
    seed : int
        Seed of the inducing-point selection.
    jitter : float
        Added to the diagonal of K(U, U) as ``jitter * variance`` before the Cholesky.
    p_floor : float
        Residual variances are floored at ``p_floor * variance``.
    backend : str or None
        Where V, p and the norms are built: None (default) or "cpu" on the host (Numba), "cuda"
        on the GPU (kernels/residual_factors.cu), "jax" on the host; any of them the same bits
        (docs/precision.md, "The problem's factors"). Queries at new locations use it too.
    inducing_method : str
        How a count of inducing points is chosen (inducing.py); ignored for given points.
        ``"kmeans++"`` (the default): seeded kmeans++ picks m data points, which then have
        p ~ jitter * variance (brute force and the tree set those few points apart).
        ``"kmeans"``: kmeans++ seeding then Lloyd iterations, as GPBoost chooses them by default:
        the centroids cover the data more evenly (a smaller residual variance on average for
        the same m), but are not data points, so no point has p ~ jitter; it costs up to
        KMEANS_MAX_ITER passes of n m d, and ``inducing_indices`` is None.
    """

    def __init__(self, coords, kernel: Kernel, inducing=None, seed: int = 0,
                 jitter: float = DEFAULT_JITTER, p_floor: float = DEFAULT_P_FLOOR,
                 inducing_method: str = "kmeans++", backend: str | None = None):
        x = as_float_matrix(coords, "coords")
        self._init_geometry(x, kernel, jitter, p_floor)
        self._factor_backend = get_backend("cpu" if backend is None else backend)  # builds V; None: the host
        n = x.shape[0]
        self.seed = as_int(seed, "seed", low=0)
        if inducing_method not in INDUCING_METHODS:
            raise InvalidArgumentError(f"inducing_method must be one of {list(INDUCING_METHODS)}, "
                                       f"got inducing_method={inducing_method!r}")
        self.inducing_method = inducing_method
        if inducing is None:
            inducing = default_inducing(n)
        if isinstance(inducing, (float, np.floating, bool)):
            raise InvalidTypeError(f"inducing must be an int (a count) or an (m, d) array of points, "
                                   f"got inducing={inducing!r}")
        self.inducing_indices = None
        if isinstance(inducing, (int, np.integer)):
            m = as_int(inducing, "inducing", low=1, high=n)
            if inducing_method == "kmeans":
                u = kmeans_centres(x, m, self.seed)  # means of data points: inside the checked bounds
            else:
                self.inducing_indices = _frozen(kmeanspp_indices(x, m, self.seed))
                u = x[self.inducing_indices]
        else:
            u = as_float_matrix(inducing, "inducing", ncols=self.d)
            self._check_inducing_spread(u)
        self._set_inducing(u)
        self._build_factors()

    def with_kernel(self, kernel: Kernel) -> ResidualProblem:
        """The same coordinates and inducing points (``inducing_indices`` kept) under new kernel
        hyper-parameters: bitwise the problem ``ResidualProblem(coords, kernel, inducing=U)``
        would build, without repeating what does not depend on the kernel (the coordinates'
        conversion and bounds, the inducing-point selection). For an optimisation loop."""
        if self.inducing is None:
            raise InvalidArgumentError(
                "with_kernel needs the inducing points: pass inducing=U to ResidualProblem.from_factors"
            )
        new = type(self).__new__(type(self))
        new._init_geometry(self.coords, kernel, self.jitter, self.p_floor, bounds=self._bounds)
        new.seed = self.seed
        new.inducing_method = self.inducing_method
        new.inducing_indices = self.inducing_indices
        new._factor_backend = self._factor_backend
        new._set_inducing(self.inducing)
        new._build_factors()
        return new

    @classmethod
    def from_factors(cls, coords, *, v, p, kernel: Kernel, inducing=None,
                     jitter: float = DEFAULT_JITTER, p_floor: float = DEFAULT_P_FLOOR) -> ResidualProblem:
        """A problem from factors the caller's GP code already has: V (n, m) and p (n,).

        ``inducing`` (m, d) is optional; without it new coordinates cannot be queried.
        p must be > 0; it is used as given (no floor is applied to user factors).
        """
        self = cls.__new__(cls)
        self._factor_backend = get_backend("cpu")  # new locations' factors, on the host
        x = as_float_matrix(coords, "coords")
        self._init_geometry(x, kernel, jitter, p_floor)
        vv = as_float_matrix(v, "v")
        if vv.shape[0] != x.shape[0]:
            raise InvalidArgumentError(
                f"v must have one row per point (n={x.shape[0]}), got v.shape={vv.shape}"
            )
        pp = as_float_vector(p, "p", length=x.shape[0], positive=True)
        self.seed = None
        self.inducing_method = None
        self.inducing_indices = None
        if inducing is None:
            self.inducing = None
            self._chol = None
        else:
            u = as_float_matrix(inducing, "inducing", ncols=self.d)
            if u.shape[0] != vv.shape[1]:
                raise InvalidArgumentError(
                    f"inducing must have m={vv.shape[1]} rows to match v's columns, got inducing.shape={u.shape}"
                )
            self._check_inducing_spread(u)
            self._set_inducing(u)
        self._set_factors(vv, pp)
        return self

    # -- construction helpers -------------------------------------------------------
    def _init_geometry(self, x, kernel, jitter, p_floor, bounds=None):
        """``bounds``: the per-column (min, max) of another problem's points (with_kernel), checked
        under this kernel's lengthscales instead of scanning x again."""
        self.kernel = make_kernel(kernel)
        self.coords = _frozen(x)
        self.n, self.d = x.shape
        self.lengthscales = _frozen(self.kernel.lengthscales(self.d))
        self.jitter = float(jitter)
        self.p_floor = float(p_floor)
        if not (np.isfinite(self.jitter) and self.jitter >= 0):
            raise InvalidArgumentError(f"jitter must be finite and >= 0, got jitter={jitter!r}")
        if not (np.isfinite(self.p_floor) and self.p_floor > 0):
            raise InvalidArgumentError(f"p_floor must be finite and > 0, got p_floor={p_floor!r}")
        # before any O(n m) work (kmeans++, V): coordinates too many lengthscales apart overflow
        # the kernel (docs in _validation.MAX_SCALED_SQ_DISTANCE). _bounds is the per-column
        # (min, max) of every point compared so far (coords, then the inducing points), kept so
        # that a query checks its spread without rescanning the n points.
        named = [("coords", x)] if bounds is None else [("the problem's coords and inducing points", bounds)]
        self._bounds = tuple(_frozen(b) for b in check_scaled_spread(
            named, self.lengthscales, lengthscale=self.kernel.lengthscale))

    def _check_inducing_spread(self, u):
        """The spread check of coords together with given inducing points (kmeans++ picks data
        points and kmeans their means, which cannot widen the bounds)."""
        self._bounds = tuple(_frozen(b) for b in check_scaled_spread(
            [("coords", self._bounds), ("inducing", u)], self.lengthscales, lengthscale=self.kernel.lengthscale))

    def _set_inducing(self, u):
        self.inducing = _frozen(u)
        self.m = u.shape[0]
        kuu = self.kernel(u)
        kuu[np.diag_indices_from(kuu)] += self.jitter * self.kernel.variance
        chol = cholesky_lower(kuu)  # fixed order: the same factor for any thread count (_linalg)
        if chol is None:
            raise InvalidArgumentError(
                f"K(U, U) + jitter*variance*I is not positive definite with jitter={self.jitter!r}; "
                "use fewer or more distinct inducing points, or a larger jitter"
            )
        self._chol = _frozen(chol)

    @property
    def chol(self) -> np.ndarray | None:
        """Lower Cholesky factor L of K(U, U) + jitter * variance * I (L V_i = k(U, x_i)), read-only;
        None when the problem has no inducing points (``from_factors`` without ``inducing``)."""
        return self._chol

    def _solve_cross(self, x):
        """(V, p, ||V_i||) of coordinates x, V = (L^-1 K(U, x))^T: each row the same bits whatever
        the other rows, their number or the thread count (_linalg.cross_factors). The one path
        of the problem's factors and those of new locations."""
        return self._factor_backend.cross_factors(self._chol, self.inducing, x, self.kernel, self.p_floor)

    def _build_factors(self):
        self._set_factors(*self._solve_cross(self.coords))

    def _set_factors(self, v, p, v_norms=None):
        self.v = _frozen(np.ascontiguousarray(v))
        self.p = _frozen(np.ascontiguousarray(p))
        self.m = self.v.shape[1]
        self.v_norms = _frozen(row_norms(self.v) if v_norms is None else v_norms)

    # -- queries at new locations ---------------------------------------------------
    def factors_at(self, query_coords) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(X*, V*, p*) for new locations: V* = (L^-1 K(U, X*))^T, p* floored like p."""
        xq = as_float_matrix(query_coords, "query_coords", ncols=self.d)
        if self.inducing is None:
            raise InvalidArgumentError(
                "query_coords needs the inducing points: pass inducing=U to ResidualProblem.from_factors"
            )
        check_scaled_spread([("the problem's coords and inducing points", self._bounds), ("query_coords", xq)],
                            self.lengthscales, lengthscale=self.kernel.lengthscale)
        vq, pq, _ = self._solve_cross(xq)
        return xq, vq, pq

    def __repr__(self) -> str:
        return f"ResidualProblem(n={self.n}, d={self.d}, m={self.m}, kernel={self.kernel!r})"


class ProblemView:
    """The arrays of a subset of a problem's points (ascending dataset indices ``rows``), as the
    tree build, the searchers and the backends' ``prepare`` read them; V in ``v_dtype`` (float32
    for a float32 fast pass, a copy made once)."""

    def __init__(self, problem: ResidualProblem, rows: np.ndarray, v_dtype=np.float64):
        self.rows = rows
        self.coords = problem.coords[rows]
        self.v = np.ascontiguousarray(problem.v[rows], dtype=v_dtype)
        self.p = problem.p[rows]
        self.v_norms = problem.v_norms[rows]
        self.n = rows.size
        self.d = problem.d
        self.m = problem.m
        self.lengthscales = problem.lengthscales
        self.kernel = problem.kernel
        self.chol = problem.chol
