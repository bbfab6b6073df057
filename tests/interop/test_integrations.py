"""peagle_ext.integrations against the real speculators 0.9.0 and NeMo Automodel 0.7.0.

Each peer's own P-EAGLE forward and loss run twice on the CPU (fp32, under no_grad: flex_attention
has no CPU backward), with and without enable(): the logits and the loss must be identical, the
BlockMasks the same, and while enabled no dense mask may be evaluated (torch's create_mask, which
every create_block_mask call goes through, and the peers' dense helpers raise).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.attention.flex_attention as flex

import peagle_ext
from peagle_ext import integrations

# flex_attention warns once that it runs eagerly: that is what these tests run on the CPU.
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

S = 300  # original sequence length: N ~ 930-1000 COD elements over 8 depths, 8 x 8 tiles
# Two packed documents, then padding or not. speculators' COD gives the chains that start before
# position 0 the anchor -1 and looks their document up as document_ids[-1]: with padding at the end
# they see nothing, without it they form a group of their own in the last document.
LAYOUTS = {"padded": (130, 140), "unpadded": (130, 170)}
WINDOW = 24
HIDDEN, VOCAB, AUX = 32, 100, 3


def require_peer(name: str) -> None:
    """Skip, saying why, unless the peer is installed at a version the integration was tested with."""
    distribution, tested = integrations.TESTED_VERSIONS[name]
    if importlib.util.find_spec(distribution) is None:
        pytest.skip(f"{distribution} is not installed (the interop extra; see README 'Run the tests')")
    found = integrations._installed_version(distribution)
    if found not in tested:
        pytest.skip(f"{distribution} {found} is installed; these tests are for {', '.join(tested)}")


@pytest.fixture(autouse=True)
def all_disabled():
    yield
    for name in integrations.TESTED_VERSIONS:
        integrations.disable(name)


class DenseMaskEvaluated(AssertionError):
    pass


@contextlib.contextmanager
def no_dense_masks():
    """Make every dense evaluation of a mask_mod raise: torch's create_mask (create_block_mask calls
    it through the module, however the peer imported create_block_mask) and the dense-mask names
    the peers imported themselves."""

    def refuse(*args, **kwargs):
        raise DenseMaskEvaluated("a dense mask was evaluated")

    targets = [(flex, "create_mask"), (flex, "create_block_mask")]
    if "speculators.models.eagle3.core" in sys.modules:
        targets += [(sys.modules["speculators.models.attention"], "_create_mask"),
                    (sys.modules["speculators.models.eagle3.core"], "create_mask")]
    saved = [(owner, name, getattr(owner, name)) for owner, name in targets]
    for owner, name, _ in saved:
        setattr(owner, name, refuse)
    try:
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


@pytest.fixture
def builder_calls(monkeypatch):
    """Counts build_block_mask calls made by the integrations."""
    calls = []

    def counting(*args, **kwargs):
        calls.append(args)
        return peagle_ext.build_block_mask(*args, **kwargs)

    monkeypatch.setattr(integrations, "build_block_mask", counting)
    return calls


def document_ids(layout: str) -> torch.Tensor:
    lengths = LAYOUTS[layout]
    ids = [torch.full((n,), doc) for doc, n in enumerate(lengths)]
    return torch.cat(ids + [torch.full((S - sum(lengths),), -1)])


def record_masks_and_logits(layers, lm_head):
    """Hooks that record each layer's attention mask and lm_head's output; returns (record, remove)."""
    record = {"masks": [], "logits": []}
    handles = [layer.register_forward_pre_hook(
        lambda module, args, kwargs: record["masks"].append(kwargs.get("attention_mask")), with_kwargs=True)
        for layer in layers]
    handles.append(lm_head.register_forward_hook(lambda module, args, out: record["logits"].append(out)))
    return record, lambda: [handle.remove() for handle in handles]


def assert_same_run(ours: dict, own: dict) -> None:
    assert torch.equal(ours["loss"], own["loss"]), (ours["loss"], own["loss"])
    assert len(ours["logits"]) == len(own["logits"]) > 0
    for a, b in zip(ours["logits"], own["logits"]):
        assert torch.equal(a, b)
    assert len(ours["masks"]) == len(own["masks"]) > 0
    for a, b in zip(ours["masks"], own["masks"]):
        peagle_ext.assert_block_masks_equal(a, b)


# ---------------------------------------------------------------------------------------------
# speculators: PEagleDraftModel.forward(hidden_states, input_ids, document_ids, ...) -> (None, loss, metrics)

def speculators_draft(attn_impl="simple_flex_attention", window=None):
    from speculators.config import SpeculatorsConfig, VerifierConfig
    from speculators.models.peagle import PEagleDraftModel, PEagleSpeculatorConfig
    from speculators.proposals.greedy import GreedyTokenProposalConfig
    from transformers import LlamaConfig

    layers = LlamaConfig(hidden_size=HIDDEN, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=2, vocab_size=VOCAB, max_position_embeddings=S)
    if window is not None:  # layer 1 attends through speculators' second (sliding-window) mask
        layers.layer_types, layers.sliding_window = ["full_attention", "sliding_attention"], window
    layers._attn_implementation = attn_impl  # read once, in __init__
    config = PEagleSpeculatorConfig(
        transformer_layer_config=layers, draft_vocab_size=VOCAB, mask_token_id=VOCAB - 1,
        speculators_config=SpeculatorsConfig(
            algorithm="peagle", proposal_methods=[GreedyTokenProposalConfig(speculative_tokens=4)],
            default_proposal_method="greedy", verifier=VerifierConfig(name_or_path=None, architectures=[])))
    torch.manual_seed(0)
    model = PEagleDraftModel(config).eval()
    with torch.no_grad():  # speculators leaves these uninitialised (they come from the verifier)
        for weight in (model.lm_head.weight, model.embed_tokens.weight, model.verifier_lm_head.weight):
            weight.normal_()
    return model


def speculators_step(model, forward=None, layout="padded") -> dict:
    """One P-EAGLE training forward of the peer (COD sampling seeded): its loss, masks, logits and
    the COD anchors it drew."""
    from speculators.losses import resolve_loss_config
    peagle_core = importlib.import_module("speculators.models.peagle.core")

    g = torch.Generator().manual_seed(1)
    docs = document_ids(layout)
    batch = dict(hidden_states=torch.randn(1, S, AUX * HIDDEN, generator=g),
                 input_ids=torch.randint(0, VOCAB - 1, (1, S), generator=g), document_ids=docs[None],
                 loss_mask=(docs >= 0).float()[None],
                 verifier_last_hidden_states=torch.randn(1, S, HIDDEN, generator=g),
                 num_depths=8, loss_config=resolve_loss_config("kl_div", "eager"))  # the default is a Triton kernel
    record, remove = record_masks_and_logits(model.layers, model.lm_head)
    sample = peagle_core.generate_cod_sample_indices

    def recording_sample(**kwargs):
        record["anchor_pos"], depth = sample(**kwargs)
        return record["anchor_pos"], depth

    peagle_core.generate_cod_sample_indices = recording_sample
    torch.manual_seed(2)
    try:
        with torch.no_grad():
            _, record["loss"], _ = (forward or model)(**batch)
    finally:
        remove()
        peagle_core.generate_cod_sample_indices = sample
    return record


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("window", [None, WINDOW])
@pytest.mark.parametrize("created", ["before enable", "after enable"])
def test_speculators_forward_and_loss_unchanged(created, window, layout, builder_calls):
    require_peer("speculators")
    if created == "before enable":
        model = speculators_draft(window=window)
        own = speculators_step(model, layout=layout)
        integrations.enable("speculators")
        with no_dense_masks():
            ours = speculators_step(model, layout=layout)
    else:
        integrations.enable("speculators")
        model = speculators_draft(window=window)
        with no_dense_masks():
            ours = speculators_step(model, layout=layout)
        integrations.disable("speculators")
        own = speculators_step(model, layout=layout)
    assert_same_run(ours, own)
    assert len(builder_calls) == (2 if window else 1)
    assert own["anchor_pos"].min() == -1  # the chains before position 0 are there
    if window:  # the sliding-window mask is really another mask (inside the tiles)
        n = own["anchor_pos"].numel()
        full, sliding = (flex.create_mask(mask.mask_mod, None, None, n, n, "cpu") for mask in own["masks"])
        assert not torch.equal(full, sliding)


def test_speculators_own_masks_are_dense_and_caught():
    """The guard is real: without enable() the peer's forward evaluates a dense mask."""
    require_peer("speculators")
    model = speculators_draft()
    with no_dense_masks(), pytest.raises(DenseMaskEvaluated):
        speculators_step(model)


