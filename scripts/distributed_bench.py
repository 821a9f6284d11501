"""The `scale` suite on a LocalCluster against the single process, in one run (docs/benchmarks.md).

    PYTHONPATH=. python scripts/distributed_bench.py --n 262144 --queries 65536 --shards 2 --shards 64

``--method`` (default auto) is the shards' method; the single process always runs auto.

Queries: a seeded sample (``default_rng(0).choice(n, queries, replace=False)``, sorted) in the
suite's predecessor mode. The single process runs in its own process (its peak RSS is its
own); each shard count gets a fresh 2-worker cluster (1 thread each), so a worker's peak RSS
is that configuration's. Both answers must be the same bits; the script says so.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import time

import numpy as np

import residual_gpu as rg
from residual_gpu.suites import get_suite


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _single(n: int, queries: np.ndarray, out) -> None:
    case = get_suite("scale", n)
    t0 = time.perf_counter()
    prob = rg.ResidualProblem(case.coords, kernel=case.kernel, inducing=case.inducing, seed=case.seed)
    index = rg.ResidualIndex(prob, progress=False)
    t1 = time.perf_counter()
    res = index.query(case.k, queries=queries, predecessor=True, progress=False)
    t2 = time.perf_counter()
    np.save(out + ".idx.npy", res.indices)
    np.save(out + ".dist.npy", res.distances)
    with open(out + ".json", "w") as fh:
        json.dump({"build_s": t1 - t0, "query_s": t2 - t1, "peak_rss": _peak_rss_bytes(), "method": res.telemetry.method}, fh)


def _distributed(n: int, queries: np.ndarray, shards: int, workers: int, method: str) -> dict:
    from distributed import Client, LocalCluster

    import residual_gpu.distributed as rgd

    case = get_suite("scale", n)
    with (LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
          Client(cluster) as client):
        t0 = time.perf_counter()
        index = rgd.DistributedIndex(case.coords, case.kernel, case.inducing, client=client, shards=shards,
                                     seed=case.seed, method=method)
        t1 = time.perf_counter()
        res = index.query(case.k, queries=queries, predecessor=True)
        t2 = time.perf_counter()
        rss = client.run(_peak_rss_bytes)
        mem = index.shard_memory()
        index.close()
    tel = res.telemetry
    return {"build_s": t1 - t0, "query_s": t2 - t1, "worker_peak_rss": sorted(rss.values()),
            "shard_bytes": mem, "evaluations": tel.evaluations, "chunks": tel.chunks,
            "sent_per_chunk": float(np.mean(tel.searched)), "pruned_per_chunk": float(np.mean(tel.pruned)),
            "pruned_pair_share": tel.pruned_pair_share, "methods": tel.methods, "indices": res.indices, "distances": res.distances}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=262144)
    ap.add_argument("--queries", type=int, default=4096)
    ap.add_argument("--shards", type=int, action="append")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--method", default="auto", choices=["auto", "brute", "tree"])
    args = ap.parse_args()
    shards = args.shards or [args.workers]
    queries = np.sort(np.random.default_rng(0).choice(args.n, args.queries, replace=False))
    out = f"/tmp/distributed_bench_{args.n}"
    proc = mp.get_context("spawn").Process(target=_single, args=(args.n, queries, out))
    proc.start()
    proc.join()
    with open(out + ".json") as fh:
        single = json.load(fh)
    ref_idx, ref_dist = np.load(out + ".idx.npy"), np.load(out + ".dist.npy")
    mib = 2.0**20
    print(f"scale n={args.n}, {args.queries} sampled queries, k=30, predecessor; single process "
          f"(method {single['method']}): build {single['build_s']:.1f} s, query {single['query_s']:.1f} s, "
          f"peak RSS {single['peak_rss'] / mib:.0f} MiB")
    print("| shards | build s | query s | total vs single | worker peak RSS MiB | vs single | shards sent / pruned "
          "per chunk | pairs pruned | shard MiB (mean) | evaluations per shard (mean, max/mean) | searches by method | "
          "same bits |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    total = single["build_s"] + single["query_s"]
    for p in shards:
        r = _distributed(args.n, queries, p, args.workers, args.method)
        same = np.array_equal(r["indices"], ref_idx) and np.array_equal(r["distances"], ref_dist)
        ev = np.asarray(r["evaluations"], dtype=np.float64)
        rss = max(r["worker_peak_rss"])
        print(f"| {p} | {r['build_s']:.1f} | {r['query_s']:.1f} | {(r['build_s'] + r['query_s']) / total:.2f}x | "
              f"{rss / mib:.0f} | {rss / single['peak_rss']:.2f}x | {r['sent_per_chunk']:.1f} / "
              f"{r['pruned_per_chunk']:.1f} | {r['pruned_pair_share']:.2f} | {np.mean(r['shard_bytes']) / mib:.1f} | "
              f"{ev.mean():.3g}, {ev.max() / max(ev.mean(), 1):.2f} | "
              f"{', '.join(f'{m} {c}' for m, c in sorted(r['methods'].items()))} | {same} |", flush=True)


if __name__ == "__main__":
    main()
