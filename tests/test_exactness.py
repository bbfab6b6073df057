"""Every backend against the oracle: create_block_mask evaluating the rule on the dense grid."""

from __future__ import annotations

import pytest
import torch
from conftest import BACKEND_DEVICE, oracle_block_mask
from hypothesis import example, given, settings
from hypothesis import strategies as st
from strategies import BLOCK_SIZES, Case, arbitrary_cases, cod_cases

import peagle_ext

def check_case(case: Case, block_size, backend: str) -> None:
    case = case.to(BACKEND_DEVICE[backend])
    built = peagle_ext.build_block_mask(case.anchor_pos, case.depth, BLOCK_SIZE=block_size, backend=backend, **case.kwargs)
    expected = oracle_block_mask(case.anchor_pos, case.depth, BLOCK_SIZE=block_size, **case.kwargs)
    peagle_ext.assert_block_masks_equal(built, expected)
    assert built.kv_indices.device == case.anchor_pos.device
    n = case.anchor_pos.numel()
    probe = torch.arange(n, device=case.anchor_pos.device)
    zero = torch.zeros((), dtype=torch.int64, device=probe.device)
    # The mask_mod it carries is the rule itself (eager flex_attention reads only mask_mod).
    assert torch.equal(
        built.mask_mod(zero, zero, probe[:, None], probe[None, :]),
        expected.mask_mod(zero, zero, probe[:, None], probe[None, :]),
    )


@given(case=cod_cases(), block_size=BLOCK_SIZES)
@example(  # a padding position inside a document, just under a query's window
    case=Case(torch.arange(33), torch.zeros(33, dtype=torch.int64),
              {"document_ids": torch.tensor([0] * 31 + [-1, 0]), "sliding_window": 2}),
    block_size=1,
)
def test_cod_layout_matches_create_block_mask(backend, case, block_size):
    check_case(case, block_size, backend)


@given(case=arbitrary_cases(), block_size=BLOCK_SIZES)
@example(  # every element on one anchor: the whole grid is one rollout chain
    case=Case(torch.zeros(40, dtype=torch.int64), torch.arange(40) % 5, {"lengths": torch.tensor([3]), "total_seq_len": 3}),
    block_size=4,
)
@example(  # every position padding: an empty mask
    case=Case(torch.arange(10) % 3, torch.zeros(10, dtype=torch.int64), {"document_ids": torch.full((3,), -1)}),
    block_size=2,
)
def test_arbitrary_input_matches_create_block_mask(backend, case, block_size):
    check_case(case, block_size, backend)


@settings(max_examples=8)
@given(case=cod_cases(max_seq_len=1200), block_size=st.sampled_from([64, 128, (128, 64)]))
def test_larger_cod_inputs_match_create_block_mask(backend, case, block_size):
    check_case(case, block_size, backend)


@pytest.mark.parametrize("block_size", [64, 128, (128, 64)])
@pytest.mark.parametrize("sliding_window", [None, 64])
def test_thousands_of_elements_with_several_documents(backend, block_size, sliding_window):
    seq_len = 1024
    generator = torch.Generator().manual_seed(0)
    anchor_pos, depth = peagle_ext.generate_cod_sample_indices(seq_len, torch.ones(seq_len), generator=generator)
    lengths = torch.tensor([300, 200, 400, 24])
    case = Case(anchor_pos, depth, {"lengths": lengths, "total_seq_len": 1000 + 24 + 0, "sliding_window": sliding_window})
    check_case(case, block_size, backend)


def test_full_and_partial_blocks_both_occur(cpu_backend):
    """Guard against a vacuous suite: the canonical case has full, partial and empty tiles."""
    anchor_pos, depth = peagle_ext.generate_cod_sample_indices(2048, torch.ones(2048), generator=torch.Generator().manual_seed(1))
    mask = peagle_ext.build_block_mask(anchor_pos, depth, torch.tensor([2048]), 2048, BLOCK_SIZE=64, backend=cpu_backend)
    tiles = mask.kv_indices.shape[-2] * mask.kv_indices.shape[-1]
    partial, full = int(mask.kv_num_blocks.sum()), int(mask.full_kv_num_blocks.sum())
    assert partial > 0 and full > 0 and partial + full < tiles
