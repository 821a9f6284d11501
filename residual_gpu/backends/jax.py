"""JAX backend: the same block computation in jax.numpy under jax.jit, on JAX's default device.

float64: every call into JAX (prepare, abs_rho_tile, select_candidates) runs inside the
``jax.enable_x64(True)`` context manager (``jax.experimental.enable_x64`` on JAX versions
that have only that), so the arrays, the traced functions and the GEMM are float64 while
the process-wide ``jax_enable_x64`` flag of the caller's own JAX code is left untouched.
Only on a JAX with neither context manager is the global flag switched on (once).

Shapes are fixed so that jit compiles once per shape: the data set is padded (at prepare)
to a multiple of the candidate tile width CT = min(CANDIDATE_TILE, next power of two >= n);
query tiles have QT = QUERY_TILE rows (SMALL_QUERY_TILE for batches that small, e.g.
certification retries), the last one padded with rows that admit nothing (limit 0);
``keep`` is rounded up to a power of two >= MIN_KEEP inside the traced code (the extra
entries are folded into the dropped maximum on the host). So a problem compiles the select
for a handful of shapes: two query tiles times the few keep buckets its k and retries use.

One jitted call per query tile runs a ``lax.fori_loop`` over the candidate tiles (the trip
count is a traced value, so predecessor mode and any query limits reuse the compiled code;
only a new problem shape or kernel family compiles anew): dynamic_slice of the padded
arrays, GEMM V_Q V_C^T, the fused transform (cpu.py's formula and operation order),
inadmissible entries masked to -inf, then ``lax.top_k(concat(running, tile), K + 1)``: the
first K are the new running set, the (K + 1)-th is the largest value that left it, which
raises the dropped maximum. Memory is O(QT * (CT + K)) whatever n is, besides the data set.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from functools import partial

import numpy as np

from .base import Backend, Candidates, QueryBatch

#: Query rows per jitted select call.
QUERY_TILE = 256
#: Query rows per call for batches of at most this many queries.
SMALL_QUERY_TILE = 32
#: Largest candidate tile (columns per loop step).
CANDIDATE_TILE = 2048
#: Smallest keep bucket: keep is rounded up to a power of two >= this in the traced code.
MIN_KEEP = 32
#: Smallest padded row / column count of abs_rho_tile and the candidate tile.
MIN_TILE = 8

_SQRT3 = math.sqrt(3.0)
_SQRT5 = math.sqrt(5.0)
_NOT_INSTALLED = "JAX is not installed (pip install 'residual-gpu[jax]')"


def _bucket(size: int, cap: int | None = None) -> int:
    """Next power of two >= size (at least MIN_TILE), capped at ``cap``."""
    b = max(MIN_TILE, 1 << max(0, int(size) - 1).bit_length())
    return b if cap is None else min(b, cap)


_GLOBAL_X64 = False


def _x64():
    """Context in which JAX computes in float64 (see the module docstring)."""
    global _GLOBAL_X64
    import jax

    ctx = getattr(jax, "enable_x64", None)
    if ctx is not None:
        return ctx(True)
    try:  # JAX versions before jax.enable_x64
        from jax.experimental import enable_x64

        return enable_x64()
    except ImportError:  # pragma: no cover - neither context manager exists
        if not _GLOBAL_X64:
            jax.config.update("jax_enable_x64", True)
            _GLOBAL_X64 = True
        return contextlib.nullcontext()


def _abs_rho(jnp, kernel_id, variance, qx, inv_scale, qip, xc, ipc, g):
    """a = min(|variance g(r2) - G| * qip * ipc, 1) for qx (Q, d) against xc (d, C); cpu.py's order."""
    r2 = jnp.zeros(g.shape, dtype=g.dtype)
    for t in range(qx.shape[1]):  # d is static: unrolled, summed in cpu.py's order
        diff = (qx[:, t, None] - xc[None, t, :]) * inv_scale[t]
        r2 = r2 + diff * diff
    if kernel_id == 0:
        k = jnp.exp(-0.5 * r2)
    elif kernel_id == 1:
        k = jnp.exp(-jnp.sqrt(r2))
    else:
        c = _SQRT3 if kernel_id == 2 else _SQRT5
        r2_coef = 0.0 if kernel_id == 2 else 5.0 / 3.0
        sr = c * jnp.sqrt(r2)
        k = jnp.exp(-sr) * (1.0 + sr + r2_coef * r2)
    a = jnp.abs(variance * k - g) * qip[:, None] * ipc[None, :]
    return jnp.where(a < 1.0, a, 1.0)


_FUNCTIONS = None


