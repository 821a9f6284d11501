"""CuPy backend: cuBLAS (cupy.matmul) for V_Q V_C^T, CUDA C kernels for the rest.

Layout on the device (``prepare``, copied once): coordinates transposed (d, n) so that the
threads of a block read consecutive candidates, V (n, m), 1/sqrt(p) (n,), 1/lengthscale (d,).

``select_candidates`` streams the data set in tiles. Per query tile (at most QUERY_TILE
rows) and candidate tile (as wide as fits in TILE_ELEMENTS entries, so at most 128 MiB of G
whatever n is) it runs one GEMM G = V_Q V_C^T in V's precision (DGEMM; SGEMM for a float32
fast pass, whose V is float32) and one launch of ``residual_select_tile`` (``_f32`` for float32
G; kernels/residual_select.cu): one thread block per query row computes the fast
a = min(|variance g(r2) - G| / sqrt(p_q p_c), 1) of its row, exactly as the CPU backend's
formula, and folds it into that row's bounded heap (the ``keep`` largest a) and its exact
dropped maximum. The heaps (q, keep) stay on the device between tiles (staged in shared
memory inside a launch when keep <= SHARED_HEAP_MAX_KEEP); only the final Candidates come
back to the host, as numpy arrays. Certification happens on the host, as for every backend.

The .cu sources live at the repository root in ``kernels/``. They are found next to the
source tree (a checkout or an editable install) or, for an installed wheel, where the
setuptools ``data-files`` entry of pyproject.toml puts them:
``<prefix>/share/residual_gpu/kernels/``. They are compiled by NVRTC through
cupy.RawModule on first use (never at import) and cached by CuPy on disk.
"""

from __future__ import annotations

import math
import site
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import BackendUnavailableError
from .base import Backend, Candidates, QueryBatch

#: Query rows per GEMM / select launch (one thread block per row).
QUERY_TILE = 2048
#: Entries in one tile of G = V_Q V_C^T (2**24 doubles = 128 MiB); fixes the candidate tile width.
TILE_ELEMENTS = 1 << 24
#: Widest candidate tile (used when a query tile has few rows, e.g. certification retries).
MAX_CANDIDATE_TILE = 1 << 16
#: Threads per block of the select kernel (passed to NVRTC as -DRG_SELECT_BLOCK).
SELECT_BLOCK = 256
#: Threads per block of the dense kernel.
DENSE_BLOCK = 256
#: Largest keep whose heap (16 bytes per entry) is staged in dynamic shared memory.
SHARED_HEAP_MAX_KEEP = 2048

KERNEL_FILE = "residual_select.cu"
#: The problem's factors V, p, ||V_i|| (CudaBackend.cross_factors), compiled without FMA contraction.
FACTORS_FILE = "residual_factors.cu"
FACTORS_OPTIONS = ("--fmad=false",)
#: Threads per block of the factors kernel.
FACTORS_BLOCK = 128
#: which source file defines each kernel
KERNEL_FILES = {"residual_select_tile": KERNEL_FILE, "residual_select_tile_f32": KERNEL_FILE,
                "residual_abs_rho_dense": KERNEL_FILE, "residual_abs_rho_dense_f32": KERNEL_FILE,
                "residual_cross_factors": FACTORS_FILE}
#: Where an installed wheel keeps the kernels (relative to the installation's data prefix).
DATA_SUBDIR = Path("share") / "residual_gpu" / "kernels"

_INSTALL_HINT = "pip install 'residual-gpu[cuda12]' or '[cuda13]'"
_NOT_INSTALLED = f"CuPy is not installed ({_INSTALL_HINT})"


# -- locating the CUDA sources ---------------------------------------------------------
def kernel_dirs() -> list[Path]:
    """Folders searched for the .cu sources, in order: the source tree, then data prefixes."""
    dirs = [Path(__file__).resolve().parents[2] / "kernels"]
    prefixes = [sysconfig.get_path("data"), sys.prefix, sys.base_prefix]
    try:
        prefixes.append(site.getuserbase())
    except Exception:  # noqa: BLE001, S110  # pragma: no cover - exotic site configurations: skip the user base
        pass
    for prefix in prefixes:
        if prefix:
            dirs.append(Path(prefix) / DATA_SUBDIR)
    unique = []
    for d in dirs:
        if d not in unique:
            unique.append(d)
    return unique


