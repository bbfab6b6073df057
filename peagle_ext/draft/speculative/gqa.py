"""Grouped-query attention over the target's KV cache without copying it, on the CPU.

transformers' SDPA attention passes ``enable_gqa`` to ``scaled_dot_product_attention`` only when
there is no attention mask (CUDA's fast kernels need that). A verification forward reads K + 1
tokens after the cache, so it has a mask (causal among the new tokens), and each layer then
repeats its keys and values for every query head: a copy of the whole cache, twice per layer and
step, that a one-token forward never makes. On the CPU, SDPA takes the mask and ``enable_gqa``
together (the same result to the bit) at about half the cost for SmolLM2's 3 key-value heads.
:func:`cpu_grouped_attention` switches a model to that attention for the duration of a ``with``
block; the plain-decoding baseline runs through the same block, so speedups stay honest.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F

# the name the attention and its mask are registered under in transformers' interfaces
ATTENTION_NAME = "peagle_cpu_sdpa_gqa"


def _grouped_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' SDPA attention with ``enable_gqa`` also under a boolean mask, on the CPU; any
    other case (another device, a float mask, dropout, a position bias or attention sinks) goes to
    transformers' own function."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    plain = query.device.type != "cpu" or groups <= 1 or dropout or kwargs.get("position_bias") is not None \
        or kwargs.get("s_aux") is not None or kwargs.get("output_attentions") \
        or (attention_mask is not None and attention_mask.dtype != torch.bool)
    if plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(query.shape[2] > 1 and attention_mask is None and causal)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling, is_causal=causal,
                                         enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


@functools.cache
def _registered() -> bool:
    """Register the attention (and SDPA's mask under its name) once; False where this transformers
    has no such interfaces."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:
        return False
    AttentionInterface.register(ATTENTION_NAME, _grouped_sdpa)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    return True


@contextlib.contextmanager
def cpu_grouped_attention(config, enabled: bool = True):
    """Within the block, a model whose ``config`` selects SDPA attention runs :func:`_grouped_sdpa`
    instead (the model's forward reads the name from its config at every call); any other model,
    or ``enabled=False``, is left alone."""
    if not enabled or getattr(config, "_attn_implementation", None) != "sdpa" or not _registered():
        yield
        return
    config._attn_implementation = ATTENTION_NAME
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"
