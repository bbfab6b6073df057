"""peagle_ext.masks against create_block_mask over speculators' own mask_mods (run from its package)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import create_block_mask

from peagle_ext.masks import dflash_block_mask, document_causal_block_mask, eagle3_block_mask

from helpers import assert_same_bytes

eagle3_attention = pytest.importorskip("speculators.models.eagle3.attention")
dflash_attention = pytest.importorskip("speculators.models.dflash.attention")

BLOCK_SIZES = st.sampled_from([1, 2, 3, 4, 7, 16, 128, (8, 4), (3, 5), (4, 16)])
WINDOWS = st.one_of(st.none(), st.integers(-2, 6), st.integers(1, 100))


@st.composite
def document_ids(draw, length=None):
    """Contiguous runs with padding anywhere, or ids in any order (runs split, -1 and -2 anywhere)."""
    length = draw(st.integers(1, 70)) if length is None else length
    if draw(st.booleans()):
        ids, doc = [], 0
        while len(ids) < length:
            run = draw(st.integers(1, 20))
            ids += [doc if draw(st.integers(0, 4)) else -1] * run
            doc += 1
        return torch.tensor(ids[:length])
    return torch.tensor(draw(st.lists(st.integers(-2, 3), min_size=length, max_size=length)))


def document_causal_rule(document_ids, sliding_window):
    """The document-causal rule as stated: doc[q] != -1, doc[q] == doc[k], k <= q (and k > q - W)."""
    def rule(b, h, q_idx, kv_idx):
        seen = (document_ids[q_idx] != -1) & (document_ids[q_idx] == document_ids[kv_idx]) & (kv_idx <= q_idx)
        return seen & (kv_idx > q_idx - sliding_window) if sliding_window is not None else seen
    return rule


@given(document_ids(), WINDOWS, BLOCK_SIZES)
@example(torch.tensor([0, 1, 0, 1, -1, 0]), 2, 2)  # split documents: the P-EAGLE engine builds it
@example(torch.tensor([-2, -2, -1, -2]), None, 1)  # -2 is a document, -1 padding
def test_document_causal(ids, window, block_size):
    length = ids.numel()
    expected = create_block_mask(document_causal_rule(ids, window), None, None, length, length, device="cpu",
                                 BLOCK_SIZE=block_size)
    assert_same_bytes(document_causal_block_mask(ids, window, BLOCK_SIZE=block_size), expected)


@given(document_ids(), st.integers(1, 4), WINDOWS, BLOCK_SIZES)
@example(torch.tensor([0, 1, 0, -1, 1, 1]), 3, 2, 2)
@example(torch.tensor([0, 0, 0, 0]), 2, None, 2)
def test_eagle3(ids, num_steps, window, block_size):
    length = ids.numel()
    mask_mod = eagle3_attention.create_combined_mask_mod(ids, length, sliding_window=window)
    expected = create_block_mask(mask_mod, None, None, length, num_steps * length, device="cpu", BLOCK_SIZE=block_size)
    got = eagle3_block_mask(ids, length, num_steps, sliding_window=window, BLOCK_SIZE=block_size)
    assert_same_bytes(got, expected)


@given(st.data(), st.integers(1, 5), WINDOWS, st.booleans(), BLOCK_SIZES)
@example(None, 3, 2, False, 4)
def test_dflash(data, block_size, window, non_causal, mask_block_size):
    if data is None:  # the explicit example: documents split into runs, anchors inside later runs
        ids, anchors = torch.tensor([0, 0, 1, 1, 0, 0, 1, -1, 0, 0]), torch.tensor([5, 9, 3, 0])
    else:
        ids = data.draw(document_ids())
        length = ids.numel()
        anchors = torch.tensor(data.draw(st.lists(st.integers(0, length - 1), min_size=1, max_size=8)))
    length = ids.numel()
    mask_mod, q_len, kv_len = dflash_attention.create_anchor_block_mask_mod(
        ids, length, anchors, block_size, sliding_window=window, sliding_window_non_causal=non_causal)
    expected = create_block_mask(mask_mod, None, None, q_len, kv_len, device="cpu", BLOCK_SIZE=mask_block_size)
    got = dflash_block_mask(ids, length, anchors, block_size, sliding_window=window,
                            sliding_window_non_causal=non_causal, BLOCK_SIZE=mask_block_size)
    assert_same_bytes(got, expected)


def test_mask_mods_describe_the_rule():
    """The BlockMasks' mask_mods (what eager flex_attention reads) are the rule on every pair."""
    ids = torch.tensor([0, 0, 1, 1, 1, -1, 2, 2])
    checks = [
        (document_causal_block_mask(ids, 3, BLOCK_SIZE=2), document_causal_rule(ids, 3)),
        (eagle3_block_mask(ids, 8, 3, 2, BLOCK_SIZE=2), eagle3_attention.create_combined_mask_mod(ids, 8, 2)),
        (dflash_block_mask(ids, 8, torch.tensor([4, 7]), 3, BLOCK_SIZE=2),
         dflash_attention.create_anchor_block_mask_mod(ids, 8, torch.tensor([4, 7]), 3)[0]),
    ]
    for mask, rule in checks:
        q_len, kv_len = mask.seq_lengths
        q_idx, kv_idx = torch.meshgrid(torch.arange(q_len), torch.arange(kv_len), indexing="ij")
        zero = torch.tensor(0)
        assert torch.equal(mask.mask_mod(zero, zero, q_idx, kv_idx), rule(zero, zero, q_idx, kv_idx))


@pytest.mark.parametrize(("build", "says"), [
    (lambda: document_causal_block_mask([0, 1]), "document_ids must be a torch.Tensor"),
    (lambda: document_causal_block_mask(torch.tensor([0.0])), "document_ids must be an integer tensor"),
    (lambda: document_causal_block_mask(torch.tensor([], dtype=torch.long)), "document_ids must be a non-empty"),
    (lambda: document_causal_block_mask(torch.tensor([0]), sliding_window=1.5), "sliding_window must be an int"),
    (lambda: eagle3_block_mask(torch.tensor([0, 0]), 3, 1), "document_ids must hold total_seq_len=3"),
    (lambda: eagle3_block_mask(torch.tensor([0, 0]), 2, 0), "num_steps must be >= 1"),
    (lambda: dflash_block_mask(torch.tensor([0, 0]), 2, torch.tensor([2]), 2), "anchor_positions must lie in"),
    (lambda: dflash_block_mask(torch.tensor([0, 0]), 2, torch.tensor([[1]]), 2), "anchor_positions must be a non"),
    (lambda: dflash_block_mask(torch.tensor([0, 0]), 2, torch.tensor([1]), 0), "block_size must be >= 1"),
])
def test_bad_input_is_refused_by_name(build, says):
    with pytest.raises((TypeError, ValueError), match=says):
        build()
