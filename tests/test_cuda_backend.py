"""The CuPy backend.

Three layers, so that most of it is checked on machines without a GPU:

- unmarked tests: availability messages with CuPy hidden or without a device, "auto" and
  RESIDUAL_GPU_BACKEND behaviour, the .cu sources found by the loader (source tree and
  installed layout), nothing imported at ``import residual_gpu``;
- unmarked tests on an *emulated device*: kernels/residual_select.cu compiled by the host
  C++ compiler (-DRG_HOST_EMULATION; each thread block run as real std::threads with a
  std::barrier for __syncthreads, shared memory shared between them) and driven by the
  backend's own host code with numpy standing in for CuPy. This checks the select and
  transform kernels, the tiling, the launch arguments (their C types are checked against
  the kernels' signatures) and the exact a_dropped, end to end against backend="cpu" and
  the reference. Skipped when no C++20 compiler is found;
- ``@pytest.mark.gpu`` tests: the same checks on a real device through CuPy; skipped with
  the reason when CuPy is missing or sees no device. ``pytest -m gpu`` runs only these.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import types
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    CASE_IDS,
    CASES,
    assert_float32_equals_float64,
    assert_select_matches_cpu,
    check_knn,
    fast_value_tolerance,
    make_problem,
)

import residual_gpu as rg
import residual_gpu.backends.cuda as cuda_backend
from residual_gpu import backends as reg
from residual_gpu import search
from residual_gpu.backends import get_backend
from residual_gpu.backends.cuda import CudaBackend
from residual_gpu.errors import BackendUnavailableError
from residual_gpu.problem import ProblemView


def check(problem, k, **kwargs):
    """Results through this backend equal the reference and backend "cpu"."""
    return check_knn(problem, k, backend="cuda", **kwargs)


ENV = "RESIDUAL_GPU_BACKEND"
ROOT = Path(__file__).resolve().parents[1]



@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)


def hide_cupy(monkeypatch):
    """Make ``import cupy`` fail as if it were not installed (availability is not cached)."""
    monkeypatch.setitem(sys.modules, "cupy", None)
    monkeypatch.setattr(cuda_backend, "_RUNTIME", None)


# --------------------------------------------------------------------------------------
# Without CuPy / without a device
# --------------------------------------------------------------------------------------


def test_without_cupy_cuda_is_unavailable_and_says_how_to_install(monkeypatch):
    hide_cupy(monkeypatch)
    usable, reason = CudaBackend.availability()
    assert not usable
    assert "CuPy is not installed" in reason and "residual-gpu[cuda12]" in reason and "[cuda13]" in reason
    with pytest.raises(BackendUnavailableError) as info:
        get_backend("cuda")
    assert "cuda12" in str(info.value) and "cuda13" in str(info.value)
    problem = make_problem(0, 40, 2, rg.RBF(lengthscale=0.3), 5)
    with pytest.raises(BackendUnavailableError):
        rg.ResidualIndex(problem, backend="cuda")  # an explicit name never falls back


def test_without_cupy_auto_resolves_to_cpu(monkeypatch):
    hide_cupy(monkeypatch)
    assert reg.resolve_backend_name("auto") == "cpu"
    assert get_backend("auto").name == "cpu"
    assert rg.ResidualIndex(make_problem(0, 40, 2, rg.RBF(lengthscale=0.3), 5)).backend == "cpu"


def test_env_var_cuda_without_cupy_raises(monkeypatch):
    hide_cupy(monkeypatch)
    monkeypatch.setenv(ENV, "cuda")
    with pytest.raises(BackendUnavailableError, match="cuda.*CuPy is not installed.*cuda12"):
        get_backend("auto")
    with pytest.raises(BackendUnavailableError):
        rg.ResidualIndex(make_problem(0, 40, 2, rg.RBF(lengthscale=0.3), 5))


def _fake_cupy(device_count):
    def get_device_count():
        if isinstance(device_count, Exception):
            raise device_count
        return device_count

    runtime = types.SimpleNamespace(getDeviceCount=get_device_count)
    return types.SimpleNamespace(__version__="13.0.0", cuda=types.SimpleNamespace(runtime=runtime))


@pytest.mark.parametrize("count", [0, RuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")],
                         ids=["zero-devices", "runtime-error"])
def test_cupy_without_device_says_so(monkeypatch, count):
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(count))
    usable, reason = CudaBackend.availability()
    assert not usable
    assert "CuPy is installed but sees no CUDA device" in reason
    assert "not installed" not in reason
    with pytest.raises(BackendUnavailableError, match="sees no CUDA device"):
        get_backend("cuda")
    assert reg.resolve_backend_name("auto") == "cpu"


def test_importing_the_package_imports_no_cupy_or_jax():
    code = ("import sys, residual_gpu, residual_gpu.backends.cuda, residual_gpu.backends.jax; "
            "assert 'cupy' not in sys.modules and 'jax' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------------------
# Locating the CUDA sources
# --------------------------------------------------------------------------------------


def test_kernel_sources_are_found_without_cupy(monkeypatch):
    hide_cupy(monkeypatch)
    path = cuda_backend.kernel_source_path()
    assert path.is_file() and path.stat().st_size > 0
    assert path == ROOT / "kernels" / cuda_backend.KERNEL_FILE  # the source tree wins in a checkout
    src = cuda_backend.kernel_source()
    for name in ("residual_select_tile", "residual_select_tile_f32", "residual_abs_rho_dense",
                 "residual_abs_rho_dense_f32", "RG_SELECT_BLOCK"):
        assert name in src


def test_kernel_sources_are_found_in_an_installed_layout(monkeypatch, tmp_path):
    """A wheel puts kernels/*.cu under <prefix>/share/residual_gpu/kernels (pyproject data-files)."""
    site_pkgs = tmp_path / "lib" / "python3" / "site-packages"
    fake_module = site_pkgs / "residual_gpu" / "backends" / "cuda.py"
    data = tmp_path / cuda_backend.DATA_SUBDIR
    data.mkdir(parents=True)
    (data / cuda_backend.KERNEL_FILE).write_text("// installed copy\n")
    monkeypatch.setattr(cuda_backend, "__file__", str(fake_module))
    monkeypatch.setattr(sysconfig, "get_path", lambda name, *a, **k: str(tmp_path) if name == "data" else None)
    assert cuda_backend.kernel_source_path() == data / cuda_backend.KERNEL_FILE
    (data / cuda_backend.KERNEL_FILE).unlink()
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "nowhere"))
    monkeypatch.setattr(sys, "base_prefix", str(tmp_path / "nowhere"))
    monkeypatch.setattr(cuda_backend.site, "getuserbase", lambda: str(tmp_path / "nowhere"))
    with pytest.raises(BackendUnavailableError, match="not found"):
        cuda_backend.kernel_source_path()


def test_pyproject_ships_every_kernel_source():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    data_files = config["tool"]["setuptools"]["data-files"]
    shipped = data_files[cuda_backend.DATA_SUBDIR.as_posix()]
    on_disk = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "kernels").glob("*.cu"))
    assert on_disk and sorted(shipped) == on_disk


def _nvrtc_library():
    """libnvrtc from the nvidia-cuda-nvrtc wheel (which CuPy users often have) or the system."""
    import ctypes.util
    import glob
    import importlib.util

    candidates = []
    spec = importlib.util.find_spec("nvidia")
    for base in (spec.submodule_search_locations or []) if spec else []:
        candidates += sorted(glob.glob(os.path.join(base, "cuda_nvrtc", "lib", "libnvrtc.so*")))
    found = ctypes.util.find_library("nvrtc")
    if found:
        candidates.append(found)
    for path in candidates:
        if "builtins" in path or ".alt." in path:
            continue
        try:
            return ctypes.CDLL(path)
        except OSError:
            continue
    return None


def check_nvrtc(lib, name, options, entries):
    """Compile kernels/<name> with NVRTC (compute_80) and check its PTX has ``entries`` and its log no warning."""
    prog = ctypes.c_void_p()
    src = cuda_backend.kernel_source(name).encode()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), src, name.encode(), 0, None, None) == 0
    opts = [o.encode() for o in options] + [b"--gpu-architecture=compute_80"]
    rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    assert rc == 0, log.value.decode()
    lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
    ptx = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetPTX(prog, ptx)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    for entry in entries:
        assert f".entry {entry}(" in ptx.value.decode()
    assert "warning" not in log.value.decode().lower(), log.value.decode()
    if "--fmad=false" in options:
        assert_only_two_prod_fmas(ptx.value.decode())


def assert_only_two_prod_fmas(ptx: str):
    """No contracted multiply-add in the PTX: every fma.rn.f64 is Dot2's TwoProduct of y with
    itself, fma(y, y, -(y * y)) (unrolled copies included); a contraction of r2 += diff * diff,
    acc - l * y or Horner's p * r + c would have another third operand."""
    negated = {}
    fmas = []
    for line in ptx.splitlines():
        op, _, args = line.strip().partition(" ")
        regs = [a.strip(" \t;") for a in args.split(",")]
        if op == "neg.f64":
            negated[regs[0]] = regs[1]
        elif op == "fma.rn.f64":
            fmas.append(regs)
    assert fmas, "Dot2's TwoProduct FMA is missing"
    for dst, a, b, c in fmas:
        assert a == b and c in negated, f"a contracted multiply-add: fma {a}, {b}, {c}"


def test_kernels_compile_with_nvrtc():
    """The .cu source through NVRTC (the compiler cupy.RawModule uses); needs no GPU, only libnvrtc."""
    lib = _nvrtc_library()
    if lib is None:
        pytest.skip("libnvrtc not found (pip install nvidia-cuda-nvrtc-cu12 to run this check without CuPy)")
    check_nvrtc(lib, cuda_backend.FACTORS_FILE, list(cuda_backend.FACTORS_OPTIONS), ["residual_cross_factors"])
    for block in (cuda_backend.SELECT_BLOCK, 32):
        check_nvrtc(lib, cuda_backend.KERNEL_FILE, list(cuda_backend.select_options(block)),
                    ["residual_select_tile", "residual_select_tile_f32", "residual_abs_rho_dense",
                     "residual_abs_rho_dense_f32"])


# --------------------------------------------------------------------------------------
# Emulated device: the .cu kernels compiled for the host, driven by the backend's host code
# --------------------------------------------------------------------------------------

_EMULATION_HEADER = r"""
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <string>
#include <thread>
#include <utility>
#include <vector>
using std::exp; using std::fabs; using std::ldexp; using std::sqrt;

struct rg_dim3 { unsigned x, y, z; };
static thread_local rg_dim3 threadIdx;
static thread_local rg_dim3 blockIdx;
static rg_dim3 blockDim, gridDim;
static std::barrier<>* rg_barrier = nullptr;
static char* rg_dynamic_shared = nullptr;

static inline void __syncthreads() { rg_barrier->arrive_and_wait(); }
static inline int atomicAdd(int* address, int value) { return __atomic_fetch_add(address, value, __ATOMIC_SEQ_CST); }

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static  /* one block runs at a time: function statics are its shared memory */
#define RG_DYNAMIC_SHARED(type, name) type* name = reinterpret_cast<type*>(rg_dynamic_shared)
#define RG_HOST_EMULATION 1
#include "residual_select.cu"
#include "residual_factors.cu"

