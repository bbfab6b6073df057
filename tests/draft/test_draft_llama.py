"""The Llama EAGLE-3 host classes: structure, config, RoPE, GQA, and the whole forward against an
independent dense reference written here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peagle_ext.draft.llama import (
    Eagle3DraftConfig,
    Eagle3LlamaDecoderLayer,
    Eagle3LlamaPeagleLayer,
    LlamaEagle3DraftModel,
)

from draft_helpers import cod_indices, random_sequence, single_thread, tiny_config, tiny_model  # noqa: F401 (autouse fixture)
from helpers import dense_rule


def test_config_defaults_and_derived_fields():
    config = Eagle3DraftConfig()
    assert (config.head_dim, config.target_hidden_size, config.mask_token_id) == (128, 4096, 128255)
    assert config.num_aux_hidden_states == 3 and not config.parallel_drafting
    assert tiny_config(head_dim=16).head_dim == 16


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"draft_vocab_size": 97}, "draft_vocab_size"),
        ({"mask_token_id": 96}, "mask_token_id"),
        ({"num_depths": 0}, "num_depths"),
        ({"norm_before_fc": True, "fc_norm": True}, "norm_before_fc and fc_norm are mutually exclusive"),
        ({"num_aux_hidden_states": 3, "eagle_aux_hidden_state_layer_ids": [1, 2]}, "num_aux_hidden_states \\(3\\)"),
        ({"head_dim": 7}, "head_dim must be even"),
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "unsupported rope_type 'dynamic'"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0, "beta_fast": 4}}, "unknown rope option 'beta_fast'"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "needs the rope option 'low_freq_factor'"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5}},
         "partial_rotary_factor"),
        ({"rope_scaling": {"rope_type": "yarn", "type": "linear", "factor": 2.0}}, "two types"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}, "rope_theta"),
    ],
)
def test_config_rejects_bad_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_config_derived_aux_count_and_rope_forms():
    assert tiny_config(eagle_aux_hidden_state_layer_ids=[1, 4, 7, 9]).num_aux_hidden_states == 4
    assert tiny_config(num_aux_hidden_states=1).num_aux_hidden_states == 1
    assert tiny_config(rope_scaling={"rope_type": "default"}).rope_scaling is None
    legacy = tiny_config(rope_scaling={"type": "yarn", "factor": 4.0})
    # The legacy key becomes rope_type, and the pre-training length defaults to max_position_embeddings.
    assert legacy.rope_scaling == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    assert legacy.rope_parameters == {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                      "original_max_position_embeddings": 64}
    with pytest.raises(TypeError, match="'rope_scaling' must be dict"):
        tiny_config(rope_scaling=[("rope_type", "linear")])
    with pytest.raises(TypeError, match="truncate"):
        tiny_config(rope_scaling={"rope_type": "yarn", "factor": 2.0, "truncate": "no"})


@pytest.mark.parametrize("layers", [1, 3])
def test_model_structure(layers):
    model = tiny_model(num_hidden_layers=layers, draft_vocab_size=40)
    config = model.config
    stack = model.model.layers
    assert len(stack) == layers
    assert type(stack[0]) is Eagle3LlamaDecoderLayer
    assert all(type(layer) is Eagle3LlamaPeagleLayer for layer in stack[1:])
    assert stack[0].self_attn.q_proj.in_features == 2 * config.hidden_size
    assert all(layer.self_attn.q_proj.in_features == config.hidden_size for layer in stack[1:])
    assert stack[0].hidden_norm.weight.shape == (config.hidden_size,)
    assert model.model.fc.in_features == 3 * config.target_hidden_size
    assert model.model.fc.out_features == config.hidden_size
    assert model.lm_head.out_features == 40 and model.model.embed_tokens.num_embeddings == 96
    assert model.model.fc_norm is None and model.model.input_norm is None
    per_state = tiny_model(fc_norm=True, num_aux_hidden_states=4).model
    assert [tuple(norm.weight.shape) for norm in per_state.fc_norm] == [(config.target_hidden_size,)] * 4
    assert tiny_model(norm_before_fc=True).model.input_norm.weight.shape == (3 * config.target_hidden_size,)
    biased = tiny_model(attention_bias=True, mlp_bias=True).model.layers[1]
    assert all(getattr(biased.self_attn, f"{name}_proj").bias is not None for name in "qkvo")
    assert all(getattr(biased.mlp, f"{name}_proj").bias is not None for name in ("gate", "up", "down"))


def test_repeat_kv_gives_each_query_head_its_group():
    attention = tiny_model(num_attention_heads=4, num_key_value_heads=2).model.layers[0].self_attn
    kv = torch.arange(2.0).view(1, 2, 1, 1).expand(1, 2, 5, 8)
    repeated = attention._repeat_kv(kv)
    assert repeated.shape == (1, 4, 5, 8)
    assert repeated[0, :, 0, 0].tolist() == [0.0, 0.0, 1.0, 1.0]


def test_rope_is_relative_and_honours_arbitrary_positions():
    rotary = tiny_model().model.layers[0].self_attn.rotary_emb
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(q_pos, k_pos):
        rq, _ = rotary(q, q, torch.tensor([q_pos]))
        rk, _ = rotary(k, k, torch.tensor([k_pos]))
        return (rq * rk).sum()

    torch.testing.assert_close(score(5, 3), score(40, 38))
    assert not torch.allclose(score(5, 3), score(5, 4))
    torch.testing.assert_close(rotary(q, k, torch.tensor([0]))[0], q)
    # Non-contiguous, unordered positions: each row is rotated by its own position alone.
    positions = torch.tensor([7, 0, 3, 3, 12])
    x = torch.randn(1, 2, 5, 8)
    together, _ = rotary(x, x, positions)
    for i, position in enumerate(positions.tolist()):
        alone, _ = rotary(x[:, :, i : i + 1], x[:, :, i : i + 1], torch.tensor([position]))
        torch.testing.assert_close(together[:, :, i : i + 1], alone)


# --- an independent dense reference of the whole P-EAGLE forward -------------------------------------------


def _rope(x, positions, theta):
    """Rotary embedding in complex form: pairs (i, i + D/2) rotated by position * theta^(-2i/D)."""
    half = x.shape[-1] // 2
    angles = positions[:, None].double() * theta ** (-torch.arange(half).double() * 2 / x.shape[-1])
    z = torch.complex(x[..., :half].double(), x[..., half:].double()) * torch.polar(torch.ones_like(angles), angles)
    return torch.cat([z.real, z.imag], dim=-1).float()


def _reference_forward(model, ids, projected, positions, visible):
    """The draft's forward written out densely: ids [N], projected [N, H], positions [N], visible [N, N]."""
    config = model.config

    def rms(x, norm):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + config.rms_norm_eps) * norm.weight

    def linear(x, proj):
        return x @ proj.weight.T + (0 if proj.bias is None else proj.bias)

    def attention(attn, x):
        heads, kv_heads, dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        q = linear(x, attn.q_proj).view(-1, heads, dim).transpose(0, 1)
        k = linear(x, attn.k_proj).view(-1, kv_heads, dim).transpose(0, 1)
        v = linear(x, attn.v_proj).view(-1, kv_heads, dim).transpose(0, 1)
        q, k = _rope(q, positions, config.rope_theta), _rope(k, positions, config.rope_theta)
        group = torch.arange(heads) // (heads // kv_heads)
        scores = (q @ k[group].transpose(1, 2)) / dim**0.5
        weights = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        return linear((weights @ v[group]).transpose(0, 1).reshape(len(ids), -1), attn.o_proj)

    def mlp(layer, x):
        return linear(F.silu(linear(x, layer.mlp.gate_proj)) * linear(x, layer.mlp.up_proj), layer.mlp.down_proj)

    first, *rest = model.model.layers
    embeds = model.model.embed_tokens.weight[ids]
    normed = rms(projected, first.hidden_norm)
    residual = normed if config.norm_before_residual else projected
    hidden = residual + attention(first.self_attn, torch.cat([rms(embeds, first.input_layernorm), normed], -1))
    hidden = hidden + mlp(first, rms(hidden, first.post_attention_layernorm))
    for layer in rest:
        hidden = hidden + attention(layer.self_attn, rms(hidden, layer.input_layernorm))
        hidden = hidden + mlp(layer, rms(hidden, layer.post_attention_layernorm))
    return rms(hidden, model.model.norm) if config.norm_output else hidden


