"""Weights both ways with NeMo Automodel 0.7.0's own LlamaEagle3DraftModel (its module names are
ours, ``model.`` prefix included): our state dict loads strictly into Automodel's draft and
Automodel's into ours, and the logits of Automodel's own P-EAGLE path (its projection, mask_hidden,
BlockMask and forward_peagle) equal ours (float32, CPU, no_grad). Automodel has no norm_before_fc
and no norm_before_residual, so the variants here are those it has."""

from __future__ import annotations

import pytest
import torch

from peagle_ext.draft.llama import Eagle3DraftConfig, LlamaEagle3DraftModel

from checkpoint_peers import (
    AUTOMODEL_VERSION,
    LLAMA3,
    YARN,
    assert_logits_close,
    cod_inputs,
    draft_vocab,
    our_logits,
    our_model,
    print_measured,
    randomize_,
    require,
    transformers_llama_config,
    variant_config,
)
from draft_helpers import single_thread  # noqa: F401 (autouse fixture)

MEASURED: dict = {}

# Automodel's parallel_drafting drafts: the P-EAGLE options it shares with us, and a target hidden
# size unlike the draft's (it reads target_hidden_size, as vLLM does).
VARIANTS = {
    "peagle": {},
    "fc_norm-aux4-target16-vocab-llama3-norm_output-3layers": dict(
        fc_norm=True, eagle_aux_hidden_state_layer_ids=[1, 3, 5, 7], target_hidden_size=16, draft_vocab_size=40,
        rope_scaling=LLAMA3, norm_output=True, num_hidden_layers=3),
    "aux1-yarn-bias": dict(num_aux_hidden_states=1, rope_scaling=YARN, attention_bias=True, mlp_bias=True),
}


@pytest.fixture(scope="module", autouse=True)
def report_measured():
    yield
    print_measured("automodel", MEASURED)


@pytest.fixture(scope="module")
def draft_llama():
    return require("nemo_automodel", AUTOMODEL_VERSION, "nemo_automodel.components.speculative.eagle.draft_llama")


def automodel_draft(draft_llama, config: Eagle3DraftConfig):
    """Automodel's draft for our config: an HF LlamaConfig plus the attributes its recipe sets."""
    hf = transformers_llama_config(config)
    for name in ("parallel_drafting", "num_aux_hidden_states", "target_hidden_size", "draft_vocab_size", "fc_norm",
                 "norm_output", "mask_token_id", "num_depths"):
        setattr(hf, name, getattr(config, name))
    hf.attn_implementation = "eager"
    return draft_llama.LlamaEagle3DraftModel(hf).float().eval()  # its RMSNorms are created in bfloat16


@torch.no_grad()
def automodel_logits(model, inputs) -> torch.Tensor:
    """[N, draft_vocab] logits from Automodel's own P-EAGLE path, as its trainer builds the inputs."""
    anchor_pos, depth = inputs["anchor_pos"], inputs["depth"]
    real = depth == 0
    ids = torch.where(real, inputs["input_ids"][anchor_pos], torch.full_like(anchor_pos, model.config.mask_token_id))
    projected = model.project_hidden_states(inputs["aux"])[anchor_pos]
    projected = torch.where(real[:, None], projected, model.masked_projected_hidden())
    seq_len = inputs["input_ids"].numel()
    block_mask = model.build_peagle_block_mask(anchor_pos=anchor_pos, depth=depth, lengths=inputs["lengths"],
                                               total_seq_len=seq_len)
    hidden = model.forward_peagle(ids[None], projected[None], (anchor_pos + depth)[None], block_mask)
    return model.compute_logits(hidden)[0]


@pytest.mark.parametrize("name", VARIANTS)
def test_weights_both_ways_with_equal_logits(draft_llama, name):
    config = variant_config("peagle", **VARIANTS[name])
    inputs = cod_inputs(config)

    ours = our_model(config, seed=0)
    theirs = automodel_draft(draft_llama, config)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    assert_logits_close(our_logits(ours, inputs), automodel_logits(theirs, inputs), MEASURED,
                        ("loads peagle_ext's", name))

    randomize_(theirs, seed=1)
    if hasattr(theirs, "d2t"):
        theirs.set_vocab_mapping(draft_vocab(config, seed=1))
    ours = LlamaEagle3DraftModel(config).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert_logits_close(our_logits(ours, inputs), automodel_logits(theirs, inputs), MEASURED,
                        ("weights, peagle_ext loads", name))
