"""Backend registry and the one place where ``backend="auto"`` is resolved.

Rule for "auto" (and for the default when ``RESIDUAL_GPU_BACKEND`` is unset): "cuda" when
CuPy imports and sees a device, else "cpu". An explicit name never falls back: a backend
that cannot run raises BackendUnavailableError saying what is missing.
"""

from __future__ import annotations

import logging
import os

from ..errors import BackendUnavailableError, InvalidArgumentError, InvalidTypeError
from .base import Backend, BlockList, Candidates, QueryBatch
from .cpu import CpuBackend
from .cuda import CudaBackend
from .jax import JaxBackend

BACKENDS: dict[str, type[Backend]] = {"cpu": CpuBackend, "cuda": CudaBackend, "jax": JaxBackend}
ENV_VAR = "RESIDUAL_GPU_BACKEND"

logger = logging.getLogger("residual_gpu")

__all__ = ["BACKENDS", "Backend", "BlockList", "Candidates", "QueryBatch", "available_backends", "get_backend", "resolve_backend_name"]


def available_backends() -> dict[str, tuple[bool, str]]:
    """{name: (usable, reason)} for every registered backend."""
    return {name: cls.availability() for name, cls in BACKENDS.items()}


def resolve_backend_name(name: str = "auto") -> str:
    """The concrete backend name for ``name`` ("auto" honours RESIDUAL_GPU_BACKEND)."""
    if not isinstance(name, str):
        raise InvalidTypeError(f"backend must be a string, got backend={name!r}")
    requested = name.lower()
    if requested == "auto" and os.environ.get(ENV_VAR):
        requested = os.environ[ENV_VAR].lower()
        if requested not in BACKENDS and requested != "auto":
            raise InvalidArgumentError(
                f"{ENV_VAR} must be one of {['auto', *BACKENDS]}, got {ENV_VAR}={os.environ[ENV_VAR]!r}")
    if requested == "auto":
        usable, _ = CudaBackend.availability()
        return "cuda" if usable else "cpu"
    if requested not in BACKENDS:
        raise InvalidArgumentError(f"backend must be one of {['auto', *BACKENDS]}, got backend={name!r}")
    return requested


def get_backend(name: str = "auto") -> Backend:
    """An instance of the resolved backend; raises BackendUnavailableError if it cannot run."""
    resolved = resolve_backend_name(name)
    cls = BACKENDS[resolved]
    usable, reason = cls.availability()
    if not usable:
        raise BackendUnavailableError(f"backend {resolved!r} is unavailable: {reason}")
    if name.lower() != resolved:
        logger.info("residual_gpu: backend=%r resolved to %r (%s)", name, resolved, reason)
    return cls()
