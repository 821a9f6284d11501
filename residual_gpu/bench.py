"""Running a suite: build and query timings, evaluation counts, and the GEMM yardstick.

Every rate is quoted next to a plain GEMM of the same shape and precision (q x m times m x n,
numpy's BLAS, float64 and float32) timed in the same run, because absolute numbers on shared
machines are noise.
"""

from __future__ import annotations

import platform
import time

import numpy as np
from threadpoolctl import threadpool_info

from . import __version__
from .errors import InvalidArgumentError
from .index import ResidualIndex
from .problem import ResidualProblem
from .suites import get_suite

#: most query rows of the GEMM yardstick actually multiplied (the time is scaled to all rows)
GEMM_ROWS = 1024
#: timed products of the yardstick per precision, after one untimed full-size product each
#: (whatever --repeats says: one cold product ran at half the machine's rate, which made "of
#: GEMM" exceed 100%). The two precisions alternate, so a noisy neighbour hits both alike, and
#: the best time is taken: noise only ever slows a product down.
GEMM_REPEATS = 7


def gemm_seconds(q: int, n: int, m: int, dtypes=(np.float64, np.float32)) -> dict:
    """{dtype name: best time} of one (q, m) @ (m, n) product per dtype through numpy's BLAS, warm."""
    rng = np.random.default_rng(0)
    a64 = rng.standard_normal((q, m))
    b64 = rng.standard_normal((n, m))
    pairs = {np.dtype(t).name: (a64.astype(t), b64.astype(t)) for t in dtypes}
    for a, b in pairs.values():
        a @ b.T  # warm: BLAS threads, page faults of the output, caches
    best = {name: np.inf for name in pairs}
    for _ in range(GEMM_REPEATS):
        for name, (a, b) in pairs.items():
            t0 = time.perf_counter()
            a @ b.T
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def run_suite(name: str, n: int | None = None, backend: str = "auto", methods=("brute",), precisions=("auto",),
              repeats: int = 3, progress: bool | None = None) -> dict:
    """Run one suite; returns a JSON-serialisable dict (rows: one per method, precision and mode)."""
    if repeats < 1:
        raise InvalidArgumentError(f"repeats must be >= 1, got repeats={repeats!r}")
    case = get_suite(name, n)
    t0 = time.perf_counter()
    problem = ResidualProblem(case.coords, kernel=case.kernel, inducing=case.inducing, seed=case.seed, backend=backend)
    problem_seconds = time.perf_counter() - t0
    q = case.n if case.queries is None else case.queries.size
    # The yardstick is timed on at most GEMM_ROWS query rows (a q x n float64 product does not fit in
    # memory at large n) and scaled to all q rows: GEMM time is linear in the rows.
    gemm_rows = min(q, GEMM_ROWS)
    gemm = {name: sec * (q / gemm_rows) for name, sec in gemm_seconds(gemm_rows, case.n, problem.m).items()}
    gemm_rate = {name: 2.0 * q * case.n * problem.m / sec / 1e9 for name, sec in gemm.items()}
    rows = []
    all_ids = np.arange(case.n) if case.queries is None else case.queries
    warm_ids = all_ids[np.linspace(0, all_ids.size - 1, min(all_ids.size, 256)).astype(np.int64)]
    for method, precision in [(m, p) for m in methods for p in precisions]:
        index = ResidualIndex(problem, backend=backend, method=method, precision=precision, progress=progress)
        for predecessor in case.modes:
            # "auto" decides for the timed query (its estimate counts as build time), so that
            # the warm-up below compiles what the timed query runs
            method_used = index.method_for(queries=case.queries, predecessor=predecessor, progress=progress)

            def once(ids=None, index=index, predecessor=predecessor):
                return index.query(case.k, queries=case.queries if ids is None else ids, predecessor=predecessor,
                                   progress=progress)
            once(warm_ids)  # warm-up on a subset: JIT compilation and caches are not timed
            res = None
            times = []
            for _ in range(repeats):
                t1 = time.perf_counter()
                res = once()
                times.append(time.perf_counter() - t1)
            seconds = float(np.median(times))
            tel = res.telemetry
            evals = tel.distance_evaluations
            pairs = sum(int(min(lim, case.n)) for lim in _limits(case, predecessor))
            gflops = 2.0 * evals * problem.m / seconds / 1e9
            gemm_gflops = gemm_rate[index.precision]  # the yardstick of the row's own precision
            work = evals + tel.bound_products + tel.filter_products
            rows.append({
                "requested": method, "method": method_used, "backend": index.backend, "predecessor": predecessor,
                "auto_reason": index.auto_reason, "requested_precision": precision, "precision": index.precision,
                "precision_reason": index.precision_reason,
                "queries": q, "k": case.k, "query_seconds": seconds,
                "queries_per_second": q / seconds,
                "distance_evaluations": evals, "evaluations_per_query": evals / q,
                "candidate_share": evals / max(pairs, 1),
                "accurate_evaluations": tel.accurate_evaluations,
                "recertified_queries": tel.recertified_queries,
                "gflops": gflops, "gemm_gflops": gemm_gflops, "gemm_fraction": gflops / gemm_gflops,
                "build_seconds": problem_seconds + index.build_seconds,
                "index_build_seconds": index.build_seconds,
                "index_build_phases": dict(index.build_seconds_by_phase),
                "total_seconds": index.build_seconds + seconds,
                "bound_products": tel.bound_products, "filter_products": tel.filter_products,
                "filter_pairs": tel.filter_pairs, "filter_drops": tel.filter_drops,
                "work_share": work / max(pairs, 1),
                "nodes_visited": tel.nodes_visited, "prunes_bound": tel.prunes_bound,
                "brute_queries": tel.brute_queries, "tree_nodes": tel.tree_nodes,
            })
    for r in rows:  # end-to-end speed-up over brute force measured in this run, same mode: over float64
        # brute force where the run has it, else over brute force in the row's own precision
        brute = [b for b in rows if b["method"] == "brute" and b["requested"] == "brute"
                 and b["predecessor"] == r["predecessor"]]
        base = ([b for b in brute if b["precision"] == "float64"] or [b for b in brute if b["precision"] == r["precision"]])
        r["speedup_vs_brute"] = base[0]["total_seconds"] / r["total_seconds"] if base else None
    return {
        "suite": case.name, "n": case.n, "d": problem.d, "m": problem.m, "k": case.k,
        "kernel": repr(case.kernel), "median_p": float(np.median(problem.p)),
        "problem_seconds": problem_seconds, "gemm_seconds": gemm["float64"], "gemm_seconds_float32": gemm["float32"],
        "gemm_gflops": gemm_rate["float64"], "gemm_gflops_float32": gemm_rate["float32"],
        "gemm_rows": gemm_rows, "gemm_repeats": GEMM_REPEATS, "repeats": repeats,
        "version": __version__, "machine": platform.machine(), "python": platform.python_version(),
        "blas": [{k: info.get(k) for k in ("internal_api", "version", "num_threads", "architecture")}
                 for info in threadpool_info()],
        "rows": rows,
    }


