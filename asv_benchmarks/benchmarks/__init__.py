"""asv benchmarks for residual_gpu (see docs/asv.md).

Modules: ``common`` (profile switch, parameter grid, cached builders) and ``knn`` (the
benchmark classes). The problems come from ``residual_gpu.suites``, never from here.
"""
