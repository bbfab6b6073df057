"""peagle_ext: exact P-EAGLE flex_attention BlockMasks without the dense grid.

    anchor_pos, depth = peagle_ext.generate_cod_sample_indices(seq_len, loss_mask)
    block_mask = peagle_ext.build_block_mask(anchor_pos, depth, lengths, total_seq_len=seq_len)

The BlockMask describes exactly what ``create_block_mask(create_peagle_mask_mod(...), ...)``
describes; it is built by a compiled CPU or CUDA kernel when one is installed, by a vectorized
pure-PyTorch path otherwise (``available_backends()`` says which).

The package has three parts: the mask engine (this namespace), the P-EAGLE draft model
(:mod:`peagle_ext.draft`, with its mixins at NeMo Automodel's path :mod:`peagle_ext.peagle_draft`)
and the command line (:mod:`peagle_ext.cli`). The draft names below are imported on first use, so
building masks does not import the draft model or safetensors.
"""

from .block_mask import available_backends, build_block_mask
from .cod import assign_cod_segments, cod_segments, generate_cod_sample_indices, pad_rows
from .intervals import IntervalMaskMod, block_mask_from_intervals
from .mask_mod import PeagleMaskMod, create_peagle_mask_mod
from .testing import assert_block_masks_equal

# Draft-model names served here on first access (PEP 562), from the module that defines them.
_DRAFT_NAMES = {"Eagle3DraftConfig": "peagle_ext.draft.llama", "LlamaEagle3DraftModel": "peagle_ext.draft.llama"}


def __getattr__(name: str):
    if name in _DRAFT_NAMES:
        import importlib

        return getattr(importlib.import_module(_DRAFT_NAMES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Eagle3DraftConfig",
    "IntervalMaskMod",
    "LlamaEagle3DraftModel",
    "PeagleMaskMod",
    "assert_block_masks_equal",
    "assign_cod_segments",
    "available_backends",
    "block_mask_from_intervals",
    "build_block_mask",
    "cod_segments",
    "create_peagle_mask_mod",
    "generate_cod_sample_indices",
    "pad_rows",
]
__version__ = "0.1.0"
