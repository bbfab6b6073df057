"""A transformers causal LM as a target: loading it (a model folder or a GGUF file in it), chat
prompts through its template, and strict JSON for the measurements."""

from __future__ import annotations

import contextlib
import functools
import math

import torch
import torch.nn.functional as F


def load_transformers_target(folder: str, gguf_file: str | None):
    """(model in float32, eval mode; tokenizer) from a transformers folder or a GGUF file in it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    extra = {} if gguf_file is None else {"gguf_file": gguf_file}
    tokenizer = AutoTokenizer.from_pretrained(folder, **extra)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **extra).eval()
    return model, tokenizer


GROUPED_DECODE_ATTENTION = "peagle_grouped_decode_sdpa"


def _grouped_decode_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                              **kwargs):
    """transformers' SDPA attention, without the copy of every key and value per query head that
    transformers makes for grouped key/value heads whenever a mask is present (the whole KV cache,
    at every layer and step):

    - one query token per row (a decode step; any device): the query heads that share a key/value
      head become that head's query rows;
    - several query tokens (a verification forward over K + 1 tokens) on the CPU under a boolean
      mask or none: SDPA's ``enable_gqa``, which the CPU kernels take together with a mask (CUDA's
      fast kernels do not, so there transformers' own path stays).

    Anything else (no grouping, attention weights asked for, a position bias, attention sinks)
    goes to transformers' own function."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    grouped = heads != kv_heads and not kwargs.get("output_attentions", False) \
        and kwargs.get("position_bias") is None and kwargs.get("s_aux") is None
    if grouped and q_len == 1:
        # head h reads key/value head h // group (transformers' repeat_kv order); a [B, 1, 1, S]
        # padding mask broadcasts over the group's rows
        rows = query.reshape(batch, kv_heads, heads // kv_heads, dim)
        out = F.scaled_dot_product_attention(rows, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                             scale=scaling)
        return out.reshape(batch, heads, 1, dim).transpose(1, 2).contiguous(), None
    if grouped and query.device.type == "cpu" and not dropout and (attention_mask is None
                                                                    or attention_mask.dtype == torch.bool):
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling,
                                             is_causal=bool(attention_mask is None and causal), enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


@functools.cache
def _register_grouped_attention() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(GROUPED_DECODE_ATTENTION, _grouped_decode_attention)
    AttentionMaskInterface.register(GROUPED_DECODE_ATTENTION, sdpa_mask)


@contextlib.contextmanager
def grouped_decode_attention(model, enabled: bool = True):
    """Within the block, a transformers ``model`` on SDPA attention runs
    :func:`_grouped_decode_attention` (the same products; about 3x faster batched decoding of
    192-token responses for SmolLM2's 9 query and 3 key/value heads on a CPU, and a verification
    forward without copying the cache). Another attention implementation, or ``enabled=False``,
    is left as it is. The switch is the config's attention name, which the model reads at every
    forward (cheap enough to enter per forward; ``set_attn_implementation`` costs ~0.4 ms)."""
    config = model.config
    if not enabled or getattr(config, "_attn_implementation", None) != "sdpa":
        yield model
        return
    _register_grouped_attention()
    config._attn_implementation = GROUPED_DECODE_ATTENTION
    try:
        yield model
    finally:
        config._attn_implementation = "sdpa"


def chat_template_ids(tokenizer, messages) -> list[int]:
    """Token ids of chat ``messages`` through the tokenizer's template, with the generation prompt."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def json_ready(value):
    """NaN (a rate nothing reached) becomes null, so the file is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value
