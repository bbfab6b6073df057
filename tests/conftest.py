"""Shared fixtures: the backends under test and the oracle (create_block_mask over the rule)."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings
from torch.nn.attention.flex_attention import create_block_mask

import peagle_ext
from peagle_ext import _native

# The backend fixtures only select a parameter, so sharing them across examples is safe.
settings.register_profile(
    "ci",
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
settings.load_profile("ci")

# Every backend and the device its tensors live on; "cuda_emulated" is the CUDA pipeline's code run
# on CPU tensors by a sequential launcher, so the CPU suite covers what the GPU runs.
BACKEND_DEVICE = {"python": "cpu", "cpu": "cpu", "cuda_emulated": "cpu", "cuda": "cuda"}


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
            raise pytest.UsageError(f"PEAGLE_EXT_REQUIRE_NATIVE=1 but cuda_emulated is unavailable: {status['cuda_emulated']}")


def backends_here() -> list[str]:
    """Every backend that runs here (the python one always), for tests that compare them all."""
    return [backend for backend in BACKEND_DEVICE if backend == "python" or _native.native_status()[backend] is None]


def skip_unless_backend(backend: str) -> None:
    if backend == "python":
        return
    reason = _native.native_status()[backend]
    if reason is not None:
        pytest.skip(f"backend {backend!r} unavailable: {reason}")


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


def oracle_block_mask(anchor_pos, depth, lengths=None, total_seq_len=None, *, document_ids=None,
                      sliding_window=None, BLOCK_SIZE=128, kv_anchor_pos=None, kv_depth=None):
    """What create_block_mask finds by evaluating the rule on the dense Q_LEN x KV_LEN grid."""
    mask_mod = peagle_ext.create_peagle_mask_mod(
        anchor_pos, depth, lengths, total_seq_len, document_ids=document_ids, sliding_window=sliding_window,
        kv_anchor_pos=kv_anchor_pos, kv_depth=kv_depth,
    )
    q_len = anchor_pos.numel()
    kv_len = q_len if kv_anchor_pos is None else kv_anchor_pos.numel()
    return create_block_mask(mask_mod, None, None, q_len, kv_len, device=anchor_pos.device, BLOCK_SIZE=BLOCK_SIZE)


def shuffled_noncontiguous_case(seq_len: int = 20000, seed: int = 3):
    """(anchor_pos, depth, document_ids): a COD sample in random element order over documents out of
    position order, with padding: the builders' general paths, at a size the oracle cannot reach."""
    generator = torch.Generator().manual_seed(seed)
    anchor_pos, depth = peagle_ext.generate_cod_sample_indices(seq_len, torch.ones(seq_len), generator=generator)
    order = torch.randperm(anchor_pos.numel(), generator=generator)
    document_ids = torch.randint(-1, 6, (seq_len,), generator=generator)
    return anchor_pos[order], depth[order], document_ids