def kernel_source_path(name: str = KERNEL_FILE) -> Path:
    """Path of a .cu source; raises BackendUnavailableError when no copy is found."""
    dirs = kernel_dirs()
    for d in dirs:
        path = d / name
        if path.is_file():
            return path
    raise BackendUnavailableError(
        f"backend 'cuda': CUDA source {name} not found; looked in {[str(d) for d in dirs]} "
        "(reinstall residual-gpu: the wheel ships it under share/residual_gpu/kernels)"
    )


def kernel_source(name: str = KERNEL_FILE) -> str:
    return kernel_source_path(name).read_text(encoding="utf-8")


# -- the device runtime ------------------------------------------------------------------
class _CupyRuntime:
    """What the backend needs from CuPy: the array module, kernel launches, copies to the host.

    Kept behind this small interface so that the host-side tiling can also be exercised
    against an emulation of the kernels (tests/test_cuda_backend.py).
    """

    def __init__(self, cupy):
        self.xp = cupy
        self._modules = {}

    def _function(self, name: str):
        source = KERNEL_FILES[name]
        options = select_options() if source == KERNEL_FILE else FACTORS_OPTIONS
        module = self._modules.get((source, options))
        if module is None:
            module = self.xp.RawModule(code=kernel_source(source), options=options)
            self._modules[(source, options)] = module
        return module.get_function(name)

    def launch(self, name: str, grid: int, block: int, args: tuple, shared_mem: int = 0) -> None:
        self._function(name)((int(grid),), (int(block),), args, shared_mem=int(shared_mem))

    def asnumpy(self, a) -> np.ndarray:
        return self.xp.asnumpy(a)


_RUNTIME = None


def _runtime():
    """The process-wide CuPy runtime (imports CuPy; kernels compile on first launch)."""
    global _RUNTIME
    if _RUNTIME is None:
        import cupy

        _RUNTIME = _CupyRuntime(cupy)
    return _RUNTIME


@dataclass(frozen=True)
class _Prepared:
    runtime: object
    xt: object           # (d, n) device coordinates, transposed
    v: object            # (n, m) device
    inv_sqrt_p: object   # (n,) device
    inv_scale: object    # (d,) device, 1 / lengthscale
    kernel_id: int
    variance: float
    n: int
    d: int


def candidate_tile_width(rows: int) -> int:
    """Candidate columns per tile for a query tile of ``rows`` rows (multiple of SELECT_BLOCK)."""
    width = TILE_ELEMENTS // max(rows, 1)
    width = max(SELECT_BLOCK, min(MAX_CANDIDATE_TILE, width))
    return width // SELECT_BLOCK * SELECT_BLOCK


def select_options(block: int = SELECT_BLOCK) -> tuple[str, ...]:
    """NVRTC's options for residual_select.cu: the block size, and the float32 correlation's
    clamp from the host's own constant (-_numba_math._EXP32_MIN), so the device cannot drift
    from the CPU's _corr32."""
    from .. import _numba_math as nm

    return (f"-DRG_SELECT_BLOCK={int(block)}", f"-DRG_EXP32_CLAMP={float(-nm._EXP32_MIN)!r}f")


def factor_constants() -> np.ndarray:
    """The constants residual_factors.cu reads (its RG_C_* slots), from _numba_math itself."""
    from .. import _numba_math as nm

    return np.array([nm._LOG2E, nm._ROUND_SHIFT, nm._LN2_HI, nm._LN2_LO, nm._EXP_MIN, nm._EXP_MAX,
                     nm._SQRT3, nm._SQRT5, *nm._EXP_COEF], dtype=np.float64)


def kernel_name(base: str, g_dtype) -> str:
    """The kernel instantiated for G's precision: ``base`` for float64, ``base_f32`` for float32."""
    return base if np.dtype(g_dtype) == np.float64 else f"{base}_f32"


