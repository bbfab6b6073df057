"""The CUDA backend on a GPU: exactness against create_block_mask run on the GPU (every backend
that runs on CUDA tensors), the same bytes as the emulated pipeline and the CPU kernel, no host
sync, CUDA-graph capture and replay, the launch count, and compiled flex_attention reading its
block lists. Every test here needs a GPU and skips without one; on a CPU machine the emulated
backend runs the same kernel code (tests/mask/test_exactness.py, test_native.py)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from torch.nn.attention.flex_attention import flex_attention

import peagle_ext
from peagle_ext import _native
from peagle_ext._inputs import normalize_mask_inputs

from helpers import (
    BACKEND_DEVICE,
    assert_same_bytes,
    dense_rule,
    oracle_block_mask,
    shuffled_noncontiguous_case,
    skip_unless_backend,
)
from strategies import BLOCK_SIZES, arbitrary_cases, cod_cases

# The backends run on CUDA tensors.
GPU_BACKENDS = [backend for backend, device in BACKEND_DEVICE.items() if device == "cuda"] + ["python"]


@pytest.fixture(autouse=True)
def needs_cuda_backend():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (none visible)")
    skip_unless_backend("cuda")


def cod(seq_len, seed=0, device="cuda"):
    generator = torch.Generator().manual_seed(seed)
    anchor_pos, depth = peagle_ext.generate_cod_sample_indices(seq_len, torch.ones(seq_len), generator=generator)
    lengths = torch.tensor([seq_len // 2, seq_len - seq_len // 2 - 7])
    return anchor_pos.to(device), depth.to(device), lengths.to(device)


def check_on_gpu(case, block_size):
    """create_block_mask on the GPU is the oracle; every GPU backend must match it, and the CUDA
    kernel must give the bytes of the emulated pipeline (the same code, run on the CPU)."""
    on_gpu = case.to("cuda")
    oracle = oracle_block_mask(on_gpu.anchor_pos, on_gpu.depth, BLOCK_SIZE=block_size, **on_gpu.kwargs)
    built = {}
    for backend in GPU_BACKENDS:
        built[backend] = peagle_ext.build_block_mask(on_gpu.anchor_pos, on_gpu.depth, BLOCK_SIZE=block_size,
                                                     backend=backend, **on_gpu.kwargs)
        assert built[backend].kv_indices.is_cuda, backend
        try:
            peagle_ext.assert_block_masks_equal(built[backend], oracle)
        except AssertionError as error:
            raise AssertionError(f"backend {backend!r} on the GPU: {error}") from None
    if _native.native_status()["cuda_emulated"] is None:
        emulated = peagle_ext.build_block_mask(case.anchor_pos, case.depth, BLOCK_SIZE=block_size,
                                               backend="cuda_emulated", **case.kwargs)
        assert_same_bytes(built["cuda"], emulated, "cuda vs cuda_emulated:")


@settings(max_examples=40)
@given(case=cod_cases(), block_size=BLOCK_SIZES)
def test_cod_layouts_match_create_block_mask_on_the_gpu(case, block_size):
    check_on_gpu(case, block_size)


@settings(max_examples=40)
@given(case=arbitrary_cases(), block_size=BLOCK_SIZES)
def test_arbitrary_inputs_match_create_block_mask_on_the_gpu(case, block_size):
    check_on_gpu(case, block_size)


@pytest.mark.parametrize("seq_len, kwargs", [
    (4096, {}),
    (4096, {"sliding_window": 300, "BLOCK_SIZE": (128, 64)}),
    (2048, {"BLOCK_SIZE": 64}),
])
def test_thousands_of_elements_match_create_block_mask_on_the_gpu(seq_len, kwargs):
    anchor_pos, depth, lengths = cod(seq_len, seed=seq_len)
    oracle = oracle_block_mask(anchor_pos, depth, lengths, seq_len, **kwargs)
    ours = peagle_ext.build_block_mask(anchor_pos, depth, lengths, seq_len, backend="cuda", **kwargs)
    peagle_ext.assert_block_masks_equal(ours, oracle)
    assert int(ours.full_kv_num_blocks.sum()) > 0 and int(ours.kv_num_blocks.sum()) > 0


@pytest.mark.parametrize("form", ["lengths", "document_ids"])
def test_no_host_sync_on_cuda(form):
    anchor_pos, depth, lengths = cod(4096)
    if form == "lengths":
        kwargs = {"lengths": lengths, "total_seq_len": 4096}
    else:
        kwargs = {"document_ids": torch.repeat_interleave(torch.arange(2, device="cuda"), 2048), "sliding_window": 512}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        mask = peagle_ext.build_block_mask(anchor_pos, depth, backend="cuda", validate=False, **kwargs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    cpu_kwargs = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    reference = peagle_ext.build_block_mask(anchor_pos.cpu(), depth.cpu(), backend="cpu", **cpu_kwargs)
    assert_same_bytes(mask, reference)


def test_one_memset_and_four_kernels_per_build():
    """One memset and four kernels per build (docs/cuda-pipeline.md), as the profiler sees them."""
    inputs = normalize_mask_inputs(*cod(4096, seed=3), 4096)
    args = (inputs.anchor_pos, inputs.depth, inputs.doc_of_position, None, 128, 128)
    torch.ops.peagle_ext.build_block_index(*args)  # warm up
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        torch.ops.peagle_ext.build_block_index(*args)
        torch.cuda.synchronize()
    kernels = [event.name for event in profile.events() if event.device_type == torch.autograd.DeviceType.CUDA]
    ours = [name for name in kernels if "run_phases" in name]
    assert len(ours) == 4, kernels
    assert len(kernels) <= 5, kernels  # and the memset of the counters, where the profiler lists it


def test_cuda_graph_capture_and_replay_with_new_inputs():
    """The whole build_block_mask (validate=False) captured once, replayed on new inputs of the
    same N: each replay gives the CPU kernel's bytes for the inputs it saw."""
    seq_len = 2048
    firsts, seconds = cod(seq_len, seed=1), cod(seq_len, seed=2)
    assert firsts[0].numel() == seconds[0].numel()  # same N, different layout
    static = [t.clone() for t in firsts]

    def build():
        return peagle_ext.build_block_mask(static[0], static[1], static[2], seq_len, backend="cuda", validate=False)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        build()  # warm up allocations outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = build()
    for inputs in (seconds, firsts, seconds):
        for dst, src in zip(static, inputs):
            dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        expected = peagle_ext.build_block_mask(*(t.cpu() for t in inputs), seq_len, backend="cpu")
        assert_same_bytes(captured, expected)