template <typename T> struct rg_code;
template <> struct rg_code<int> { static constexpr char c = 'i'; };
template <> struct rg_code<long long> { static constexpr char c = 'q'; };
template <> struct rg_code<double> { static constexpr char c = 'd'; };
template <> struct rg_code<int*> { static constexpr char c = 'I'; };
template <> struct rg_code<long long*> { static constexpr char c = 'Q'; };
template <> struct rg_code<double*> { static constexpr char c = 'D'; };
template <> struct rg_code<const int*> { static constexpr char c = 'I'; };
template <> struct rg_code<const long long*> { static constexpr char c = 'Q'; };
template <> struct rg_code<const double*> { static constexpr char c = 'D'; };
template <> struct rg_code<const float*> { static constexpr char c = 'F'; };

template <typename... A> static std::string rg_signature(void (*)(A...)) { return std::string{rg_code<A>::c...}; }

template <typename... A, std::size_t... I>
static void rg_call(void (*kernel)(A...), void** args, std::index_sequence<I...>) {
    kernel(*static_cast<A*>(args[I])...);
}

template <typename... A>
static void rg_launch(void (*kernel)(A...), unsigned grid, unsigned block, std::size_t shared, void** args) {
    // `block` threads live for the whole launch and run the blocks one after the other; the
    // barrier that implements __syncthreads also separates consecutive blocks.
    blockDim = {block, 1, 1};
    gridDim = {grid, 1, 1};
    std::vector<char> dynamic(shared + 64);
    rg_dynamic_shared = dynamic.data();
    std::barrier<> barrier(block);
    rg_barrier = &barrier;
    std::vector<std::thread> threads;
    threads.reserve(block);
    for (unsigned t = 0; t < block; ++t)
        threads.emplace_back([&, t] {
            threadIdx = {t, 0, 0};
            for (unsigned b = 0; b < grid; ++b) {
                if (t == 0) std::memset(dynamic.data(), 0xff, dynamic.size());  // garbage (NaN) until written
                barrier.arrive_and_wait();
                blockIdx = {b, 0, 0};
                rg_call(kernel, args, std::index_sequence_for<A...>{});
                barrier.arrive_and_wait();  // every thread has left block b
            }
        });
    for (auto& th : threads) th.join();
}

