"""The block index every builder returns: the eight BlockMask tensors, in BlockMask's order."""

from __future__ import annotations

from typing import NamedTuple

import torch


def num_blocks(length: int, block_size: int) -> int:
    """How many blocks of ``block_size`` cover ``length`` elements (the last one may be a partial tail)."""
    return -(-length // block_size)


class BlockIndex(NamedTuple):
    """The eight BlockMask index tensors, int32, with leading [1, 1] batch and head dims."""

    kv_num_blocks: torch.Tensor  # [1, 1, nQ] partial kv blocks per q-block
    kv_indices: torch.Tensor  # [1, 1, nQ, nKV]
    full_kv_num_blocks: torch.Tensor  # [1, 1, nQ]
    full_kv_indices: torch.Tensor  # [1, 1, nQ, nKV]
    q_num_blocks: torch.Tensor  # [1, 1, nKV] partial q blocks per kv-block
    q_indices: torch.Tensor  # [1, 1, nKV, nQ]
    full_q_num_blocks: torch.Tensor  # [1, 1, nKV]
    full_q_indices: torch.Tensor  # [1, 1, nKV, nQ]