@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
def test_speculators_dense_attention_keeps_its_own_masks(attn_impl, builder_calls):
    """sdpa and eager add a dense mask to the scores: they keep speculators' own builder. (Without
    padding: speculators' eager attention gives rows that see nothing NaN.)"""
    require_peer("speculators")
    model = speculators_draft(attn_impl)
    own_builder = model._create_mask_fn
    own = speculators_step(model, layout="unpadded")
    integrations.enable("speculators")
    assert model._create_mask_fn is own_builder
    ours = speculators_step(model, layout="unpadded")
    assert torch.equal(ours["loss"], own["loss"]) and builder_calls == []


def test_speculators_under_torch_compile(builder_calls):
    """speculators compiles forward when CUDA is present; the builder runs eagerly inside it."""
    require_peer("speculators")
    model = speculators_draft(window=WINDOW)
    own = speculators_step(model)
    integrations.enable("speculators")
    torch._dynamo.reset()
    try:
        with no_dense_masks():
            ours = speculators_step(model, torch.compile(model.forward, backend="eager"))
    finally:
        torch._dynamo.reset()
    assert_same_run(ours, own)
    assert len(builder_calls) == 2


def test_speculators_enable_disable_restore_exactly():
    require_peer("speculators")
    peagle_core = importlib.import_module("speculators.models.peagle.core")
    eagle3_core = importlib.import_module("speculators.models.eagle3.core")
    cls = peagle_core.PEagleDraftModel
    original_mask_mod = peagle_core.create_peagle_mask_mod
    model = speculators_draft()

    integrations.enable("speculators")
    patched = (peagle_core.create_peagle_mask_mod, vars(cls)["_create_mask_fn"])
    integrations.enable("speculators")
    assert (peagle_core.create_peagle_mask_mod, vars(cls)["_create_mask_fn"]) == patched
    assert patched[0] is not original_mask_mod and integrations.is_enabled("speculators")

    integrations.disable("speculators")
    integrations.disable("speculators")
    assert peagle_core.create_peagle_mask_mod is original_mask_mod
    assert "_create_mask_fn" not in vars(cls) and not integrations.is_enabled("speculators")
    assert model._create_mask_fn is eagle3_core.create_block_mask
    assert speculators_draft()._create_mask_fn is eagle3_core.create_block_mask


