"""The CUDA kernel: no host sync, CUDA-graph capture, agreement with the CPU kernel at large N,
and flex_attention reading its block lists. Every test here needs a GPU and skips without one."""

from __future__ import annotations

import pytest
import torch
from conftest import skip_unless_backend
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import peagle_ext
from peagle_ext._inputs import normalize_mask_inputs


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


def test_no_host_sync_on_cuda():
    anchor_pos, depth, lengths = cod(4096)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        mask = peagle_ext.build_block_mask(anchor_pos, depth, lengths, 4096, backend="cuda", validate=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    reference = peagle_ext.build_block_mask(anchor_pos.cpu(), depth.cpu(), lengths.cpu(), 4096, backend="cpu")
    peagle_ext.assert_block_masks_equal(mask, reference)


def test_cuda_graph_capture_and_replay_with_new_inputs():
    seq_len = 2048
    first = normalize_mask_inputs(*cod(seq_len, seed=1), seq_len)
    second = normalize_mask_inputs(*cod(seq_len, seed=2), seq_len)
    assert first.num_elements == second.num_elements  # same N, different layout
    static = [t.clone() for t in (first.anchor_pos, first.depth, first.doc_of_position)]

    def build():
        return torch.ops.peagle_ext.build_block_index(*static, None, 128, 128)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        build()  # warm up allocations outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = build()
    for inputs in (second, first):
        for dst, src in zip(static, (inputs.anchor_pos, inputs.depth, inputs.doc_of_position)):
            dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        expected = torch.ops.peagle_ext.build_block_index(
            inputs.anchor_pos.cpu(), inputs.depth.cpu(), inputs.doc_of_position.cpu(), None, 128, 128
        )
        for got, want in zip(captured, expected):
            assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("seq_len, kwargs", [(8192, {}), (60000, {"sliding_window": 1000}), (16384, {"BLOCK_SIZE": (128, 64)})])
def test_cuda_equals_cpu_at_large_n(seq_len, kwargs):
    anchor_pos, depth, lengths = cod(seq_len, seed=seq_len)
    on_gpu = peagle_ext.build_block_mask(anchor_pos, depth, lengths, seq_len, backend="cuda", **kwargs)
    on_cpu = peagle_ext.build_block_mask(anchor_pos.cpu(), depth.cpu(), lengths.cpu(), seq_len, backend="cpu", **kwargs)
    assert on_gpu.kv_indices.is_cuda
    peagle_ext.assert_block_masks_equal(on_gpu, on_cpu)


def test_python_backend_on_cuda_tensors():
    anchor_pos, depth, lengths = cod(1024)
    on_gpu = peagle_ext.build_block_mask(anchor_pos, depth, lengths, 1024, backend="python")
    oracle = create_block_mask(
        peagle_ext.create_peagle_mask_mod(anchor_pos, depth, lengths, 1024), None, None,
        anchor_pos.numel(), anchor_pos.numel(), device="cuda",
    )
    assert on_gpu.kv_indices.is_cuda
    peagle_ext.assert_block_masks_equal(on_gpu, oracle)


def test_compiled_flex_attention_output_matches_create_block_mask():
    """Compiled flex_attention reads the block lists, so this checks them where it matters."""
    anchor_pos, depth, lengths = cod(1024, seed=4)
    n = anchor_pos.numel()
    ours = peagle_ext.build_block_mask(anchor_pos, depth, lengths, 1024, backend="cuda")
    theirs = create_block_mask(ours.mask_mod, None, None, n, n, device="cuda")
    q, k, v = (torch.randn(1, 4, n, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    compiled = torch.compile(flex_attention)
    torch.testing.assert_close(compiled(q, k, v, block_mask=ours), compiled(q, k, v, block_mask=theirs))
