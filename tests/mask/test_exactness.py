"""Every backend against the oracle: create_block_mask evaluating the rule on the dense grid.

Each example builds the oracle once and compares every backend that runs here with it (backends
that cannot run here are named in the header pytest prints)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import peagle_ext

from helpers import BACKEND_DEVICE, backends_here, oracle_block_mask
from strategies import BLOCK_SIZES, Case, arbitrary_cases, cod_cases, separate_key_cases


def check_case(case: Case, block_size) -> None:
    """The oracle once, on the CPU; every backend that runs here, on its own device, against it."""
    expected = oracle_block_mask(case.anchor_pos, case.depth, BLOCK_SIZE=block_size, **case.kwargs)
    q_len, kv_len = expected.seq_lengths
    # The mask_mod a BlockMask carries must be the rule itself (eager flex_attention reads only
    # mask_mod): compared on a sample of pairs, the block lists having covered the rest.
    generator = torch.Generator().manual_seed(q_len)
    pairs = torch.stack([torch.randint(0, q_len, (256,), generator=generator),
                         torch.randint(0, kv_len, (256,), generator=generator)])
    zero = torch.zeros((), dtype=torch.int64)
    expected_pairs = expected.mask_mod(zero, zero, pairs[0], pairs[1])
    for backend in backends_here():
        on_device = case.to(BACKEND_DEVICE[backend])
        built = peagle_ext.build_block_mask(on_device.anchor_pos, on_device.depth, BLOCK_SIZE=block_size,
                                            backend=backend, **on_device.kwargs)
        try:
            peagle_ext.assert_block_masks_equal(built, expected)
        except AssertionError as error:
            raise AssertionError(f"backend {backend!r}: {error}") from None
        assert built.kv_indices.device == on_device.anchor_pos.device, backend
        device_pairs = pairs.to(built.kv_indices.device)
        zero_there = zero.to(device_pairs.device)
        got = built.mask_mod(zero_there, zero_there, device_pairs[0], device_pairs[1])
        assert torch.equal(got.cpu(), expected_pairs), backend


@given(case=cod_cases(), block_size=BLOCK_SIZES)
@example(  # a padding position inside a document, just under a query's window
    case=Case(torch.arange(33), torch.zeros(33, dtype=torch.int64),
              {"document_ids": torch.tensor([0] * 31 + [-1, 0]), "sliding_window": 2}),
    block_size=1,
)
def test_cod_layout_matches_create_block_mask(case, block_size):
    check_case(case, block_size)


@given(case=arbitrary_cases(), block_size=BLOCK_SIZES)
@example(  # every element on one anchor: the whole grid is one rollout chain
    case=Case(torch.zeros(40, dtype=torch.int64), torch.arange(40) % 5,
              {"lengths": torch.tensor([3]), "total_seq_len": 3}),
    block_size=4,
)
@example(  # every position padding: an empty mask
    case=Case(torch.arange(10) % 3, torch.zeros(10, dtype=torch.int64), {"document_ids": torch.full((3,), -1)}),
    block_size=2,
)
def test_arbitrary_input_matches_create_block_mask(case, block_size):
    check_case(case, block_size)


@given(case=separate_key_cases(), block_size=BLOCK_SIZES)
@example(  # one query, the last key element, all keys of one rollout
    case=Case(torch.tensor([2]), torch.tensor([3]),
              {"lengths": torch.tensor([4]), "total_seq_len": 4, "kv_anchor_pos": torch.tensor([0, 1, 2, 2, 2, 2]),
               "kv_depth": torch.tensor([0, 0, 0, 1, 2, 3])}),
    block_size=2,
)
def test_queries_apart_from_keys_match_create_block_mask(case, block_size):
    check_case(case, block_size)


@settings(max_examples=8)
@given(case=cod_cases(max_seq_len=1200), block_size=st.sampled_from([64, 128, (128, 64)]))
def test_larger_cod_inputs_match_create_block_mask(case, block_size):
    check_case(case, block_size)


@pytest.mark.parametrize("block_size", [64, 128, (128, 64)])
@pytest.mark.parametrize("sliding_window", [None, 64])
def test_thousands_of_elements_with_several_documents(block_size, sliding_window):
    seq_len = 1024
    generator = torch.Generator().manual_seed(0)
    anchor_pos, depth = peagle_ext.generate_cod_sample_indices(seq_len, torch.ones(seq_len), generator=generator)
    lengths = torch.tensor([300, 200, 400, 24])
    case = Case(anchor_pos, depth,
                {"lengths": lengths, "total_seq_len": 1000 + 24 + 0, "sliding_window": sliding_window})
    check_case(case, block_size)


def test_full_and_partial_blocks_both_occur(cpu_backend):
    """Guard against a vacuous suite: the canonical case has full, partial and empty tiles."""
    generator = torch.Generator().manual_seed(1)
    anchor_pos, depth = peagle_ext.generate_cod_sample_indices(2048, torch.ones(2048), generator=generator)
    mask = peagle_ext.build_block_mask(anchor_pos, depth, torch.tensor([2048]), 2048, BLOCK_SIZE=64,
                                       backend=cpu_backend)
    tiles = mask.kv_indices.shape[-2] * mask.kv_indices.shape[-1]
    partial, full = int(mask.kv_num_blocks.sum()), int(mask.full_kv_num_blocks.sum())
    assert partial > 0 and full > 0 and partial + full < tiles
