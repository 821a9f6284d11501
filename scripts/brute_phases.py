"""Where brute force's time goes: one all-points predecessor query of `vif`, with a timer around
each backend select call (by V's dtype and the candidates' count) next to the telemetry's select
and certify seconds. Cited by docs/benchmarks.md (float32 section).

    python scripts/brute_phases.py --n 32768 --precision float32
"""

from __future__ import annotations

import argparse
import collections
import time

import numpy as np

import residual_gpu as rg
from residual_gpu import suites
from residual_gpu.backends import cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=32768)
    parser.add_argument("--precision", default="float32", choices=["float64", "float32"])
    args = parser.parse_args()
    case = suites.vif(args.n)
    problem = rg.ResidualProblem(case.coords, kernel=case.kernel, inducing=case.inducing, seed=case.seed)
    index = rg.ResidualIndex(problem, backend="cpu", method="brute", precision=args.precision)
    seconds, calls = collections.defaultdict(float), collections.defaultdict(int)
    select = cpu.CpuBackend.select_candidates

    def timed(self, prepared, batch, keep):
        t0 = time.perf_counter()
        out = select(self, prepared, batch, keep)
        key = f"{prepared.v.dtype} select over {prepared.n} candidates"
        seconds[key] += time.perf_counter() - t0
        calls[key] += 1
        return out

    cpu.CpuBackend.select_candidates = timed
    index.query(case.k, predecessor=True, queries=np.arange(min(args.n, 4096)))  # warm-up
    seconds.clear()
    calls.clear()
    t0 = time.perf_counter()
    res = index.query(case.k, predecessor=True)
    total = time.perf_counter() - t0
    tel = res.telemetry
    print(f"vif n={args.n} precision={args.precision}: {total:.3f} s; telemetry select {tel.seconds['select']:.3f} s, "
          f"certify {tel.seconds['certify']:.3f} s; {tel.recertified_queries} queries searched again")
    for key, sec in seconds.items():
        print(f"  {key}: {sec:.3f} s in {calls[key]} calls")


if __name__ == "__main__":
    main()
