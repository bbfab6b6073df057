"""The mask_mod is a PeagleMaskMod: a BlockMask carrying it pickles, torch.saves and loads back
equal; it never reads out of bounds, validated or not, and agrees with the builders' blocks on
unvalidated input (an out-of-range anchor is padding for both)."""

from __future__ import annotations

import io
import pickle

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import create_block_mask, create_mask, flex_attention

import peagle_ext
from peagle_ext.data import SAFE_GLOBALS
from peagle_ext.mask_mod import PeagleMaskMod

from helpers import backends_here, skip_unless_backend
from strategies import BLOCK_SIZES, WINDOWS, arbitrary_cases, cod_cases, separate_key_cases


def dense(mask_mod, q_len, kv_len):
    return create_mask(mask_mod, None, None, q_len, kv_len, device="cpu")


def round_trips(block_mask):
    """(how, the BlockMask loaded back) for each way of sending one across a process boundary."""
    yield "pickle", pickle.loads(pickle.dumps(block_mask))
    buffer = io.BytesIO()
    torch.save(block_mask, buffer)
    buffer.seek(0)
    yield "torch.load(weights_only=False)", torch.load(buffer, weights_only=False)
    buffer.seek(0)
    with torch.serialization.safe_globals(SAFE_GLOBALS):
        loaded = torch.load(buffer)  # weights_only=True, the default
    yield "torch.load with SAFE_GLOBALS", loaded


@given(case=st.one_of(cod_cases(max_seq_len=120), arbitrary_cases(max_elements=150), separate_key_cases()),
       block_size=BLOCK_SIZES)
def test_block_mask_loads_back_equal(case, block_size):
    block_mask = peagle_ext.build_block_mask(case.anchor_pos, case.depth, BLOCK_SIZE=block_size, **case.kwargs)
    expected = dense(peagle_ext.create_peagle_mask_mod(case.anchor_pos, case.depth, **case.kwargs),
                     *block_mask.seq_lengths)
    for how, loaded in round_trips(block_mask):
        assert isinstance(loaded.mask_mod, PeagleMaskMod), how
        peagle_ext.assert_block_masks_equal(loaded, block_mask)
        assert torch.equal(dense(loaded.mask_mod, *loaded.seq_lengths), expected), how
        # One element set stays one set (the keys are the queries' tensors, stored once).
        assert loaded.mask_mod.keys_are_queries == ("kv_anchor_pos" not in case.kwargs), how


def test_loaded_mask_mod_holds_the_inputs():
    anchor_pos = torch.tensor([0, 1, 2, 0, 1], dtype=torch.int32)
    depth = torch.tensor([0, 0, 0, 1, 1])
    block_mask = peagle_ext.build_block_mask(anchor_pos, depth, torch.tensor([2, 1]), 4, sliding_window=2)
    mask_mod = pickle.loads(pickle.dumps(block_mask)).mask_mod
    assert torch.equal(mask_mod.anchor_pos, anchor_pos.long()) and torch.equal(mask_mod.depth, depth)
    assert torch.equal(mask_mod.doc_of_position, torch.tensor([0, 0, 1, -1]))
    assert mask_mod.sliding_window == 2
    assert mask_mod.kv_anchor_pos is mask_mod.anchor_pos and mask_mod.kv_depth is mask_mod.depth
    assert "Q_LEN=5" in repr(mask_mod) and "sliding_window=2" in repr(mask_mod)


def test_loaded_mask_gives_the_same_flex_attention_output_eager_and_compiled():
    generator = torch.Generator().manual_seed(11)
    anchor_pos, depth = peagle_ext.generate_cod_sample_indices(200, torch.ones(200), generator=generator)
    block_mask = peagle_ext.build_block_mask(anchor_pos, depth, torch.tensor([80, 120]), 200, sliding_window=30)
    loaded = pickle.loads(pickle.dumps(block_mask))
    n = anchor_pos.numel()
    q, k, v = (torch.randn(1, 2, n, 16, generator=generator) for _ in range(3))
    with torch.no_grad():
        expected = flex_attention(q, k, v, block_mask=block_mask)
        torch.testing.assert_close(flex_attention(q, k, v, block_mask=loaded), expected)
        compiled = torch.compile(flex_attention, dynamic=False)
        torch.testing.assert_close(compiled(q, k, v, block_mask=loaded), expected, atol=1e-5, rtol=1e-4)


