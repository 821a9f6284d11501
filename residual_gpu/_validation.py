"""Argument checks shared by the public entry points.

Each helper returns a fresh array (never a view the caller could see us modify) and
raises a typed error that quotes the argument's name and the offending value. Array
arguments may come from any array library (numpy, CuPy, JAX, PyTorch): ``_arrays.to_host``
reads them, copying device memory to the host once.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from ._arrays import to_host
from .errors import InvalidArgumentError, InvalidTypeError


def _describe(value) -> str:
    """A short description of a rejected value for error messages."""
    if isinstance(value, np.generic):
        return repr(value.item())
    if isinstance(value, np.ndarray):
        return f"array(shape={value.shape}, dtype={value.dtype})"
    if hasattr(value, "shape") and hasattr(value, "dtype"):  # another library's array
        return f"{type(value).__name__}(shape={tuple(value.shape)}, dtype={value.dtype})"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def require_real(arr: np.ndarray, name: str) -> None:
    """InvalidTypeError unless the array holds real numbers (floats or integers, not bools)."""
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise InvalidTypeError(f"{name} must hold real numbers, got {name}.dtype={arr.dtype}")


def as_float_matrix(value, name: str, *, ncols: int | None = None, min_rows: int = 1) -> np.ndarray:
    """A C-contiguous float64 copy of a 2-D finite real array.

    A 1-D array is read as one coordinate per row (d = 1) so that ``x`` of shape (n,)
    works as users expect.
    """
    if isinstance(value, (str, bytes)) or value is None:
        raise InvalidTypeError(f"{name} must be a 2-D array of real numbers, got {_describe(value)}")
    try:
        host, fresh = to_host(value)
        arr = np.asarray(host)
    except Exception as exc:  # ragged lists, dtypes numpy lacks (bfloat16) and the like
        raise InvalidTypeError(f"{name} must be a 2-D array of real numbers, got {_describe(value)}") from exc
    require_real(arr, name)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise InvalidArgumentError(f"{name} must be 2-D (rows, columns), got {name}.shape={arr.shape}")
    if arr.shape[0] < min_rows:
        raise InvalidArgumentError(f"{name} must have at least {min_rows} row(s), got {name}.shape={arr.shape}")
    if ncols is not None and arr.shape[1] != ncols:
        raise InvalidArgumentError(f"{name} must have {ncols} column(s), got {name}.shape={arr.shape}")
    if arr.shape[1] < 1:
        raise InvalidArgumentError(f"{name} must have at least one column, got {name}.shape={arr.shape}")
    # a fresh copy from device memory is already ours: no second host copy
    out = (np.asarray if fresh else np.array)(arr, dtype=np.float64, order="C")
    if not np.all(np.isfinite(out)):
        bad = np.argwhere(~np.isfinite(out))[0]
        raise InvalidArgumentError(
            f"{name} must be finite, got {name}[{bad[0]}, {bad[1]}]={_describe(arr[tuple(bad)])}"
        )
    return out


def as_float_vector(value, name: str, *, length: int | None = None, positive: bool = False) -> np.ndarray:
    """A float64 copy of a finite 1-D array (optionally of a given length, all > 0)."""
    try:
        host, fresh = to_host(value)
        arr = np.asarray(host)
    except Exception as exc:
        raise InvalidTypeError(f"{name} must be a 1-D array of real numbers, got {_describe(value)}") from exc
    require_real(arr, name)
    if arr.ndim != 1:
        raise InvalidArgumentError(f"{name} must be 1-D, got {name}.shape={arr.shape}")
    if length is not None and arr.shape[0] != length:
        raise InvalidArgumentError(f"{name} must have length {length}, got {name}.shape={arr.shape}")
    out = (np.asarray if fresh else np.array)(arr, dtype=np.float64)
    bad = ~np.isfinite(out) | ((out <= 0) if positive else False)
    if np.any(bad):
        i = int(np.flatnonzero(bad)[0])
        need = "finite and > 0" if positive else "finite"
        raise InvalidArgumentError(f"{name} must be {need}, got {name}[{i}]={_describe(arr[i])}")
    return out


def as_positive_float(value, name: str) -> float:
    """A finite float > 0 (a 0-d array of any library counts as a scalar)."""
    value = to_host(value)[0]
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value[()]
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, np.floating, np.integer)):
        raise InvalidTypeError(f"{name} must be a real number, got {_describe(value)}")
    out = float(value)
    if not np.isfinite(out) or out <= 0:
        raise InvalidArgumentError(f"{name} must be finite and > 0, got {name}={_describe(value)}")
    return out


def as_int(value, name: str, *, low: int | None = None, high: int | None = None) -> int:
    """An integer in [low, high] (either end optional)."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, np.integer)):
        raise InvalidTypeError(f"{name} must be an integer, got {_describe(value)}")
    out = int(value)
    if (low is not None and out < low) or (high is not None and out > high):
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise InvalidArgumentError(f"{name} must be in [{lo}, {hi}], got {name}={_describe(value)}")
    return out


