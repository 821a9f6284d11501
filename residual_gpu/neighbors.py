"""ResidualNeighbors: the residual-correlation kNN search as a scikit-learn neighbours estimator.

It follows scikit-learn's estimator rules: every parameter is stored verbatim by ``__init__``
(checked only in ``fit``), ``get_params``/``set_params``/``clone`` come from BaseEstimator,
fitted state ends in ``_``, and a method called before ``fit`` raises NotFittedError. Its
``kneighbors`` and ``kneighbors_graph`` match sklearn.neighbors.NearestNeighbors' (X=None: the
training points, none its own neighbour) and return what ``ResidualIndex.query`` returns, bit
for bit. Needs scikit-learn (``pip install residual-gpu[sklearn]``); ``import residual_gpu``
does not import it.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse

try:
    import sklearn
    from sklearn.base import BaseEstimator
    from sklearn.utils.validation import check_is_fitted
except ImportError as exc:  # pragma: no cover - exercised only where scikit-learn is absent
    raise ImportError("residual_gpu.neighbors needs scikit-learn: pip install 'residual-gpu[sklearn]'") from exc

from ._validation import as_float_matrix, as_int
from .errors import InvalidArgumentError
from .index import ResidualIndex
from .kernels import make_kernel
from .problem import ResidualProblem

GRAPH_MODES = ("connectivity", "distance")


class ResidualNeighbors(BaseEstimator):
    """Exact k nearest neighbours in residual distance d = sqrt(1 - |rho|), sklearn style.

    Parameters
    ----------
    n_neighbors : int
        Neighbours per query when ``kneighbors`` is not given ``n_neighbors``.
    kernel : Kernel or str
        A kernel object (``rg.Matern52(lengthscale=0.1)``) or a family name ("rbf",
        "matern12", "matern32", "matern52") completed by ``lengthscale`` and ``variance``.
    lengthscale, variance : float or array, optional
        With a kernel name only (default 1.0 each); searchable by GridSearchCV.
    inducing : int, array (m, d) or None
        As ``ResidualProblem``'s ``inducing``; None takes ResidualProblem's default.
    seed : int
        Seed of the kmeans++ inducing-point selection.
    backend, method, precision : str
        As ``ResidualIndex``'s; the resolved choices are ``index_.backend``, ``index_.method``
        and ``index_.precision``.

    Attributes
    ----------
    problem_ : ResidualProblem
    index_ : ResidualIndex
    n_features_in_ : int
    n_samples_fit_ : int
    """

    def __init__(self, n_neighbors=5, *, kernel="matern52", lengthscale=None, variance=None, inducing=None,
                 seed=0, backend="auto", method="auto", precision="auto"):
        self.n_neighbors = n_neighbors
        self.kernel = kernel
        self.lengthscale = lengthscale
        self.variance = variance
        self.inducing = inducing
        self.seed = seed
        self.backend = backend
        self.method = method
        self.precision = precision

    def fit(self, X, y=None):
        """Build the residual problem and the index over the points X (n, d); y is ignored."""
        as_int(self.n_neighbors, "n_neighbors", low=1)
        x = as_float_matrix(X, "X")
        kernel = make_kernel(self.kernel, self.lengthscale, self.variance)
        extra = {} if self.inducing is None else {"inducing": self.inducing}
        self.problem_ = ResidualProblem(x, kernel=kernel, seed=self.seed, backend=self.backend, **extra)
        self.index_ = ResidualIndex(self.problem_, backend=self.backend, method=self.method,
                                    precision=self.precision)
        self.n_features_in_ = x.shape[1]
        self.n_samples_fit_ = x.shape[0]
        return self

    def _query(self, X, n_neighbors):
        """The KnnResult of X (None: the training points) for n_neighbors (None: the parameter)."""
        k = self.n_neighbors if n_neighbors is None else n_neighbors
        if X is None:  # the training points, each excluded from its own neighbours
            return self.index_.query(as_int(k, "n_neighbors", low=1, high=self.n_samples_fit_ - 1))
        x = as_float_matrix(X, "X", ncols=self.n_features_in_)
        return self.index_.query(as_int(k, "n_neighbors", low=1, high=self.n_samples_fit_), query_coords=x)

    def kneighbors(self, X=None, n_neighbors=None, return_distance=True):
        """(distances, indices), each (q, n_neighbors), ascending, ties to the smaller index; the
        indices alone if not ``return_distance``. X=None queries the training points, none of
        them its own neighbour; a new location X coinciding with a training point finds it at
        distance 0."""
        check_is_fitted(self)
        res = self._query(X, n_neighbors)
        return (res.distances, res.indices) if return_distance else res.indices

    def kneighbors_graph(self, X=None, n_neighbors=None, mode="connectivity"):
        """The (q, n_samples_fit_) CSR kNN graph: ones ("connectivity") or the residual
        distances ("distance", a neighbour at distance 0.0 a stored entry), columns ascending.
        A scipy sparse matrix or array as sklearn's ``sparse_interface`` setting says."""
        check_is_fitted(self)
        if mode not in GRAPH_MODES:
            raise InvalidArgumentError(f"mode must be one of {list(GRAPH_MODES)}, got mode={mode!r}")
        graph = self._query(X, n_neighbors).to_csr()
        if mode == "connectivity":
            graph.data = np.ones_like(graph.data)
        # sklearn >= 1.9 lets the user pick sparse arrays or matrices; before, kneighbors_graph gave matrices
        if sklearn.get_config().get("sparse_interface", "spmatrix") == "spmatrix":
            return scipy.sparse.csr_matrix(graph)
        return graph
