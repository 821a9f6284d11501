#!/usr/bin/env bash
# CI smoke run of the asv suite: every benchmark once, on the fast profile, against the
# installed residual_gpu (--python=same: no build, nothing saved). Exits non-zero when
# a benchmark failed or the suite could not be imported.
#
#   bash asv_benchmarks/run_smoke.sh   (from anywhere; needs asv, from the dev extra, and
#                                       residual_gpu installed in the `python` on PATH)
#
# asv 0.6 has no --strict; `asv run` itself exits 2 when any benchmark (or any parameter
# combination) failed and 1 when discovery failed. We also read its log: a "failed" result
# line, or the CPU backend being skipped (it must always run), fails the smoke run too.
set -uo pipefail
cd "$(dirname "$0")"

# asv through the `python` that has residual_gpu installed: --python=same means "the Python
# running asv", so this pins the benchmarks to that interpreter.
asv() { python -m asv "$@"; }

log=$(mktemp "${TMPDIR:-/tmp}/asv-smoke.XXXXXX")
trap 'rm -f "$log"' EXIT
start=$(date +%s)

asv machine --yes >/dev/null || { echo "asv machine --yes failed" >&2; exit 1; }
RESIDUAL_GPU_ASV_PROFILE=fast asv check --python=same || { echo "asv check failed" >&2; exit 1; }

RESIDUAL_GPU_ASV_PROFILE=fast asv run --quick --python=same --show-stderr 2>&1 | tee "$log"
status=${PIPESTATUS[0]}

fail() {
    echo "asv smoke: $*" >&2
    if [ "$status" -eq 0 ]; then status=1; fi
}
if grep -Eq '(^|[[:space:]])([0-9]+/[0-9]+ )?failed[[:space:]]*$' "$log"; then
    fail "a benchmark failed (see 'failed' above)"
fi
if grep -q "backend 'cpu' unavailable" "$log"; then
    fail "the cpu backend was skipped; it must always run"
fi
if ! grep -q 'knn.QueryTime.time_query *ok' "$log"; then
    fail "time_query did not report ok"
fi

echo "asv smoke: exit status ${status}, $(( $(date +%s) - start )) s"
exit "$status"