@pytest.mark.parametrize(
    ("layout", "overrides"),
    [
        ("causal", {}),
        ("cod", {}),
        ("cod", {"norm_output": True, "num_hidden_layers": 3, "num_key_value_heads": 1}),
        ("cod", {"norm_before_residual": True, "attention_bias": True, "mlp_bias": True}),
    ],
)
def test_forward_matches_dense_reference(layout, overrides):
    from peagle_ext.draft.training import build_peagle_inputs

    seq_len, lengths = 20, torch.tensor([11, 9])
    model = tiny_model(**overrides)
    with torch.no_grad():  # biases start at random values; move the norms off their all-ones init
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.add_(0.2 * torch.randn_like(parameter))
    if layout == "causal":
        anchor_pos, depth = torch.arange(seq_len), torch.zeros(seq_len, dtype=torch.int64)
    else:
        anchor_pos, depth = cod_indices(seq_len, 4)
    ids, aux = random_sequence(model, seq_len)
    flat_ids, projected, positions = build_peagle_inputs(model, ids, aux, anchor_pos, depth)
    with torch.no_grad():
        block_mask = model.build_peagle_block_mask(anchor_pos, depth, lengths, seq_len)
        actual = model.forward_peagle(flat_ids, projected, positions, block_mask)[0]
        visible = dense_rule(anchor_pos, depth, lengths, seq_len)
        expected = _reference_forward(model, flat_ids[0], projected[0], positions[0], visible)
    torch.testing.assert_close(actual, expected, atol=2e-5, rtol=1e-4)


