"""Code written for NeMo Automodel 0.7.0's P-EAGLE module, run against peagle_ext with only its
imports changed: drafts built from a transformers LlamaConfig with the attributes Automodel's
recipe sets, Automodel's own PEagleTrainerModule training them on the CPU (flat and partitioned,
with and without activation checkpointing), its COD sampler's call pattern, and checkpoints. The
oracle is Automodel's own code: its draft with the same weights gives the same loss, its sampler
under the same RNG state gives the same layout."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file

import peagle_ext
from peagle_ext.draft.llama import Eagle3LlamaDecoderLayer, Eagle3LlamaPeagleLayer, LlamaEagle3DraftModel

from checkpoint_peers import AUTOMODEL_VERSION, require
from draft_helpers import single_thread  # noqa: F401 (autouse fixture)

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
pytest.importorskip("transformers",
                    reason="the drafts' configs are transformers LlamaConfigs (pip install '.[interop]')")

MASK_ID = 20  # outside [0, draft_vocab_size), where the batches' real tokens are drawn
DRAFT_VOCAB = 16
ABSENT = object()


@pytest.fixture(scope="module")
def automodel():
    """Automodel's draft, trainer and COD modules (skips, saying why, without nemo_automodel 0.7.0)."""
    eagle = "nemo_automodel.components.speculative.eagle."
    return {name: require("nemo_automodel", AUTOMODEL_VERSION, eagle + name)
            for name in ("draft_llama", "peagle_trainer", "peagle_data")}


def llama_config(**attributes):
    """A transformers LlamaConfig with P-EAGLE attributes set on it, as Automodel's recipe and its
    tests build a draft's config (``ABSENT`` leaves an attribute unset)."""
    from transformers import LlamaConfig

    attributes = dict(attributes)
    layer = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=64)
    config = LlamaConfig(**{**layer, **attributes.pop("layer", {})})
    recipe = dict(torch_dtype=torch.float32, draft_vocab_size=DRAFT_VOCAB, target_hidden_size=32,
                  parallel_drafting=True, mask_token_id=MASK_ID, num_depths=8, attn_implementation="eager")
    for name, value in {**recipe, **attributes}.items():
        if value is not ABSENT:
            setattr(config, name, value)
    return config


def trainer_for(automodel, draft, num_depths=4, sequence_partitions=1):
    vocab = draft.config.vocab_size
    selected = torch.arange(draft.draft_vocab_size)
    in_vocab = torch.zeros(vocab, dtype=torch.bool)
    in_vocab[selected] = True
    return automodel["peagle_trainer"].PEagleTrainerModule(
        draft, selected_token_ids=selected, selected_token_mask=in_vocab, num_depths=num_depths,
        mask_token_id=MASK_ID, sequence_partitions=sequence_partitions)


def batch_for(config, batch_size=2, seq_len=12, seed=0, padded=True) -> dict:
    """Automodel's trainer inputs; the second row padded after 8 positions when ``padded``."""
    g = torch.Generator().manual_seed(seed)
    width = getattr(config, "num_aux_hidden_states", 3) * getattr(config, "target_hidden_size", config.hidden_size)
    attention_mask = torch.ones(batch_size, seq_len, dtype=torch.long)
    if padded and batch_size > 1:
        attention_mask[1, 8:] = 0
    return {
        "input_ids": torch.randint(0, DRAFT_VOCAB, (batch_size, seq_len), generator=g),
        "attention_mask": attention_mask,
        "loss_mask": attention_mask.clone(),
        "aux_hidden_states": torch.randn(batch_size, seq_len, width, generator=g),
        "target_logits": torch.randn(batch_size, seq_len, config.vocab_size, generator=g),
    }


def seeded_loss(trainer, batch, seed=123, **kwargs):
    torch.manual_seed(seed)  # the trainer's COD sampling is its only draw
    return trainer(**batch, **kwargs).loss


