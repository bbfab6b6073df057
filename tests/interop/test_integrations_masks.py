"""peagle_ext.integrations.enable("speculators") for speculators 0.9.0's EAGLE-3 and DFlash drafts.

Each draft's own training forward and loss run twice on the CPU (fp32, no_grad), with and without
enable(): loss and logits identical, the BlockMasks the same, and while enabled no dense mask is
evaluated (torch's create_mask, which every create_block_mask call goes through, raises).
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.attention.flex_attention as flex
from test_integrations import (
    AUX,
    HIDDEN,
    VOCAB,
    WINDOW,
    DenseMaskEvaluated,
    no_dense_masks,
    record_masks_and_logits,
    require_peer,
)

import peagle_ext
from peagle_ext import integrations

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


@pytest.fixture(autouse=True)
def all_disabled():
    yield
    for name in integrations.TESTED_VERSIONS:
        integrations.disable(name)


# speculators' EAGLE-3 extends its mask per test-time step assuming whole blocks of 128 (its own
# run fails otherwise), so its sequence is a multiple of 128; DFlash's is not.
LENGTHS = {"eagle3": 256, "dflash": 300}
# Two packed documents, then padding or not.
LAYOUTS = {"padded": (100, 120), "unpadded": (100, None)}


def document_ids(layout: str, length: int) -> torch.Tensor:
    first, second = LAYOUTS[layout]
    second = length - first if second is None else second
    return torch.cat([torch.zeros(first), torch.ones(second), torch.full((length - first - second,), -1)]).long()


def layer_config(config_class, window, attn_impl):
    layers = config_class(hidden_size=HIDDEN, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=8, num_hidden_layers=2, vocab_size=VOCAB, max_position_embeddings=2048)
    if window is not None:  # layer 1 attends through the draft's second (sliding-window) mask
        layers.layer_types, layers.sliding_window = ["full_attention", "sliding_attention"], window
    layers._attn_implementation = attn_impl  # read once, in __init__
    return layers


def speculators_config(algorithm):
    from speculators.config import SpeculatorsConfig, VerifierConfig
    from speculators.proposals.greedy import GreedyTokenProposalConfig

    return SpeculatorsConfig(algorithm=algorithm, proposal_methods=[GreedyTokenProposalConfig(speculative_tokens=4)],
                             default_proposal_method="greedy", verifier=VerifierConfig(name_or_path=None,
                                                                                         architectures=[]))


def initialised(model):
    torch.manual_seed(0)
    with torch.no_grad():  # speculators leaves these uninitialised (they come from the verifier)
        for name in ("lm_head", "embed_tokens", "verifier_lm_head"):
            module = getattr(model, name, None)
            if module is not None and getattr(module, "weight", None) is not None:
                module.weight.normal_()
    return model.eval()


def eagle3_draft(window=None, attn_impl="simple_flex_attention"):
    from speculators.models.eagle3 import Eagle3DraftModel, Eagle3SpeculatorConfig
    from transformers import LlamaConfig

    torch.manual_seed(0)
    config = Eagle3SpeculatorConfig(transformer_layer_config=layer_config(LlamaConfig, window, attn_impl),
                                    draft_vocab_size=VOCAB, speculators_config=speculators_config("eagle3"))
    return initialised(Eagle3DraftModel(config))


def dflash_draft(window=None, non_causal=False, attn_impl="simple_flex_attention"):
    from speculators.models.dflash import DFlashDraftModel, DFlashSpeculatorConfig
    from transformers import Qwen3Config

    torch.manual_seed(0)
    config = DFlashSpeculatorConfig(transformer_layer_config=layer_config(Qwen3Config, window, attn_impl),
                                    draft_vocab_size=VOCAB, block_size=4, mask_token_id=VOCAB - 1,
                                    aux_hidden_state_layer_ids=[0, 1, 2], sliding_window_non_causal=non_causal,
                                    speculators_config=speculators_config("dflash"))
    return initialised(DFlashDraftModel(config))


def training_step(model, layout, **extra) -> dict:
    """One training forward of the peer (seeded): its loss, the masks its layers got, the logits."""
    from speculators.losses import resolve_loss_config

    g = torch.Generator().manual_seed(1)
    length = LENGTHS["eagle3" if "ttt_steps" in extra else "dflash"]
    docs = document_ids(layout, length)
    batch = dict(hidden_states=torch.randn(1, length, AUX * HIDDEN, generator=g),
                 input_ids=torch.randint(0, VOCAB - 1, (1, length), generator=g), document_ids=docs[None],
                 loss_mask=(docs >= 0).float()[None],
                 verifier_last_hidden_states=torch.randn(1, length, HIDDEN, generator=g),
                 loss_config=resolve_loss_config("kl_div", "eager"), **extra)
    record, remove = record_masks_and_logits(model.layers, model.lm_head)
    torch.manual_seed(2)
    try:
        with torch.no_grad():
            record["loss"] = model(**batch)[1]
    finally:
        remove()
    return record


def assert_same_run(ours: dict, own: dict) -> None:
    assert torch.equal(ours["loss"], own["loss"]), (ours["loss"], own["loss"])
    assert len(ours["logits"]) == len(own["logits"]) > 0
    for a, b in zip(ours["logits"], own["logits"]):
        assert torch.equal(a, b)
    assert len(ours["masks"]) == len(own["masks"]) > 0
    for a, b in zip(ours["masks"], own["masks"]):
        peagle_ext.assert_block_masks_equal(a, b)


DRAFTS = {
    "eagle3": (eagle3_draft, dict(ttt_steps=3)),
    "dflash": (dflash_draft, dict(max_anchors=24)),
}


@pytest.mark.parametrize("layout", ["padded", "unpadded"])
@pytest.mark.parametrize("window", [None, WINDOW])
@pytest.mark.parametrize("draft", sorted(DRAFTS))
def test_loss_unchanged_and_no_dense_mask(draft, window, layout):
    require_peer("speculators")
    make, extra = DRAFTS[draft]
    model = make(window=window)
    own = training_step(model, layout, **extra)
    integrations.enable("speculators")
    with no_dense_masks():
        ours = training_step(model, layout, **extra)
    assert_same_run(ours, own)
    integrations.disable("speculators")
    with no_dense_masks(), pytest.raises(DenseMaskEvaluated):  # the guard is real: theirs is dense
        training_step(model, layout, **extra)


def test_dflash_non_causal_window():
    require_peer("speculators")
    model = dflash_draft(window=WINDOW, non_causal=True)
    own = training_step(model, "padded", max_anchors=24)
    integrations.enable("speculators")
    with no_dense_masks():
        ours = training_step(model, "padded", max_anchors=24)
    assert_same_run(ours, own)


@pytest.mark.parametrize("draft", sorted(DRAFTS))
def test_dense_attention_keeps_its_own_masks(draft):
    """sdpa adds a dense mask to the scores: such drafts keep speculators' own builder."""
    require_peer("speculators")
    make, extra = DRAFTS[draft]
    model = make(attn_impl="sdpa")
    own = training_step(model, "unpadded", **extra)
    integrations.enable("speculators")
    ours = training_step(model, "unpadded", **extra)
    assert torch.equal(ours["loss"], own["loss"])


def test_enable_disable_restore_exactly():
    require_peer("speculators")
    eagle3_core = importlib.import_module("speculators.models.eagle3.core")
    dflash_core = importlib.import_module("speculators.models.dflash.core")
    originals = (vars(eagle3_core.Eagle3DraftModel)["_build_attn_mask"],
                 vars(dflash_core.DFlashDraftModel)["_create_attention_mask"])
    integrations.enable("speculators")
    patched = (vars(eagle3_core.Eagle3DraftModel)["_build_attn_mask"],
               vars(dflash_core.DFlashDraftModel)["_create_attention_mask"])
    assert patched[0] is not originals[0] and patched[1] is not originals[1]
    integrations.disable("speculators")
    assert (vars(eagle3_core.Eagle3DraftModel)["_build_attn_mask"],
            vars(dflash_core.DFlashDraftModel)["_create_attention_mask"]) == originals
    assert flex.create_mask is not None
