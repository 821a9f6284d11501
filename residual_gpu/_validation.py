"""Argument checks shared by the public entry points.

Each helper returns a fresh array (never a view the caller could see us modify) and
raises a typed error that quotes the argument's name and the offending value.
"""

from __future__ import annotations

import numbers

import numpy as np

from .errors import InvalidArgumentError, InvalidTypeError


def _describe(value) -> str:
    """A short description of a rejected value for error messages."""
    if isinstance(value, np.generic):
        return repr(value.item())
    if isinstance(value, np.ndarray):
        return f"array(shape={value.shape}, dtype={value.dtype})"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def as_float_matrix(value, name: str, *, ncols: int | None = None, min_rows: int = 1) -> np.ndarray:
    """A C-contiguous float64 copy of a 2-D finite real array.

    A 1-D array is read as one coordinate per row (d = 1) so that ``x`` of shape (n,)
    works as users expect.
    """
    if isinstance(value, (str, bytes)) or value is None:
        raise InvalidTypeError(f"{name} must be a 2-D array of real numbers, got {_describe(value)}")
    try:
        arr = np.asarray(value)
    except Exception as exc:  # ragged lists and the like
        raise InvalidTypeError(f"{name} must be a 2-D array of real numbers, got {_describe(value)}") from exc
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise InvalidTypeError(f"{name} must hold real numbers, got {name}.dtype={arr.dtype}")
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
    out = np.array(arr, dtype=np.float64, order="C", copy=True)
    if not np.all(np.isfinite(out)):
        bad = np.argwhere(~np.isfinite(out))[0]
        raise InvalidArgumentError(
            f"{name} must be finite, got {name}[{bad[0]}, {bad[1]}]={_describe(arr[tuple(bad)])}"
        )
    return out


def as_float_vector(value, name: str, *, length: int | None = None, positive: bool = False) -> np.ndarray:
    """A float64 copy of a finite 1-D array (optionally of a given length, all > 0)."""
    try:
        arr = np.asarray(value)
    except Exception as exc:
        raise InvalidTypeError(f"{name} must be a 1-D array of real numbers, got {_describe(value)}") from exc
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise InvalidTypeError(f"{name} must hold real numbers, got {name}.dtype={arr.dtype}")
    if arr.ndim != 1:
        raise InvalidArgumentError(f"{name} must be 1-D, got {name}.shape={arr.shape}")
    if length is not None and arr.shape[0] != length:
        raise InvalidArgumentError(f"{name} must have length {length}, got {name}.shape={arr.shape}")
    out = np.array(arr, dtype=np.float64, copy=True)
    bad = ~np.isfinite(out) | ((out <= 0) if positive else False)
    if np.any(bad):
        i = int(np.flatnonzero(bad)[0])
        need = "finite and > 0" if positive else "finite"
        raise InvalidArgumentError(f"{name} must be {need}, got {name}[{i}]={_describe(arr[i])}")
    return out


def as_positive_float(value, name: str) -> float:
    """A finite float > 0 (a 0-d array counts as a scalar)."""
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
        arr = np.asarray(value)
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