static std::string rg_sig_buffer;

extern "C" const char* rg_emu_signature(const char* name) {
    const std::string n(name);
    if (n == "residual_select_tile") rg_sig_buffer = rg_signature(residual_select_tile);
    else if (n == "residual_select_tile_f32") rg_sig_buffer = rg_signature(residual_select_tile_f32);
    else if (n == "residual_abs_rho_dense") rg_sig_buffer = rg_signature(residual_abs_rho_dense);
    else if (n == "residual_abs_rho_dense_f32") rg_sig_buffer = rg_signature(residual_abs_rho_dense_f32);
    else if (n == "residual_cross_factors") rg_sig_buffer = rg_signature(residual_cross_factors);
    else return nullptr;
    return rg_sig_buffer.c_str();
}

extern "C" int rg_emu_launch(const char* name, unsigned grid, unsigned block, std::size_t shared, void** args) {
    const std::string n(name);
    if (n == "residual_select_tile") rg_launch(residual_select_tile, grid, block, shared, args);
    else if (n == "residual_select_tile_f32") rg_launch(residual_select_tile_f32, grid, block, shared, args);
    else if (n == "residual_abs_rho_dense") rg_launch(residual_abs_rho_dense, grid, block, shared, args);
    else if (n == "residual_abs_rho_dense_f32") rg_launch(residual_abs_rho_dense_f32, grid, block, shared, args);
    else if (n == "residual_cross_factors") rg_launch(residual_cross_factors, grid, block, shared, args);
    else return 1;
    return 0;
}
"""

#: CUDA's default limit on dynamic + static shared memory per block without opt-in.
_SHARED_LIMIT = 48 * 1024
_DTYPE_OF = {"I": np.int32, "Q": np.int64, "D": np.float64, "F": np.float32}
_SCALAR_OF = {"i": (np.int32, ctypes.c_int32), "q": (np.int64, ctypes.c_int64), "d": (np.float64, ctypes.c_double)}


class _EmulatedRuntime:
    """Stands in for cuda._CupyRuntime: numpy arrays, kernels run by the host-compiled library."""

    xp = np

    def __init__(self, lib, block):
        self.lib = lib
        self.block = block
        self.launches = []

    def launch(self, name, grid, block, args, shared_mem=0):
        sig = self.lib.rg_emu_signature(name.encode())
        assert sig is not None, f"unknown kernel {name}"
        sig = sig.decode()
        assert len(sig) == len(args), f"{name}: {len(args)} arguments for a signature of {len(sig)}"
        if name.startswith("residual_select_tile"):
            assert block == self.block == cuda_backend.SELECT_BLOCK, "block size must match -DRG_SELECT_BLOCK"
        assert 1 <= grid < 2**31 and 1 <= block <= 1024
        assert 0 <= shared_mem and shared_mem + 3 * 8 * self.block + 64 <= _SHARED_LIMIT
        holders = []
        for pos, (code, arg) in enumerate(zip(sig, args)):
            if code in _DTYPE_OF:
                assert isinstance(arg, np.ndarray), f"{name} argument {pos}: expected an array, got {type(arg)}"
                assert arg.dtype == _DTYPE_OF[code], f"{name} argument {pos}: dtype {arg.dtype} for C code {code}"
                assert arg.flags.c_contiguous, f"{name} argument {pos}: not contiguous"
                holders.append(ctypes.c_void_p(arg.ctypes.data))
            else:
                dtype, ctype = _SCALAR_OF[code]
                assert type(arg) is dtype, f"{name} argument {pos}: {type(arg).__name__} for C code {code}"
                holders.append(ctype(arg.item()))
        argv = (ctypes.c_void_p * len(holders))(*[ctypes.cast(ctypes.byref(h), ctypes.c_void_p) for h in holders])
        self.launches.append((name, grid, block, shared_mem))
        assert self.lib.rg_emu_launch(name.encode(), grid, block, shared_mem, argv) == 0

    @staticmethod
    def asnumpy(a):
        return np.array(a)


def _compiler():
    for name in (os.environ.get("CXX"), "g++", "clang++", "c++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@pytest.fixture(scope="session")
def emulation_library(tmp_path_factory):
    """build(block) -> ctypes library of kernels/residual_select.cu compiled for the host."""
    cxx = _compiler()
    if cxx is None:
        pytest.skip("no host C++ compiler (g++/clang++) to emulate the CUDA kernels")
    folder = tmp_path_factory.mktemp("cuda_emulation")
    (folder / "emulation.cpp").write_text(_EMULATION_HEADER)
    built = {}

    def build(block):
        if block not in built:
            out = folder / f"residual_select_{block}.so"
            # -ffp-contract=off: as NVRTC's --fmad=false for residual_factors.cu (no FMA contraction)
            cmd = [cxx, "-std=c++20", "-O1", "-ffp-contract=off", "-shared", "-fPIC", "-pthread", "-Wall", "-Werror",
                   "-Wno-unused-function", *cuda_backend.select_options(block), f"-I{ROOT / 'kernels'}",
                   str(folder / "emulation.cpp"), "-o", str(out)]
            proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
            if proc.returncode != 0 and "barrier" in proc.stderr and "No such file" in proc.stderr:
                pytest.skip(f"{cxx} has no C++20 <barrier>")
            assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr}"
            lib = ctypes.CDLL(str(out))
            lib.rg_emu_signature.restype = ctypes.c_char_p
            lib.rg_emu_signature.argtypes = [ctypes.c_char_p]
            lib.rg_emu_launch.restype = ctypes.c_int
            lib.rg_emu_launch.argtypes = [ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_size_t,
                                          ctypes.POINTER(ctypes.c_void_p)]
            built[block] = lib
        return built[block]

    return build


@pytest.fixture
def emulated(monkeypatch, emulation_library):
    """backend="cuda" runs on the emulated device (small blocks, so chunks are crossed often)."""
    block = 32
    monkeypatch.setattr(cuda_backend, "SELECT_BLOCK", block)
    monkeypatch.setattr(cuda_backend, "DENSE_BLOCK", 64)
    runtime = _EmulatedRuntime(emulation_library(block), block)
    monkeypatch.setattr(cuda_backend, "_runtime", lambda: runtime)
    monkeypatch.setattr(CudaBackend, "availability", classmethod(lambda cls: (True, "emulated on the host")))
    return runtime



def run_query_kinds(problem, d, ks=(1, 7, 40)):
    for k in ks:
        check(problem, k)
        check(problem, k, predecessor=True)
    queries = np.random.default_rng(11).integers(0, problem.n, 40)
    check(problem, 9, queries=queries)
    res = check(problem, 9, queries=queries, predecessor=True)
    small = queries < 9
    assert np.all((res.indices[small] >= 0).sum(axis=1) == queries[small])
    xnew = np.random.default_rng(21).random((30, d))
    xnew[:3] = problem.coords[:3]
    check(problem, 11, query_coords=xnew)
    check(problem, problem.n, query_coords=xnew)  # every point


def compare_abs_rho_tile_with_cpu(dtype=np.float64, kernel=None):
    """The dense kernel against the CPU backend's tile, with V (and the products) in ``dtype``."""
    x = np.random.default_rng(9).random((300, 3))
    x[-1] = 1e19  # r^2 beyond float32's range: the Matern polynomial must not make inf * 0 = NaN
    u = np.random.default_rng(10).random((20, 3))  # off the data: p is a sizeable share of the variance
    kernel = rg.Matern52(lengthscale=0.3, variance=1.3) if kernel is None else kernel
    problem = rg.ResidualProblem(x, kernel=kernel, inducing=u)
    batch = rg.ResidualIndex(problem, backend="cpu")._batch(np.arange(0, 300, 7), None, False)
    batch = dataclasses.replace(batch, v=batch.v.astype(dtype))
    view = ProblemView(problem, np.arange(problem.n), dtype)
    cols = np.concatenate([np.random.default_rng(1).permutation(299)[:110], [299]])
    out = []
    for name in ("cpu", "cuda"):
        backend = get_backend(name)
        out.append(backend.abs_rho_tile(backend.prepare(view), batch, cols))
    cpu, fast = out
    assert fast.shape == (batch.size, cols.size) and fast.dtype == np.float64
    assert np.all(np.abs(fast - cpu) <= fast_value_tolerance(problem, batch, dtype))
    backend = get_backend("cuda")
    assert backend.abs_rho_tile(backend.prepare(view), batch, np.array([], dtype=np.int64)).shape == (batch.size, 0)


