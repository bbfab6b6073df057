"""The fixtures: hypothesis's profile, the backends under test, a CUDA device; what the tests share
besides fixtures is in helpers.py."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

import peagle_ext
from peagle_ext import _native

from helpers import BACKEND_DEVICE, skip_unless_backend

# The backend fixtures only select a parameter, so sharing them across examples is safe.
settings.register_profile(
    "ci",
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
settings.load_profile("ci")


def pytest_report_header(config):
    return [
        f"peagle_ext from {peagle_ext.__file__}",
        f"compiled kernels: {_native.compiled_kernels() or 'none'}; backends here: {peagle_ext.available_backends()}",
    ]


def pytest_sessionstart(session):
    # CI sets this so that a build that silently fell back to pure Python fails loudly.
    if os.environ.get("PEAGLE_EXT_REQUIRE_NATIVE") == "1":
        status = _native.native_status()
        if status["cpu"] is not None:
            raise pytest.UsageError(f"PEAGLE_EXT_REQUIRE_NATIVE=1 but the cpu kernel is unavailable: {status['cpu']}")
        if torch.version.cuda and "cuda" not in _native.compiled_kernels():
            raise pytest.UsageError("PEAGLE_EXT_REQUIRE_NATIVE=1 but the CUDA kernels were not compiled in")
        if status["cuda_emulated"] is not None:
            raise pytest.UsageError(
                f"PEAGLE_EXT_REQUIRE_NATIVE=1 but cuda_emulated is unavailable: {status['cuda_emulated']}")


@pytest.fixture(params=list(BACKEND_DEVICE))
def backend(request) -> str:
    """Each builder backend; the native ones skip, saying why, where they cannot run."""
    skip_unless_backend(request.param)
    return request.param


@pytest.fixture(params=[b for b, device in BACKEND_DEVICE.items() if device == "cpu"])
def cpu_backend(request) -> str:
    skip_unless_backend(request.param)
    return request.param


@pytest.fixture
def cuda_device():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (none visible)")
    skip_unless_backend("cuda")
    return torch.device("cuda")