def test_draft_vocabulary_maps():
    full = tiny_model()
    assert not hasattr(full, "d2t") and torch.equal(full.draft_to_target_ids(), torch.arange(96))
    with pytest.raises(ValueError, match="whole target vocabulary"):
        full.set_draft_vocab(torch.arange(96))
    model = tiny_model(draft_vocab_size=5)
    assert torch.equal(model.draft_to_target_ids(), torch.arange(5))
    model.set_draft_vocab(torch.tensor([90, 3, 17, 4, 60]))
    assert model.draft_to_target_ids().tolist() == [3, 4, 17, 60, 90]
    assert model.d2t.tolist() == [3, 3, 15, 57, 86]
    assert model.t2d.nonzero().squeeze(-1).tolist() == [3, 4, 17, 60, 90]
    for bad in (torch.tensor([1, 1, 2, 3, 4]), torch.tensor([0, 1, 2, 3, 96]), torch.arange(4)):
        with pytest.raises(ValueError):
            model.set_draft_vocab(bad)


def test_model_forward_is_forward_peagle():
    model = tiny_model()
    anchor_pos, depth = cod_indices(16, 3)
    from peagle_ext.draft.training import build_peagle_inputs

    inputs = build_peagle_inputs(model, *random_sequence(model, 16), anchor_pos, depth)
    block_mask = model.build_peagle_block_mask(anchor_pos, depth, torch.tensor([16]), 16)
    with torch.no_grad():
        torch.testing.assert_close(model(*inputs, block_mask), model.forward_peagle(*inputs, block_mask))
    assert isinstance(model, LlamaEagle3DraftModel)