@pytest.mark.parametrize("d,kernel,ls,m", CASES, ids=CASE_IDS)
def test_emulated_every_query_kind(emulated, d, kernel, ls, m):
    problem = make_problem(1, 180, d, kernel(lengthscale=ls, variance=1.7), m)
    run_query_kinds(problem, d, ks=(1, 7, 40) if d == 1 else (7,))  # emulated threads are slow
    # only the streaming select ran (float64, or float32 where precision="auto" chose it)
    assert {name for name, *_ in emulated.launches} <= {"residual_select_tile", "residual_select_tile_f32"}
    assert emulated.launches


def test_emulated_duplicates_ties_and_retries(emulated, monkeypatch):
    problem = make_problem(4, 160, 2, rg.Matern12(lengthscale=0.2), 20, duplicates=60)
    check(problem, 12)
    check(problem, 12, predecessor=True)
    x = np.random.default_rng(5).random((120, 2))
    x[40:90] = x[40]
    problem = rg.ResidualProblem(x, kernel=rg.Matern52(lengthscale=0.3), inducing=15)
    res = check(problem, 10)
    assert res.telemetry.recertified_queries > 0
    monkeypatch.setattr(search, "initial_keep", lambda k: k)
    check(problem, 10, predecessor=True)


def test_emulated_tiny_residual_variance(emulated):
    x = np.random.default_rng(42).normal(size=(400, 3))
    u = x[np.sort(np.random.default_rng(0).choice(400, 200, replace=False))]
    problem = rg.ResidualProblem(x, kernel=rg.RBF(lengthscale=1.0), inducing=u)
    assert np.median(problem.p) < 1e-5
    queries = np.random.default_rng(43).integers(0, 400, 64)
    check(problem, 20, queries=queries)
    check(problem, 20, queries=queries, predecessor=True)


