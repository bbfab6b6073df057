"""Grouped-query attention without copying the keys and values per query head (one-token decode
steps; verification forwards on the CPU): the same result as transformers' SDPA attention, switched
on only for the duration of the target's forwards. The lossless tests of the decoding loop
(tests/draft/test_speculative.py) run on a grouped-query Llama on SDPA, so through it as well."""

from __future__ import annotations

import pytest
import torch

from peagle_ext.draft.hf import GROUPED_DECODE_ATTENTION, _grouped_decode_attention, grouped_decode_attention
from peagle_ext.draft.speculative import TransformersTarget

transformers = pytest.importorskip("transformers", reason="the grouped attention plugs into transformers")
from transformers.integrations import sdpa_attention  # noqa: E402


class Module(torch.nn.Module):
    """What transformers' attention functions read of the attention module."""

    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups, self.is_causal, self.training = groups, True, False


def qkv(query_len, key_len, heads=6, kv_heads=2, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(2, heads, query_len, 16, generator=generator).to(dtype),
            torch.randn(2, kv_heads, key_len, 16, generator=generator).to(dtype),
            torch.randn(2, kv_heads, key_len, 16, generator=generator).to(dtype))


def verification_mask(query_len, key_len, holes=()):
    """[2, 1, Q, T] bool: causal among the new tokens after the cache; row 1 has holes."""
    mask = torch.ones(query_len, key_len, dtype=torch.bool).tril(key_len - query_len)
    mask = mask.expand(2, 1, query_len, key_len).clone()
    for column in holes:
        mask[1, :, :, column] = False
    return mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("query_len, key_len, masked",
                         [(1, 40, False), (1, 40, True), (6, 40, True), (6, 6, False), (4, 90, True)])
def test_grouped_attention_equals_transformers_sdpa(query_len, key_len, masked, dtype):
    """Verification (a mask), one-token decoding and prefill (no mask: causal when Q > 1)."""
    query, key, value = qkv(query_len, key_len, dtype=dtype)
    mask = verification_mask(query_len, key_len, holes=(3, 7)) if masked else None
    module = Module(groups=3)
    ours, _ = _grouped_decode_attention(module, query, key, value, mask, scaling=0.25)
    theirs, _ = sdpa_attention.sdpa_attention_forward(module, query, key, value, mask, scaling=0.25)
    assert ours.shape == theirs.shape == (2, query_len, 6, 16)
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(ours, theirs, atol=tolerance, rtol=tolerance)
    # a wrong mask would not pass: hiding one more column changes the output
    if masked:
        wider = verification_mask(query_len, key_len, holes=(3, 7, 8))
        other, _ = _grouped_decode_attention(module, query, key, value, wider, scaling=0.25)
        assert not torch.allclose(other, ours)


@pytest.mark.parametrize("case", ["float mask", "one group", "dropout", "position bias"])
def test_what_the_grouped_path_cannot_take_goes_to_transformers(case, monkeypatch):
    calls = []
    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward", lambda *a, **k: calls.append(k) or ("theirs", None))
    query, key, value = qkv(4, 20, kv_heads=6 if case == "one group" else 2)
    mask = verification_mask(4, 20)
    options = {}
    if case == "float mask":
        mask = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    elif case == "dropout":
        options["dropout"] = 0.1
    elif case == "position bias":
        options["position_bias"] = torch.zeros(2, 6, 4, 20)
    module = Module(groups=1 if case == "one group" else 3)
    out, _ = _grouped_decode_attention(module, query, key, value, mask, **options)
    assert out == "theirs" and len(calls) == 1


def test_the_switch_holds_for_the_block_only():
    model = tiny_gqa_llama()
    config = model.config
    with grouped_decode_attention(model):
        assert config._attn_implementation == GROUPED_DECODE_ATTENTION
    assert config._attn_implementation == "sdpa"
    with pytest.raises(RuntimeError, match="inside"):
        with grouped_decode_attention(model):
            raise RuntimeError("inside")
    assert config._attn_implementation == "sdpa"
    with grouped_decode_attention(model, enabled=False):
        assert config._attn_implementation == "sdpa"
    config._attn_implementation = "eager"  # a model set to another attention is left alone
    with grouped_decode_attention(model):
        assert config._attn_implementation == "eager"


def tiny_gqa_llama(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256,
                                      attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(config).eval()


def test_the_target_runs_its_forwards_with_the_grouped_attention_and_gets_the_same_outputs():
    """A verification-shaped extend after a padded batch (a mask with padding) through the grouped
    attention and through transformers' own: the same logits and states; the model is back on
    SDPA afterwards, and the grouped attention did run inside."""
    model = tiny_gqa_llama()
    seen = []
    model.model.layers[0].register_forward_pre_hook(lambda *_: seen.append(model.config._attn_implementation))
    outputs = {}
    for grouped in (True, False):
        target = TransformersTarget(model, [1, 2, 3], grouped_attention=grouped)
        target.start([[5, 9, 14, 3, 7], [11, 4]])
        outputs[grouped] = target.extend(torch.tensor([[8, 21, 30, 2], [40, 6, 6, 17]]))
    assert seen == [GROUPED_DECODE_ATTENTION] * 2 + ["sdpa"] * 2
    assert model.config._attn_implementation == "sdpa"
    for ours, theirs in zip(outputs[True], outputs[False]):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
