"""Rotary embeddings against transformers' own rope init functions and rotary classes, for both
config forms (transformers 5's rope_parameters, and rope_theta + rope_scaling)."""

from __future__ import annotations

import pytest
import torch

from peagle_ext.draft import rope
from peagle_ext.draft.llama import LlamaRotaryEmbedding

from draft_helpers import single_thread  # noqa: F401 (autouse fixture)

transformers = pytest.importorskip("transformers", reason="transformers is the reference for the rope math")
from transformers import LlamaConfig  # noqa: E402
from transformers.models.llama import modeling_llama  # noqa: E402

HEAD_DIM, MAX_POSITIONS = 16, 4096

# (rope_theta, rope_scaling) pairs: every type, the llama3 of Llama 3.1, and yarn's options.
ROPES = {
    "default": (500000.0, None),
    "default-theta-int": (10000, None),
    "linear": (10000.0, {"rope_type": "linear", "factor": 4.0}),
    "llama3": (500000.0, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 512}),
    "yarn": (1000000.0, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}),
    "yarn-options": (10000.0, {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 512,
                               "beta_fast": 16, "beta_slow": 2, "mscale": 0.707, "mscale_all_dim": 1.0,
                               "truncate": False}),
    "yarn-untruncated": (10000.0, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024,
                                   "truncate": False}),
    "yarn-attention-factor": (10000.0, {"rope_type": "yarn", "factor": 2.0, "attention_factor": 0.9,
                                        "original_max_position_embeddings": 2048}),
    "yarn-no-factor": (10000.0, {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 1024}),
}


def _transformers_config(theta, scaling) -> LlamaConfig:
    """transformers 5's form: one rope_parameters dict."""
    return LlamaConfig(hidden_size=4 * HEAD_DIM, num_attention_heads=4, head_dim=HEAD_DIM,
                       max_position_embeddings=MAX_POSITIONS,
                       rope_parameters=rope.rope_parameters(theta, rope.check_rope_scaling(scaling, MAX_POSITIONS)))


def _reference(config: LlamaConfig):
    """(inv_freq, attention_scaling) from transformers' own init function for the config's rope type."""
    rope_type = config.rope_parameters["rope_type"]
    if rope_type == "default":
        return modeling_llama.LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    return transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS[rope_type](config)


@pytest.mark.parametrize("name", ROPES)
def test_inverse_frequencies_equal_transformers(name):
    theta, scaling = ROPES[name]
    expected_freq, expected_scaling = _reference(_transformers_config(theta, scaling))
    freq, scaling_factor = rope.inverse_frequencies(HEAD_DIM, theta, rope.check_rope_scaling(scaling, MAX_POSITIONS),
                                                    MAX_POSITIONS)
    assert freq.dtype == torch.float32
    torch.testing.assert_close(freq, expected_freq, rtol=0, atol=0)
    assert scaling_factor == pytest.approx(expected_scaling, rel=1e-12)


@pytest.mark.parametrize("name", ["default", "llama3", "yarn-options"])
def test_rotation_equals_transformers(name):
    """cos/sin from transformers' LlamaRotaryEmbedding applied with its apply_rotary_pos_emb."""
    theta, scaling = ROPES[name]
    config = _transformers_config(theta, scaling)
    theirs = modeling_llama.LlamaRotaryEmbedding(config)
    ours = LlamaRotaryEmbedding(HEAD_DIM, theta, scaling, MAX_POSITIONS)
    torch.manual_seed(0)
    q, k = torch.randn(1, 4, 40, HEAD_DIM), torch.randn(1, 2, 40, HEAD_DIM)
    positions = torch.randint(0, 3000, (1, 40))
    cos, sin = theirs(q, positions)
    expected = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
    for actual, reference in zip(ours(q, k, positions), expected):
        torch.testing.assert_close(actual, reference, rtol=1e-6, atol=1e-6)


LEGACY = [
    {"rope_theta": 500000.0},
    {"rope_theta": 10000.0, "rope_scaling": {"type": "linear", "factor": 2.0}},
    {"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 512}},
    {"rope_theta": 10000.0, "rope_scaling": {"type": "yarn", "factor": 4.0}},
    {},
]


@pytest.mark.parametrize("legacy", LEGACY, ids=["theta", "linear-type", "llama3", "yarn-type-no-original", "nothing"])
def test_legacy_and_transformers5_forms_read_as_transformers_reads_them(legacy):
    """A layer config with rope_theta + rope_scaling (or nothing) gives what transformers makes of it,
    and so does the rope_parameters that transformers 5 writes for it."""
    config = LlamaConfig(hidden_size=4 * HEAD_DIM, num_attention_heads=4, head_dim=HEAD_DIM,
                         max_position_embeddings=MAX_POSITIONS, **legacy)
    expected_freq, expected_scaling = _reference(config)
    for layer in (legacy, {"rope_parameters": config.to_dict()["rope_parameters"]}):
        theta, scaling = rope.rope_fields(layer)
        freq, scaling_factor = rope.inverse_frequencies(
            HEAD_DIM, theta, rope.check_rope_scaling(scaling, MAX_POSITIONS), MAX_POSITIONS
        )
        torch.testing.assert_close(freq, expected_freq, rtol=0, atol=0)
        assert scaling_factor == pytest.approx(expected_scaling, rel=1e-12)


def test_rope_fields_refuse_nested_and_mistyped():
    nested = {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e4},
                                  "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}
    with pytest.raises(ValueError, match="per-layer-type"):
        rope.rope_fields(nested)
    with pytest.raises(TypeError, match="transformer_layer_config.rope_parameters must be a JSON object"):
        rope.rope_fields({"rope_parameters": "default"})
