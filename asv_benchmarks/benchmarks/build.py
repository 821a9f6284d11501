"""Seconds to build a ResidualProblem alone (no index): the factors V, p and the inducing points.

Parameters: suite and n (from the profile, ``common``) and how the inducing points come:
``given`` (an (m, d) array: the suite's own for ``gold``, the kmeans++ points for ``vif``,
chosen in setup), ``kmeans++`` (a count: seeded kmeans++ from the data, then V) or ``kmeans``
(kmeans++ then Lloyd iterations; skipped on commits whose ResidualProblem has no
``inducing_method``). Coordinates are generated in setup; one untimed build per process warms
Numba's compilation up.
"""

from __future__ import annotations

import inspect

import numpy as np

from residual_gpu.problem import ResidualProblem

from .common import SIZES, SUITES, TIMEOUT, case_for, memo

INDUCING = ("given", "kmeans++", "kmeans")


class ProblemBuild:
    params = (SUITES, SIZES, INDUCING)
    param_names = ("suite", "n", "inducing")
    timeout = TIMEOUT
    warmup_time = 0
    min_run_count = 1
    repeat = (1, 5, 10.0)
    rounds = 2

    def setup(self, suite, n, inducing):
        if inducing == "kmeans" and "inducing_method" not in inspect.signature(ResidualProblem).parameters:
            raise NotImplementedError("this commit's ResidualProblem has no inducing_method")
        case = memo(("ProblemBuild", suite, n), lambda: case_for(suite, n))
        m = case.inducing if isinstance(case.inducing, int) else case.inducing.shape[0]
        if inducing == "given":
            if isinstance(case.inducing, int):
                u = memo(("ProblemBuild-u", suite, n),
                         lambda: ResidualProblem(case.coords, kernel=case.kernel, inducing=m, seed=case.seed).inducing)
            else:
                u = case.inducing
            self.kwargs = {"inducing": np.array(u)}
        else:
            self.kwargs = {"inducing": m, "seed": case.seed}
            if inducing == "kmeans":
                self.kwargs["inducing_method"] = "kmeans"
        self.case = case
        ResidualProblem(case.coords[:256], kernel=case.kernel, inducing=8)  # untimed: compilation

    def time_build(self, suite, n, inducing):
        ResidualProblem(self.case.coords, kernel=self.case.kernel, **self.kwargs)
