"""The backend registry (residual_gpu.backends): names, "auto" resolution, RESIDUAL_GPU_BACKEND,
typed errors for unknown and unavailable backends.

Whether cuda and jax can run depends on the machine (CuPy and a device, JAX installed), so
assertions about them first ask ``available_backends()``; the resolution rule itself is
also tested with availability patched, so it is checked everywhere.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

import residual_gpu as rg
from residual_gpu import backends as reg
from residual_gpu.backends.cpu import CpuBackend
from residual_gpu.backends.cuda import CudaBackend
from residual_gpu.backends.jax import JaxBackend
from residual_gpu.errors import BackendUnavailableError, InvalidArgumentError, InvalidTypeError

ENV = "RESIDUAL_GPU_BACKEND"


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)


@pytest.fixture(scope="module")
def problem():
    return rg.ResidualProblem(np.random.default_rng(0).random((40, 2)), kernel=rg.RBF(0.3), inducing=5)


def usable(name: str) -> bool:
    return rg.available_backends()[name][0]


def patch_availability(monkeypatch, cls, usable_: bool, reason: str):
    monkeypatch.setattr(cls, "availability", classmethod(lambda c: (usable_, reason)))


# --------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------


def test_available_backends_lists_the_three():
    avail = rg.available_backends()
    assert set(avail) == {"cpu", "cuda", "jax"}
    for name, entry in avail.items():
        assert isinstance(entry, tuple) and len(entry) == 2, name
        ok, reason = entry
        assert isinstance(ok, bool), name
        assert isinstance(reason, str) and reason.strip(), f"{name} gives no reason"
    assert avail["cpu"][0] is True


def test_registry_table_matches():
    assert reg.BACKENDS == {"cpu": CpuBackend, "cuda": CudaBackend, "jax": JaxBackend}
    for name, cls in reg.BACKENDS.items():
        assert cls.name == name


def test_get_cpu_backend():
    be = rg.get_backend("cpu")
    assert isinstance(be, CpuBackend)
    assert be.name == "cpu"
    assert rg.get_backend("CPU").name == "cpu"  # names are case-insensitive


def test_auto_resolves_to_cpu_without_cuda():
    expected = "cuda" if usable("cuda") else "cpu"
    assert reg.resolve_backend_name("auto") == expected
    assert reg.resolve_backend_name() == expected
    assert rg.get_backend("auto").name == expected
    assert rg.get_backend().name == expected


def test_index_reports_resolved_backend(problem):
    expected = "cuda" if usable("cuda") else "cpu"
    idx = rg.ResidualIndex(problem)
    assert idx.backend == expected
    assert rg.ResidualIndex(problem, backend="auto").backend == expected
    assert rg.ResidualIndex(problem, backend="cpu").backend == "cpu"
    res = idx.query(3)
    assert res.telemetry.backend == expected


def test_auto_rule_prefers_cuda_when_usable(monkeypatch):
    patch_availability(monkeypatch, CudaBackend, True, "fake device")
    assert reg.resolve_backend_name("auto") == "cuda"
    patch_availability(monkeypatch, CudaBackend, False, "no CuPy")
    assert reg.resolve_backend_name("auto") == "cpu"
    # jax is never picked by "auto", even when it is usable
    patch_availability(monkeypatch, JaxBackend, True, "fake jax")
    assert reg.resolve_backend_name("auto") == "cpu"


def test_auto_resolution_is_logged(caplog):
    with caplog.at_level(logging.INFO, logger="residual_gpu"):
        be = rg.get_backend("auto")
    assert any("resolved to" in r.getMessage() and be.name in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------------------
# RESIDUAL_GPU_BACKEND
# --------------------------------------------------------------------------------------


def test_env_var_cpu_honoured_by_auto(monkeypatch, problem):
    monkeypatch.setenv(ENV, "cpu")
    patch_availability(monkeypatch, CudaBackend, True, "fake device")  # would win without the variable
    assert reg.resolve_backend_name("auto") == "cpu"
    assert rg.get_backend("auto").name == "cpu"
    assert rg.ResidualIndex(problem).backend == "cpu"


@pytest.mark.parametrize("value", ["CPU", "auto", ""])
def test_env_var_other_spellings(monkeypatch, value):
    monkeypatch.setenv(ENV, value)
    expected = "cuda" if (value != "CPU" and usable("cuda")) else "cpu"
    assert reg.resolve_backend_name("auto") == expected


def test_env_var_does_not_override_an_explicit_name(monkeypatch):
    monkeypatch.setenv(ENV, "jax")
    assert reg.resolve_backend_name("cpu") == "cpu"
    assert rg.get_backend("cpu").name == "cpu"


def test_env_var_naming_unavailable_backend_raises(monkeypatch):
    monkeypatch.setenv(ENV, "cuda")
    patch_availability(monkeypatch, CudaBackend, False, "CuPy is not installed")
    with pytest.raises(BackendUnavailableError, match="cuda.*CuPy is not installed"):
        rg.get_backend("auto")


def test_env_var_unknown_value_raises(monkeypatch, problem):
    monkeypatch.setenv(ENV, "tpu")
    with pytest.raises(InvalidArgumentError):
        reg.resolve_backend_name("auto")
    with pytest.raises(InvalidArgumentError):
        rg.ResidualIndex(problem)
    # an explicit name is unaffected by the bad variable
    assert rg.ResidualIndex(problem, backend="cpu").backend == "cpu"


def test_env_var_unknown_value_message_names_variable_and_value(monkeypatch):
    monkeypatch.setenv(ENV, "tpu")
    with pytest.raises(InvalidArgumentError) as info:
        reg.resolve_backend_name("auto")
    assert ENV in str(info.value) and "tpu" in str(info.value)


# --------------------------------------------------------------------------------------
# Unavailable, unknown and mistyped backends
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cuda", "jax"])
def test_unavailable_gpu_backend_raises_with_reason(name, problem):
    ok, reason = rg.available_backends()[name]
    if ok:
        be = rg.get_backend(name)
        assert be.name == name
        assert rg.ResidualIndex(problem, backend=name).backend == name
        return
    with pytest.raises(rg.BackendUnavailableError) as info:
        rg.get_backend(name)
    msg = str(info.value)
    assert name in msg and "unavailable" in msg
    assert reason in msg
    assert isinstance(info.value, RuntimeError) and isinstance(info.value, rg.ResidualGPUError)
    # an explicit name never falls back to the cpu
    with pytest.raises(rg.BackendUnavailableError):
        rg.ResidualIndex(problem, backend=name)


@pytest.mark.parametrize("cls,name", [(CudaBackend, "cuda"), (JaxBackend, "jax")])
def test_unavailable_backend_message_says_why(monkeypatch, cls, name):
    patch_availability(monkeypatch, cls, False, "the widget library is missing (pip install widget)")
    with pytest.raises(BackendUnavailableError) as info:
        rg.get_backend(name)
    msg = str(info.value)
    assert repr(name) in msg and "the widget library is missing (pip install widget)" in msg
    assert issubclass(BackendUnavailableError, RuntimeError)


def test_real_unavailability_reasons_are_actionable():
    for name in ("cuda", "jax"):
        ok, reason = rg.available_backends()[name]
        if not ok:
            # says what is missing: a package (and how to install it) or a device
            assert any(word in reason for word in ("install", "device", "not implemented")), reason


@pytest.mark.parametrize("name", ["gpu", "numba", "cupy", " cpu", "auto2"])
def test_unknown_backend_name(name):
    with pytest.raises(InvalidArgumentError) as info:
        rg.get_backend(name)
    msg = str(info.value)
    assert "backend" in msg and repr(name) in msg
    for known in ("auto", "cpu", "cuda", "jax"):
        assert known in msg
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("name", [None, 1, b"cpu", ["cpu"], CpuBackend])
def test_backend_name_must_be_a_string(name):
    with pytest.raises(InvalidTypeError) as info:
        rg.get_backend(name)
    assert "backend" in str(info.value)
    assert isinstance(info.value, TypeError)