def _functions():
    """(select, dense): the jitted functions, built on first use (JAX is imported lazily)."""
    global _FUNCTIONS
    if _FUNCTIONS is not None:
        return _FUNCTIONS
    import jax
    import jax.numpy as jnp
    from jax import lax

    @partial(jax.jit, static_argnames=("kernel_id", "keep", "ctile"))
    def select(qx, qv, qip, qself, qlimit, xt, v, ip, inv_scale, variance, ntiles, *, kernel_id, keep, ctile):
        rows = qx.shape[0]
        cols = jnp.arange(ctile, dtype=qlimit.dtype)

        def body(t, carry):
            top_a, top_i, dropped, evals = carry
            c0 = (t * ctile).astype(qlimit.dtype)
            xc = lax.dynamic_slice_in_dim(xt, c0, ctile, axis=1)
            vc = lax.dynamic_slice_in_dim(v, c0, ctile, axis=0)
            ipc = lax.dynamic_slice_in_dim(ip, c0, ctile, axis=0)
            # float32 V: a float32 product (HIGHEST: no TF32), the transform in float64
            g = jnp.matmul(qv, vc.T, precision=lax.Precision.HIGHEST).astype(qx.dtype)
            a = _abs_rho(jnp, kernel_id, variance, qx, inv_scale, qip, xc, ipc, g)
            j = c0 + cols
            admissible = (j[None, :] < qlimit[:, None]) & (j[None, :] != qself[:, None])
            a = jnp.where(admissible, a, -jnp.inf)
            vals, pos = lax.top_k(jnp.concatenate([top_a, a], axis=1), keep + 1)
            idx = jnp.take_along_axis(jnp.concatenate([top_i, jnp.broadcast_to(j, (rows, ctile))], axis=1),
                                      pos, axis=1)
            dropped = jnp.maximum(dropped, vals[:, keep])
            evals = evals + jnp.sum(admissible, axis=1, dtype=evals.dtype)
            return vals[:, :keep], idx[:, :keep], dropped, evals

        init = (jnp.full((rows, keep), -jnp.inf, dtype=qx.dtype),
                jnp.full((rows, keep), -1, dtype=qlimit.dtype),
                jnp.full((rows,), -1.0, dtype=qx.dtype),
                jnp.zeros((rows,), dtype=qlimit.dtype))
        return lax.fori_loop(jnp.zeros((), ntiles.dtype), ntiles, body, init)

    @partial(jax.jit, static_argnames=("kernel_id",))
    def dense(qx, qv, qip, xt, v, ip, inv_scale, variance, cols, *, kernel_id):
        g = jnp.matmul(qv, v[cols].T, precision=lax.Precision.HIGHEST).astype(qx.dtype)
        return _abs_rho(jnp, kernel_id, variance, qx, inv_scale, qip, xt[:, cols], ip[cols], g)

    _FUNCTIONS = (select, dense)
    return _FUNCTIONS


@dataclass(frozen=True)
class _Prepared:
    xt: object           # (d, n_pad) device coordinates, transposed, zero-padded
    v: object            # (n_pad, m) device, zero rows as padding; float32 for a float32 fast pass
    inv_sqrt_p: object   # (n_pad,) device, 1 / sqrt(p) (1 on padding)
    inv_scale: object    # (d,) device, 1 / lengthscale
    variance: object     # float64 device scalar (traced: no recompilation per variance)
    kernel_id: int
    n: int
    ctile: int


def _pad_rows(a: np.ndarray, rows: int, fill) -> np.ndarray:
    if a.shape[0] == rows:
        return np.ascontiguousarray(a)
    out = np.full((rows, *a.shape[1:]), fill, dtype=a.dtype)
    out[: a.shape[0]] = a
    return out