# The configs of the drop-in check: Automodel's recipe, every option absent, EAGLE-3, and options set.
CONFIGS = {
    "recipe": {},
    "every option absent": dict(draft_vocab_size=ABSENT, target_hidden_size=ABSENT, mask_token_id=ABSENT,
                                num_depths=ABSENT, torch_dtype=ABSENT, attn_implementation=ABSENT),
    "eagle3": dict(parallel_drafting=False),
    "fc_norm-norm_output-aux1-bias-llama3": dict(
        fc_norm=True, norm_output=True, num_aux_hidden_states=1, layer=dict(
            attention_bias=True, mlp_bias=True, rope_parameters={
                "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "yarn-aux4-target24-pad-3layers": dict(
        num_aux_hidden_states=4, target_hidden_size=24, layer=dict(
            num_hidden_layers=3, pad_token_id=3, rope_parameters={
                "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16})),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_same_draft_as_automodels_from_the_same_config(automodel, name):
    """Same layers, attributes, parameter names and shapes as Automodel's draft; with its weights,
    the same loss from its trainer."""
    config = llama_config(**CONFIGS[name])
    torch.manual_seed(0)
    theirs = automodel["draft_llama"].LlamaEagle3DraftModel(config).float()
    ours = LlamaEagle3DraftModel(config)

    assert ours.config is config
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    for attribute in ("target_hidden_size", "draft_vocab_size", "has_vocab_compression"):
        assert getattr(ours, attribute) == getattr(theirs, attribute), attribute
    assert ([type(layer).__name__ for layer in ours.model.layers]
            == [type(layer).__name__ for layer in theirs.model.layers])
    for mine, their in zip(ours.model.layers, theirs.model.layers):
        assert (mine.layer_id, mine.self_attn.fuse_input) == (their.layer_id, their.self_attn.fuse_input)
        assert mine.self_attn.head_dim == their.self_attn.head_dim
    assert ours.model.layers[0].is_input_layer is theirs.model.layers[0].is_input_layer is True
    assert ours.model.embed_tokens.padding_idx == theirs.model.embed_tokens.padding_idx
    assert hasattr(ours, "mask_hidden") == hasattr(theirs, "mask_hidden")
    if not hasattr(theirs, "mask_hidden"):
        with pytest.raises(ValueError, match="mask_hidden"):
            trainer_for(automodel, ours)
        return

    ours.load_state_dict(theirs.state_dict(), strict=True)
    batch = batch_for(config)
    with torch.no_grad():
        torch.testing.assert_close(seeded_loss(trainer_for(automodel, ours), batch),
                                   seeded_loss(trainer_for(automodel, theirs), batch), rtol=0, atol=1e-5)


def test_layers_from_a_llama_config_alone():
    """Each host class takes the config by itself, with Automodel's constructor arguments."""
    config = llama_config()
    first, deep = Eagle3LlamaDecoderLayer(config), Eagle3LlamaPeagleLayer(config, layer_id=1)
    assert first.self_attn.q_proj.in_features == 64 and deep.self_attn.q_proj.in_features == 32
    assert first.self_attn.q_proj.out_features == 4 * 16  # head_dim from the config, not hidden / heads
    assert (first.layer_id, deep.layer_id, first.is_input_layer) == (0, 1, True)


@pytest.mark.parametrize(("attribute", "value", "message"), [
    ("hidden_act", "gelu", "hidden_act 'gelu' is not supported"),
    ("partial_rotary_factor", 0.5, "partial_rotary_factor 0.5 is not supported"),
    ("fc_norm", "yes", "field 'fc_norm' must be bool"),
    ("num_depths", 0, r"field 'num_depths' must be in \[1, 2\*\*31 - 1\]"),
    ("pad_token_id", 500, "pad_token_id must be None or an int in"),
])
def test_what_cannot_be_built_is_refused_by_name(attribute, value, message):
    config = llama_config()
    setattr(config, attribute, value)
    with pytest.raises((TypeError, ValueError), match=message):
        LlamaEagle3DraftModel(config)


def test_a_config_without_the_llama_fields_is_refused_by_name():
    from types import SimpleNamespace

    with pytest.raises(ValueError, match="lacks the Llama field.*intermediate_size"):
        LlamaEagle3DraftModel(SimpleNamespace(hidden_size=32, num_attention_heads=4, vocab_size=64, rms_norm_eps=1e-5))


def test_automodels_trainer_trains_our_draft_on_the_cpu(automodel):
    config = llama_config(layer=dict(pad_token_id=3))
    torch.manual_seed(0)
    draft = LlamaEagle3DraftModel(config)
    trainer = trainer_for(automodel, draft)
    batch = batch_for(config, batch_size=1, seq_len=16)
    optimizer = torch.optim.AdamW([p for p in trainer.parameters() if p.requires_grad], lr=1e-2)

    losses = []
    for step in range(12):
        optimizer.zero_grad(set_to_none=True)
        metrics = trainer(**batch)
        metrics.loss.backward()
        if step == 0:
            grad = draft.mask_hidden.grad
            assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in draft.model.layers[1].parameters())
            assert not draft.model.embed_tokens.weight.grad[3].any()  # the padding row, as in Automodel
            assert 0.0 <= metrics.accuracy.item() <= 1.0 and metrics.valid_tokens.item() > 0
        optimizer.step()
        losses.append(metrics.loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_one_depth_leaves_mask_hidden_untrained(automodel):
    draft = LlamaEagle3DraftModel(llama_config())
    trainer_for(automodel, draft, num_depths=1)(**batch_for(draft.config)).loss.backward()
    assert draft.mask_hidden.grad is None or not draft.mask_hidden.grad.any()


def test_masked_slots_get_the_mask_token_and_projected_mask_hidden(automodel):
    draft = LlamaEagle3DraftModel(llama_config())
    trainer = trainer_for(automodel, draft)
    seen = {}
    forward_peagle = draft.forward_peagle

    def recording(**kwargs):
        seen.update(kwargs)
        return forward_peagle(**kwargs)

    draft.forward_peagle = recording
    trainer(**batch_for(draft.config, batch_size=1))
    masked = seen["sampled_input_ids"][0] == MASK_ID
    assert masked.any()
    expected = draft.masked_projected_hidden()[0].expand(int(masked.sum()), -1)
    torch.testing.assert_close(seen["sampled_projected_hidden"][0][masked], expected)


def _owned_and_segments(plan, row):
    units = [unit for unit in plan.units if unit[0] == row]
    owned = [(a, d) for _b, anchors, depths, _o, loss in units
             for a, d in zip(anchors[loss].tolist(), depths[loss].tolist())]
    return owned, [list(zip(anchors.tolist(), depths.tolist())) for _b, anchors, depths, _o, _l in units]


def test_partitioned_plan_charges_every_supervised_token_once(automodel):
    """Each row's plan, built by Automodel's trainer, is our cod_segments of the layout our sampler
    draws from the same RNG state; every supervised element is charged in exactly one segment."""
    config = llama_config()
    trainer = trainer_for(automodel, LlamaEagle3DraftModel(config), num_depths=6, sequence_partitions=4)
    loss_mask = batch_for(config, seq_len=16)["loss_mask"]
    torch.manual_seed(5)
    plan = trainer.build_peagle_plan(loss_mask)
    torch.manual_seed(5)
    layouts = [peagle_ext.generate_cod_sample_indices(16, loss_mask[row:row + 1], 6) for row in range(2)]

    charged = 0
    for row, (anchor_pos, depth) in enumerate(layouts):
        owned, segments = _owned_and_segments(plan, row)
        supervised = loss_mask[row, anchor_pos + depth].bool()
        assert sorted(owned) == sorted(zip(anchor_pos[supervised].tolist(), depth[supervised].tolist()))
        ours = [list(zip(anchor_pos[elements].tolist(), depth[elements].tolist()))
                for elements, _own in peagle_ext.cod_segments(anchor_pos, depth, 16, 4) if elements.numel()]
        assert segments == ours
        charged += len(owned)
    assert charged == int(plan.total_den) > 0


def _loss_and_grads(draft, run):
    draft.zero_grad(set_to_none=True)
    loss = run()
    return loss.detach(), {n: p.grad.clone() for n, p in draft.named_parameters() if p.grad is not None}


def _assert_same_step(first, second):
    torch.testing.assert_close(first[0], second[0], rtol=1e-4, atol=1e-6)
    assert first[1].keys() == second[1].keys() and first[1]
    for name in first[1]:
        torch.testing.assert_close(first[1][name], second[1][name], rtol=1e-3, atol=1e-6, msg=name)


def test_partitioned_steps_equal_the_flat_step(automodel):
    """Automodel's recipe loop (plan, then one forward and backward per segment) gives the flat
    step's loss and gradients."""
    draft = LlamaEagle3DraftModel(llama_config())
    flat, partitioned = (trainer_for(automodel, draft, num_depths=6, sequence_partitions=k) for k in (1, 4))
    batch = batch_for(draft.config, seq_len=16)

    def flat_step():
        loss = seeded_loss(flat, batch)
        loss.backward()
        return loss

    def partitioned_step():
        torch.manual_seed(123)
        plan = partitioned.build_peagle_plan(batch["loss_mask"])
        total = torch.zeros(())
        for unit in range(len(plan.units)):
            loss = partitioned(**batch, peagle_segment=(plan, unit)).loss
            loss.backward()
            total = total + loss.detach()
        return total

    _assert_same_step(_loss_and_grads(draft, flat_step), _loss_and_grads(draft, partitioned_step))


def test_gradient_checkpointing_gives_the_same_step(automodel):
    draft = LlamaEagle3DraftModel(llama_config())
    trainer = trainer_for(automodel, draft, num_depths=6)
    batch = batch_for(draft.config, seq_len=16)

    def step():
        loss = seeded_loss(trainer, batch)
        loss.backward()
        return loss

    assert draft.gradient_checkpointing is False
    plain = _loss_and_grads(draft, step)
    draft.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    assert draft.gradient_checkpointing is True
    _assert_same_step(plain, _loss_and_grads(draft, step))
    draft.gradient_checkpointing_disable()
    assert draft.gradient_checkpointing is False


def test_run_draft_layer_takes_the_layer_arguments_directly():
    """``_run_draft_layer(fn, *args, **kwargs)`` recomputes only when checkpointing and training."""
    draft = LlamaEagle3DraftModel(llama_config())
    linear = torch.nn.Linear(4, 4)
    calls = []

    def layer(x, scale=1.0):
        calls.append(1)
        return linear(x) * scale

    x = torch.randn(2, 4)
    results = {}
    for enabled, training in ((False, True), (True, True), (True, False)):
        draft.gradient_checkpointing, calls[:] = enabled, []
        draft.train(training)
        leaf = x.clone().requires_grad_(True)
        out = draft._run_draft_layer(layer, leaf, scale=2.0)
        out.sum().backward()
        results[enabled, training] = (len(calls), out.detach(), leaf.grad)
    assert [count for count, _, _ in results.values()] == [1, 2, 1]
    for _count, out, grad in results.values():
        torch.testing.assert_close(out, results[False, True][1])
        torch.testing.assert_close(grad, results[False, True][2])


def test_forward_peagle_runs_every_layer_through_the_helper(monkeypatch):
    """Layer forwards replaced on the instances, as Automodel's test does: both layers run through
    ``_run_draft_layer`` (twice each under checkpointing), the first with keyword arguments."""
    draft = LlamaEagle3DraftModel(llama_config()).train()
    draft.gradient_checkpointing_enable()
    calls = []

    def stub(index, linear):
        def forward_peagle(*args, **kwargs):
            calls.append((index, sorted(kwargs)))
            return linear(kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])
        return forward_peagle

    for index, layer in enumerate(draft.model.layers):
        monkeypatch.setattr(layer, "forward_peagle", stub(index, torch.nn.Linear(32, 32)))
    hidden = torch.randn(1, 5, 32, requires_grad=True)
    draft.forward_peagle(torch.zeros(1, 5, dtype=torch.long), hidden, torch.arange(5)[None],
                         block_mask=None).sum().backward()
    first = (0, ["block_mask", "hidden_states", "input_embeds", "position_ids"])
    assert calls.count(first) == 2 and calls.count((1, ["block_mask"])) == 2


def test_checkpoints_round_trip(automodel, tmp_path):
    """A draft trained by Automodel's trainer: the trainer's state dict into a fresh trainer, the
    draft through save_pretrained/from_pretrained, and its weights into Automodel's own draft all
    give the same loss."""
    config = llama_config()
    torch.manual_seed(0)
    draft = LlamaEagle3DraftModel(config)
    trainer = trainer_for(automodel, draft)
    batch = batch_for(config)
    optimizer = torch.optim.AdamW(trainer.parameters(), lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        trainer(**batch).loss.backward()
        optimizer.step()
    with torch.no_grad():
        expected = seeded_loss(trainer, batch)

        torch.save(trainer.state_dict(), tmp_path / "trainer.pt")
        fresh = trainer_for(automodel, LlamaEagle3DraftModel(config))
        fresh.load_state_dict(torch.load(tmp_path / "trainer.pt"), strict=True)
        assert torch.equal(seeded_loss(fresh, batch), expected)

        # Built from a LlamaConfig, the draft saves Automodel's layout by default; speculators' on request.
        draft.save_pretrained(tmp_path / "automodel")
        saved = json.loads((tmp_path / "automodel" / "config.json").read_text())
        assert (saved["parallel_drafting"], saved["mask_token_id"]) == (True, MASK_ID)
        draft.save_pretrained(tmp_path / "speculators", verifier="meta-llama/Llama-3.1-8B", layout="speculators")
        saved = json.loads((tmp_path / "speculators" / "config.json").read_text())
        assert (saved["speculators_model_type"], saved["mask_token_id"]) == ("peagle", MASK_ID)
        for layout in ("automodel", "speculators"):
            assert load_file(tmp_path / layout / "model.safetensors")["mask_hidden"].shape == (1, 1, 3 * 32)
            loaded = LlamaEagle3DraftModel.from_pretrained(tmp_path / layout)
            assert torch.equal(seeded_loss(trainer_for(automodel, loaded), batch), expected)

        theirs = automodel["draft_llama"].LlamaEagle3DraftModel(config).float()
        theirs.load_state_dict(draft.state_dict(), strict=True)
        torch.testing.assert_close(seeded_loss(trainer_for(automodel, theirs), batch), expected, rtol=0, atol=1e-5)


def test_checkpoints_in_automodels_layout_load_both_ways(automodel, tmp_path):
    """A checkpoint Automodel's own draft saves (transformers' save_pretrained) loads into ours, and
    ours saved in Automodel's layout loads into Automodel's draft: the same weights, the same loss."""
    config = llama_config(fc_norm=True, layer=dict(pad_token_id=3))
    torch.manual_seed(0)
    theirs = automodel["draft_llama"].LlamaEagle3DraftModel(config).float()
    with torch.no_grad():
        for parameter in theirs.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    theirs.save_pretrained(tmp_path / "theirs")
    ours = LlamaEagle3DraftModel.from_pretrained(tmp_path / "theirs")
    for name, tensor in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[name], tensor), name
    batch = batch_for(config)
    with torch.no_grad():
        expected = seeded_loss(trainer_for(automodel, theirs), batch)
        torch.testing.assert_close(seeded_loss(trainer_for(automodel, ours), batch), expected, rtol=0, atol=1e-5)

    from transformers import LlamaConfig

    ours.save_pretrained(tmp_path / "ours", layout="automodel")
    # Automodel's draft class names no config class: its config is read as the LlamaConfig it is.
    back = type(theirs).from_pretrained(tmp_path / "ours", config=LlamaConfig.from_pretrained(tmp_path / "ours"),
                                        dtype=torch.float32)
    for name, tensor in ours.state_dict().items():  # Automodel makes its RMSNorms in bfloat16, whatever dtype
        loaded = back.state_dict()[name]
        assert torch.equal(loaded, tensor.to(loaded.dtype)), name


@given(seed=st.integers(0, 2**31 - 1), seq_len=st.integers(1, 80), density=st.floats(0.0, 1.0),
       first_supervised=st.booleans(), num_depths=st.integers(1, 10), ratio=st.floats(0.05, 1.0),
       ratio_min=st.floats(0.0, 1.0), filter_position_zero=st.booleans(),
       form=st.sampled_from(["[1, S] long", "[S] float", "[1, S] bool"]))
def test_cod_sampler_equals_automodels(automodel, seed, seq_len, density, first_supervised, num_depths, ratio,
                                       ratio_min, filter_position_zero, form):
    """Called as Automodel's trainer calls it (keywords, a [1, S] row), from the same RNG state."""
    mask = torch.rand(1, seq_len, generator=torch.Generator().manual_seed(seed)) < density
    mask[0, 0] = first_supervised
    loss_mask = {"[1, S] long": mask.long(), "[S] float": mask[0].float(), "[1, S] bool": mask}[form]
    kwargs = dict(seq_length=seq_len, loss_mask=loss_mask, num_depths=num_depths, down_sample_ratio=ratio,
                  down_sample_ratio_min=ratio_min, filter_position_zero=filter_position_zero)
    torch.manual_seed(seed)
    ours = peagle_ext.generate_cod_sample_indices(**kwargs)
    torch.manual_seed(seed)
    theirs = automodel["peagle_data"].generate_cod_sample_indices(**{**kwargs, "loss_mask": mask.long()})
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])


def test_mask_mod_called_as_automodels(automodel):
    """Our create_peagle_mask_mod with Automodel's keywords describes the blocks its own does (two
    documents and padding)."""
    from torch.nn.attention.flex_attention import create_block_mask

    attention = require("nemo_automodel", AUTOMODEL_VERSION,
                        "nemo_automodel.components.speculative.eagle.peagle_attention")
    torch.manual_seed(1)
    anchor_pos, depth = peagle_ext.generate_cod_sample_indices(seq_length=150, loss_mask=torch.ones(1, 150))
    kwargs = dict(anchor_pos=anchor_pos, depth=depth, lengths=torch.tensor([70, 60]), total_seq_len=150)
    n = anchor_pos.numel()
    peagle_ext.assert_block_masks_equal(
        create_block_mask(peagle_ext.create_peagle_mask_mod(**kwargs), None, None, n, n, device="cpu"),
        create_block_mask(attention.create_peagle_mask_mod(**kwargs), None, None, n, n, device="cpu"))
