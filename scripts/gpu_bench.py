#!/usr/bin/env python
"""GPU check and benchmark of the CuPy backend, for a machine with an NVIDIA GPU.

    python scripts/gpu_bench.py                  # tests, GEMM yardstick, gold and vif: cuda vs cpu
    python scripts/gpu_bench.py --n 8192 --repeats 1 --skip-cpu-vif   # quicker

Steps (each printed with its command line):
1. ``pytest -m gpu tests/test_cuda_backend.py``: cuda == cpu == reference on the device;
2. the device's float64 and float32 GEMM rates: cupy.matmul of the gold brute-force shape
   (1024 x 512) @ (512 x 32768), synchronised, median of several runs (float32 without TF32:
   CuPy's default compute type for float32 matmul);
3. ``residual_gpu.bench.run_suite`` on the gold and vif suites with backend="cuda" and
   backend="cpu", brute force with the fast pass in float64 and in float32 (``--precisions``),
   printed as tables, and the achieved rate of each cuda brute-force row (2 * evaluations * m /
   seconds) as a fraction of the device GEMM rate of its own precision;
4. the problem build (V, p, norms) of the vif suite on the device (``ResidualProblem(...,
   backend="cuda")``, kernels/residual_factors.cu) against the host build: seconds, and whether
   the arrays are the same bits (they must be).

Exit status: 1 if the GPU tests fail or the cuda backend is unavailable, else 0.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def device_gemm_gflops(q: int = 1024, m: int = 512, n: int = 32768, repeats: int = 10,
                       dtype: str = "float64") -> tuple[float, float]:
    """(median seconds, GFLOP/s) of a synchronised cupy (q, m) @ (m, n) in ``dtype``."""
    import cupy as cp

    rng = cp.random.default_rng(0)
    a = rng.standard_normal((q, m), dtype=cp.float64).astype(dtype)
    b = rng.standard_normal((m, n), dtype=cp.float64).astype(dtype)
    out = cp.empty((q, n), dtype=dtype)
    for _ in range(3):  # warm-up: cuBLAS handle, heuristics, clocks
        cp.matmul(a, b, out=out)
    cp.cuda.Device().synchronize()
    times = []
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    for _ in range(repeats):
        start.record()
        cp.matmul(a, b, out=out)
        stop.record()
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop) / 1e3)
    seconds = sorted(times)[len(times) // 2]
    return seconds, 2.0 * q * m * n / seconds / 1e9


def device_build(n: int | None) -> dict:
    """Seconds of the vif problem's factors built on the host and on the device (given inducing
    points, after one warm-up build each), and whether the two are the same bits."""
    import residual_gpu as rg
    from residual_gpu import suites

    case = suites.vif(n)
    inducing = rg.ResidualProblem(case.coords[:4096], kernel=case.kernel, inducing=min(512, case.n)).inducing
    out, problems = {"n": case.n, "m": inducing.shape[0]}, {}
    for name, backend in (("host", None), ("device", "cuda")):
        rg.ResidualProblem(case.coords[:1024], kernel=case.kernel, inducing=inducing, backend=backend)  # warm-up
        t0 = time.perf_counter()
        problems[name] = rg.ResidualProblem(case.coords, kernel=case.kernel, inducing=inducing, backend=backend)
        out[f"{name}_s"] = time.perf_counter() - t0
    out["bitwise"] = all(bool((getattr(problems["host"], a) == getattr(problems["device"], a)).all())
                         for a in ("v", "p", "v_norms"))
    return out


def device_name() -> str:
    import cupy as cp

    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.runtime.getDevice())
    name = props["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


def _seconds(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=None, help="points per suite (default: the suite's own, 32768)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per row (median quoted)")
    parser.add_argument("--suites", default="gold,vif", help="comma-separated suites (default gold,vif)")
    parser.add_argument("--skip-tests", action="store_true", help="do not run pytest -m gpu first")
    parser.add_argument("--skip-cpu-vif", action="store_true", help="no cpu run of vif (it takes minutes)")
    parser.add_argument("--precisions", default="float64,float32",
                        help="comma-separated fast-pass precisions of every run (default float64,float32)")
    parser.add_argument("--json", type=Path, default=None, help="also write every result to this JSON file")
    args = parser.parse_args(argv)

    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"cwd: {os.getcwd()}")

    import residual_gpu as rg
    from residual_gpu.bench import format_table, run_suite

    for name, (usable, reason) in rg.available_backends().items():
        print(f"backend {name}: {'available' if usable else 'UNAVAILABLE'} - {reason}")
    usable, reason = rg.available_backends()["cuda"]
    if not usable:
        print(f"the cuda backend cannot run here: {reason}", file=sys.stderr)
        return 1
    print(f"device: {device_name()}")

    status = 0
    if not args.skip_tests:
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", str(ROOT / "tests" / "test_cuda_backend.py")]
        print(f"\n$ {shlex.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, check=False)
        print(f"pytest -m gpu: exit {proc.returncode} in {time.perf_counter() - t0:.1f}s", flush=True)
        if proc.returncode != 0:
            status = 1

    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    gemm = {dtype: device_gemm_gflops(dtype=dtype) for dtype in ("float64", "float32")}
    for dtype, (sec, rate) in gemm.items():
        print(f"device {dtype} GEMM (1024 x 512) @ (512 x 32768), cupy.matmul, synchronised: "
              f"{sec * 1e3:.3f} ms = {rate:.0f} GFLOP/s (median of 10)")
    print(f"device float32/float64 GEMM ratio: {gemm['float32'][1] / gemm['float64'][1]:.1f}")

    results = {"device": device_name(), "gemm_seconds": gemm["float64"][0], "gemm_gflops": gemm["float64"][1],
               "gemm_seconds_float32": gemm["float32"][0], "gemm_gflops_float32": gemm["float32"][1], "suites": []}
    for suite in [s.strip() for s in args.suites.split(",") if s.strip()]:
        for backend in ("cuda", "cpu"):
            if backend == "cpu" and suite == "vif" and args.skip_cpu_vif:
                continue
            print(f"\n$ residual_gpu.bench.run_suite({suite!r}, n={args.n}, backend={backend!r}, "
                  f"precisions={tuple(precisions)!r}, repeats={args.repeats})", flush=True)
            result = run_suite(suite, n=args.n, backend=backend, precisions=precisions, repeats=args.repeats,
                               progress=False)
            print(format_table(result), flush=True)
            results["suites"].append(result)
            if backend == "cuda":
                for row in result["rows"]:
                    rate = gemm[row["precision"]][1]
                    print(f"cuda brute force on {suite} ({row['precision']}, predecessor={row['predecessor']}): "
                          f"{row['gflops']:.0f} GFLOP/s achieved = {row['gflops'] / rate:.1%} of the device's "
                          f"{row['precision']} GEMM rate ({row['query_seconds'] * 1e3:.1f} ms for {row['queries']} "
                          f"queries)")
    build = device_build(args.n)
    results["build"] = build
    print(f"\nvif problem build (n={build['n']}, m={build['m']}, given inducing points): host {build['host_s']:.3f} s, "
          f"device {build['device_s']:.3f} s; V, p and norms bitwise equal: {build['bitwise']}")
    if not build["bitwise"]:
        status = 1
    # side-by-side summary: query seconds per suite and mode, cuda vs cpu
    print("\nsummary (median query seconds)")
    print("suite | precision | predecessor | cuda_s | cpu_s | cpu/cuda")
    by_key = {}
    for result in results["suites"]:
        for row in result["rows"]:
            key = (result["suite"], row["precision"], row["predecessor"])
            by_key.setdefault(key, {})[row["backend"]] = row["query_seconds"]
    for (suite, precision, pred), times in by_key.items():
        cuda_s, cpu_s = times.get("cuda"), times.get("cpu")
        ratio = f"{cpu_s / cuda_s:.1f}x" if cuda_s and cpu_s else "-"
        print(f"{suite} | {precision} | {pred} | {_seconds(cuda_s)} | {_seconds(cpu_s)} | {ratio}")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2, default=str))
        print(f"wrote {args.json}")
    return status


if __name__ == "__main__":
    sys.exit(main())
