"""A transformers causal LM as a target: loading it (a model folder or a GGUF file in it), chat
prompts through its template, and strict JSON for the measurements."""

from __future__ import annotations

import math

import torch


def load_transformers_target(folder: str, gguf_file: str | None):
    """(model in float32, eval mode; tokenizer) from a transformers folder or a GGUF file in it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    extra = {} if gguf_file is None else {"gguf_file": gguf_file}
    tokenizer = AutoTokenizer.from_pretrained(folder, **extra)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **extra).eval()
    return model, tokenizer


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
