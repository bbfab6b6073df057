"""Hostile and careless arguments to the interval engine and the mask families built on it
(block_mask_from_intervals, document_causal_block_mask, eagle3_block_mask, dflash_block_mask): any
int64 bound, wrong dtypes, ranks and devices, meta and non-contiguous tensors, sizes past 2^31 - 1,
windows of any int. Each ends in a ValueError/TypeError naming the argument (a MemoryError with the
estimate for a size that would not fit), or in exactly create_block_mask's blocks."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import create_block_mask

import peagle_ext
from peagle_ext import _native
from peagle_ext.intervals import INTERVAL_BACKENDS
from peagle_ext.masks import dflash_block_mask, document_causal_block_mask, eagle3_block_mask

from helpers import assert_same_bytes

INT64 = st.one_of(st.integers(-(2**63), 2**63 - 1), st.sampled_from([-(2**63), 2**63 - 1, -1, 0, 2**31, -(2**31)]),
                  st.integers(-3, 12))
ANY_INT = st.one_of(st.integers(-(2**70), 2**70), st.sampled_from([2**63, 2**64, -(2**63) - 1, 2**31, -(2**31)]))


def interval_backends_here() -> list[str]:
    status = _native.interval_status()
    return [b for b in INTERVAL_BACKENDS if b == "python" or (status[b] is None and b != "cuda")]


def interval_oracle(starts, ends, kv_len, block_size):
    """create_block_mask over the rule as stated, q sees k iff starts[q, m] <= k < ends[q, m] for some m."""
    k = torch.arange(kv_len)
    allowed = ((starts[..., None] <= k) & (k < ends[..., None])).any(dim=1)
    return create_block_mask(lambda b, h, q, kv: allowed[q, kv], None, None, starts.shape[0], kv_len, device="cpu",
                             BLOCK_SIZE=block_size)


def _build(starts, ends, kv_len, **kwargs):
    return peagle_ext.block_mask_from_intervals(starts, ends, kv_len, **kwargs)


@given(st.integers(1, 9), st.integers(0, 3), st.integers(1, 12), st.data(), st.sampled_from([1, 2, 3, (4, 2)]))
@example(3, 2, 5, None, 2)
def test_any_int64_bounds(num_queries, width, kv_len, data, block_size):
    """Any int64 bounds, reversed ones included: validate=False gives the rule's mask (bounds past
    [0, kv_len] mean nothing more, no wrap); validate=True gives it too or refuses naming the tensor."""
    if data is None:  # the extremes at once
        starts = torch.tensor([[-(2**63), 2**63 - 1]] * 3)
        ends = torch.tensor([[2**63 - 1, -(2**63)], [3, 2], [0, 2**63 - 1]])
    else:
        values = data.draw(st.lists(INT64, min_size=2 * num_queries * width, max_size=2 * num_queries * width))
        pair = torch.tensor(values, dtype=torch.int64).reshape(2, num_queries, width)
        starts, ends = pair[0], pair[1]
    expected = interval_oracle(starts, ends, kv_len, block_size)
    in_range = bool(((starts >= 0) & (starts <= kv_len) & (ends >= 0) & (ends <= kv_len)).all())
    for backend in interval_backends_here():
        assert_same_bytes(_build(starts, ends, kv_len, BLOCK_SIZE=block_size, backend=backend, validate=False),
                          expected, backend)
        if in_range:
            assert_same_bytes(_build(starts, ends, kv_len, BLOCK_SIZE=block_size, backend=backend), expected, backend)
        else:
            with pytest.raises(ValueError, match=r"(starts|ends) must lie in \[0, kv_len="):
                _build(starts, ends, kv_len, BLOCK_SIZE=block_size, backend=backend)


S, E = torch.tensor([[0], [1]]), torch.tensor([[2], [3]])


@pytest.mark.parametrize("backend", interval_backends_here())
@pytest.mark.parametrize(("arguments", "error", "says"), [
    ((S.float(), E, 4), TypeError, "starts must be an integer tensor"),
    ((S, E.bool(), 4), TypeError, "ends must be an integer tensor"),
    ((S.to(torch.complex64), E, 4), TypeError, "starts must be an integer tensor"),
    ((S, E.double(), 4), TypeError, "ends must be an integer tensor"),
    (([[0], [1]], E, 4), TypeError, "starts must be a torch.Tensor"),
    ((torch.tensor(0), torch.tensor(1), 4), ValueError, "starts must be [Q, M] or [B, Q, M]"),
    ((S[None, None], E[None, None], 4), ValueError, "starts must be [Q, M] or [B, Q, M]"),
    ((S, E[None, None], 4), ValueError, "ends must be [Q, M] or [B, Q, M]"),
    ((S, E[:1], 4), ValueError, "starts and ends must have one shape"),
    ((S, torch.tensor([[2, 2], [3, 3]]), 4), ValueError, "starts and ends must have one shape"),
    ((S[:0], E[:0], 4), ValueError, "starts must hold 1 to 2^31 - 1 queries"),
    ((S[None][:0], E[None][:0], 4), ValueError, "starts must hold 1 to 65535 rows"),
    ((S.to("meta"), E.to("meta"), 4), ValueError, "starts must hold values, not be on the meta device"),
    ((S, E.to("meta"), 4), ValueError, "ends must hold values, not be on the meta device"),
    ((S, E, 0), ValueError, "kv_len must be in [1, 2^31 - 1]"),
    ((S, E, -5), ValueError, "kv_len must be in [1, 2^31 - 1]"),
    ((S, E, 2**31), ValueError, "kv_len must be in [1, 2^31 - 1]"),
    ((S, E, 2**70), ValueError, "kv_len must be in [1, 2^31 - 1]"),
    ((S, E, True), TypeError, "kv_len must be an int"),
    ((S, E, 4.0), TypeError, "kv_len must be an int"),
    ((S, E, torch.tensor(4)), TypeError, "kv_len must be an int"),
    ((S, E, None), TypeError, "kv_len must be an int"),
])
def test_bad_tensors_and_kv_len_are_refused_by_name(backend, arguments, error, says):
    for validate in (True, False):
        with pytest.raises(error) as raised:
            _build(*arguments, backend=backend, validate=validate)
        assert says in str(raised.value)


@pytest.mark.parametrize("backend", interval_backends_here())
@pytest.mark.parametrize("block_size", [0, -1, 2**31, 2**70, (2,), (2, 2, 2), (0, 2), (2, -3), (2, 2**31), True,
                                        (True, 2), 2.0, [2, 2], (2, None), "2", None])
def test_bad_block_sizes_are_refused_by_name(backend, block_size):
    with pytest.raises((TypeError, ValueError), match="BLOCK_SIZE"):
        _build(S, E, 4, BLOCK_SIZE=block_size, backend=backend)


@pytest.mark.parametrize("backend", ["gpu", "CPU", "", None, 3, "auto "])
def test_bad_backends_are_refused_by_name(backend):
    with pytest.raises(ValueError, match="backend must be one of"):
        _build(S, E, 4, backend=backend)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for tensors on two devices")
def test_tensors_on_two_devices_are_refused():
    with pytest.raises(ValueError, match="starts and ends must be on one device"):
        _build(S, E.cuda(), 4)


@pytest.mark.parametrize("backend", interval_backends_here())
def test_non_contiguous_and_narrow_dtypes_give_the_same_mask(backend):
    base = torch.tensor([[0, 9, 2, 5], [3, 1, 4, 4], [7, 0, 8, 2]])
    starts, ends = base[:, ::2], base[:, 1::2]  # strided views
    expected = interval_oracle(starts.contiguous(), ends.contiguous(), 9, 2)
    assert_same_bytes(_build(starts, ends, 9, BLOCK_SIZE=2, backend=backend), expected, backend)
    assert_same_bytes(_build(starts.t().contiguous().t(), ends.to(torch.uint8), 9, BLOCK_SIZE=2, backend=backend),
                      expected, backend)
    one_row = torch.tensor([[1, 4]])
    broadcast = _build(one_row[:, :1].expand(5, 1), one_row[:, 1:].expand(5, 1), 9, BLOCK_SIZE=2, backend=backend)
    assert_same_bytes(broadcast, interval_oracle(torch.ones(5, 1, dtype=torch.long), torch.full((5, 1), 4), 9, 2))


@pytest.mark.parametrize("backend", interval_backends_here())
def test_a_huge_kv_len_with_one_query_costs_only_its_tiles(backend):
    """kv_len = 2^31 - 1 keys, one query: the lists have one row of 2048 kv-blocks (BLOCK_SIZE 2^20),
    not a Q x kv_len grid; the interval over every key covers all but the tail block whole."""
    kv_len = 2**31 - 1
    mask = _build(torch.tensor([[0], [0]]), torch.tensor([[3], [kv_len]]), kv_len, BLOCK_SIZE=(1, 2**20),
                  backend=backend)
    assert mask.shape[-2:] == (2, kv_len)
    assert tuple(mask.kv_indices.shape) == (1, 1, 2, 2048)
    assert mask.kv_num_blocks[0, 0].tolist() == [1, 1]
    assert mask.kv_indices[0, 0, :, 0].tolist() == [0, 2047]
    assert mask.full_kv_num_blocks[0, 0].tolist() == [0, 2047]
    assert mask.full_kv_indices[0, 0, 1, :2047].tolist() == list(range(2047))


def test_a_grid_that_would_not_fit_is_refused_before_it_is_allocated():
    queries = torch.zeros(2**16, 1, dtype=torch.long)
    for backend in interval_backends_here():
        with pytest.raises(MemoryError, match="interval block mask .* would need about"):
            _build(queries, queries + 1, 2**31 - 1, BLOCK_SIZE=1, backend=backend)


# The mask families.

eagle3_attention = pytest.importorskip("speculators.models.eagle3.attention")
dflash_attention = pytest.importorskip("speculators.models.dflash.attention")

IDS = st.lists(st.sampled_from([-(2**63), 2**63 - 1, -5, -2, -1, 0, 3]), min_size=1, max_size=24).map(torch.tensor)


def _standing_window(window: int | None, length: int) -> int | None:
    """A window the oracle's own arithmetic takes that says the same as ``window``: every key of a
    sequence of ``length`` lies inside a window of 2 * length + 1, and none inside a window of -1."""
    return window if window is None else max(min(window, 2 * length + 1), -1)


def _document_causal_rule(ids, window):
    def rule(b, h, q, k):
        seen = (ids[q] != -1) & (ids[q] == ids[k]) & (k <= q)
        return seen if window is None else seen & (k > q - window)
    return rule


@given(IDS, st.one_of(st.none(), ANY_INT, st.integers(-3, 30)), st.sampled_from([1, 2, 3, (4, 2)]))
@example(torch.tensor([0, 0, 1, 1]), -(2**63), 2)  # q - W wrapped to a negative bound: the whole document
@example(torch.tensor([0, 1, 0, 1]), 2**70, 2)
def test_document_causal_with_any_ids_and_window(ids, window, block_size):
    length = ids.numel()
    expected = create_block_mask(_document_causal_rule(ids, _standing_window(window, length)), None, None, length,
                                 length, device="cpu", BLOCK_SIZE=block_size)
    assert_same_bytes(document_causal_block_mask(ids, window, BLOCK_SIZE=block_size), expected)
    assert_same_bytes(document_causal_block_mask(ids[None], window, BLOCK_SIZE=block_size), expected)


@given(IDS, st.integers(1, 3), st.one_of(st.none(), ANY_INT, st.integers(-3, 30)), st.sampled_from([1, 3, (4, 2)]))
@example(torch.tensor([0, 0, 1, 1]), 2, -(2**63), 2)
@example(torch.tensor([0, 1, 0, 1]), 3, 2**63 - 1, 2)
def test_eagle3_with_any_ids_and_window(ids, num_steps, window, block_size):
    length = ids.numel()
    mask_mod = eagle3_attention.create_combined_mask_mod(ids, length, sliding_window=_standing_window(window, length))
    expected = create_block_mask(mask_mod, None, None, length, num_steps * length, device="cpu", BLOCK_SIZE=block_size)
    assert_same_bytes(eagle3_block_mask(ids, length, num_steps, sliding_window=window, BLOCK_SIZE=block_size), expected)


@given(IDS, st.data(), st.integers(1, 4), st.one_of(st.none(), ANY_INT, st.integers(-3, 30)), st.booleans())
@example(torch.tensor([0, 0, 1, 1]), None, 2, -(2**63), False)
def test_dflash_with_any_ids_anchors_and_window(ids, data, block_size, window, non_causal):
    length = ids.numel()
    anchors = (torch.tensor([3, -4, 0]) if data is None else
               torch.tensor(data.draw(st.lists(st.integers(-length, length - 1), min_size=1, max_size=6))))
    mask_mod, q_len, kv_len = dflash_attention.create_anchor_block_mask_mod(
        ids, length, anchors.clamp(min=0), block_size, sliding_window=_standing_window(window, length),
        sliding_window_non_causal=non_causal)
    # The oracle reads ids at the anchor: a negative anchor (no base keys before it) is given to it
    # as anchor 0, which has none either.
    expected = create_block_mask(mask_mod, None, None, q_len, kv_len, device="cpu", BLOCK_SIZE=2)
    got = dflash_block_mask(ids, length, anchors, block_size, sliding_window=window,
                            sliding_window_non_causal=non_causal, BLOCK_SIZE=2)
    assert_same_bytes(got, expected)


IDS4 = torch.tensor([0, 0, 1, 1])
A = torch.tensor([1, 3])


@pytest.mark.parametrize(("build", "error", "says"), [
    (lambda: document_causal_block_mask(IDS4.float()), TypeError, "document_ids must be an integer tensor"),
    (lambda: document_causal_block_mask(IDS4.bool()), TypeError, "document_ids must be an integer tensor"),
    (lambda: document_causal_block_mask(IDS4.to(torch.complex64)), TypeError, "document_ids must be an integer"),
    (lambda: document_causal_block_mask([0, 0]), TypeError, "document_ids must be a torch.Tensor"),
    (lambda: document_causal_block_mask(torch.tensor(0)), ValueError, "document_ids must be a non-empty [S]"),
    (lambda: document_causal_block_mask(IDS4[:0]), ValueError, "document_ids must be a non-empty [S]"),
    (lambda: document_causal_block_mask(IDS4.reshape(2, 2)), ValueError, "document_ids must be a non-empty [S]"),
    (lambda: document_causal_block_mask(IDS4[None, None]), ValueError, "document_ids must be a non-empty [S]"),
    (lambda: document_causal_block_mask(IDS4.to("meta")), ValueError, "document_ids must hold values"),
    (lambda: document_causal_block_mask(IDS4, torch.tensor(2)), TypeError, "sliding_window must be an int"),
    (lambda: document_causal_block_mask(IDS4, 2.0), TypeError, "sliding_window must be an int"),
    (lambda: document_causal_block_mask(IDS4, True), TypeError, "sliding_window must be an int"),
    (lambda: document_causal_block_mask(IDS4, BLOCK_SIZE=(2, 0)), ValueError, "BLOCK_SIZE"),
    (lambda: eagle3_block_mask(IDS4, 5, 2), ValueError, "document_ids must hold total_seq_len=5 entries"),
    (lambda: eagle3_block_mask(IDS4, 0, 2), ValueError, "total_seq_len must be >= 1"),
    (lambda: eagle3_block_mask(IDS4, True, 2), TypeError, "total_seq_len must be an int"),
    (lambda: eagle3_block_mask(IDS4, 4, 0), ValueError, "num_steps must be >= 1"),
    (lambda: eagle3_block_mask(IDS4, 4, -1), ValueError, "num_steps must be >= 1"),
    (lambda: eagle3_block_mask(IDS4, 4, 2.0), TypeError, "num_steps must be an int"),
    (lambda: eagle3_block_mask(IDS4, 4, 2**29), ValueError, "num_steps x total_seq_len (KV_LEN)"),
    (lambda: eagle3_block_mask(IDS4, 4, 2**70), ValueError, "num_steps x total_seq_len (KV_LEN)"),
    (lambda: eagle3_block_mask(IDS4[:2], 2, 2**30 - 1), MemoryError, "EAGLE-3 intervals"),
    (lambda: eagle3_block_mask(IDS4, 4, 2, sliding_window=torch.tensor(3)), TypeError, "sliding_window"),
    (lambda: dflash_block_mask(IDS4, 4, A, 0), ValueError, "block_size must be >= 1"),
    (lambda: dflash_block_mask(IDS4, 4, A, True), TypeError, "block_size must be an int"),
    (lambda: dflash_block_mask(IDS4, 4, A, 2**30), ValueError, "len(anchor_positions) x block_size (KV_LEN)"),
    (lambda: dflash_block_mask(IDS4, 4, A, 2**70), ValueError, "len(anchor_positions) x block_size (KV_LEN)"),
    (lambda: dflash_block_mask(IDS4, 4, A[:1], 2**30), MemoryError, "DFlash intervals"),
    (lambda: dflash_block_mask(IDS4, 4, torch.tensor([4]), 2), ValueError, "anchor_positions must lie in"),
    (lambda: dflash_block_mask(IDS4, 4, torch.tensor([-5]), 2), ValueError, "anchor_positions must lie in"),
    (lambda: dflash_block_mask(IDS4, 4, torch.tensor([2**63 - 1]), 2), ValueError, "anchor_positions must lie in"),
    (lambda: dflash_block_mask(IDS4, 4, torch.tensor([-(2**63)]), 2), ValueError, "anchor_positions must lie in"),
    (lambda: dflash_block_mask(IDS4, 4, torch.tensor([255], dtype=torch.uint8), 2), ValueError, "anchor_positions"),
    (lambda: dflash_block_mask(IDS4, 4, A.float(), 2), TypeError, "anchor_positions must be an integer"),
    (lambda: dflash_block_mask(IDS4, 4, [1, 3], 2), TypeError, "anchor_positions must be an integer"),
    (lambda: dflash_block_mask(IDS4, 4, A[None], 2), ValueError, "anchor_positions must be a non-empty 1-D"),
    (lambda: dflash_block_mask(IDS4, 4, A[:0], 2), ValueError, "anchor_positions must be a non-empty 1-D"),
    (lambda: dflash_block_mask(IDS4, 4, A.to("meta"), 2), ValueError, "anchor_positions must hold values"),
    (lambda: dflash_block_mask(IDS4, 4, A, 2, sliding_window=2.5), TypeError, "sliding_window must be an int"),
    (lambda: dflash_block_mask(IDS4, 4, A, 2, sliding_window_non_causal=1), TypeError, "sliding_window_non_causal"),
])
def test_bad_mask_family_arguments_are_refused_by_name(build, error, says):
    with pytest.raises(error) as raised:
        build()
    assert says in str(raised.value)


def test_mask_families_take_non_contiguous_ids_and_anchors():
    ids, anchors = torch.tensor([0, 9, 0, 9, 1, 9, 1, 9]), torch.tensor([3, 9, 0, 9])
    assert_same_bytes(document_causal_block_mask(ids[::2], 2, BLOCK_SIZE=2),
                      document_causal_block_mask(ids[::2].contiguous(), 2, BLOCK_SIZE=2))
    assert_same_bytes(eagle3_block_mask(ids[::2], 4, 2, BLOCK_SIZE=2),
                      eagle3_block_mask(ids[::2].contiguous(), 4, 2, BLOCK_SIZE=2))
    assert_same_bytes(dflash_block_mask(ids[::2], 4, anchors[::2], 2, BLOCK_SIZE=2),
                      dflash_block_mask(ids[::2].contiguous(), 4, anchors[::2].contiguous(), 2, BLOCK_SIZE=2))


@pytest.mark.skipif(_native.interval_status()["cpu"] is not None, reason="the compiled interval op is not built")
@pytest.mark.parametrize(("arguments", "says"), [
    ((S, E, 4, 2, 2), "must be [B, Q, M]"),
    ((S[None].int(), E[None].int(), 4, 2, 2), "must be int64"),
    ((S[None], E[None, :1], 4, 2, 2), "differ in shape"),
    ((S[None][:, :, :0], E[None][:, :, :0], 4, 2, 2), "intervals"),
    ((S[None], E[None], 0, 2, 2), "kv_len"),
    ((S[None], E[None], 2**31, 2, 2), "kv_len"),
    ((S[None], E[None], 4, 0, 2), "block sizes"),
    ((S[None], E[None], 4, 2, -1), "block sizes"),
])
def test_the_compiled_op_checks_its_own_inputs(arguments, says):
    """The op behind the native backends, called directly, refuses what the Python checks would (a
    RuntimeError from its checks, never a read out of bounds)."""
    with pytest.raises(RuntimeError, match="build_interval_block_index: .*" + re.escape(says)):
        torch.ops.peagle_ext.build_interval_block_index(*arguments)