def test_emulated_tiling_and_global_heap(emulated, monkeypatch):
    """Tiny query/candidate tiles and the heap kept in global memory instead of shared."""
    monkeypatch.setattr(cuda_backend, "QUERY_TILE", 7)
    monkeypatch.setattr(cuda_backend, "TILE_ELEMENTS", 7 * 64)  # 64 candidates per tile: two chunks of 32
    monkeypatch.setattr(search, "QUERY_CHUNK", 19)
    problem = make_problem(6, 130, 2, rg.Matern32(lengthscale=0.15), 14, duplicates=10)
    check(problem, 6)
    check(problem, 6, predecessor=True)
    check(problem, 6, queries=np.array([129, 0, 5, 5, 77]))
    monkeypatch.setattr(cuda_backend, "SHARED_HEAP_MAX_KEEP", 0)
    check(problem, 6)
    assert any(shared == 0 for name, _, _, shared in emulated.launches if name == "residual_select_tile")


@pytest.mark.parametrize("predecessor", [False, True], ids=["plain", "pred"])
def test_emulated_select_candidates_matches_cpu(emulated, predecessor):
    problem = make_problem(8, 150, 3, rg.Matern52(lengthscale=0.3), 20)
    assert_select_matches_cpu(problem, "cuda", predecessor)


