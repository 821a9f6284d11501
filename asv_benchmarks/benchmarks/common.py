"""Shared parts of the asv suite: the profile switch, the parameter grid and the builders.

Profile: ``RESIDUAL_GPU_ASV_PROFILE`` = fast | regular (default) | large picks the suites and
sizes. An unknown value is an error at import (asv's discovery fails and it exits 1), never
a silent fallback. Results of different profiles have different parameter grids:
keep one profile per results directory (CI's ``--quick`` runs save nothing).

Every problem is ``residual_gpu.suites.get_suite(suite, n)``; nothing here redefines one.
"""

from __future__ import annotations

import os

import residual_gpu
from residual_gpu.index import ResidualIndex
from residual_gpu.problem import ResidualProblem
from residual_gpu.suites import get_suite

PROFILE_ENV = "RESIDUAL_GPU_ASV_PROFILE"

#: suites and sizes per profile; timeout (s) is asv's per-benchmark-process limit
#: (setup + warm-up + samples). The brute-force query cost grows as n^2 for ``vif``
#: (every point is a query): on 2 cores n=32768 takes about a minute per query batch.
PROFILES = {
    # CI smoke: seconds per benchmark. n=512 is avoided: there m=min(512, n)=n inducing
    # points explain everything and every residual variance sits on the floor.
    "fast": {"suites": ("gold", "vif"), "sizes": (1024,), "timeout": 300},
    # history / comparisons on a workstation: the sizes DESIGN.md section 5 quotes.
    "regular": {"suites": ("gold", "vif"), "sizes": (2048, 8192, 32768), "timeout": 1200},
    # big machines and GPUs; `scale` is vif with k=30, m=256.
    "large": {"suites": ("gold", "vif", "scale"), "sizes": (131072, 262144), "timeout": 4 * 3600},
}


def _profile_name() -> str:
    name = os.environ.get(PROFILE_ENV, "regular").strip().lower() or "regular"
    if name not in PROFILES:
        raise ValueError(f"{PROFILE_ENV} must be one of {sorted(PROFILES)}, got {PROFILE_ENV}={name!r}")
    return name


PROFILE_NAME = _profile_name()
PROFILE = PROFILES[PROFILE_NAME]

#: every registered backend; unavailable ones are skipped in setup, with the reason.
BACKENDS = ("cpu", "jax", "cuda")
#: search methods benchmarked; adding "tree" here is the whole change on this side.
METHODS = ("brute", "tree")
SUITES = PROFILE["suites"]
SIZES = PROFILE["sizes"]
#: "plain" = unrestricted neighbours, "predecessor" = j < i (Vecchia); a suite that is not
#: measured in a mode (vif and scale: predecessor only) skips it.
MODES = ("plain", "predecessor")
TIMEOUT = PROFILE["timeout"]


def require_backend(backend: str) -> None:
    """Skip (asv's NotImplementedError convention) when the backend cannot run here."""
    usable, reason = residual_gpu.available_backends().get(backend, (False, "not registered in this version"))
    if not usable:
        raise NotImplementedError(f"backend {backend!r} unavailable: {reason}")


def require_method(method: str) -> None:
    """Skip a method that the installed commit does not know (e.g. older commits, asv continuous)."""
    from residual_gpu.index import METHODS as KNOWN

    if method not in KNOWN:
        raise NotImplementedError(f"method {method!r} not in this version's residual_gpu.index.METHODS={KNOWN}")


def mode_flag(case, mode: str) -> bool:
    """The predecessor flag for ``mode``; skips a mode the suite is not measured in."""
    flag = mode == "predecessor"
    if flag not in case.modes:
        raise NotImplementedError(f"suite {case.name!r} is measured in modes {case.modes} (predecessor flags) only")
    return flag


def queries_per_batch(case) -> int:
    """Queries in one query call: ``case.queries.size``, or n when every point is a query."""
    return case.n if case.queries is None else int(case.queries.size)


# asv re-runs ``setup`` before every timed sample (asv#966), and runs each parameter
# combination in its own process. The case and index are read-only under ``query``, so
# memoising them per process keeps setup cheap after the first call and the warm-up (JIT
# compilation) happens once per process. One entry is kept: one combination a process.
_MEMO: dict = {}


def memo(key, build):
    if key not in _MEMO:
        _MEMO.clear()
        _MEMO[key] = build()
    return _MEMO[key]


def build_index(case, backend: str, method: str) -> ResidualIndex:
    """What ``time_build`` times: the problem (factors, kmeans++) and the index (backend copy)."""
    problem = ResidualProblem(case.coords, kernel=case.kernel, inducing=case.inducing, seed=case.seed)
    return ResidualIndex(problem, backend=backend, method=method)


def synchronise(backend: str, index: ResidualIndex) -> None:
    """Wait for device work that construction may have left in flight.

    CuPy and JAX may return from a host-to-device copy before it has finished; ``time_build``
    calls this so the copies are inside the timed region. (Queries need nothing: they return
    numpy arrays, which waits for the device.) The index's prepared arrays are private, read
    here only to block on them.
    """
    if backend == "cuda":
        import cupy

        cupy.cuda.Device().synchronize()
    elif backend == "jax":
        import dataclasses

        import jax

        prepared = index._prepared
        if dataclasses.is_dataclass(prepared):
            jax.block_until_ready([getattr(prepared, f.name) for f in dataclasses.fields(prepared)])


def case_for(suite: str, n: int):
    return get_suite(suite, n)
