"""Exact residual-correlation kNN sharded over the workers of a dask.distributed Client.

    from dask.distributed import Client, LocalCluster
    import residual_gpu.distributed as rgd
    with LocalCluster(n_workers=2, threads_per_worker=1) as cluster, Client(cluster) as client:
        idx, dist = rgd.residual_knn(coords, 30, kernel, inducing=256, predecessor=True, client=client)

The answers are residual_gpu.residual_knn's, bit for bit (docs/distributed.md). Needs the
``[dask]`` extra; ``import residual_gpu`` never imports dask.
"""

try:
    import distributed  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("residual_gpu.distributed needs dask.distributed: pip install 'residual-gpu[dask]'") from exc

from .engine import DistributedIndex, DistributedResult, DistributedTelemetry, residual_knn

__all__ = ["DistributedIndex", "DistributedResult", "DistributedTelemetry", "residual_knn"]