def test_emulated_abs_rho_tile_matches_cpu(emulated):
    compare_abs_rho_tile_with_cpu()


@pytest.mark.parametrize("kernel_cls", [rg.RBF, rg.Matern12, rg.Matern32, rg.Matern52])
def test_emulated_float32_abs_rho_tile_matches_cpu(emulated, kernel_cls):
    """The float32 instantiation (correlation in float32 from float32 G) against the CPU's float32
    tile, within both float32 margins, for every kernel family."""
    compare_abs_rho_tile_with_cpu(np.float32, kernel_cls(lengthscale=0.3, variance=1.3))
    assert {name for name, *_ in emulated.launches} == {"residual_abs_rho_dense_f32"}


@pytest.mark.parametrize("case", CASES[:3], ids=CASE_IDS[:3])
def test_emulated_float32_equals_float64(emulated, case):
    """The float32 fast pass through the CUDA code path (SGEMM, then the float32 select kernel):
    float64's answers bit for bit, in every query kind."""
    d, kernel_cls, ls, m = case
    problem = make_problem(1, 150, d, kernel_cls(lengthscale=ls), m)
    for predecessor in (False, True):
        index, _ = assert_float32_equals_float64(problem, 8, "cuda", predecessor=predecessor)
    assert index._brute_select.fast.prepared.v.dtype == np.float32
    assert "residual_select_tile_f32" in {name for name, *_ in emulated.launches}
    assert_float32_equals_float64(problem, 6, "cuda", queries=np.array([0, 3, 3, 149]))
    assert_float32_equals_float64(problem, 9, "cuda", query_coords=np.random.default_rng(2).random((7, d)))


FACTOR_CASES = [(1, rg.RBF, 0.3, 7), (2, rg.Matern12, 0.2, 16), (3, rg.Matern32, np.array([0.2, 0.3, 0.5]), 13),
                (3, rg.Matern52, 0.25, 24)]


def assert_factors_bitwise(x, kernel, u):
    """ResidualProblem built by the CUDA backend == the host build, bit for bit: V, p, the norms,
    and the factors of new locations (a data point among them gets its row back)."""
    host = rg.ResidualProblem(x, kernel=kernel, inducing=u)
    dev = rg.ResidualProblem(x, kernel=kernel, inducing=u, backend="cuda")
    for name in ("v", "p", "v_norms"):
        assert np.array_equal(getattr(dev, name), getattr(host, name)), name
    xnew = np.concatenate([np.random.default_rng(5).random((9, x.shape[1])), x[:2]])
    for a, b in zip(dev.factors_at(xnew), host.factors_at(xnew), strict=True):
        assert np.array_equal(a, b)
    assert np.array_equal(dev.factors_at(xnew)[1][-2:], host.v[:2])
    return dev


@pytest.mark.parametrize("d,kernel_cls,ls,m", FACTOR_CASES, ids=[c[1].__name__ for c in FACTOR_CASES])
def test_emulated_factors_are_the_host_bits(emulated, monkeypatch, d, kernel_cls, ls, m):
    """kernels/residual_factors.cu (no FMA contraction) against _linalg.cross_factors: the same
    bits, over several chunks (a small TILE_ELEMENTS) and inducing points among the data (p ~ jitter)."""
    monkeypatch.setattr(cuda_backend, "TILE_ELEMENTS", 40 * m)
    x = np.random.default_rng(d).random((101, d))
    u = np.concatenate([x[:3], np.random.default_rng(7).random((m - 3, d))])
    dev = assert_factors_bitwise(x, kernel_cls(lengthscale=ls, variance=1.7), u)
    assert dev.p[:3].max() < 1e-5 * 1.7  # the inducing points among the data: p ~ jitter
    assert {name for name, *_ in emulated.launches} == {"residual_cross_factors"}
    assert len(emulated.launches) > 3


