"""Arrays of any library in, numpy inside, and back out in the caller's library on request.

Inputs (coordinates, inducing points, factors, query indices, lengthscales) may be numpy,
CuPy, JAX or PyTorch arrays, or anything numpy reads (``__array__``, ``__dlpack__``, lists).
``to_host`` is the one place they become numpy: an array in device memory (CuPy, a torch
CUDA tensor) is copied to the host in one transfer; host arrays are read in place (the
checks in ``_validation`` then make the float64 copy the problem keeps). The search always
runs on host numpy arrays; a GPU backend copies them to its device once, in ``prepare``.
Results are numpy unless the caller passes ``like=``: ``result_converter`` then puts them in
that array's library and on its device.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import array_api_compat as aac
import numpy as np

from .errors import InvalidArgumentError, InvalidTypeError


def _in_device_memory(value) -> bool:
    """Whether numpy cannot read ``value`` in place (CuPy and torch refuse implicit copies;
    a JAX array on a GPU is copied by ``np.asarray`` itself)."""
    if aac.is_cupy_array(value):
        return True
    return aac.is_torch_array(value) and value.device.type != "cpu"


def to_host(value) -> tuple[object, bool]:
    """``value`` as something numpy reads, and whether it is a fresh host copy (ours to keep).

    numpy arrays, scalars, lists and other non-array objects come back unchanged, so that the
    callers' own checks see and describe them.
    """
    # scalars and lists never reach array-api-compat's probe, which looks CuPy and torch up in sys.modules
    foreign = hasattr(value, "__array_namespace__") or hasattr(value, "__dlpack__")
    if isinstance(value, np.ndarray) or not foreign or not aac.is_array_api_obj(value):
        return value, False
    if aac.is_torch_array(value):
        value = value.detach()  # a tensor that requires grad refuses numpy(); we only read it
    if _in_device_memory(value):
        return np.asarray(aac.to_device(value, "cpu")), True
    if hasattr(value, "__array__"):
        return np.asarray(value), False
    return np.from_dlpack(value), False


def result_converter(like) -> Callable[[np.ndarray], Any]:
    """A function that puts numpy results into the array library of ``like`` and on its device
    (the identity for None or a numpy array), checked here, before any search runs.

    Raises InvalidTypeError for a ``like`` that is no array, and InvalidArgumentError where
    that library would change the results' dtypes (JAX without ``jax_enable_x64`` rounds
    float64 to float32): exact distances are never rounded silently.
    """
    if like is None or isinstance(like, np.ndarray):
        return lambda a: a
    if not aac.is_array_api_obj(like):
        raise InvalidTypeError(f"like must be an array (numpy, CuPy, JAX, PyTorch) whose library the results "
                               f"take, or None for numpy, got like={type(like).__name__}")
    xp = aac.array_namespace(like)
    device = aac.device(like)

    def convert(a: np.ndarray):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # JAX's truncation warning: the dtype check below raises instead
            return xp.asarray(a, device=device)

    for dtype in (np.int64, np.float64):
        got = convert(np.zeros(0, dtype=dtype)).dtype
        if got != getattr(xp, np.dtype(dtype).name):
            hint = (" (JAX runs in 32-bit mode: jax.config.update('jax_enable_x64', True))"
                    if aac.is_jax_array(like) else "")
            raise InvalidArgumentError(f"like={type(like).__name__} would turn {np.dtype(dtype)} results into "
                                       f"{got}{hint}; pass like=None for numpy results")
    return convert
