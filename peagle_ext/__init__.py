"""peagle_ext: exact P-EAGLE flex_attention BlockMasks without the dense grid.

    anchor_pos, depth = peagle_ext.generate_cod_sample_indices(seq_len, loss_mask)
    block_mask = peagle_ext.build_block_mask(anchor_pos, depth, lengths, total_seq_len=seq_len)

The BlockMask describes exactly what ``create_block_mask(create_peagle_mask_mod(...), ...)``
describes; it is built by a compiled CPU or CUDA kernel when one is installed, by a vectorized
pure-PyTorch path otherwise (``available_backends()`` says which).
"""

from .block_mask import available_backends, build_block_mask
from .cod import generate_cod_sample_indices
from .draft_llama import Eagle3DraftConfig, LlamaEagle3DraftModel
from .mask_mod import create_peagle_mask_mod
from .testing import assert_block_masks_equal

__all__ = [
    "Eagle3DraftConfig",
    "LlamaEagle3DraftModel",
    "assert_block_masks_equal",
    "available_backends",
    "build_block_mask",
    "create_peagle_mask_mod",
    "generate_cod_sample_indices",
]
__version__ = "0.1.0"