def test_emulated_factors_through_with_kernel_and_the_index(emulated):
    x = np.random.default_rng(3).random((150, 2))
    dev = rg.ResidualProblem(x, kernel=rg.Matern32(lengthscale=0.2), inducing=12, backend="cuda")
    host = rg.ResidualProblem(x, kernel=rg.Matern32(lengthscale=0.2), inducing=12)
    again, again_host = dev.with_kernel(rg.RBF(lengthscale=0.3)), host.with_kernel(rg.RBF(lengthscale=0.3))
    assert np.array_equal(again.v, again_host.v) and np.array_equal(again.p, again_host.p)
    a = rg.ResidualIndex(again, backend="cpu").query(5, predecessor=True)
    b = rg.ResidualIndex(again_host, backend="cpu").query(5, predecessor=True)
    assert np.array_equal(a.indices, b.indices) and np.array_equal(a.distances, b.distances)
    # the one call with backend="cuda" builds the factors on the device too
    emulated.launches.clear()
    got = rg.residual_knn(x, 5, rg.Matern32(lengthscale=0.2), inducing=12, backend="cuda")
    want = rg.residual_knn(x, 5, rg.Matern32(lengthscale=0.2), inducing=12, backend="cpu")
    assert "residual_cross_factors" in {name for name, *_ in emulated.launches}
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


def _gpu_problem():
    """20000 points (several candidate tiles per query tile with the default sizes), 300 queries."""
    x = np.random.default_rng(3).random((20000, 3))
    problem = rg.ResidualProblem(x, kernel=rg.Matern52(lengthscale=0.1), inducing=64)
    return problem, np.random.default_rng(4).integers(0, 20000, 300)


@pytest.mark.gpu
def test_gpu_float32_equals_float64(cuda_device):
    problem, queries = _gpu_problem()
    for predecessor in (False, True):
        assert_float32_equals_float64(problem, 30, "cuda", queries=queries, predecessor=predecessor)


def assert_tree_equals_cpu_tree(problem, precision, leaf_size=16):
    """method="tree" on the cuda backend (the block schedule: its leaf blocks and bound products on the
    device) returns the fused CPU traversal's indices and distances, bit for bit, for every query kind."""
    cpu = rg.ResidualIndex(problem, backend="cpu", method="tree", leaf_size=leaf_size, precision=precision)
    dev = rg.ResidualIndex(problem, backend="cuda", method="tree", leaf_size=leaf_size, precision=precision)
    assert dev.schedule == "blocks"
    rng = np.random.default_rng(7)
    for kw in ({"predecessor": True}, {"queries": rng.choice(problem.n, 30, replace=False)},
               {"query_coords": rng.random((12, problem.d))}):
        want, got = cpu.query(6, **kw), dev.query(6, **kw)
        np.testing.assert_array_equal(got.indices, want.indices)
        np.testing.assert_array_equal(got.distances, want.distances)
        assert got.telemetry.backend == "cuda" and got.telemetry.tree_queries == want.telemetry.tree_queries


@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_emulated_tree_equals_the_cpu_tree(emulated, precision):
    problem = make_problem(7, 260, 2, rg.Matern32(lengthscale=0.1, variance=1.3), 16, duplicates=10)
    assert_tree_equals_cpu_tree(problem, precision)
    names = {name for name, *_ in emulated.launches}
    assert names & {"residual_abs_rho_dense", "residual_abs_rho_dense_f32"}


def test_emulated_keep_zero_and_no_candidates(emulated):
    """keep = 0 keeps nothing and drops everything; queries with limit 0 evaluate nothing."""
    problem = make_problem(2, 50, 2, rg.RBF(lengthscale=0.3), 6)
    backend = get_backend("cuda")
    prepared = backend.prepare(problem)
    batch = rg.ResidualIndex(problem, backend="cpu")._batch(np.array([0, 0, 10]), None, True)
    cand = backend.select_candidates(prepared, batch, 0)
    assert cand.index.shape == (3, 0) and cand.evaluations == 10  # query 10: j < 10, itself excluded by limit
    np.testing.assert_array_equal(cand.a_dropped[:2], [-1.0, -1.0])
    cpu = get_backend("cpu")
    full = cpu.abs_rho_tile(cpu.prepare(problem), batch.take(np.array([2])), np.arange(10))
    assert abs(cand.a_dropped[2] - full.max()) <= fast_value_tolerance(problem, batch.take(np.array([2])))[0, 0]


# --------------------------------------------------------------------------------------
# On a real GPU (pytest -m gpu)
# --------------------------------------------------------------------------------------


