"""Exact kNN driver shared by every method: a select pass, then host certification.

A method supplies ``select(batch, keep) -> Candidates``: for brute force the backend's
streaming select over all candidates; for the tree a traversal that also counts pruned
subtrees as dropped (with their upper bound on |rho|). Queries are processed in chunks
(bounded memory whatever q is), each chunk ordered by its admissible limit so that
predecessor-mode tiles stop early. A query whose k-th neighbour the fast values cannot
certify is searched again with four times as many kept candidates; once ``keep`` covers
every admissible candidate nothing is dropped and certification cannot fail, so the loop
ends. A batch with a ``floor`` is certified against it (certify.py): rows hold the top k
within the floor.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
from tqdm.auto import tqdm

from .backends import Candidates, QueryBatch
from .certify import certify_and_rank
from .precision import candidate_maxima, query_margins
from .telemetry import Telemetry

QUERY_CHUNK = 4096
#: Most (query, kept candidate) slots one select call may hold; bounds retries' memory.
CANDIDATE_SLOTS = 1 << 22


def initial_keep(k: int) -> int:
    """Candidates kept per query in the first pass: k plus room for near-ties."""
    return k + max(8, k // 2)


def exact_knn(select: Callable[[QueryBatch, int], Candidates], problem, batch: QueryBatch, k: int,
              telemetry: Telemetry, progress: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(indices, distances) for every query of ``batch``, certified exact (see certify.py)."""
    q = batch.size
    out_index = np.full((q, k), -1, dtype=np.int64)
    out_dist = np.full((q, k), np.inf)
    w_max, ip_max = candidate_maxima(problem.v_norms, problem.p)
    order = np.argsort(batch.limit, kind="stable")
    telemetry.keep = initial_keep(k)
    # progress=None: a bar only for multi-chunk runs on a terminal (tqdm's disable=None)
    disable = True if progress is False or (progress is None and q <= QUERY_CHUNK) else (None if progress is None else False)
    bar = tqdm(total=q, unit="query", disable=disable, desc=f"residual kNN ({telemetry.method}, {telemetry.backend})",
               leave=False)
    # work items: (query rows, candidates to keep); failures come back with 4x the keep
    work = [(order[start:start + QUERY_CHUNK], telemetry.keep) for start in range(0, q, QUERY_CHUNK)][::-1]
    while work:
        rows, keep = work.pop()
        keep = min(keep, int(batch.limit[rows].max()))
        if keep == 0:  # predecessor mode, first point(s): nothing is admissible, rows stay padded
            bar.update(rows.size)
            continue
        fits = max(1, CANDIDATE_SLOTS // keep)  # retries with a large keep go a few queries at a time
        if rows.size > fits:
            work.append((rows[fits:], keep))
            rows = rows[:fits]
        sub = batch.take(rows)
        t0 = time.perf_counter()
        cand = select(sub, keep)
        t1 = time.perf_counter()
        margin = cand.margin if cand.margin is not None else query_margins(
            sub.v_norms, sub.p, w_max, ip_max, problem.m, problem.d, problem.kernel.variance)
        idx = np.empty((sub.size, k), dtype=np.int64)
        dist = np.empty((sub.size, k))
        ok = np.zeros(sub.size, dtype=np.bool_)
        acc = np.zeros(sub.size, dtype=np.int64)
        floor = sub.floor if sub.floor is not None else np.full(sub.size, np.inf)
        certify_and_rank(k, cand.index, cand.abs_rho, cand.a_dropped, margin, floor, sub.coords, sub.v, sub.p,
                         problem.coords, problem.v, problem.p, problem.lengthscales,
                         problem.kernel.kernel_id, problem.kernel.variance, idx, dist, ok, acc)
        telemetry.add_seconds("select", t1 - t0)
        telemetry.add_seconds("certify", time.perf_counter() - t1)
        telemetry.distance_evaluations += cand.evaluations
        telemetry.block_requests += 1
        telemetry.accurate_evaluations += int(acc.sum())
        out_index[rows[ok]] = idx[ok]
        out_dist[rows[ok]] = dist[ok]
        if not np.all(ok):
            telemetry.recertified_queries += int(np.count_nonzero(~ok))
            work.append((rows[~ok], keep * 4))
        bar.update(int(np.count_nonzero(ok)))
    bar.close()
    return out_index, out_dist
