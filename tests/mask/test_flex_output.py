"""flex_attention gives the attention the rule defines, with our BlockMasks.

Compiled flex_attention skips empty tiles and applies mask_mod only on partial ones, so it is where
wrong block lists show. Eager flex_attention reads only the mask_mod a BlockMask carries, so it is
where a wrong mask_mod shows. Both are compared with attention over the rule written out pair by
pair (helpers.dense_rule). On CPU, torch 2.14.1 compiles the forward (inference).
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

import peagle_ext

from helpers import BACKEND_DEVICE, backends_here, dense_rule


def dense_attention(q, k, v, allowed):
    """Softmax attention over the pairs ``allowed`` (bool [N, N]) alone; rows that see nothing give 0."""
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.nan_to_num(torch.softmax(scores, dim=-1)) @ v


def test_compiled_flex_attention_reads_the_block_lists():
    """One compile; every CPU backend's mask runs through it. (The oracle's own BlockMask cannot:
    its mask_mod reads a captured [N, N] tensor, which torch 2.14.1's CPU flex kernel fails to build.)"""
    generator = torch.Generator().manual_seed(5)
    anchor_pos, depth = peagle_ext.generate_cod_sample_indices(300, torch.ones(300), generator=generator)
    lengths, n = torch.tensor([120, 150]), anchor_pos.numel()
    q, k, v = (torch.randn(1, 2, n, 16, generator=generator) for _ in range(3))
    compiled = torch.compile(flex_attention)
    with torch.no_grad():
        expected = dense_attention(q, k, v, dense_rule(anchor_pos, depth, lengths, 300))
        for backend in (b for b in backends_here() if BACKEND_DEVICE[b] == "cpu"):
            ours = peagle_ext.build_block_mask(anchor_pos, depth, lengths, 300, BLOCK_SIZE=128, backend=backend)
            got = compiled(q, k, v, block_mask=ours)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4,
                                       msg=lambda m, backend=backend: f"backend {backend!r}: {m}")
        # Sensitivity: the same mask with one partial tile dropped from its lists changes the output.
        kv_num_blocks = ours.kv_num_blocks.clone()
        row = int(torch.nonzero(kv_num_blocks.flatten())[-1])
        kv_num_blocks[0, 0, row] -= 1
        broken = BlockMask.from_kv_blocks(kv_num_blocks, ours.kv_indices, ours.full_kv_num_blocks,
                                          ours.full_kv_indices, BLOCK_SIZE=128, mask_mod=ours.mask_mod,
                                          seq_lengths=(n, n))
        assert not torch.allclose(compiled(q, k, v, block_mask=broken), got)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_eager_flex_attention_applies_the_rule(device):
    """The mask_mod the BlockMask carries, with a window and documents given by id (padding among
    them), against the rule: the same for every backend, so one build per device."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (none visible)")
    generator = torch.Generator().manual_seed(6)
    anchor_pos, depth = peagle_ext.generate_cod_sample_indices(200, torch.ones(200), generator=generator)
    document_ids = torch.repeat_interleave(torch.tensor([0, -1, 1, 2]), torch.tensor([70, 10, 90, 30]))
    anchor_pos, depth, document_ids = anchor_pos.to(device), depth.to(device), document_ids.to(device)
    n = anchor_pos.numel()
    ours = peagle_ext.build_block_mask(anchor_pos, depth, document_ids=document_ids, sliding_window=40)
    q, k, v = (torch.randn(1, 2, n, 16, generator=generator).to(device) for _ in range(3))
    allowed = dense_rule(anchor_pos, depth, document_ids=document_ids, sliding_window=40)
    torch.testing.assert_close(flex_attention(q, k, v, block_mask=ours), dense_attention(q, k, v, allowed))