def _limits(case, predecessor):
    """Admissible candidates per query (for the share of candidates evaluated)."""
    ids = np.arange(case.n) if case.queries is None else case.queries
    return ids if predecessor else np.full(ids.size, case.n - 1)


def format_table(result: dict) -> str:
    head = (f"suite={result['suite']} n={result['n']} d={result['d']} m={result['m']} k={result['k']} "
            f"kernel={result['kernel']} median_p={result['median_p']:.3g} "
            f"problem_build={result['problem_seconds']:.2f}s (median of {result['repeats']})\n"
            f"GEMM yardstick (same shape, warm, best of {result.get('gemm_repeats', 1)}): float64 "
            f"{result['gemm_gflops']:.1f} GFLOP/s, float32 {result.get('gemm_gflops_float32', float('nan')):.1f} "
            f"GFLOP/s, ratio {result.get('gemm_gflops_float32', float('nan')) / result['gemm_gflops']:.2f}")
    cols = ["method", "precision", "backend", "predecessor", "build_s", "index_s", "query_s", "total_s", "vs brute",
            "queries/s", "evals/query", "share", "work", "GFLOP/s", "GEMM GFLOP/s", "of GEMM", "recert"]
    lines = [head, " | ".join(cols)]
    for r in result["rows"]:
        name = r["method"] if r.get("requested", r["method"]) == r["method"] else f"{r['requested']}->{r['method']}"
        speed = r.get("speedup_vs_brute")
        lines.append(" | ".join([
            name, r.get("precision", "float64"), r["backend"], str(r["predecessor"]), f"{r['build_seconds']:.2f}",
            f"{r.get('index_build_seconds', 0.0):.2f}", f"{r['query_seconds']:.3f}",
            f"{r.get('total_seconds', r['query_seconds']):.2f}", "-" if speed is None else f"{speed:.2f}x",
            f"{r['queries_per_second']:.0f}", f"{r['evaluations_per_query']:.0f}",
            f"{r['candidate_share']:.3f}", f"{r.get('work_share', r['candidate_share']):.3f}",
            f"{r['gflops']:.1f}", f"{r['gemm_gflops']:.1f}",
            f"{r['gemm_fraction']:.0%}", str(r["recertified_queries"]),
        ]))
    for r in result["rows"]:
        if r.get("auto_reason"):
            lines.append(f"auto (predecessor={r['predecessor']}): {r['auto_reason']}")
        if r.get("precision_reason"):
            lines.append(f"precision auto ({r['method']}, predecessor={r['predecessor']}): {r['precision_reason']}")
    lines.append("build_s: problem + index; index_s: index only (backend prepare, tree); total_s = index_s + "
                 "query_s; share: distance evaluations per admissible candidate; work: (evaluations + bound and leaf-"
                 "filter dot products) per admissible candidate; of GEMM: GFLOP/s against the GEMM of the row's precision")
    return "\n".join(lines)