@st.composite
def unvalidated_cases(draw, negative_depths: bool):
    """Inputs validation would refuse: anchors below 0 or past the sequence (some far past),
    documents below -1, and with ``negative_depths`` depths below 0; queries and keys one set or apart."""
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    num_positions = draw(st.integers(1, 30))

    def elements(n):
        anchor_pos = torch.randint(-4, num_positions + 4, (n,), generator=generator)
        far = torch.rand(n, generator=generator) < 0.1
        anchor_pos[far] = torch.tensor([-(2**40), 2**40])[torch.randint(0, 2, (int(far.sum()),), generator=generator)]
        depth = torch.randint(-2 if negative_depths else 0, 5, (n,), generator=generator)
        return anchor_pos, depth

    anchor_pos, depth = elements(draw(st.integers(1, 120)))
    kwargs = {"document_ids": torch.randint(-3, 3, (num_positions,), generator=generator),
              "sliding_window": draw(WINDOWS)}
    if draw(st.booleans()):
        kwargs["kv_anchor_pos"], kwargs["kv_depth"] = elements(draw(st.integers(1, 120)))
    return anchor_pos, depth, kwargs


def assert_blocks_follow_the_mask_mod(anchor_pos, depth, kwargs, block_size, backend):
    block_mask = peagle_ext.build_block_mask(anchor_pos, depth, BLOCK_SIZE=block_size, validate=False,
                                             backend=backend, **kwargs)
    oracle = create_block_mask(block_mask.mask_mod, None, None, *block_mask.seq_lengths, device="cpu",
                               BLOCK_SIZE=block_size)
    peagle_ext.assert_block_masks_equal(block_mask, oracle)


@given(case=unvalidated_cases(negative_depths=False), block_size=BLOCK_SIZES)
def test_unvalidated_blocks_follow_the_mask_mod(cpu_backend, case, block_size):
    """The mask is one thing unvalidated too: create_block_mask over the returned mask_mod gives the
    builder's blocks (and, evaluating it on every pair, shows it reads nothing out of bounds)."""
    assert_blocks_follow_the_mask_mod(*case, block_size, cpu_backend)


@pytest.mark.parametrize("backend", ["cpu", "cuda_emulated", "python"])
@given(case=unvalidated_cases(negative_depths=True), block_size=BLOCK_SIZES)
def test_unvalidated_negative_depths_are_padding(backend, case, block_size):
    skip_unless_backend(backend)
    assert_blocks_follow_the_mask_mod(*case, block_size, backend)


@pytest.mark.parametrize("bad_anchor", [-1, -(2**40), "P", 2**40])
def test_eager_flex_attention_reads_out_of_range_anchors_as_padding(bad_anchor):
    """validate=False with anchors outside the sequence: eager flex_attention (which evaluates the
    mask_mod on every pair) runs, and gives the output of the same elements put on a padding position."""
    seq_len = 100
    generator = torch.Generator().manual_seed(3)
    anchor_pos, depth = peagle_ext.generate_cod_sample_indices(seq_len, torch.ones(seq_len), generator=generator)
    document_ids = torch.randint(0, 3, (seq_len,), generator=generator)
    bad = torch.randperm(anchor_pos.numel(), generator=generator)[:50]
    garbage, on_padding = anchor_pos.clone(), anchor_pos.clone()
    garbage[bad] = seq_len if bad_anchor == "P" else bad_anchor
    on_padding[bad] = seq_len
    n = anchor_pos.numel()
    q, k, v = (torch.randn(1, 2, n, 16, generator=generator) for _ in range(3))
    expected_mask = peagle_ext.build_block_mask(on_padding, depth,
                                                document_ids=torch.cat([document_ids, torch.tensor([-1])]),
                                                sliding_window=20, BLOCK_SIZE=32)
    expected = flex_attention(q, k, v, block_mask=expected_mask)
    for backend in backends_here():
        if backend == "cuda":
            continue
        got_mask = peagle_ext.build_block_mask(garbage, depth, document_ids=document_ids, sliding_window=20,
                                               BLOCK_SIZE=32, validate=False, backend=backend)
        torch.testing.assert_close(flex_attention(q, k, v, block_mask=got_mask), expected)
        assert torch.equal(dense(got_mask.mask_mod, n, n), dense(expected_mask.mask_mod, n, n))
        peagle_ext.assert_block_masks_equal(got_mask, expected_mask)
