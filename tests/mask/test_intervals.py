"""block_mask_from_intervals against create_block_mask over the interval rule, on every backend that runs here."""

from __future__ import annotations

import pickle
import re

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import create_block_mask

import peagle_ext
from peagle_ext import _native
from peagle_ext.intervals import INTERVAL_BACKENDS, IntervalMaskMod

from helpers import assert_same_bytes

BLOCK_SIZES = st.sampled_from([1, 2, 3, 5, 8, 16, 128, (16, 4), (3, 7), (4, 16), (128, 64)])


def interval_backends_here() -> list[str]:
    status = _native.interval_status()
    return [b for b in INTERVAL_BACKENDS if b == "python" or (status[b] is None and b != "cuda")]


def dense_interval_rule(starts: torch.Tensor, ends: torch.Tensor, kv_len: int) -> torch.Tensor:
    """bool [B, Q, KV] from the rule's statement alone: q sees k iff starts[q, m] <= k < ends[q, m] for some m."""
    if starts.dim() == 2:
        starts, ends = starts[None], ends[None]
    k = torch.arange(kv_len)[None, None, None, :]
    return ((starts[..., None] <= k) & (k < ends[..., None])).any(dim=2)


def oracle(starts, ends, kv_len, block_size):
    batched = starts.dim() == 3
    allowed = dense_interval_rule(starts, ends, kv_len)

    def rule(b, h, q_idx, kv_idx):
        return allowed[b, q_idx, kv_idx]

    return create_block_mask(rule, allowed.shape[0] if batched else None, None, allowed.shape[1], kv_len,
                             device="cpu", BLOCK_SIZE=block_size)


def check(starts, ends, kv_len, block_size):
    expected = oracle(starts, ends, kv_len, block_size)
    clamped = starts.clamp(0, kv_len), ends.clamp(0, kv_len)
    for backend in interval_backends_here():
        got = peagle_ext.block_mask_from_intervals(*clamped, kv_len, BLOCK_SIZE=block_size, backend=backend)
        assert_same_bytes(got, expected, backend)
        # Out-of-range bounds, unvalidated, are clamped: the same mask.
        unchecked = peagle_ext.block_mask_from_intervals(starts, ends, kv_len, BLOCK_SIZE=block_size,
                                                         backend=backend, validate=False)
        assert_same_bytes(unchecked, expected, f"{backend} validate=False")
    # The mask_mod is the rule, on every pair.
    got = peagle_ext.block_mask_from_intervals(*clamped, kv_len, BLOCK_SIZE=block_size, backend="python")
    batch = starts.shape[0] if starts.dim() == 3 else 1
    q_idx, kv_idx = torch.meshgrid(torch.arange(starts.shape[-2]), torch.arange(kv_len), indexing="ij")
    for b in range(batch):
        pairs = got.mask_mod(torch.tensor(b), torch.tensor(0), q_idx, kv_idx)
        assert torch.equal(pairs, dense_interval_rule(starts, ends, kv_len)[b])


@st.composite
def interval_cases(draw):
    """Random and adversarial intervals: overlapping, touching, nested, empty, reversed, out of
    range, sizes that are not block multiples, Q != KV, batches."""
    batched = draw(st.booleans())
    batch = draw(st.integers(1, 3)) if batched else 1
    num_queries, kv_len, m = draw(st.integers(1, 70)), draw(st.integers(1, 70)), draw(st.integers(0, 5))
    bound = st.integers(-3, kv_len + 3)
    shape = (batch, num_queries, m)
    flat = draw(st.lists(st.tuples(bound, st.integers(-2, 30)), min_size=batch * num_queries * m,
                         max_size=batch * num_queries * m))
    style = draw(st.sampled_from(["free", "lengths", "tiled"]))
    starts = torch.tensor([s for s, _ in flat], dtype=torch.int64).reshape(shape)
    ends = torch.tensor([e for _, e in flat], dtype=torch.int64).reshape(shape)
    if style == "lengths":  # start + length: mostly non-empty, some reversed
        ends = starts + ends
    elif style == "tiled" and m:  # pieces that tile a range exactly, shuffled: only their union covers
        cut = torch.sort(torch.randint(0, kv_len + 1, shape, generator=torch.Generator().manual_seed(num_queries)),
                         dim=-1).values
        starts = torch.cat([torch.zeros_like(cut[..., :1]), cut[..., :-1]], -1)
        ends = cut.clone()
        ends[..., -1] = kv_len
        permutation = torch.randperm(m, generator=torch.Generator().manual_seed(kv_len))
        starts, ends = starts[..., permutation], ends[..., permutation]
    else:
        ends = torch.tensor([e for _, e in flat], dtype=torch.int64).reshape(shape).clamp(max=kv_len + 3)
        ends = torch.where(ends > 0, ends, starts + 1)
    if not batched:
        starts, ends = starts[0], ends[0]
    return starts, ends, kv_len