@pytest.fixture
def cuda_device(monkeypatch):
    usable, reason = CudaBackend.availability()
    if not usable:
        pytest.skip(f"backend 'cuda' unavailable: {reason}")
    return reason


@pytest.mark.gpu
def test_gpu_availability_names_the_device(cuda_device):
    assert cuda_device.startswith("CuPy ") and " on " in cuda_device
    assert get_backend("cuda").name == "cuda"
    assert reg.resolve_backend_name("auto") == "cuda"


@pytest.mark.gpu
@pytest.mark.parametrize("d,kernel,ls,m", CASES, ids=CASE_IDS)
def test_gpu_every_query_kind(cuda_device, d, kernel, ls, m):
    problem = make_problem(1, 180, d, kernel(lengthscale=ls, variance=1.7), m)
    run_query_kinds(problem, d)


@pytest.mark.gpu
def test_gpu_duplicates_ties_and_retries(cuda_device, monkeypatch):
    for kernel in (rg.Matern12, rg.Matern32, rg.Matern52, rg.RBF):
        problem = make_problem(4, 160, 2, kernel(lengthscale=0.2), 20, duplicates=60)
        check(problem, 12)
        check(problem, 12, predecessor=True)
    x = np.random.default_rng(5).random((120, 2))
    x[40:90] = x[40]
    problem = rg.ResidualProblem(x, kernel=rg.Matern52(lengthscale=0.3), inducing=15)
    assert check(problem, 10).telemetry.recertified_queries > 0
    monkeypatch.setattr(search, "initial_keep", lambda k: k)
    check(problem, 10, predecessor=True)


@pytest.mark.gpu
def test_gpu_tiny_residual_variance(cuda_device):
    x = np.random.default_rng(42).normal(size=(400, 3))
    u = x[np.sort(np.random.default_rng(0).choice(400, 200, replace=False))]
    problem = rg.ResidualProblem(x, kernel=rg.RBF(lengthscale=1.0), inducing=u)
    queries = np.random.default_rng(43).integers(0, 400, 64)
    check(problem, 20, queries=queries)
    check(problem, 20, queries=queries, predecessor=True)


@pytest.mark.gpu
def test_gpu_tiling_and_global_heap(cuda_device, monkeypatch):
    monkeypatch.setattr(cuda_backend, "QUERY_TILE", 7)
    monkeypatch.setattr(cuda_backend, "TILE_ELEMENTS", 7 * 512)  # 512 candidates per tile: 2 chunks
    monkeypatch.setattr(search, "QUERY_CHUNK", 19)
    problem = make_problem(6, 1300, 2, rg.Matern32(lengthscale=0.15), 14, duplicates=10)
    check(problem, 6)
    check(problem, 6, predecessor=True)
    monkeypatch.setattr(cuda_backend, "SHARED_HEAP_MAX_KEEP", 0)
    check(problem, 6, queries=np.array([1299, 0, 5, 5, 77]))


@pytest.mark.gpu
def test_gpu_larger_problem(cuda_device):
    """Several candidate tiles per query tile with the default sizes."""
    problem, queries = _gpu_problem()
    for predecessor in (False, True):
        res = rg.ResidualIndex(problem, backend="cuda").query(30, queries=queries, predecessor=predecessor)
        cpu = rg.ResidualIndex(problem, backend="cpu").query(30, queries=queries, predecessor=predecessor)
        np.testing.assert_array_equal(res.indices, cpu.indices)
        np.testing.assert_array_equal(res.distances, cpu.distances)  # both certified on the host


@pytest.mark.gpu
@pytest.mark.parametrize("predecessor", [False, True], ids=["plain", "pred"])
def test_gpu_select_candidates_matches_cpu(cuda_device, predecessor):
    assert_select_matches_cpu(make_problem(8, 150, 3, rg.Matern52(lengthscale=0.3), 20), "cuda", predecessor)


@pytest.mark.gpu
def test_gpu_factors_are_the_host_bits(cuda_device):
    x = np.random.default_rng(8).random((20000, 3))
    for kernel_cls in (rg.RBF, rg.Matern12, rg.Matern32, rg.Matern52):
        assert_factors_bitwise(x, kernel_cls(lengthscale=0.1, variance=1.3), x[:64])


@pytest.mark.gpu
def test_gpu_abs_rho_tile_matches_cpu(cuda_device):
    compare_abs_rho_tile_with_cpu()
    for kernel_cls in (rg.RBF, rg.Matern12, rg.Matern32, rg.Matern52):
        compare_abs_rho_tile_with_cpu(np.float32, kernel_cls(lengthscale=0.3, variance=1.3))


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_gpu_tree_equals_the_cpu_tree(cuda_device, precision):
    problem, _ = _gpu_problem()
    assert_tree_equals_cpu_tree(problem, precision, leaf_size=64)
