#!/usr/bin/env bash
# The exactness and parity tests again, under another CPU dispatch than this machine's native
# one, so that one CI machine proves they do not depend on its SIMD level, BLAS kernel or exp:
#   - Numba compiles for a generic CPU (no FMA, no AVX), with its own cache;
#   - OpenBLAS runs another kernel family than the one CI's environment picked;
#   - numpy's dispatched SIMD levels above its baseline are all switched off (its exp, sums, ...).
#
#   bash .ci/alt_dispatch.sh [pytest args]   (from anywhere; residual_gpu and the oracle installed)
set -euo pipefail
cd "$(dirname "$0")/.."

case "$(uname -m)" in
    x86_64) coretype=Sandybridge ;;   # AVX, no AVX2/FMA: every x86-64 CI machine runs it
    aarch64 | arm64) coretype=ARMV8 ;;
    *) coretype="" ;;
esac
# numpy's dispatch targets above its baseline that this CPU has (numpy refuses unknown names)
npy_off=$(python - <<'EOF'
from numpy._core import _multiarray_umath as m
print(" ".join(f for f in m.__cpu_dispatch__ if m.__cpu_features__.get(f)))
EOF
)
cache=$(mktemp -d "${TMPDIR:-/tmp}/numba-generic.XXXXXX")
trap 'rm -rf "$cache"' EXIT

export NUMBA_CPU_NAME=generic NUMBA_CACHE_DIR="$cache" NPY_DISABLE_CPU_FEATURES="$npy_off"
if [ -n "$coretype" ]; then export OPENBLAS_CORETYPE="$coretype"; fi
echo "alternative dispatch: NUMBA_CPU_NAME=$NUMBA_CPU_NAME OPENBLAS_CORETYPE=${OPENBLAS_CORETYPE:-unset}" \
     "NPY_DISABLE_CPU_FEATURES='$NPY_DISABLE_CPU_FEATURES'"
python - <<'EOF'
import numpy as np
from threadpoolctl import threadpool_info
from numpy._core import _multiarray_umath as m
print("numpy SIMD in use:", [f for f in m.__cpu_dispatch__ if m.__cpu_features__.get(f)] or "baseline only",
      "| BLAS:", [(i["internal_api"], i.get("architecture")) for i in threadpool_info() if i["user_api"] == "blas"])
EOF
python -m pytest -q tests/test_parity.py tests/test_brute.py tests/test_tree.py tests/test_rust_oracle.py \
    tests/test_precision.py tests/test_comparison_helper.py tests/test_determinism.py tests/test_properties.py \
    tests/test_float32.py tests/test_build.py tests/test_query_from_factors.py tests/test_traversal_flags.py \
    tests/test_tree_schedule.py tests/test_leaf_filter.py tests/test_blas.py \
    tests/test_cuda_backend.py "$@"