@given(interval_cases(), BLOCK_SIZES)
@example((torch.tensor([[0, 5], [5, 0]]), torch.tensor([[5, 9], [9, 5]]), 9), 3)  # touching halves cover
@example((torch.tensor([[0]] * 4), torch.tensor([[8]] * 4), 8), 4)  # all full
@example((torch.tensor([[0]] * 5), torch.tensor([[9]] * 5), 9), 4)  # tails never full
def test_matches_create_block_mask(case, block_size):
    check(*case, block_size)


def test_interval_cases_cover_the_adversarial_shapes():
    """The named corner cases, each once and on every backend."""
    check(torch.tensor([[3, 0, 7]]).repeat(8, 1), torch.tensor([[7, 3, 16]]).repeat(8, 1), 16, 4)  # tiled: full
    check(torch.tensor([[0, 0]]).repeat(8, 1), torch.tensor([[0, -1]]).repeat(8, 1), 16, 4)  # all empty
    check(torch.tensor([[-100]]), torch.tensor([[100]]), 5, 2)  # far out of range
    check(torch.arange(12)[:, None], torch.arange(12)[:, None] + 1, 12, (4, 2))  # diagonal
    check(torch.zeros(2, 6, 3, dtype=torch.int64), torch.full((2, 6, 3), 7), 7, (2, 3))  # batch


def test_mask_mod_pickles():
    mask = peagle_ext.block_mask_from_intervals(torch.tensor([[0], [1]]), torch.tensor([[2], [3]]), 3, BLOCK_SIZE=2)
    restored = pickle.loads(pickle.dumps(mask))
    assert isinstance(restored.mask_mod, IntervalMaskMod)
    assert torch.equal(restored.mask_mod.starts, mask.mask_mod.starts)
    assert restored.mask_mod.to("cpu").ends.tolist() == [[2], [3]]


def test_int32_bounds_and_large_block():
    starts, ends = torch.tensor([[0, 10]], dtype=torch.int32).repeat(300, 1), torch.tensor([[5, 40]]).repeat(300, 1)
    check(starts.long(), ends, 300, 128)
    got = peagle_ext.block_mask_from_intervals(starts, ends.int(), 300)
    assert_same_bytes(got, oracle(starts.long(), ends, 300, 128))


@pytest.mark.parametrize(
    ("arguments", "error", "says"),
    [
        ((torch.zeros(2, 1), torch.ones(2, 1), 4), TypeError, "starts must be an integer tensor"),
        ((torch.zeros(2, 1, dtype=torch.long), [1, 1], 4), TypeError, "ends must be a torch.Tensor"),
        ((torch.zeros(2, dtype=torch.long), torch.ones(2, dtype=torch.long), 4), ValueError, "starts must be [Q, M]"),
        ((torch.zeros(2, 1, dtype=torch.long), torch.ones(3, 1, dtype=torch.long), 4), ValueError, "one shape"),
        ((torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1, dtype=torch.long), 0), ValueError, "kv_len"),
        ((torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1, dtype=torch.long), 2.0), TypeError, "kv_len"),
        ((torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1, dtype=torch.long), True), TypeError, "kv_len"),
        ((torch.zeros(0, 1, dtype=torch.long), torch.ones(0, 1, dtype=torch.long), 4), ValueError, "queries"),
        ((torch.tensor([[-1]]), torch.tensor([[1]]), 4), ValueError, "starts must lie in [0, kv_len=4]"),
        ((torch.tensor([[0]]), torch.tensor([[5]]), 4), ValueError, "ends must lie in [0, kv_len=4]"),
    ],
)
def test_bad_input_is_refused_by_name(arguments, error, says):
    with pytest.raises(error, match=re.escape(says)):
        peagle_ext.block_mask_from_intervals(*arguments)