# ---------------------------------------------------------------------------------------------
# NeMo Automodel: PEagleTrainerModule(draft).forward(input_ids, attention_mask, loss_mask,
# aux_hidden_states, target_logits) -> Eagle3StepMetrics; one mask per row (or segment).

def automodel_trainer(sequence_partitions=1):
    from nemo_automodel.components.speculative.eagle.draft_llama import LlamaEagle3DraftModel
    from nemo_automodel.components.speculative.eagle.peagle_trainer import PEagleTrainerModule
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=2, vocab_size=VOCAB, max_position_embeddings=S)
    for key, value in dict(draft_vocab_size=VOCAB, target_hidden_size=HIDDEN, num_aux_hidden_states=AUX,
                           parallel_drafting=True, mask_token_id=VOCAB - 1, num_depths=8,
                           attn_implementation="eager").items():
        setattr(config, key, value)
    torch.manual_seed(0)
    draft = LlamaEagle3DraftModel(config).float().eval()  # its norms are built in bf16
    return PEagleTrainerModule(draft, selected_token_ids=torch.arange(VOCAB),
                               selected_token_mask=torch.ones(VOCAB, dtype=torch.bool), num_depths=8,
                               mask_token_id=VOCAB - 1, sequence_partitions=sequence_partitions)


def automodel_batch() -> dict:
    """Two rows: the first full, the second padded after 250 positions."""
    g = torch.Generator().manual_seed(1)
    attention_mask = torch.ones(2, S, dtype=torch.long)
    attention_mask[1, 250:] = 0
    return dict(input_ids=torch.randint(0, VOCAB - 1, (2, S), generator=g), attention_mask=attention_mask,
                loss_mask=attention_mask.float(), aux_hidden_states=torch.randn(2, S, AUX * HIDDEN, generator=g),
                target_logits=torch.randn(2, S, VOCAB, generator=g))


def automodel_step(trainer, plan=None) -> dict:
    """The peer's P-EAGLE loss for one batch (or each segment of a plan), with masks and logits."""
    draft = trainer.draft_model
    forward_peagle = draft.forward_peagle
    record, remove = record_masks_and_logits([], draft.lm_head)

    def recording_forward_peagle(**kwargs):
        record["masks"].append(kwargs["block_mask"])
        return forward_peagle(**kwargs)

    draft.forward_peagle = recording_forward_peagle
    torch.manual_seed(2)
    try:
        with torch.no_grad():
            if plan is None:
                record["loss"] = trainer(**automodel_batch()).loss
            else:
                record["loss"] = torch.stack([trainer(**automodel_batch(), peagle_segment=(plan, unit)).loss
                                              for unit in range(len(plan.units))])
    finally:
        remove()
        del draft.forward_peagle
    return record


@pytest.mark.parametrize("created", ["before enable", "after enable"])
def test_automodel_forward_and_loss_unchanged(created, builder_calls):
    require_peer("automodel")
    if created == "before enable":
        trainer = automodel_trainer()
        own = automodel_step(trainer)
        integrations.enable("automodel")
        with no_dense_masks():
            ours = automodel_step(trainer)
    else:
        integrations.enable("automodel")
        trainer = automodel_trainer()
        with no_dense_masks():
            ours = automodel_step(trainer)
        integrations.disable("automodel")
        own = automodel_step(trainer)
    assert_same_run(ours, own)
    assert len(builder_calls) == 2  # one per row