class CudaBackend(Backend):
    """CuPy on an NVIDIA GPU: cuBLAS DGEMM tiles and fused CUDA C select kernels."""

    name = "cuda"

    @classmethod
    def availability(cls):
        try:
            import cupy
        except ImportError:
            return False, _NOT_INSTALLED
        except Exception as exc:  # noqa: BLE001 - a broken installation (CUDA libraries that do not load) is reported, not raised
            return False, f"CuPy is installed but failed to import ({type(exc).__name__}: {exc}); {_INSTALL_HINT}"
        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except Exception as exc:  # noqa: BLE001 - a driver or runtime error of any type means no usable device
            return False, f"CuPy is installed but sees no CUDA device ({type(exc).__name__}: {exc})"
        if count == 0:
            return False, "CuPy is installed but sees no CUDA device (getDeviceCount() == 0)"
        try:
            props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.runtime.getDevice())
            name = props["name"]
            name = name.decode() if isinstance(name, bytes) else str(name)
        except Exception:  # noqa: BLE001  # pragma: no cover - the name is cosmetic
            name = "a CUDA device"
        return True, f"CuPy {cupy.__version__} on {name}"

    def prepare(self, problem):
        rt = _runtime()
        xp = rt.xp
        return _Prepared(
            runtime=rt,
            xt=xp.asarray(np.ascontiguousarray(problem.coords.T)),
            v=xp.asarray(problem.v),
            inv_sqrt_p=xp.asarray(1.0 / np.sqrt(problem.p)),
            inv_scale=xp.asarray(1.0 / problem.lengthscales),
            kernel_id=int(problem.kernel.kernel_id),
            variance=float(problem.kernel.variance),
            n=int(problem.n),
            d=int(problem.d),
        )

    @staticmethod
    def _queries(xp, batch: QueryBatch, v_dtype):
        return (xp.asarray(np.ascontiguousarray(batch.coords, dtype=np.float64)),
                xp.asarray(np.ascontiguousarray(batch.v, dtype=v_dtype)),
                xp.asarray(1.0 / np.sqrt(batch.p)))

    def cross_factors(self, chol, inducing, coords, kernel, p_floor):
        """(V, p, ||V_i||) built on the device by kernels/residual_factors.cu: bitwise the host's
        (_linalg.cross_factors), in chunks whose (m, chunk) scratch fits TILE_ELEMENTS."""
        rt = _runtime()
        xp = rt.xp
        coords = np.ascontiguousarray(coords, dtype=np.float64)
        q, d = coords.shape
        m = inducing.shape[0]
        chol_d = xp.asarray(np.ascontiguousarray(chol, dtype=np.float64))
        u_d = xp.asarray(np.ascontiguousarray(inducing, dtype=np.float64))
        scale = xp.asarray(np.ascontiguousarray(kernel.lengthscales(d), dtype=np.float64))
        consts = xp.asarray(factor_constants())
        v, p, norms = np.empty((q, m)), np.empty(q), np.empty(q)
        chunk = max(1, min(q, TILE_ELEMENTS // max(m, 1)))
        yt = xp.empty((m, chunk))
        for q0 in range(0, q, chunk):
            q1 = min(q0 + chunk, q)
            rows = q1 - q0
            vd, pd, nd = xp.empty((rows, m)), xp.empty(rows), xp.empty(rows)
            rt.launch("residual_cross_factors", min(math.ceil(rows / FACTORS_BLOCK), 1 << 16), FACTORS_BLOCK, (
                chol_d, np.int32(m), u_d, np.int32(d), xp.asarray(coords[q0:q1]), np.int64(rows), scale, consts,
                np.int32(kernel.kernel_id), np.float64(kernel.variance), np.float64(p_floor * kernel.variance),
                yt if rows == chunk else xp.empty((m, rows)), vd, pd, nd))
            v[q0:q1], p[q0:q1], norms[q0:q1] = rt.asnumpy(vd), rt.asnumpy(pd), rt.asnumpy(nd)
        return v, p, norms

    def abs_rho_tile(self, prepared, batch: QueryBatch, cols: np.ndarray) -> np.ndarray:
        cols = np.asarray(cols, dtype=np.int64)
        q, c = batch.size, cols.size
        if q == 0 or c == 0:
            return np.empty((q, c))
        rt = prepared.runtime
        xp = rt.xp
        qx, qv, qip = self._queries(xp, batch, prepared.v.dtype)
        dcols = xp.asarray(cols)
        g = xp.ascontiguousarray(qv @ prepared.v[dcols].T)
        xc = xp.ascontiguousarray(prepared.xt[:, dcols])
        ipc = xp.ascontiguousarray(prepared.inv_sqrt_p[dcols])
        out = xp.empty((q, c))
        blocks = min(math.ceil(q * c / DENSE_BLOCK), 1 << 20)  # grid-stride loop covers the rest
        rt.launch(kernel_name("residual_abs_rho_dense", g.dtype), blocks, DENSE_BLOCK,
                  (g, np.int64(q), np.int64(c), qx, np.int32(prepared.d), qip, xc, ipc, prepared.inv_scale,
                   np.int32(prepared.kernel_id), np.float64(prepared.variance), out))
        return rt.asnumpy(out)

    def select_candidates(self, prepared, batch: QueryBatch, keep: int) -> Candidates:
        rt = prepared.runtime
        xp = rt.xp
        q = batch.size
        keep = int(keep)
        heap_a = xp.full((q, keep), -1.0)
        heap_i = xp.full((q, keep), -1, dtype=np.int64)
        count = xp.zeros(q, dtype=np.int32)
        a_dropped = xp.full(q, -1.0)
        evaluations = xp.zeros(q, dtype=np.int64)
        if q == 0:
            return Candidates(index=np.full((0, keep), -1, dtype=np.int64), abs_rho=np.full((0, keep), -1.0),
                              a_dropped=np.full(0, -1.0), evaluations=0)
        qx, qv, qip = self._queries(xp, batch, prepared.v.dtype)
        qself = xp.asarray(np.ascontiguousarray(batch.self_index, dtype=np.int64))
        qlimit = xp.asarray(np.ascontiguousarray(batch.limit, dtype=np.int64))
        use_shared = keep <= SHARED_HEAP_MAX_KEEP
        shared_mem = 16 * keep if use_shared else 0
        select = kernel_name("residual_select_tile", prepared.v.dtype)
        for q0 in range(0, q, QUERY_TILE):
            q1 = min(q0 + QUERY_TILE, q)
            rows = q1 - q0
            stop = min(int(batch.limit[q0:q1].max()), prepared.n)
            width = candidate_tile_width(rows)
            for c0 in range(0, stop, width):
                c1 = min(c0 + width, stop)
                g = qv[q0:q1] @ prepared.v[c0:c1].T  # cuBLAS DGEMM, or SGEMM for float32 V
                rt.launch(select, rows, SELECT_BLOCK, (
                    g, np.int32(c1 - c0),
                    qx[q0:q1], np.int32(prepared.d), qip[q0:q1], qself[q0:q1], qlimit[q0:q1],
                    prepared.xt, np.int64(prepared.n), prepared.inv_sqrt_p, prepared.inv_scale,
                    np.int32(prepared.kernel_id), np.float64(prepared.variance), np.int64(c0),
                    heap_a[q0:q1], heap_i[q0:q1], np.int32(keep), np.int32(use_shared),
                    count[q0:q1], a_dropped[q0:q1], evaluations[q0:q1],
                ), shared_mem)
        return Candidates(index=rt.asnumpy(heap_i), abs_rho=rt.asnumpy(heap_a),
                          a_dropped=rt.asnumpy(a_dropped), evaluations=int(evaluations.sum()))

    def prepare_bounds(self, mid: np.ndarray, rad: np.ndarray):
        rt = _runtime()
        return rt, rt.xp.asarray(np.ascontiguousarray(mid)), rt.xp.asarray(np.ascontiguousarray(rad))

    def bound_products(self, prepared_bounds, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rt, mid, rad = prepared_bounds
        xp = rt.xp
        ad = xp.asarray(np.ascontiguousarray(a, dtype=mid.dtype))
        s0 = ad @ mid.T  # cuBLAS in the summaries' precision (CuPy does not use TF32 unless asked)
        sr = xp.abs(ad) @ rad.T
        return rt.asnumpy(s0).astype(np.float64, copy=False), rt.asnumpy(sr).astype(np.float64, copy=False)
