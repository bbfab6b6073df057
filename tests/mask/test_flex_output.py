"""flex_attention gives the same output with our BlockMask as with create_block_mask's.

Compiled flex_attention skips empty tiles and applies mask_mod only on partial ones, so this
is where wrong block lists would show. On CPU, torch 2.14.1 compiles the forward (inference).
"""

from __future__ import annotations

import torch
from conftest import BACKEND_DEVICE, backends_here, oracle_block_mask
from torch.nn.attention.flex_attention import BlockMask, create_mask, flex_attention

import peagle_ext


def dense_reference(q, k, v, mask_mod):
    n = q.shape[-2]
    allowed = create_mask(mask_mod, None, None, n, n, device=q.device)
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.nan_to_num(torch.softmax(scores, dim=-1)) @ v  # rows that see nothing give 0


def test_compiled_flex_attention_reads_the_block_lists():
    """One compile; the masks of every CPU backend and the oracle's run through it."""
    generator = torch.Generator().manual_seed(5)
    anchor_pos, depth = peagle_ext.generate_cod_sample_indices(300, torch.ones(300), generator=generator)
    lengths, n = torch.tensor([120, 150]), anchor_pos.numel()
    theirs = oracle_block_mask(anchor_pos, depth, lengths, 300)
    q, k, v = (torch.randn(1, 2, n, 16, generator=generator) for _ in range(3))
    compiled = torch.compile(flex_attention)
    with torch.no_grad():
        expected = compiled(q, k, v, block_mask=theirs)
        torch.testing.assert_close(expected, dense_reference(q, k, v, theirs.mask_mod), atol=1e-5, rtol=1e-4)
        for backend in (b for b in backends_here() if BACKEND_DEVICE[b] == "cpu"):
            ours = peagle_ext.build_block_mask(anchor_pos, depth, lengths, 300, BLOCK_SIZE=128, backend=backend)
            got = compiled(q, k, v, block_mask=ours)
            torch.testing.assert_close(got, expected, msg=lambda m: f"backend {backend!r}: {m}")
        # Sensitivity: the same mask with one partial tile dropped from its lists changes the output.
        kv_num_blocks = ours.kv_num_blocks.clone()
        row = int(torch.nonzero(kv_num_blocks.flatten())[-1])
        kv_num_blocks[0, 0, row] -= 1
        broken = BlockMask.from_kv_blocks(kv_num_blocks, ours.kv_indices, ours.full_kv_num_blocks,
                                          ours.full_kv_indices, BLOCK_SIZE=128, mask_mod=ours.mask_mod,
                                          seq_lengths=(n, n))
        assert not torch.allclose(compiled(q, k, v, block_mask=broken), got)


def test_eager_flex_attention_agrees(backend):
    generator = torch.Generator().manual_seed(6)
    anchor_pos, depth = peagle_ext.generate_cod_sample_indices(200, torch.ones(200), generator=generator)
    device = BACKEND_DEVICE[backend]
    anchor_pos, depth, lengths = anchor_pos.to(device), depth.to(device), torch.tensor([200], device=device)
    n = anchor_pos.numel()
    ours = peagle_ext.build_block_mask(anchor_pos, depth, lengths, 200, backend=backend)
    q, k, v = (torch.randn(1, 2, n, 16, generator=generator).to(device) for _ in range(3))
    torch.testing.assert_close(flex_attention(q, k, v, block_mask=ours), dense_reference(q, k, v, ours.mask_mod))
