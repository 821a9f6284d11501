#!/usr/bin/env python
"""Plot queries per second against n, one line per method (and backend, mode).

Needs matplotlib, which is not a dependency of residual_gpu: ``python -m pip install matplotlib``.

Inputs (any mix of):
  * JSON written by ``residual-gpu bench --suite vif --n N --json > vif_N.json``
    (one file per n; every row becomes a point);
  * asv result files, ``asv_benchmarks/results/<machine>/<commit>-<env>.json``, or a results
    folder (every result file under it). Queries per second there is
    queries per batch / ``knn.QueryTime.time_query`` (asv stores the time of one full query
    batch); the queries per batch come from ``residual_gpu.suites.get_suite(suite, n)``, so
    the package must be importable for asv inputs.

Examples:
    for n in 2048 8192 32768; do residual-gpu bench --suite vif --n $n --json > vif_$n.json; done
    python scripts/plot_scaling.py vif_*.json -o vif_scaling.png
    python scripts/plot_scaling.py asv_benchmarks/results --suite vif -o asv_vif.png
"""

from __future__ import annotations

import argparse
import ast
import itertools
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

ASV_TIME_KEY = "knn.QueryTime.time_query"


def _bench_records(doc: dict, source: str) -> list[dict]:
    # source labels the series; every bench file is one n of the same series
    """Points from one ``residual-gpu bench --json`` document."""
    records = []
    for row in doc["rows"]:
        mode = "predecessor" if row.get("predecessor") else "plain"
        records.append({"suite": doc["suite"], "n": int(doc["n"]), "method": row["method"],
                        "backend": row["backend"], "mode": mode,
                        "qps": float(row["queries_per_second"]), "source": source})
    return records


def _queries_per_batch(suite: str, n: int) -> int:
    try:
        from residual_gpu.suites import get_suite
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise SystemExit(f"asv inputs need residual_gpu importable (for the suites' query counts): {exc}")
    case = get_suite(suite, n)
    return case.n if case.queries is None else int(case.queries.size)


def _asv_records(doc: dict, source: str) -> list[dict]:
    """Points from one asv result file (results format version 2, asv 0.6)."""
    entry = doc.get("results", {}).get(ASV_TIME_KEY)
    if entry is None:
        return []
    columns = doc["result_columns"]
    values = entry[columns.index("result")]
    params = entry[columns.index("params")]
    names = ("backend", "method", "suite", "n", "mode")
    if len(params) != len(names):
        raise SystemExit(f"{source}: {ASV_TIME_KEY} has {len(params)} parameters, expected {names}")
    label = f"{doc.get('commit_hash', '')[:8]}"
    records = []
    batch_sizes = {}
    for combo, seconds in zip(itertools.product(*params), values):
        if seconds is None or math.isnan(seconds):  # skipped or failed
            continue
        backend, method, suite, n, mode = (ast.literal_eval(p) for p in combo)
        key = (suite, int(n))
        if key not in batch_sizes:
            batch_sizes[key] = _queries_per_batch(suite, int(n))
        records.append({"suite": suite, "n": int(n), "method": method, "backend": backend, "mode": mode,
                        "qps": batch_sizes[key] / float(seconds), "source": label})
    return records


def _expand(paths: list[str]) -> list[Path]:
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(f for f in sorted(p.rglob("*.json")) if f.name not in ("machine.json", "benchmarks.json"))
        else:
            files.append(p)
    return files


def load_records(paths: list[str]) -> list[dict]:
    records = []
    for path in _expand(paths):
        try:
            doc = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise SystemExit(f"cannot read {path}: {exc}")
        if isinstance(doc, dict) and "rows" in doc and "suite" in doc:
            records.extend(_bench_records(doc, "bench"))  # one file per n: same series
        elif isinstance(doc, dict) and "result_columns" in doc:
            records.extend(_asv_records(doc, path.name))
        else:
            raise SystemExit(f"{path}: neither `residual-gpu bench --json` output nor an asv result file")
    return records


def plot(records: list[dict], output: str, title: str | None = None) -> None:
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("matplotlib is needed for plotting: python -m pip install matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def label_parts(r):
        return (r["suite"], r["method"], r["backend"], r["mode"], r["source"])

    series = defaultdict(dict)
    for r in records:
        # the same point twice (e.g. two runs at one n): keep the higher rate, the one least
        # disturbed by other load on the machine
        key = label_parts(r)
        series[key][r["n"]] = max(r["qps"], series[key].get(r["n"], 0.0))
    # only show the parts of the label that differ between series
    varying = [i for i in range(5) if len({k[i] for k in series}) > 1]
    varying = varying or [1]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key in sorted(series):
        ns = sorted(series[key])
        label = " / ".join(str(key[i]) for i in varying)
        ax.plot(ns, [series[key][n] for n in ns], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("n (points)")
    ax.set_ylabel("queries per second")
    fixed = [f"{name}={next(iter(series))[i]}" for i, name in enumerate(("suite", "method", "backend", "mode", "source"))
             if i not in varying and name != "source"]
    default_title = "residual_gpu: exact k-NN throughput" + (f"\n{', '.join(fixed)}" if fixed else "")
    ax.set_title(title or default_title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(output, dpi=120)
    print(f"wrote {output}: {len(series)} series, {sum(len(s) for s in series.values())} points")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("inputs", nargs="+", help="bench --json files, asv result files or asv results folders")
    ap.add_argument("-o", "--output", default="scaling.png", help="PNG to write (default: scaling.png)")
    ap.add_argument("--suite", default=None, help="keep only this suite (e.g. vif)")
    ap.add_argument("--backend", default=None, help="keep only this backend")
    ap.add_argument("--title", default=None)
    args = ap.parse_args(argv)
    records = load_records(args.inputs)
    if args.suite:
        records = [r for r in records if r["suite"] == args.suite]
    if args.backend:
        records = [r for r in records if r["backend"] == args.backend]
    if not records:
        print("no data points in the inputs (after filtering)", file=sys.stderr)
        return 1
    plot(records, args.output, args.title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
