"""Comparing BlockMasks the way the kernels read them: counts, and each row's valid prefix as a set."""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask

from ._block_index import BlockIndex

# (count, indices) attribute pairs of a BlockMask: kv-side lists and their q-side transposes.
BLOCK_LISTS = tuple(zip(BlockIndex._fields[0::2], BlockIndex._fields[1::2]))


def block_sets(counts: torch.Tensor, indices: torch.Tensor) -> list[set[int]]:
    """Each row's valid prefix as a set: only the first counts[row] entries are ever read."""
    counts = counts.reshape(-1).tolist()
    rows = indices.reshape(len(counts), -1).tolist()
    return [set(row[:count]) for row, count in zip(rows, counts)]


def assert_block_masks_equal(actual: BlockMask, expected: BlockMask) -> None:
    """Raise AssertionError unless both describe the same partial and full blocks.

    Compares seq_lengths, BLOCK_SIZE, every list's counts, and each row's valid prefix as a set;
    entries past the count are never read by the kernels and are not compared.
    """
    if tuple(actual.seq_lengths) != tuple(expected.seq_lengths):
        raise AssertionError(f"seq_lengths differ: {actual.seq_lengths} != {expected.seq_lengths}")
    if tuple(actual.BLOCK_SIZE) != tuple(expected.BLOCK_SIZE):
        raise AssertionError(f"BLOCK_SIZE differs: {actual.BLOCK_SIZE} != {expected.BLOCK_SIZE}")
    for count_name, index_name in BLOCK_LISTS:
        a_count, e_count = getattr(actual, count_name), getattr(expected, count_name)
        a_index, e_index = getattr(actual, index_name), getattr(expected, index_name)
        if a_count is None or e_count is None:
            if (a_count is None) != (e_count is None):
                raise AssertionError(f"{count_name} is None on one side only")
            continue
        if a_count.dtype != torch.int32 or a_index.dtype != torch.int32:
            raise AssertionError(f"{count_name}/{index_name} must be int32, got {a_count.dtype}/{a_index.dtype}")
        if a_count.shape != e_count.shape or a_index.shape != e_index.shape:
            raise AssertionError(
                f"{index_name} shape {tuple(a_index.shape)} != {tuple(e_index.shape)} "
                f"or {count_name} shape {tuple(a_count.shape)} != {tuple(e_count.shape)}"
            )
        if not torch.equal(a_count.cpu(), e_count.cpu()):
            row = int((a_count.cpu() != e_count.cpu()).flatten().nonzero()[0])  # over [B, H, rows], flattened
            raise AssertionError(
                f"{count_name} differs first at row {row}: "
                f"{int(a_count.flatten()[row])} != {int(e_count.flatten()[row])}"
            )
        a_sets = block_sets(a_count.cpu(), a_index.cpu())
        e_sets = block_sets(e_count.cpu(), e_index.cpu())
        for row, (a_set, e_set) in enumerate(zip(a_sets, e_sets)):
            if a_set != e_set:
                raise AssertionError(
                    f"{index_name} row {row}: extra {sorted(a_set - e_set)}, missing {sorted(e_set - a_set)}"
                )