def run_parity(name: str, n: int | None = None, backend: str = "auto", methods=("brute", "tree")) -> dict:
    """One suite on the Python engine and on the Rust oracle, side by side.

    Needs the oracle (``pip install ./rust_ref``). Method "brute": the engine's brute force
    against the oracle's; "tree": the engine's tree in the ``parity`` preset against the
    oracle's re-implementation (also comparing the tree arrays and every telemetry counter).
    Reports, per method and mode, both timings, how many result rows have identical indices,
    the largest distance difference, and which tree arrays and counters differ.
    """
    from .index import PRESETS
    from .parity import (
        counter_mismatches,
        load_oracle,
        oracle_brute_knn,
        oracle_tree_build,
        oracle_tree_knn,
        tree_mismatches,
    )

    oracle = load_oracle()
    case = get_suite(name, n)
    problem = ResidualProblem(case.coords, kernel=case.kernel, inducing=case.inducing, seed=case.seed)
    queries = np.arange(case.n, dtype=np.int64) if case.queries is None else case.queries.astype(np.int64)
    preset = PRESETS["parity"]
    rows = []
    engine_backend = backend
    for method in methods:
        if method not in ("brute", "tree"):
            raise InvalidArgumentError(f"methods must hold 'brute' or 'tree', got {method!r}")
        extra = {}
        if method == "brute":
            index = ResidualIndex(problem, backend=backend, method="brute")
        else:
            index = ResidualIndex(problem, backend=backend, method="tree", preset="parity")
            t0 = time.perf_counter()
            theirs = oracle_tree_build(oracle, problem, preset)
            extra = {"oracle_build_seconds": time.perf_counter() - t0, "engine_build_seconds": index.build_seconds,
                     "tree_arrays_differing": tree_mismatches(index.tree, theirs)}
        engine_backend = index.backend
        for predecessor in case.modes:
            index.query(case.k, queries=queries[:8], predecessor=predecessor, progress=False)  # JIT warm-up
            t0 = time.perf_counter()
            ours = index.query(case.k, queries=queries, predecessor=predecessor, progress=False)
            t1 = time.perf_counter()
            if method == "brute":
                ref_idx, ref_dist = oracle_brute_knn(oracle, problem, case.k, queries, predecessor)
                counters = {}
            else:
                ref_idx, ref_dist, counters = oracle_tree_knn(oracle, problem, case.k, queries, predecessor, preset)
            t2 = time.perf_counter()
            finite = ref_idx >= 0
            row = {
                "method": method, "predecessor": predecessor, "engine_seconds": t1 - t0, "oracle_seconds": t2 - t1,
                "rows_identical": int(np.all(ours.indices == ref_idx, axis=1).sum()), "rows": int(queries.size),
                "max_abs_distance_difference": float(np.max(np.abs(ours.distances[finite] - ref_dist[finite]),
                                                            initial=0.0)),
            }
            if method == "tree":
                row.update(extra)
                row["counters_differing"] = {k: list(v) for k, v in counter_mismatches(ours.telemetry, counters).items()}
                row["engine_counters"] = {k: int(getattr(ours.telemetry, k)) for k in counters}
                row["oracle_counters"] = {k: int(v) for k, v in counters.items()}
            rows.append(row)
    return {"suite": case.name, "n": case.n, "k": case.k, "backend": engine_backend,
            "oracle_version": getattr(oracle, "__version__", "?"), "median_p": float(np.median(problem.p)),
            "rows": rows}


def format_parity(result: dict) -> str:
    lines = [(f"parity suite={result['suite']} n={result['n']} k={result['k']} median_p={result['median_p']:.3g} "
              f"engine backend={result['backend']} oracle=residual_gpu_ref {result['oracle_version']}"),
             ("method | predecessor | engine_s | oracle_s | rows with identical indices | max |d_engine - d_oracle| "
              "| tree arrays | counters")]
    for r in result["rows"]:
        tree_col = counters_col = "-"
        if r["method"] == "tree":
            bad = r["tree_arrays_differing"]
            tree_col = "identical" if not bad else "DIFFER: " + ", ".join(bad)
            diff = r["counters_differing"]
            counters_col = (f"{len(r['oracle_counters'])} identical" if not diff
                            else "DIFFER: " + ", ".join(f"{k} {v[0]} vs {v[1]}" for k, v in diff.items()))
        lines.append(f"{r['method']} | {r['predecessor']} | {r['engine_seconds']:.2f} | {r['oracle_seconds']:.2f} | "
                     f"{r['rows_identical']}/{r['rows']} | {r['max_abs_distance_difference']:.2e} | {tree_col} | "
                     f"{counters_col}")
    tree_rows = [r for r in result["rows"] if r["method"] == "tree"]
    if tree_rows:
        lines.append("tree counters (engine = oracle unless marked), predecessor=" + str(tree_rows[-1]["predecessor"]) + ":")
        last = tree_rows[-1]
        lines.append("  " + ", ".join(f"{k}={v}" + ("" if k not in last["counters_differing"] else
                                                      f" (oracle {last['oracle_counters'][k]})")
                                       for k, v in last["engine_counters"].items()))
    return "\n".join(lines)
