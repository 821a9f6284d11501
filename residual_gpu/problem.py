"""ResidualProblem: the float64 host-side description of one residual-correlation search.

From coordinates X (n, d), a kernel and m inducing points U it holds
    L = chol(K(U, U) + jitter * variance * I),   V = (L^-1 K(U, X))^T  (n, m, row-major),
    p_i = max(k(x_i, x_i) - ||V_i||^2, p_floor * variance),
so that V_i . V_j = k(x_i, U) (K(U, U) + jitter I)^-1 k(U, x_j) and the residual correlation is
rho_ij = (k(x_i, x_j) - V_i . V_j) / sqrt(p_i p_j). Every backend copies these arrays once.
"""

from __future__ import annotations

import numpy as np

from ._linalg import cholesky_lower, solve_lower_columns
from ._numba_math import residual_variances, row_norms
from ._validation import as_float_matrix, as_float_vector, as_int, check_scaled_spread
from .errors import InvalidArgumentError, InvalidTypeError
from .inducing import kmeanspp_indices
from .kernels import Kernel, make_kernel

#: Diagonal jitter added to K(U, U), relative to the kernel variance (GPBoost's default scale).
DEFAULT_JITTER = 1e-6
#: Smallest residual variance kept, relative to the kernel variance; p below it is rounding noise.
DEFAULT_P_FLOOR = 1e-12
#: Rows of K(U, X) formed at once when building V, so memory stays O(m * chunk) beyond V itself.
_ROW_CHUNK = 8192


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
    inducing : int or array (m, d)
        Number of inducing points chosen from the data by seeded kmeans++, or the points.
    seed : int
        Seed of the kmeans++ selection.
    jitter : float
        Added to the diagonal of K(U, U) as ``jitter * variance`` before the Cholesky.
    p_floor : float
        Residual variances are floored at ``p_floor * variance``.
    """

    def __init__(self, coords, kernel: Kernel, inducing=256, seed: int = 0,
                 jitter: float = DEFAULT_JITTER, p_floor: float = DEFAULT_P_FLOOR):
        x = as_float_matrix(coords, "coords")
        self._init_geometry(x, kernel, jitter, p_floor)
        n = x.shape[0]
        self.seed = as_int(seed, "seed", low=0)
        if isinstance(inducing, (float, np.floating, bool)):
            raise InvalidTypeError(f"inducing must be an int (a count) or an (m, d) array of points, "
                                   f"got inducing={inducing!r}")
        if isinstance(inducing, (int, np.integer)):
            m = as_int(inducing, "inducing", low=1, high=n)
            self.inducing_indices = _frozen(kmeanspp_indices(x, m, self.seed))
            u = x[self.inducing_indices]
        else:
            u = as_float_matrix(inducing, "inducing", ncols=self.d)
            self.inducing_indices = None
            self._check_inducing_spread(u)
        self._set_inducing(u)
        v = np.empty((n, self.m))
        for start in range(0, n, _ROW_CHUNK):
            stop = min(start + _ROW_CHUNK, n)
            v[start:stop] = self._solve_cross(x[start:stop])
        self._set_factors(v, residual_variances(v, self.kernel.variance, self.p_floor * self.kernel.variance))

    @classmethod
    def from_factors(cls, coords, *, v, p, kernel: Kernel, inducing=None,
                     jitter: float = DEFAULT_JITTER, p_floor: float = DEFAULT_P_FLOOR) -> ResidualProblem:
        """A problem from factors the caller's GP code already has: V (n, m) and p (n,).

        ``inducing`` (m, d) is optional; without it new coordinates cannot be queried.
        p must be > 0; it is used as given (no floor is applied to user factors).
        """
        self = cls.__new__(cls)
        x = as_float_matrix(coords, "coords")
        self._init_geometry(x, kernel, jitter, p_floor)
        vv = as_float_matrix(v, "v")
        if vv.shape[0] != x.shape[0]:
            raise InvalidArgumentError(
                f"v must have one row per point (n={x.shape[0]}), got v.shape={vv.shape}"
            )
        pp = as_float_vector(p, "p", length=x.shape[0], positive=True)
        self.seed = None
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
    def _init_geometry(self, x, kernel, jitter, p_floor):
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
        self._bounds = tuple(_frozen(b) for b in check_scaled_spread(
            [("coords", x)], self.lengthscales, lengthscale=self.kernel.lengthscale))

    def _check_inducing_spread(self, u):
        """The spread check of coords together with given inducing points (kmeans++ picks data
        points, which cannot widen the bounds)."""
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
        """(L^-1 K(U, x))^T for a block of coordinates: each row the same bits whatever the block,
        its size or the thread count (_linalg.solve_lower_columns)."""
        return solve_lower_columns(self._chol, self.kernel(self.inducing, x))

    def _set_factors(self, v, p):
        self.v = _frozen(np.ascontiguousarray(v))
        self.p = _frozen(np.ascontiguousarray(p))
        self.m = self.v.shape[1]
        self.v_norms = _frozen(row_norms(self.v))

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
        vq = np.ascontiguousarray(self._solve_cross(xq))
        pq = residual_variances(vq, self.kernel.variance, self.p_floor * self.kernel.variance)
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
