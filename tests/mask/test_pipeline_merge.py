"""The CUDA pipeline's merge of unsorted intervals in large q-blocks (its block-wide merge sort),
run by the emulation: shuffled COD layouts whose q-blocks hold many more queries than a block has
threads, against the CPU kernel's bytes under several schedules."""

from __future__ import annotations

import pytest
import torch

import peagle_ext
from peagle_ext import _native
from peagle_ext._block_index import BlockIndex
from peagle_ext._inputs import normalize_mask_inputs

from helpers import assert_same_bytes


@pytest.mark.parametrize("block_size", [(1024, 64), (300, 128), (4096, 4096), (257, 3)])
@pytest.mark.parametrize("window", [None, 40])
def test_shuffled_layout_large_q_blocks(block_size, window):
    status = _native.native_status()
    if status["cpu"] is not None or status["cuda_emulated"] is not None:
        pytest.skip(f"needs the cpu kernel and the emulated pipeline: {status['cpu'] or status['cuda_emulated']}")
    generator = torch.Generator().manual_seed(block_size[0])
    seq_len = 600
    anchor, depth = peagle_ext.generate_cod_sample_indices(seq_len, torch.ones(seq_len), generator=generator)
    order = torch.randperm(anchor.numel(), generator=generator)
    anchor, depth = anchor[order], depth[order]
    document_ids = torch.randint(0, 3, (seq_len,), generator=generator)  # documents not in position order
    arguments = dict(document_ids=document_ids, sliding_window=window, BLOCK_SIZE=block_size)
    expected = peagle_ext.build_block_mask(anchor, depth, backend="cpu", **arguments)
    inputs = normalize_mask_inputs(anchor, depth, **arguments)
    for seed in (0, 1, 2):
        got = torch.ops.peagle_ext.build_block_index_emulated(inputs.anchor_pos, inputs.depth, inputs.doc_of_position,
                                                              inputs.sliding_window, *inputs.block_size, None, None,
                                                              seed)
        for name, value in zip(BlockIndex._fields, got):
            assert torch.equal(value, getattr(expected, name)), (name, seed)
    assert_same_bytes(peagle_ext.build_block_mask(anchor, depth, backend="cuda_emulated", **arguments), expected)
