"""``peagle_ext.draft_llama``: the names of :mod:`peagle_ext.draft.llama`, where the code lives (the
classes of NeMo Automodel's ``draft_llama`` module, under the same names)."""

from .draft.llama import (  # noqa: F401
    Eagle3DraftConfig,
    Eagle3LlamaAttention,
    Eagle3LlamaDecoderLayer,
    Eagle3LlamaMLP,
    Eagle3LlamaModel,
    Eagle3LlamaPeagleLayer,
    LlamaEagle3DraftModel,
    LlamaRotaryEmbedding,
)
