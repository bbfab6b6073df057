"""Python side of the compiled op ``torch.ops.peagle_ext.build_block_index``.

Imported only once the compiled library has loaded. The fake kernel gives the output shapes,
which depend only on N and the block sizes, so the op traces under torch.compile.
"""

from __future__ import annotations

import torch

from . import _C  # noqa: F401  (registers the op; this module needs the compiled library)
from ._python_builder import BlockIndex


@torch.library.register_fake("peagle_ext::build_block_index")
def _build_block_index_fake(anchor_pos, depth, doc_of_position, sliding_window, q_block_size, kv_block_size):
    n = anchor_pos.shape[0]
    num_q_blocks = (n + q_block_size - 1) // q_block_size
    num_kv_blocks = (n + kv_block_size - 1) // kv_block_size

    def ints(*shape):
        return anchor_pos.new_empty((1, 1, *shape), dtype=torch.int32)

    return (
        ints(num_q_blocks), ints(num_q_blocks, num_kv_blocks),
        ints(num_q_blocks), ints(num_q_blocks, num_kv_blocks),
        ints(num_kv_blocks), ints(num_kv_blocks, num_q_blocks),
        ints(num_kv_blocks), ints(num_kv_blocks, num_q_blocks),
    )


def build_native(anchor_pos, depth, doc_of_position, sliding_window, q_block_size, kv_block_size) -> BlockIndex:
    """Run the compiled op (CPU or CUDA kernel, by the tensors' device)."""
    return BlockIndex(
        *torch.ops.peagle_ext.build_block_index(
            anchor_pos, depth, doc_of_position, sliding_window, q_block_size, kv_block_size
        )
    )