class JaxBackend(Backend):
    """jax.numpy under jax.jit in float64 on JAX's default device (CPU, GPU, ...)."""

    name = "jax"

    @classmethod
    def availability(cls):
        try:
            import jax
        except ImportError:
            return False, _NOT_INSTALLED
        except Exception as exc:  # noqa: BLE001 - a broken installation is reported, not raised
            return False, f"JAX is installed but failed to import ({type(exc).__name__}: {exc})"
        try:
            device = jax.devices()[0]
        except Exception as exc:  # noqa: BLE001 - a backend error of any type means no usable device
            return False, f"JAX {jax.__version__} is installed but has no usable device ({type(exc).__name__}: {exc})"
        return True, f"JAX {jax.__version__} on its default device {device} ({device.platform}, {device.device_kind})"

    def prepare(self, problem):
        import jax.numpy as jnp

        n = problem.n
        ctile = _bucket(n, CANDIDATE_TILE)
        n_pad = -(-n // ctile) * ctile
        with _x64():
            return _Prepared(
                xt=jnp.asarray(_pad_rows(problem.coords, n_pad, 0.0).T.copy()),
                v=jnp.asarray(_pad_rows(problem.v, n_pad, 0.0)),
                inv_sqrt_p=jnp.asarray(_pad_rows(1.0 / np.sqrt(problem.p), n_pad, 1.0)),
                inv_scale=jnp.asarray(1.0 / problem.lengthscales),
                variance=jnp.asarray(np.float64(problem.kernel.variance)),
                kernel_id=int(problem.kernel.kernel_id),
                n=n,
                ctile=ctile,
            )

    def abs_rho_tile(self, prepared, batch: QueryBatch, cols: np.ndarray) -> np.ndarray:
        import jax.numpy as jnp

        cols = np.asarray(cols, dtype=np.int64)
        q, c = batch.size, cols.size
        if q == 0 or c == 0:
            return np.empty((q, c))
        _, dense = _functions()
        qpad, cpad = _bucket(q), _bucket(c)
        with _x64():
            out = dense(jnp.asarray(_pad_rows(batch.coords.astype(np.float64), qpad, 0.0)),
                        jnp.asarray(_pad_rows(batch.v.astype(prepared.v.dtype), qpad, 0.0)),
                        jnp.asarray(_pad_rows(1.0 / np.sqrt(batch.p), qpad, 1.0)),
                        prepared.xt, prepared.v, prepared.inv_sqrt_p, prepared.inv_scale, prepared.variance,
                        jnp.asarray(_pad_rows(cols, cpad, 0)), kernel_id=prepared.kernel_id)
            return np.array(out)[:q, :c]

    def select_candidates(self, prepared, batch: QueryBatch, keep: int) -> Candidates:
        import jax.numpy as jnp

        q = batch.size
        keep = int(keep)
        index = np.full((q, keep), -1, dtype=np.int64)
        abs_rho = np.full((q, keep), -1.0)
        a_dropped = np.full(q, -1.0)
        evaluations = 0
        if q == 0:
            return Candidates(index, abs_rho, a_dropped, 0)
        select, _ = _functions()
        kb = max(MIN_KEEP, 1 << max(0, keep - 1).bit_length())
        qt = SMALL_QUERY_TILE if q <= SMALL_QUERY_TILE else QUERY_TILE
        qip = 1.0 / np.sqrt(batch.p)
        with _x64():
            for q0 in range(0, q, qt):
                q1 = min(q0 + qt, q)
                stop = min(int(batch.limit[q0:q1].max()), prepared.n)
                if stop <= 0:
                    continue
                ntiles = -(-stop // prepared.ctile)
                top_a, top_i, dropped, evals = select(
                    jnp.asarray(_pad_rows(batch.coords[q0:q1].astype(np.float64), qt, 0.0)),
                    jnp.asarray(_pad_rows(batch.v[q0:q1].astype(prepared.v.dtype), qt, 0.0)),
                    jnp.asarray(_pad_rows(qip[q0:q1], qt, 1.0)),
                    jnp.asarray(_pad_rows(batch.self_index[q0:q1].astype(np.int64), qt, -1)),
                    jnp.asarray(_pad_rows(batch.limit[q0:q1].astype(np.int64), qt, 0)),
                    prepared.xt, prepared.v, prepared.inv_sqrt_p, prepared.inv_scale, prepared.variance,
                    jnp.asarray(np.int64(ntiles)), kernel_id=prepared.kernel_id, keep=kb, ctile=prepared.ctile)
                rows = q1 - q0
                top_a = np.array(top_a)[:rows]
                top_i = np.array(top_i)[:rows]
                dropped = np.array(dropped)[:rows]
                if kb > keep:  # sorted descending: the first value beyond keep left the caller's set
                    dropped = np.maximum(dropped, top_a[:, keep])
                top_a = top_a[:, :keep]
                top_i = top_i[:, :keep]
                empty = top_a == -np.inf
                index[q0:q1] = np.where(empty, -1, top_i)
                abs_rho[q0:q1] = np.where(empty, -1.0, top_a)
                a_dropped[q0:q1] = dropped
                evaluations += int(np.array(evals)[:rows].sum())
        return Candidates(index=index, abs_rho=abs_rho, a_dropped=a_dropped, evaluations=evaluations)

    def prepare_bounds(self, mid: np.ndarray, rad: np.ndarray):
        import jax.numpy as jnp

        with _x64():
            return jnp.asarray(np.ascontiguousarray(mid)), jnp.asarray(np.ascontiguousarray(rad))

    def bound_products(self, prepared_bounds, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import jax.numpy as jnp
        from jax import lax

        mid, rad = prepared_bounds
        with _x64():
            ad = jnp.asarray(np.ascontiguousarray(a, dtype=mid.dtype))
            s0 = jnp.matmul(ad, mid.T, precision=lax.Precision.HIGHEST)  # HIGHEST: no TF32
            sr = jnp.matmul(jnp.abs(ad), rad.T, precision=lax.Precision.HIGHEST)
            return np.asarray(s0, dtype=np.float64), np.asarray(sr, dtype=np.float64)