def test_automodel_sequence_partitions_unchanged(builder_calls):
    """Partitioned training builds masks over segments' subsets of the COD elements."""
    require_peer("automodel")
    trainer = automodel_trainer(sequence_partitions=3)
    torch.manual_seed(3)
    plan = trainer.build_peagle_plan(automodel_batch()["loss_mask"])
    own = automodel_step(trainer, plan)
    integrations.enable("automodel")
    with no_dense_masks():
        ours = automodel_step(trainer, plan)
    assert_same_run(ours, own)
    assert len(builder_calls) == len(plan.units) > 2


def test_automodel_own_masks_are_dense_and_caught():
    require_peer("automodel")
    trainer = automodel_trainer()
    with no_dense_masks(), pytest.raises(DenseMaskEvaluated):
        automodel_step(trainer)


def test_automodel_enable_disable_restore_exactly():
    require_peer("automodel")
    peagle_draft = importlib.import_module("nemo_automodel.components.speculative.eagle.peagle_draft")
    mixin = peagle_draft._PeagleDraftMixin
    original = vars(mixin)["build_peagle_block_mask"]

    integrations.enable("automodel")
    patched = vars(mixin)["build_peagle_block_mask"]
    integrations.enable("automodel")
    assert vars(mixin)["build_peagle_block_mask"] is patched is not original

    # Something else replaced it after enable(): disable refuses rather than undo that.
    mixin.build_peagle_block_mask = original
    with pytest.raises(RuntimeError, match="_PeagleDraftMixin.build_peagle_block_mask was replaced"):
        integrations.disable("automodel")
    mixin.build_peagle_block_mask = patched

    integrations.disable("automodel")
    integrations.disable("automodel")
    assert vars(mixin)["build_peagle_block_mask"] is original and not integrations.is_enabled("automodel")


# ---------------------------------------------------------------------------------------------
# Versions, names, imports (no peer needed unless the integration is applied)

@pytest.mark.parametrize("name", sorted(integrations.TESTED_VERSIONS))
def test_untested_version_is_refused(name, monkeypatch):
    distribution, tested = integrations.TESTED_VERSIONS[name]
    monkeypatch.delenv(integrations.FORCE_ENV, raising=False)
    monkeypatch.setattr(integrations, "_installed_version", lambda dist: "99.1")
    with pytest.raises(integrations.UntestedPeerVersionError) as error:
        integrations.enable(name)
    message = str(error.value)
    for part in (f"{distribution} 99.1 is installed", tested[0], f"enable({name!r}, force=True)",
                 f"{integrations.FORCE_ENV}={name}"):
        assert part in message
    assert not integrations.is_enabled(name)
    monkeypatch.setenv(integrations.FORCE_ENV, "automodel" if name == "speculators" else "speculators")
    with pytest.raises(integrations.UntestedPeerVersionError):
        integrations.enable(name)


@pytest.mark.parametrize("name", sorted(integrations.TESTED_VERSIONS))
@pytest.mark.parametrize("how", ["force=True", "env=1", "env=all", "env=names"])
def test_untested_version_can_be_forced(name, how, monkeypatch):
    require_peer(name)
    monkeypatch.setattr(integrations, "_installed_version", lambda dist: "99.1")
    env = {"env=1": "1", "env=all": "all", "env=names": f"other, {name}"}.get(how)
    if env is None:
        monkeypatch.delenv(integrations.FORCE_ENV, raising=False)
    else:
        monkeypatch.setenv(integrations.FORCE_ENV, env)
    integrations.enable(name, force=how == "force=True")
    assert integrations.is_enabled(name)


@pytest.mark.parametrize("name", sorted(integrations.TESTED_VERSIONS))
def test_missing_peer_is_named(name, monkeypatch):
    monkeypatch.setattr(integrations, "_installed_version", lambda dist: None)
    with pytest.raises(ModuleNotFoundError, match=f"needs the package {integrations.TESTED_VERSIONS[name][0]}"):
        integrations.enable(name)


@pytest.mark.parametrize("call", [integrations.enable, integrations.disable, integrations.is_enabled])
def test_unknown_name(call):
    with pytest.raises(ValueError, match=r"name must be one of \['automodel', 'speculators'\], got 'vllm'"):
        call("vllm")


def test_importing_does_not_import_the_peers():
    code = ("import sys, peagle_ext, peagle_ext.integrations; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('speculators', 'nemo_automodel')))")
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.strip() == "[]"
