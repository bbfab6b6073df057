"""What we save, read by vLLM 0.33.0's own code (see vllm_source.py for exactly what runs and what
is stood in for): its speculators config conversion gives the draft our options and the speculative
config our method and depths; its Eagle3LlamaForCausalLM, built from that config, accepts every
tensor (its loader raises on an unexpected key), fills every parameter it uses, and its
combine_hidden_states (the fc path, mask_hidden included) and compute_logits (the d2t mapping)
equal ours. vLLM's attention and rotary kernels, and serving, are not run here."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from peagle_ext.draft import checkpoint

from checkpoint_peers import VARIANTS, our_model, variant_config
from draft_helpers import single_thread  # noqa: F401 (autouse fixture)
from vllm_source import build_draft, load_vllm, read_sources

# Every variant of the speculators tests, and one whose target hidden size differs from the
# draft's (vLLM reads target_hidden_size; speculators cannot hold such a draft).
CASES = [pytest.param(name, {}, id=name) for name in VARIANTS] + [
    pytest.param("peagle-fc_norm-aux4-vocab-llama3-norm_output", {"target_hidden_size": 16}, id="peagle-target16")]
TARGET_LAYERS = 8
ATOL = 1e-6


@pytest.fixture(scope="module")
def vllm():
    pytest.importorskip("transformers", reason="vLLM's config code builds on transformers (pip install '.[interop]')")
    return load_vllm(read_sources())


@pytest.fixture
def saved(tmp_path, request):
    name, overrides = request.param
    config = variant_config(name, **overrides)
    model = our_model(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", checkpoint.InteropWarning)  # speculators' needs, not vLLM's
        model.save_pretrained(tmp_path / "draft", verifier="meta-llama/Llama-3.1-8B")
    return model, tmp_path / "draft"


@pytest.mark.parametrize("saved", [case.values[0:2] for case in CASES], ids=[case.id for case in CASES], indirect=True)
def test_vllm_converts_our_config(vllm, saved):
    model, directory = saved
    config = model.config
    config_json = json.loads((directory / "config.json").read_text())
    speculative = vllm.SpeculatorsConfig.extract_vllm_speculative_config(config_json)
    expected = {"method": "eagle3", "num_speculative_tokens": config.num_depths}
    assert speculative == ({**expected, "parallel_drafting": True} if config.parallel_drafting else expected)

    hf = vllm.SpeculatorsConfig.from_pretrained(str(directory))
    hf.standardize_rope_params()  # what vLLM's patch_rope_parameters runs (transformers' own checks)
    hf.validate_rope()
    kind = "Peagle" if config.parallel_drafting else "Eagle3"
    assert hf.architectures == [f"{kind}LlamaForCausalLM"]
    assert hf.rope_parameters == config.rope_parameters
    for name in ("draft_vocab_size", "target_hidden_size", "norm_before_fc", "norm_before_residual", "fc_norm",
                 "norm_output", "num_aux_hidden_states", "hidden_size", "num_hidden_layers", "attention_bias",
                 "mlp_bias", "head_dim", "rms_norm_eps"):
        assert getattr(hf, name) == getattr(config, name), name
    if config.parallel_drafting:
        assert hf.pard_token == config.mask_token_id
    if config.eagle_aux_hidden_state_layer_ids:  # what the target captures
        assert hf.eagle_aux_hidden_state_layer_ids == config.eagle_aux_hidden_state_layer_ids


@pytest.mark.parametrize("saved", [case.values[0:2] for case in CASES], ids=[case.id for case in CASES], indirect=True)
def test_vllm_loads_our_weights_with_our_projection_and_logits(vllm, saved):
    model, directory = saved
    config = model.config
    config_json = json.loads((directory / "config.json").read_text())
    hf = vllm.SpeculatorsConfig.from_pretrained(str(directory))
    draft = build_draft(vllm, hf, vllm.SpeculatorsConfig.extract_vllm_speculative_config(config_json),
                        config.vocab_size, TARGET_LAYERS)
    tensors = load_file(directory / "model.safetensors")
    with torch.no_grad():
        draft.load_weights(iter(tensors.items()))

    # Every parameter vLLM uses was filled (they start as NaN); hidden_norm exists in every vLLM
    # layer but only layer 0 uses it (and only layer 0 has one on disk).
    unfilled = [name for name, p in draft.named_parameters() if p.is_floating_point() and p.isnan().any()]
    assert unfilled == [f"model.layers.{i}.hidden_norm.weight" for i in range(1, config.num_hidden_layers)]
    layer0 = draft.model.layers[0]
    q, k, v = (tensors[f"layers.0.self_attn.{x}_proj.weight"] for x in "qkv")
    assert torch.equal(layer0.self_attn.qkv_proj.weight, torch.cat([q, k, v]))
    assert layer0.self_attn.qkv_proj.weight.shape[1] == 2 * config.hidden_size
    up = tensors["layers.0.mlp.up_proj.weight"]
    assert torch.equal(layer0.mlp.gate_up_proj.weight, torch.cat([tensors["layers.0.mlp.gate_proj.weight"], up]))
    residual = "_norm_before_residual" if config.norm_before_residual else "_norm_after_residual"
    assert layer0._residual_norm.__func__.__name__ == residual

    with torch.no_grad():
        aux = torch.randn(7, config.num_aux_hidden_states * config.target_hidden_size)
        torch.testing.assert_close(draft.combine_hidden_states(aux), model.project_hidden_states(aux), rtol=0,
                                   atol=ATOL)
        hidden = torch.randn(7, config.hidden_size)
        ours = torch.full((7, config.vocab_size), float("-inf"))
        ours[:, model.draft_to_target_ids()] = model.lm_head(hidden)
        torch.testing.assert_close(draft.compute_logits(hidden), ours, rtol=0, atol=ATOL)
        if config.parallel_drafting:  # the proposer projects the flat buffer (llm_base_proposer.py)
            torch.testing.assert_close(draft.combine_hidden_states(draft.mask_hidden.view(-1)),
                                       model.masked_projected_hidden()[0], rtol=0, atol=ATOL)


@pytest.mark.parametrize("saved", [("peagle-fc_norm-aux4-vocab-llama3-norm_output", {})], ids=["fc_norm"],
                         indirect=True)
@pytest.mark.parametrize("damage", ["single-fc_norm-key", "no-layer-config-fc_norm"])
def test_vllm_loader_refuses_what_it_cannot_place(vllm, saved, damage):
    """vLLM's loader raises on a key it has no parameter for, so the acceptance above means
    something. Refused: the single fc_norm.weight earlier peagle_ext wrote, and fc_norm.{i} when
    the layer config does not say fc_norm (vLLM's P-EAGLE converter drops the top-level key, which
    is why we write it into transformer_layer_config too)."""
    model, directory = saved
    config_json = json.loads((directory / "config.json").read_text())
    tensors = load_file(directory / "model.safetensors")
    if damage == "single-fc_norm-key":
        for i in range(model.config.num_aux_hidden_states):
            del tensors[f"fc_norm.{i}.weight"]
        tensors["fc_norm.weight"] = torch.ones(model.config.num_aux_hidden_states * model.config.target_hidden_size)
    else:
        del config_json["transformer_layer_config"]["fc_norm"]
        (directory / "config.json").write_text(json.dumps(config_json))
    hf = vllm.SpeculatorsConfig.from_pretrained(str(directory))
    draft = build_draft(vllm, hf, vllm.SpeculatorsConfig.extract_vllm_speculative_config(config_json),
                        model.config.vocab_size, TARGET_LAYERS)
    with pytest.raises(ValueError, match="There is no module or parameter named 'fc_norm[.']"):
        draft.load_weights(iter(tensors.items()))
