"""Where a query's time goes, by function, Numba's compiled code included (docs/tree.md section 4).

    perf record -k CLOCK_MONOTONIC -F 999 -o query.perf -- python scripts/profile_query.py --suite vif --n 32768
    perf report -i query.perf --time START,END --no-children --sort dso,sym -g none

perf cannot name Numba's JIT code by itself, so after the queries this script writes
/tmp/perf-<pid>.map (the format perf reads for JIT code) with the address of every compiled
function, named module.function (a parfor body by the function that holds it). Functions loaded
from Numba's on-disk cache carry no symbol table, so it compiles afresh into a temporary cache.
It prints START and END, the CLOCK_MONOTONIC times around the timed queries (after one warm-up
query, so compilation is outside them), for ``perf report --time``.
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ["NUMBA_CACHE_DIR"] = tempfile.mkdtemp(prefix="numba-profile-")  # before numba loads

import gc
import re
import time

from numba.core.registry import CPUDispatcher

import residual_gpu as rg
from residual_gpu.suites import get_suite


def compiled_functions() -> dict:
    """address -> readable name of every function Numba has compiled in this process."""
    names = {}
    for obj in gc.get_objects():
        if not isinstance(obj, CPUDispatcher):
            continue
        owner = f"{obj.py_func.__module__}.{obj.py_func.__qualname__}"
        for cres in list(obj.overloads.values()):
            for fn in cres.library.get_defined_functions():
                addr = cres.library.get_pointer_to_function(fn.name)
                if not addr:
                    continue
                if "parfor" in fn.name:
                    names[addr] = owner + ".<parfor>"
                    continue
                # Numba mangles module.function as _ZN<len><part>...; keep the readable parts
                parts, rest = [], fn.name[3:] if fn.name.startswith("_ZN") else ""
                while (m := re.match(r"(\d+)", rest)) and not rest[len(m.group(1)):].startswith("_3c"):
                    size = int(m.group(1))
                    parts.append(rest[len(m.group(1)):len(m.group(1)) + size])
                    rest = rest[len(m.group(1)) + size:]
                names[addr] = ".".join(parts) if parts else fn.name
    return names


def write_perf_map(names: dict) -> str:
    path = f"/tmp/perf-{os.getpid()}.map"
    addrs = sorted(names)
    ends = addrs[1:] + [addrs[-1] + 65536] if addrs else []  # a function ends where the next starts
    with open(path, "w") as f:
        f.writelines(f"{a:x} {min(b - a, 1 << 20):x} {names[a]}\n" for a, b in zip(addrs, ends))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default="vif", choices=["vif", "spatial", "gold", "smoke"])
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--method", default="tree", choices=["tree", "brute"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--filter-rank", type=int, default=rg.TraversalFlags().filter_rank,
                    help="TraversalFlags.filter_rank of the tree (0: off; default: the library's)")
    args = ap.parse_args()
    case = get_suite(args.suite, args.n)
    prob = rg.ResidualProblem(case.coords, kernel=case.kernel, inducing=case.inducing, seed=case.seed)
    index = rg.ResidualIndex(prob, method=args.method, traversal=rg.TraversalFlags(filter_rank=args.filter_rank))
    index.query(case.k, predecessor=True, progress=False)
    start = time.monotonic()
    t0 = time.perf_counter()
    for _ in range(args.repeats):
        index.query(case.k, predecessor=True, progress=False)
    seconds = time.perf_counter() - t0
    end = time.monotonic()
    path = write_perf_map(compiled_functions())
    print(f"{args.repeats} queries of suite={args.suite} n={case.n} method={args.method}: {seconds:.2f} s")
    print(f"START,END for perf report --time: {start:.3f},{end:.3f}; symbols: {path}")


if __name__ == "__main__":
    main()
