"""residual_gpu: exact k-nearest-neighbour search in residual correlation for Vecchia/VIF GPs.

    import residual_gpu as rg
    prob = rg.ResidualProblem(coords, kernel=rg.Matern52(lengthscale=0.1), inducing=256)
    res = rg.ResidualIndex(prob).query(k=30, predecessor=True)
    res.vecchia_pattern()                                    # the Vecchia sparsity, scipy CSR
    rg.ResidualNeighbors(n_neighbors=30).fit(coords)         # scikit-learn style (needs [sklearn])
"""

from .backends import available_backends, get_backend
from .errors import (
    BackendUnavailableError,
    IndexFormatError,
    InvalidArgumentError,
    InvalidTypeError,
    ResidualGPUError,
)
from .index import KnnResult, ResidualIndex, residual_knn
from .kernels import RBF, Kernel, Matern12, Matern32, Matern52
from .problem import ResidualProblem
from .tree import TraversalFlags

__version__ = "0.1.0"


def __getattr__(name):
    # rg.ResidualNeighbors imports scikit-learn on first use only: it is an optional extra
    if name == "ResidualNeighbors":
        from .neighbors import ResidualNeighbors

        return ResidualNeighbors
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "RBF",
    "BackendUnavailableError",
    "IndexFormatError",
    "InvalidArgumentError",
    "InvalidTypeError",
    "Kernel",
    "KnnResult",
    "Matern12",
    "Matern32",
    "Matern52",
    "ResidualGPUError",
    "ResidualIndex",
    "ResidualProblem",
    "TraversalFlags",
    "__version__",
    "available_backends",
    "get_backend",
    "residual_knn",
]
