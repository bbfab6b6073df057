"""speculators 0.9.0's P-EAGLE data helpers mixed with ours, as a user would mix them: its COD
sampler and ours give the same layout from one RNG state (called as its PEagleDraftModel.forward
calls it); either sampler's layout gives the same BlockMask through ours (build_block_mask) and
through its mask_mod with create_block_mask; ours in place of its sampler inside its own training
forward leaves the loss unchanged. The one case the two samplers differ in (a supervised position 0,
which speculators lets start a chain at anchor -1) is refused by our mask builder by name."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import create_block_mask

import peagle_ext

from checkpoint_peers import SPECULATORS_VERSION, require

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


@pytest.fixture(scope="module")
def speculators():
    """speculators' P-EAGLE data, mask and model modules (skips, saying why, without speculators 0.9.0)."""
    return {name: require("speculators", SPECULATORS_VERSION, "speculators.models.peagle." + name)
            for name in ("data", "attention", "core")}


def loss_mask_for(seq_len: int, density: float, seed: int, first_supervised: bool) -> torch.Tensor:
    """[1, S] float, the form speculators' forward passes."""
    mask = (torch.rand(1, seq_len, generator=torch.Generator().manual_seed(seed)) < density).float()
    mask[0, 0] = float(first_supervised)
    return mask


def sample_both(speculators, seed, **kwargs):
    torch.manual_seed(seed)
    ours = peagle_ext.generate_cod_sample_indices(**kwargs)
    torch.manual_seed(seed)
    theirs = speculators["data"].generate_cod_sample_indices(**kwargs)
    return ours, theirs


@given(seed=st.integers(0, 2**31 - 1), seq_len=st.integers(1, 80), density=st.floats(0.0, 1.0),
       first_supervised=st.booleans(), num_depths=st.integers(1, 10), ratio=st.floats(0.05, 1.0),
       ratio_min=st.floats(0.0, 1.0), filter_position_zero=st.booleans(),
       max_anchors=st.one_of(st.none(), st.integers(0, 60)))
def test_cod_sampler_equals_speculators(speculators, seed, seq_len, density, first_supervised, num_depths, ratio,
                                        ratio_min, filter_position_zero, max_anchors):
    """Equal wherever the meanings agree: position 0 unsupervised, or filter_position_zero=False."""
    if first_supervised and filter_position_zero:
        first_supervised = False  # the case of the next test
    ours, theirs = sample_both(
        speculators, seed, seq_length=seq_len, loss_mask=loss_mask_for(seq_len, density, seed, first_supervised),
        num_depths=num_depths, down_sample_ratio=ratio, down_sample_ratio_min=ratio_min,
        filter_position_zero=filter_position_zero, max_anchors=max_anchors)
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])


def test_supervised_position_zero_starts_no_chain_before_the_sequence(speculators):
    """speculators keeps a supervised position 0 in depth 1's pool (anchor -1, whose document its
    mask_mod reads as document_ids[-1]); ours keeps it out, as NeMo Automodel does, and our mask
    builder refuses speculators' layout by name."""
    draws = [sample_both(speculators, seed, seq_length=32, loss_mask=torch.ones(1, 32), down_sample_ratio=0.95)
             for seed in range(8)]
    assert all(int(ours[0].min()) == 0 for ours, _ in draws)
    theirs = next(theirs for _, theirs in draws if int(theirs[0].min()) == -1)
    with pytest.raises(ValueError, match="anchor_pos must be non-negative"):
        peagle_ext.build_block_mask(*theirs, document_ids=torch.zeros(32, dtype=torch.long))


@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("sampler", ["ours", "speculators'"])
def test_either_layout_gives_the_same_block_mask_through_either_mask(speculators, sampler, window):
    seq_len = 150
    document_ids = torch.cat([torch.zeros(60), torch.ones(70), torch.full((20,), -1)]).long()
    loss_mask = (document_ids >= 0).float()[None]
    loss_mask[0, 0] = 0  # the first token predicts nothing
    sample = {"ours": peagle_ext.generate_cod_sample_indices,
              "speculators'": speculators["data"].generate_cod_sample_indices}[sampler]
    torch.manual_seed(3)
    anchor_pos, depth = sample(seq_length=seq_len, loss_mask=loss_mask, num_depths=6)
    mask_mod = speculators["attention"].create_peagle_mask_mod(anchor_pos=anchor_pos, depth=depth,
                                                               document_ids=document_ids, sliding_window=window)
    theirs = create_block_mask(mask_mod, None, None, anchor_pos.numel(), anchor_pos.numel(), device="cpu")
    ours = peagle_ext.build_block_mask(anchor_pos, depth, document_ids=document_ids, sliding_window=window)
    peagle_ext.assert_block_masks_equal(ours, theirs)
    # Our mask_mod called as speculators' model calls its own (keywords) describes the same blocks.
    our_mod = peagle_ext.create_peagle_mask_mod(anchor_pos=anchor_pos, depth=depth, document_ids=document_ids,
                                                sliding_window=window)
    peagle_ext.assert_block_masks_equal(
        create_block_mask(our_mod, None, None, anchor_pos.numel(), anchor_pos.numel(), device="cpu"), theirs)


def test_our_sampler_inside_speculators_forward(speculators, monkeypatch):
    """A user's swap of speculators' sampler for ours: its P-EAGLE training loss is unchanged."""
    from speculators.losses import resolve_loss_config
    from test_integrations import AUX, HIDDEN, VOCAB, speculators_draft

    model = speculators_draft()
    seq_len = 96
    g = torch.Generator().manual_seed(1)
    document_ids = torch.cat([torch.zeros(40), torch.ones(50), torch.full((6,), -1)]).long()
    loss_mask = (document_ids >= 0).float()
    loss_mask[0] = 0
    batch = dict(hidden_states=torch.randn(1, seq_len, AUX * HIDDEN, generator=g),
                 input_ids=torch.randint(0, VOCAB - 1, (1, seq_len), generator=g), document_ids=document_ids[None],
                 loss_mask=loss_mask[None], verifier_last_hidden_states=torch.randn(1, seq_len, HIDDEN, generator=g),
                 num_depths=6, max_anchors=30, loss_config=resolve_loss_config("kl_div", "eager"))

    def loss():
        torch.manual_seed(4)
        with torch.no_grad():
            return model(**batch)[1]

    own = loss()
    calls = []

    def ours(**kwargs):
        calls.append(sorted(kwargs))
        return peagle_ext.generate_cod_sample_indices(**kwargs)

    monkeypatch.setattr(speculators["core"], "generate_cod_sample_indices", ours)
    assert torch.equal(loss(), own)
    assert calls == [["down_sample_ratio", "down_sample_ratio_min", "loss_mask", "max_anchors", "num_depths",
                      "seq_length"]]