@pytest.mark.parametrize("seq_len, kwargs",
                         [(8192, {}), (60000, {"sliding_window": 1000}), (16384, {"BLOCK_SIZE": (128, 64)})])
def test_cuda_equals_cpu_at_large_n(seq_len, kwargs):
    anchor_pos, depth, lengths = cod(seq_len, seed=seq_len)
    on_gpu = peagle_ext.build_block_mask(anchor_pos, depth, lengths, seq_len, backend="cuda", **kwargs)
    on_cpu = peagle_ext.build_block_mask(anchor_pos.cpu(), depth.cpu(), lengths.cpu(), seq_len, backend="cpu", **kwargs)
    assert on_gpu.kv_indices.is_cuda
    assert_same_bytes(on_gpu, on_cpu)


def test_cuda_equals_cpu_on_shuffled_noncontiguous_documents():
    """The general paths: documents out of position order, elements in any order."""
    anchor_pos, depth, document_ids = shuffled_noncontiguous_case()
    on_cpu = peagle_ext.build_block_mask(anchor_pos, depth, document_ids=document_ids, sliding_window=300,
                                         backend="cpu")
    on_gpu = peagle_ext.build_block_mask(anchor_pos.cuda(), depth.cuda(), document_ids=document_ids.cuda(),
                                         sliding_window=300, backend="cuda")
    assert_same_bytes(on_gpu, on_cpu)


def test_many_kv_blocks_keep_marks_in_global_memory():
    """Past 32K kv-blocks a q-block's marks leave shared memory for its row of the states."""
    seq_len = 12000
    anchor_pos, depth, lengths = cod(seq_len, seed=9)
    assert anchor_pos.numel() > 32 * 1024
    kwargs = {"BLOCK_SIZE": (512, 1)}
    on_gpu = peagle_ext.build_block_mask(anchor_pos, depth, lengths, seq_len, backend="cuda", **kwargs)
    on_cpu = peagle_ext.build_block_mask(anchor_pos.cpu(), depth.cpu(), lengths.cpu(), seq_len, backend="cpu", **kwargs)
    assert_same_bytes(on_gpu, on_cpu)


def test_compiled_flex_attention_output_matches_the_rule():
    """Compiled flex_attention reads the block lists, so this checks them where it matters: against
    attention over the rule written out pair by pair (float32, so that a missing tile shows)."""
    anchor_pos, depth, lengths = cod(1024, seed=4)
    n = anchor_pos.numel()
    ours = peagle_ext.build_block_mask(anchor_pos, depth, lengths, 1024, backend="cuda")
    q, k, v = (torch.randn(1, 4, n, 64, device="cuda") for _ in range(3))
    allowed = dense_rule(anchor_pos, depth, lengths, 1024)
    scores = ((q @ k.transpose(-1, -2)) / 8.0).masked_fill(~allowed, float("-inf"))
    expected = torch.nan_to_num(torch.softmax(scores, dim=-1)) @ v
    torch.testing.assert_close(torch.compile(flex_attention)(q, k, v, block_mask=ours), expected, atol=2e-3, rtol=2e-3)