@pytest.mark.parametrize(("keyword", "value", "says"), [
    ("BLOCK_SIZE", 0, "BLOCK_SIZE"), ("BLOCK_SIZE", (2, "x"), "BLOCK_SIZE"), ("backend", "gpu", "backend"),
])
def test_bad_options_are_refused_by_name(keyword, value, says):
    with pytest.raises((TypeError, ValueError), match=says):
        peagle_ext.block_mask_from_intervals(torch.tensor([[0]]), torch.tensor([[1]]), 2, **{keyword: value})


def test_no_intervals_means_nothing_seen():
    none = torch.zeros(4, 0, dtype=torch.long)
    mask = peagle_ext.block_mask_from_intervals(none, none, 6, BLOCK_SIZE=2)
    assert int(mask.kv_num_blocks.sum()) == 0 and int(mask.full_kv_num_blocks.sum()) == 0


def test_cuda_matches_cpu():
    if not torch.cuda.is_available() or _native.interval_status()["cuda"] is not None:
        pytest.skip("needs a CUDA device and the CUDA interval kernel")
    generator = torch.Generator().manual_seed(0)
    starts = torch.randint(0, 3000, (2, 5000, 3), generator=generator)
    ends = starts + torch.randint(-5, 800, (2, 5000, 3), generator=generator)
    cpu = peagle_ext.block_mask_from_intervals(starts, ends, 3000, validate=False, backend="python")
    gpu = peagle_ext.block_mask_from_intervals(starts.cuda(), ends.cuda(), 3000, validate=False, backend="cuda")
    assert_same_bytes(gpu, cpu)


def test_emulated_schedules_agree():
    """The CUDA kernels' code under 12 block and thread orders gives the CPU kernel's bytes."""
    status = _native.interval_status()
    if status["cuda_emulated"] is not None or status["cpu"] is not None:
        pytest.skip(f"needs the cpu and cuda_emulated interval kernels: {status['cuda_emulated'] or status['cpu']}")
    generator = torch.Generator().manual_seed(3)
    cases = [(1, 300, 257, 3, (16, 8)), (2, 64, 500, 4, (3, 64)), (3, 9, 40, 1, (4, 4))]
    for batch, queries, kv_len, m, sizes in cases:
        starts = torch.randint(0, kv_len, (batch, queries, m), generator=generator)
        ends = (starts + torch.randint(-4, kv_len // 2, (batch, queries, m), generator=generator)).clamp(0, kv_len)
        expected = torch.ops.peagle_ext.build_interval_block_index(starts, ends, kv_len, *sizes)
        for seed in range(12):
            got = torch.ops.peagle_ext.build_interval_block_index_emulated(starts, ends, kv_len, *sizes, seed)
            for a, b in zip(got, expected):
                assert torch.equal(a, b), (batch, queries, kv_len, sizes, seed)


def test_cuda_graph_capture_without_host_sync():
    if not torch.cuda.is_available() or _native.interval_status()["cuda"] is not None:
        pytest.skip("needs a CUDA device and the CUDA interval kernel")
    starts = torch.randint(0, 4000, (3000, 2), device="cuda")
    ends = starts + torch.randint(0, 900, (3000, 2), device="cuda")
    expected = peagle_ext.block_mask_from_intervals(starts.cpu(), ends.cpu(), 4000, validate=False, backend="python")
    peagle_ext.block_mask_from_intervals(starts, ends, 4000, validate=False, backend="cuda")  # warm-up
    torch.cuda.set_sync_debug_mode("error")
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            mask = peagle_ext.block_mask_from_intervals(starts, ends, 4000, validate=False, backend="cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph.replay()
    torch.cuda.synchronize()
    assert_same_bytes(mask, expected)


def test_interval_op_passes_opcheck():
    """The interval op's schema, fake kernel (output shapes under torch.compile) and autograd
    registration agree with what the CPU kernel returns."""
    status = _native.interval_status()
    if status["cpu"] is not None:
        pytest.skip(f"needs the cpu interval kernel: {status['cpu']}")
    starts = torch.randint(0, 400, (2, 300, 3), generator=torch.Generator().manual_seed(5))
    ends = (starts + 40).clamp(max=500)
    torch.library.opcheck(torch.ops.peagle_ext.build_interval_block_index.default, (starts, ends, 500, 128, 64))
