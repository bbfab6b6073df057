"""Checkpoints both ways with speculators 0.9.0, its own code: what speculators saves loads with our
from_pretrained, what we save loads with speculators' from_pretrained (the verifier resolving to a
tiny local directory), and in both cases the logits equal speculators' own forward on the same
inputs (float32, CPU, no_grad: its flex attention has no CPU backward)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from peagle_ext.draft import checkpoint
from peagle_ext.draft.llama import LlamaEagle3DraftModel

from checkpoint_peers import (
    SPECULATORS_VERSION,
    VARIANTS,
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
    write_verifier,
)
from draft_helpers import single_thread  # noqa: F401 (autouse fixture)

# Max |logits difference| per (direction, variant), printed at the end of the module (-s shows it).
MEASURED: dict = {}


@pytest.fixture(scope="module", autouse=True)
def report_measured():
    yield
    print_measured("speculators", MEASURED)


@pytest.fixture(scope="module")
def speculators():
    require("speculators", SPECULATORS_VERSION, "speculators")
    import speculators.models.eagle3.core as eagle3_core
    import speculators.models.peagle.core as peagle_core
    from speculators import SpeculatorModel
    from speculators.config import SpeculatorsConfig, VerifierConfig
    from speculators.losses import resolve_loss_config
    from speculators.models.eagle3 import Eagle3DraftModel, Eagle3SpeculatorConfig
    from speculators.models.peagle import PEagleDraftModel, PEagleSpeculatorConfig
    from speculators.proposals.greedy import GreedyTokenProposalConfig

    return {name: value for name, value in locals().items()}


def speculators_model(spec, config, seed: int = 0):
    """speculators' own draft (P-EAGLE or EAGLE-3) for our config, with random weights."""
    layer = transformers_llama_config(config)
    kind = "peagle" if config.parallel_drafting else "eagle3"
    fields = dict(
        transformer_layer_config=layer, draft_vocab_size=config.draft_vocab_size,
        norm_before_fc=config.norm_before_fc, fc_norm=config.fc_norm, norm_output=config.norm_output,
        norm_before_residual=config.norm_before_residual,
        eagle_aux_hidden_state_layer_ids=config.eagle_aux_hidden_state_layer_ids,
        speculators_config=spec["SpeculatorsConfig"](
            algorithm=kind, default_proposal_method="greedy",
            proposal_methods=[spec["GreedyTokenProposalConfig"](speculative_tokens=config.num_depths)],
            verifier=spec["VerifierConfig"](name_or_path=None, architectures=[]),
        ),
    )
    if config.parallel_drafting:
        model = spec["PEagleDraftModel"](spec["PEagleSpeculatorConfig"](mask_token_id=config.mask_token_id, **fields))
    else:
        model = spec["Eagle3DraftModel"](spec["Eagle3SpeculatorConfig"](**fields))
    randomize_(model, seed)
    if config.draft_vocab_size < config.vocab_size:
        target_ids = draft_vocab(config, seed)
        t2d = torch.zeros(config.vocab_size, dtype=torch.bool)
        t2d[target_ids] = True
        model.load_vocab_mappings(t2d, target_ids - torch.arange(config.draft_vocab_size))
    return model.eval()


@torch.no_grad()
def speculators_logits(spec, model, inputs, monkeypatch) -> torch.Tensor:
    """[N, draft_vocab] logits of speculators' own forward on the flat elements of ``inputs``: the
    P-EAGLE forward with its COD sampler made to return our (anchor, depth); the EAGLE-3 forward's
    first test-time-training step."""
    captured = []
    handle = model.lm_head.register_forward_hook(lambda module, args, output: captured.append(output))
    common = dict(hidden_states=inputs["aux"][None], input_ids=inputs["input_ids"][None],
                  document_ids=inputs["document_ids"][None])
    try:
        if isinstance(model, spec["PEagleDraftModel"]):
            sampled = (inputs["anchor_pos"], inputs["depth"])
            monkeypatch.setattr(spec["peagle_core"], "generate_cod_sample_indices", lambda **kwargs: sampled)
            last_hidden = torch.randn(1, inputs["input_ids"].numel(), model.config.transformer_layer_config.hidden_size)
            model(**common, verifier_last_hidden_states=last_hidden, num_depths=model.config.speculators_config
                  .proposal_methods[0].speculative_tokens, loss_config=spec["resolve_loss_config"]("kl_div", "eager"))
        else:
            model(**common, ttt_steps=1)
    finally:
        handle.remove()
    return captured[0][0]


