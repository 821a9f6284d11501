"""Problem build before and after, in the same run: the package at a git revision against this one.

    PYTHONPATH=. python scripts/build_bench.py [--old eade2ef] [--repeats 3]

The old revision is checked out once with ``git worktree add --detach`` under the system's
temporary directory. Each repeat runs one subprocess per version (old, then new, alternating,
so that the noise of a shared machine falls on both), which imports that version's package,
builds once untimed (Numba compilation, caches) and then times, on the `vif` coordinates:

- ``kmeans++``: ``inducing.kmeanspp_indices`` alone;
- ``given U``: ``ResidualProblem(coords, kernel, inducing=U)``, U the kmeans++ points as an array;
- ``given U, again``: the same build once more in the same process, on memory the allocator
  reuses (no first touch of V's n x m pages);
- ``with kmeans++``: ``ResidualProblem(coords, kernel, inducing=m, seed=0)``, the whole build;
- ``with kmeans`` (where the version has ``inducing_method``): the same with Lloyd iterations.

It prints medians per (case, stage) and the ratio old / new, checks that both versions choose
the same inducing points, reports the largest |V_new - V_old| on a sample of rows and the
median residual variance with kmeans++ and with kmeans inducing points.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
#: (n, m) of each case: the vif suite's default size, and the scale suite's m at 262144 points
CASES = ((32768, 512), (262144, 256))
STAGES = ("kmeans++", "given U", "given U, again", "with kmeans++")

_WORKER = r"""
import inspect, json, sys, time
import numpy as np
import residual_gpu as rg
from residual_gpu.inducing import kmeanspp_indices
from residual_gpu.suites import vif

n, m, sample_path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
case = vif(n, m=m)
x, kern = case.coords, case.kernel
rg.ResidualProblem(x[:2048], kernel=kern, inducing=m // 4, seed=0)  # untimed: compilation, caches
out = {"package": rg.__file__}
t = time.perf_counter(); idx = kmeanspp_indices(x, m, 0); out["kmeans++"] = time.perf_counter() - t
u = x[idx]
t = time.perf_counter(); prob = rg.ResidualProblem(x, kernel=kern, inducing=u); out["given U"] = time.perf_counter() - t
del prob
# the same build again: the allocator hands back the pages V just freed, so this one does not
# pay the first touch of n x m fresh memory (slow in this VM: up to ~3 ms per MiB)
t = time.perf_counter(); prob = rg.ResidualProblem(x, kernel=kern, inducing=u); out["given U, again"] = time.perf_counter() - t
del prob
t = time.perf_counter(); prob = rg.ResidualProblem(x, kernel=kern, inducing=m, seed=0)
out["with kmeans++"] = time.perf_counter() - t
out["indices"] = prob.inducing_indices.tolist()
out["median p"] = float(np.median(prob.p))
np.save(sample_path, prob.v[::997])
del prob
if "inducing_method" in inspect.signature(rg.ResidualProblem).parameters:
    t = time.perf_counter(); prob = rg.ResidualProblem(x, kernel=kern, inducing=m, seed=0, inducing_method="kmeans")
    out["with kmeans"] = time.perf_counter() - t
    out["median p kmeans"] = float(np.median(prob.p))
print(json.dumps(out))
"""


def old_checkout(rev: str) -> Path:
    """A detached worktree of ``rev`` (made once; reused when it is already there)."""
    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", rev], check=True,
                         capture_output=True, text=True).stdout.strip()
    path = Path(tempfile.gettempdir()) / f"residual_gpu_{sha}"
    if not (path / "residual_gpu").is_dir():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), sha], check=True,
                       capture_output=True)
    return path


def run_worker(package_root: Path, n: int, m: int, sample_path: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(package_root))
    proc = subprocess.run([sys.executable, "-c", _WORKER, str(n), str(m), sample_path], env=env, check=True,
                          capture_output=True, text=True, cwd=tempfile.gettempdir())
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["package"].startswith(str(package_root)), out["package"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", default="eade2ef", help="git revision of the 'old' package")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    old_root = old_checkout(args.old)
    print(f"old: {args.old} at {old_root}; new: {ROOT}; medians of {args.repeats}, old and new alternating")
    print("n | m | stage | old_s | new_s | old/new")
    with tempfile.TemporaryDirectory() as tmp:
        for n, m in CASES:
            times = {(ver, s): [] for ver in ("old", "new") for s in STAGES}
            picks, samples = {}, {}
            for _ in range(args.repeats):
                for ver, root in (("old", old_root), ("new", ROOT)):
                    sample = os.path.join(tmp, f"{ver}.npy")
                    out = run_worker(root, n, m, sample)
                    for s in STAGES:
                        times[ver, s].append(out[s])
                    if "with kmeans" in out:
                        times.setdefault((ver, "with kmeans"), []).append(out["with kmeans"])
                        median_p = (out["median p"], out["median p kmeans"])
                    picks[ver], samples[ver] = out["indices"], np.load(sample)
            for s in STAGES:
                old, new = np.median(times["old", s]), np.median(times["new", s])
                print(f"{n} | {m} | {s} | {old:.3f} | {new:.3f} | {old / new:.2f}x")
            lloyd = times.get(("new", "with kmeans"))
            print(f"{n} | {m} | with kmeans | - | {np.median(lloyd):.3f} | (new only)")
            same = picks["old"] == picks["new"]
            diff = np.max(np.abs(samples["new"] - samples["old"]))
            print(f"{n} | {m} | same kmeans++ choices: {same}; max |V_new - V_old| on every 997th row: {diff:.2e}; "
                  f"median p: kmeans++ {median_p[0]:.4f}, kmeans {median_p[1]:.4f}")


if __name__ == "__main__":
    main()