def as_index_array(value, name: str, *, n: int) -> np.ndarray:
    """A 1-D int64 copy of dataset indices, each in [0, n)."""
    try:
        arr = np.asarray(to_host(value)[0])
    except Exception as exc:
        raise InvalidTypeError(f"{name} must be a 1-D array of integers, got {_describe(value)}") from exc
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise InvalidArgumentError(f"{name} must be 1-D, got {name}.shape={arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise InvalidTypeError(f"{name} must hold integers, got {name}.dtype={arr.dtype}")
    if arr.size == 0:
        raise InvalidArgumentError(f"{name} must hold at least one index, got {name}.shape={arr.shape}")
    out = np.array(arr, dtype=np.int64, copy=True)
    bad = (out < 0) | (out >= n)
    if np.any(bad):
        i = int(np.flatnonzero(bad)[0])
        raise InvalidArgumentError(f"{name} must be in [0, {n}), got {name}[{i}]={_describe(arr[i])}")
    return out


#: Largest accepted bound R2 on the scaled squared distance r^2 = sum_t ((x_t - y_t) / l_t)^2
#: between any two points a problem compares (data, inducing and query coordinates).
#: Every kernel formula must stay finite and accurate up to it: r^2 itself, a d-term sum of
#: squares each <= R2, (5/3) r^2 and 1 + sqrt5 r + (5/3) r^2 of Matern 5/2 (beyond float64's
#: 1.8e308 they become inf, and inf * exp(-inf) = nan, which the clamp turns into |rho| = 1).
#: The limit sits far below that because the CPU fast path clamps exp's argument at -708:
#: Matern 5/2's polynomial times exp(-708) ~ 3.3e-308 is 5.5e-28 at r^2 = 1e280, far below the
#: kernel rounding margin (4 d + 64) u ~ 7.5e-15 of precision.py, but 5.5e-9 at 1e299.
MAX_SCALED_SQ_DISTANCE = 1e280


def coordinate_bounds(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column (min, max) of a float64 coordinate array (n, d), as fresh arrays."""
    return x.min(axis=0), x.max(axis=0)


def _pow10(log10_value: float) -> str:
    """10 ** log10_value in the style '1.0e+321', also beyond float64's range."""
    if log10_value == -np.inf:
        return "0"
    exp = math.floor(log10_value)
    mant = f"{10.0 ** (log10_value - exp):.1f}"
    if mant == "10.0":
        exp, mant = exp + 1, "1.0"
    return f"{mant}e{exp:+03d}"


def _lengthscale_text(lengthscale) -> str:
    if isinstance(lengthscale, np.ndarray):
        text = repr(lengthscale.tolist())
        return text if len(text) <= 80 else text[:77] + "..."
    return repr(lengthscale)


def check_scaled_spread(parts, lengthscales: np.ndarray, *, lengthscale=None) -> tuple[np.ndarray, np.ndarray]:
    """Reject coordinates so many lengthscales apart that the kernel overflows or loses float64 accuracy.

    ``parts`` is a sequence of ``(name, x)`` where x is a finite float64 array (n, d) or the
    ``(lo, hi)`` per-column bounds of one (``coordinate_bounds``), all compared with each other.
    Each part is checked together with the parts before it, so the error names the first
    argument that makes the union too wide. The bound checked is
        R2 = sum_t ((max_t - min_t) / l_t)^2 >= any pairwise scaled squared distance,
    over the union; it must be <= MAX_SCALED_SQ_DISTANCE, and every extent max_t - min_t must
    itself be finite (near +-1.8e308 the difference of two coordinates overflows).
    ``lengthscale`` is what the message shows as the user's lengthscale (default: the
    per-dimension values). Returns the union's (lo, hi) bounds.
    """
    scale = np.asarray(lengthscales, dtype=np.float64)
    shown = _lengthscale_text(scale if lengthscale is None else lengthscale)
    lo = hi = None
    seen: list[str] = []
    for name, x in parts:
        plo, phi = coordinate_bounds(x) if isinstance(x, np.ndarray) else x
        lo = plo.copy() if lo is None else np.minimum(lo, plo)
        hi = phi.copy() if hi is None else np.maximum(hi, phi)
        who = name if not seen else f"{name} (together with {', '.join(seen)})"
        seen.append(name)
        with np.errstate(over="ignore", invalid="ignore"):
            extent = hi - lo
            scaled = extent / scale
        wide = ~np.isfinite(extent)
        if np.any(wide):
            t = int(np.flatnonzero(wide)[0])
            raise InvalidArgumentError(
                f"{who} spread beyond float64's range: column {t} spans [{lo[t]:.6g}, {hi[t]:.6g}], and the "
                f"difference of two coordinates overflows float64 (> {np.finfo(np.float64).max:.6g}); "
                f"shift and rescale the coordinates, got lengthscale={shown}"
            )
        # each term <= sqrt(limit)^2, so the d-term sum below cannot overflow
        if np.all(np.isfinite(scaled)) and scaled.max() <= math.sqrt(MAX_SCALED_SQ_DISTANCE):
            r2 = float(np.sum(scaled * scaled))
            if r2 <= MAX_SCALED_SQ_DISTANCE:
                continue
        # too wide: the values for the message, in log10 (they may exceed float64's range)
        with np.errstate(divide="ignore"):
            log_scaled = np.log10(extent) - np.log10(scale)
        t = int(np.argmax(log_scaled))
        top = float(log_scaled[t])
        log_r2 = 2.0 * top + math.log10(float(np.sum(10.0 ** (2.0 * (log_scaled - top)))))
        limit = f"{MAX_SCALED_SQ_DISTANCE:.0e}"
        why = (f"overflows float64; the limit is {limit}" if log_r2 > math.log10(np.finfo(np.float64).max)
               else f"exceeds {limit}, the most the kernel evaluates accurately in float64")
        raise InvalidArgumentError(
            f"{who} spread {_pow10(log_r2 / 2.0)} lengthscales apart (scaled squared distance {_pow10(log_r2)} "
            f"{why}): column {t} spans [{lo[t]:.6g}, {hi[t]:.6g}], {_pow10(top)} times its lengthscale "
            f"{scale[t]:.6g}; rescale the coordinates or use a larger lengthscale, got lengthscale={shown}"
        )
    return lo, hi
