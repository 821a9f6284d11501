"""Query time, build time, peak memory and evaluation counts of ResidualIndex.

Parameters (see ``common``): backend ("cpu", "jax", "cuda"; unavailable ones are skipped in
setup with the reason), method ("brute"), suite and n (from the profile), and mode ("plain"
or "predecessor"; a suite not measured in a mode skips it).

What the numbers mean
---------------------
``time_query`` is the time of ONE FULL QUERY BATCH: the suite's own queries, i.e.
``min(1024, n)`` dataset indices for ``gold`` and all n points for ``vif``/``scale``
(``common.queries_per_batch``). Time per query = time_query / queries; the divisor is fixed by
(suite, n), so every ratio asv reports between commits is also the ratio of time per query.
We keep asv's ``time_*`` type rather than a ``track_seconds_per_query``: only ``time_*``
benchmarks get asv's repeated samples, median/IQR and the statistical test that
``asv continuous`` and ``asv compare`` use; a ``track_*`` value is one number with no spread.
Queries per second is deliberately not an asv metric (asv treats larger as worse); the plot
script derives it.

Device synchronisation is implicit: ``ResidualIndex.query`` returns numpy arrays (indices and
distances copied back to the host), so a timed call ends only after any GPU work has finished.
"""

from __future__ import annotations

from .common import (
    BACKENDS,
    METHODS,
    MODES,
    SIZES,
    SUITES,
    TIMEOUT,
    build_index,
    case_for,
    memo,
    mode_flag,
    queries_per_batch,
    require_backend,
    require_method,
    synchronise,
)


class _QueryBase:
    params = (BACKENDS, METHODS, SUITES, SIZES, MODES)
    param_names = ("backend", "method", "suite", "n", "mode")
    timeout = TIMEOUT
    warm_up = False

    def setup(self, backend, method, suite, n, mode):
        require_backend(backend)
        require_method(method)

        def build():
            case = case_for(suite, n)
            flag = mode_flag(case, mode)
            index = build_index(case, backend, method)
            if self.warm_up:
                # One untimed full query: Numba compilation (or loading its cache), JAX
                # tracing, BLAS thread start-up and first-touch of the work buffers.
                index.query(case.k, queries=case.queries, predecessor=flag, progress=False)
            return case, flag, index

        self.case, self.flag, self.index = memo((type(self).__name__, backend, method, suite, n, mode), build)

    def _query(self):
        return self.index.query(self.case.k, queries=self.case.queries, predecessor=self.flag, progress=False)


class QueryTime(_QueryBase):
    """Seconds for one full query batch (see the module docstring for time per query)."""

    warm_up = True
    # The warm-up is the explicit query in setup (done once per process thanks to the memo),
    # so asv's own warm-up loop, which would cost another full batch, is switched off.
    warmup_time = 0
    # A vif batch at n=32768 takes 20-30 s on 2 cores (minutes with JAX on the CPU): one
    # sample per process is enough there; small sizes still collect up to 5 samples in 10 s,
    # and asv runs 2 processes (rounds) per combination.
    min_run_count = 1
    repeat = (1, 5, 10.0)
    rounds = 2

    def time_query(self, backend, method, suite, n, mode):
        self._query()


class QueryCost(_QueryBase):
    """Peak memory and distance evaluations of one query batch (no warm-up: neither is a time).

    peakmem is the process's peak RSS, so it includes the problem (V is n x m float64) and
    the index as well as the query's own buffers.
    """

    warm_up = False

    def peakmem_query(self, backend, method, suite, n, mode):
        self._query()

    def track_evaluations_per_query(self, backend, method, suite, n, mode):
        res = self._query()
        return res.telemetry.distance_evaluations / queries_per_batch(self.case)

    track_evaluations_per_query.unit = "evaluations"


class Build:
    """Seconds to construct ResidualProblem (factors V, p; kmeans++ for vif) + ResidualIndex.

    The suite's coordinates are generated in setup and not timed. A GPU or JAX backend's
    prepare copies the factors to the device; the timed call waits for those copies
    (``common.synchronise``).
    """

    params = (BACKENDS, METHODS, SUITES, SIZES)
    param_names = ("backend", "method", "suite", "n")
    timeout = TIMEOUT
    warmup_time = 0  # warm-up build done in setup, once per process
    min_run_count = 1
    repeat = (1, 5, 10.0)
    rounds = 2

    def setup(self, backend, method, suite, n):
        require_backend(backend)
        require_method(method)

        def warm_up():
            case = case_for(suite, n)
            synchronise(backend, build_index(case, backend, method))  # untimed: JIT, backend start-up
            return case

        self.case = memo(("Build", backend, method, suite, n), warm_up)

    def time_build(self, backend, method, suite, n):
        synchronise(backend, build_index(self.case, backend, method))