def _assert_same_weights(ours: LlamaEagle3DraftModel, theirs) -> None:
    """Every tensor of our draft is in speculators' under the same name (no prefix), and no other."""
    saved = {checkpoint.disk_key(name): tensor for name, tensor in ours.state_dict().items()}
    loaded = {name: tensor for name, tensor in theirs.state_dict().items() if not name.startswith("verifier_")}
    assert set(saved) == set(loaded)
    for name, tensor in saved.items():
        assert torch.equal(loaded[name].to(tensor.dtype), tensor), name


@pytest.mark.parametrize("name", VARIANTS)
def test_speculators_checkpoint_loads_with_its_logits(speculators, name, tmp_path, monkeypatch):
    config = variant_config(name)
    theirs = speculators_model(speculators, config)
    theirs.save_pretrained(tmp_path / "draft")
    ours = LlamaEagle3DraftModel.from_pretrained(tmp_path / "draft").eval()
    assert ours.config == variant_config(name, eagle_aux_hidden_state_layer_ids=config.eagle_aux_hidden_state_layer_ids)
    inputs = cod_inputs(config)
    assert_logits_close(our_logits(ours, inputs), speculators_logits(speculators, theirs, inputs, monkeypatch),
                        MEASURED, ("saves, peagle_ext loads", name))


@pytest.mark.parametrize("name", VARIANTS)
def test_our_checkpoint_loads_in_speculators_with_our_logits(speculators, name, tmp_path, monkeypatch):
    config = variant_config(name)
    ours = our_model(config)
    verifier = write_verifier(tmp_path / "verifier", config.hidden_size, config.vocab_size)
    with warnings.catch_warnings():
        warnings.simplefilter("error", checkpoint.InteropWarning)  # nothing is missing for speculators
        ours.save_pretrained(tmp_path / "draft", verifier=verifier)
    theirs = speculators["SpeculatorModel"].from_pretrained(str(tmp_path / "draft")).eval()
    expected_class = speculators["PEagleDraftModel" if config.parallel_drafting else "Eagle3DraftModel"]
    assert type(theirs) is expected_class
    _assert_same_weights(ours, theirs)
    assert theirs.config.speculators_config.verifier.architectures == ["LlamaForCausalLM"]
    layer_ids = config.eagle_aux_hidden_state_layer_ids
    assert theirs.config.eagle_aux_hidden_state_layer_ids == (layer_ids or [2, 4, 5])  # 8-layer verifier defaults
    inputs = cod_inputs(config)
    assert_logits_close(our_logits(ours, inputs), speculators_logits(speculators, theirs, inputs, monkeypatch),
                        MEASURED, ("loads peagle_ext's", name))


def test_save_without_verifier_says_what_speculators_needs(speculators, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no retries for the hub id "None"
    config = variant_config("peagle")
    ours = our_model(config)
    with pytest.warns(checkpoint.InteropWarning) as caught:
        ours.save_pretrained(tmp_path / "draft")
    assert len(caught) == 1 and "speculators_config.verifier.name_or_path" in str(caught[0].message)
    assert set(load_file(tmp_path / "draft" / "model.safetensors")) == {
        checkpoint.disk_key(name) for name in ours.state_dict()}
    # As the message says: speculators cannot load it without a verifier ...
    with pytest.raises((OSError, TypeError, ValueError)):
        speculators["SpeculatorModel"].from_pretrained(str(tmp_path / "draft"))
    # ... and can once config.json names one.
    verifier = write_verifier(tmp_path / "verifier", config.hidden_size, config.vocab_size)
    path = tmp_path / "draft" / "config.json"
    config_json = json.loads(path.read_text())
    config_json["speculators_config"]["verifier"]["name_or_path"] = str(verifier)
    path.write_text(json.dumps(config_json))
    _assert_same_weights(ours, speculators["SpeculatorModel"].from_pretrained(str(tmp_path / "draft")))


def test_train_demo_records_the_verifier_for_speculators(speculators, tmp_path, capsys):
    from peagle_ext.cli import main

    verifier = write_verifier(tmp_path / "verifier", 32, 64)
    args = ["train-demo", "--steps", "1", "--seq-len", "8", "--depths", "2", "--vocab", "64", "--hidden-size", "32",
            "--device", "cpu", "--verifier", str(verifier), "--out", str(tmp_path / "draft")]
    assert main(args) == 0
    assert "note:" not in capsys.readouterr().err  # the demo's target states are 32 wide too: nothing missing
    theirs = speculators["SpeculatorModel"].from_pretrained(str(tmp_path / "draft"))
    assert theirs.config.speculators_config.verifier.name_or_path == str(verifier)
    _assert_same_weights(LlamaEagle3DraftModel.from_pretrained(tmp_path / "draft"), theirs)
    without = [arg for arg in args if arg not in ("--verifier", str(verifier))]
    without[-1] = str(tmp_path / "bare")
    assert main(without) == 0
    err = capsys.readouterr().err
    assert err.count("note:") == 1 and "speculators and vLLM need a draft of a real target" in err
