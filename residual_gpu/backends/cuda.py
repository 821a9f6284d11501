"""CuPy backend (registered; implemented by the GPU-backends issue)."""

from __future__ import annotations

from .base import Backend


class CudaBackend(Backend):
    name = "cuda"

    @classmethod
    def availability(cls):
        return False, "the CuPy backend is not implemented yet"

    def prepare(self, problem):  # pragma: no cover - unreachable while unavailable
        raise NotImplementedError

    def abs_rho_tile(self, prepared, batch, cols):  # pragma: no cover
        raise NotImplementedError

    def select_candidates(self, prepared, batch, keep):  # pragma: no cover
        raise NotImplementedError
