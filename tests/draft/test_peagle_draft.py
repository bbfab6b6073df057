"""The P-EAGLE mixins, attention dispatch, compile detection and fallbacks (peagle_ext.peagle_draft)."""

from __future__ import annotations

import copy
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import peagle_ext
from peagle_ext import peagle_draft

from draft_helpers import cod_indices, flat_inputs, single_thread, tiny_model  # noqa: F401 (autouse fixture)

SEQ = 24
COMPILED = "_peagle_flex_attention_compiled"


def _mask(anchor_pos, depth, lengths=None, backend="python"):
    lengths = torch.tensor([SEQ]) if lengths is None else lengths
    return peagle_ext.build_block_mask(anchor_pos, depth, lengths, SEQ, backend=backend)


def _forward(model, ids, projected, position_ids, block_mask, grad: bool):
    """forward_peagle on detached inputs; with grad the CPU path is the dense SDPA fallback."""
    with torch.set_grad_enabled(grad):
        return model.forward_peagle(ids, projected.detach(), position_ids, block_mask)


@pytest.fixture
def restore_compiled():
    """Keep the module's compiled callable and failure flag as they were."""
    namespace = vars(peagle_draft)
    saved = {key: namespace[key] for key in (COMPILED, "_peagle_flex_attention_compile_failed") if key in namespace}
    yield
    namespace.pop(COMPILED, None)
    namespace.update(saved)


# --- mask_hidden and the projected placeholder -----------------------------------------------------------


def test_mask_hidden_key_shape_and_std1_init():
    model = tiny_model(target_hidden_size=256)
    state = model.state_dict()
    assert state["mask_hidden"].shape == (1, 1, 3 * 256)
    assert isinstance(model.mask_hidden, torch.nn.Parameter) and model.mask_hidden.requires_grad
    values = model.mask_hidden.detach()
    assert abs(values.std().item() - 1.0) < 0.1
    assert abs(values.mean().item()) < 0.15


def test_mask_hidden_absent_without_parallel_drafting():
    model = tiny_model(parallel_drafting=False)
    assert "mask_hidden" not in model.state_dict()
    assert not hasattr(model, "mask_hidden")


@pytest.mark.parametrize(
    "overrides", [{}, {"fc_norm": True}, {"fc_norm": True, "num_aux_hidden_states": 2}, {"norm_before_fc": True}]
)
def test_masked_projected_hidden_shape_and_path(overrides):
    """mask_hidden goes through input_norm (one norm over all states) or fc_norm (one per state) then fc."""
    model = tiny_model(**overrides)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.add_(0.3 * torch.randn_like(parameter))
    projected = model.masked_projected_hidden()
    assert projected.shape == (1, model.config.hidden_size)
    flat = model.mask_hidden.reshape(1, -1)

    def rms(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + model.config.rms_norm_eps) * weight

    if model.config.norm_before_fc:
        flat = rms(flat, model.model.input_norm.weight)
    if model.config.fc_norm:
        width = model.config.target_hidden_size
        chunks = [rms(flat[:, i * width : (i + 1) * width], norm.weight) for i, norm in enumerate(model.model.fc_norm)]
        flat = torch.cat(chunks, -1)
    torch.testing.assert_close(projected, flat @ model.model.fc.weight.T)


# --- forward shapes, mask builders -----------------------------------------------------------------------


@pytest.mark.parametrize("norm_output", [False, True])
def test_forward_peagle_shapes(norm_output):
    model = tiny_model(norm_output=norm_output)
    anchor_pos, depth, ids, projected, position_ids = flat_inputs(model, SEQ)
    n = anchor_pos.numel()
    assert ids.shape == position_ids.shape == (1, n) and projected.shape == (1, n, 32)
    hidden = model.forward_peagle(ids, projected, position_ids, _mask(anchor_pos, depth))
    assert hidden.shape == (1, n, model.config.hidden_size)
    assert model.compute_logits(hidden).shape == (1, n, model.config.draft_vocab_size)
    rms = hidden.pow(2).mean(-1).sqrt()
    # With norm_output the rows come out of the final RMSNorm (weight 1): unit RMS.
    assert torch.allclose(rms, torch.ones_like(rms), atol=1e-3) == norm_output


@pytest.mark.parametrize("grad", [False, True], ids=["eager-flex", "dense-fallback"])
def test_same_output_whichever_builder_made_the_mask(grad):
    model = tiny_model()
    anchor_pos, depth, ids, projected, position_ids = flat_inputs(model, SEQ)
    n = anchor_pos.numel()
    lengths = torch.tensor([10, 9])  # two documents and a padding tail
    masks = {backend: _mask(anchor_pos, depth, lengths, backend) for backend in peagle_ext.available_backends()}
    rule = peagle_ext.create_peagle_mask_mod(anchor_pos, depth, lengths, SEQ)
    masks["create_block_mask"] = create_block_mask(rule, None, None, n, n, device="cpu")
    masks["model"] = model.build_peagle_block_mask(anchor_pos, depth, lengths, SEQ)
    outputs = {name: _forward(model, ids, projected, position_ids, mask, grad) for name, mask in masks.items()}
    reference = outputs.pop("create_block_mask")
    for name, output in outputs.items():
        torch.testing.assert_close(output, reference, msg=f"mask from {name}")


def test_dense_fallback_matches_eager_flex_with_padding_rows():
    torch.manual_seed(0)
    anchor_pos, depth = cod_indices(SEQ)
    block_mask = _mask(anchor_pos, depth, torch.tensor([15]))  # positions 15.. are padding: no visible key
    q, k, v = (torch.randn(1, 2, anchor_pos.numel(), 8) for _ in range(3))
    eager = flex_attention(q, k, v, block_mask=block_mask, scale=0.3)
    q.requires_grad_(True)
    dense = peagle_draft._peagle_flex_attention(q, k, v, block_mask, 0.3)
    torch.testing.assert_close(dense, eager)
    padded = anchor_pos >= 15
    assert padded.any() and dense[:, :, padded].abs().max() == 0
    dense.sum().backward()
    assert torch.isfinite(q.grad).all() and q.grad[:, :, padded].abs().max() == 0


def test_dense_fallback_warns_once_above_size(monkeypatch, caplog):
    monkeypatch.setattr(peagle_draft, "_DENSE_FALLBACK_WARN_PAIRS", 10)
    monkeypatch.setattr(peagle_draft, "_dense_fallback_warned", False)
    anchor_pos, depth = cod_indices(SEQ)
    q = torch.randn(1, 1, anchor_pos.numel(), 8, requires_grad=True)
    with caplog.at_level(logging.WARNING, logger=peagle_draft.logger.name):
        for _ in range(3):
            peagle_draft._peagle_flex_attention(q, q, q, _mask(anchor_pos, depth), None)
    assert len([r for r in caplog.records if "dense" in r.getMessage()]) == 1


# --- visibility through the whole model ------------------------------------------------------------------


class _Probe:
    """A tiny model on one COD batch; ``changed(rows)`` reruns it with those input rows perturbed."""

    def __init__(self, grad: bool, lengths=None):
        self.model, self.grad = tiny_model(), grad
        self.anchor_pos, self.depth, self.ids, self.projected, self.position_ids = flat_inputs(self.model, SEQ)
        self.block_mask = _mask(self.anchor_pos, self.depth, lengths)
        self.base = self._run(self.ids, self.projected)[0]

    def _run(self, ids, projected):
        return _forward(self.model, ids, projected, self.position_ids, self.block_mask, self.grad)

    def changed(self, rows):
        ids, projected = self.ids.clone(), self.projected.detach().clone()
        ids[0, rows] = (ids[0, rows] + 7) % 96
        projected[0, rows] += 3.0
        return self._run(ids, projected)[0]


@pytest.mark.parametrize("grad", [False, True], ids=["eager-flex", "dense-fallback"])
def test_deeper_elements_never_change_depth0_outputs(grad):
    probe = _Probe(grad)
    depth0 = probe.depth == 0
    for row in (~depth0).nonzero().squeeze(-1)[::8].tolist():
        changed = probe.changed([row])
        torch.testing.assert_close(changed[depth0], probe.base[depth0], rtol=0, atol=1e-6)
        assert not torch.allclose(changed[row], probe.base[row])  # the change does reach its own output


@pytest.mark.parametrize("grad", [False, True], ids=["eager-flex", "dense-fallback"])
def test_one_rollout_never_changes_another(grad):
    probe = _Probe(grad)
    deep_anchors = probe.anchor_pos[probe.depth >= 1].unique()
    assert deep_anchors.numel() > 3
    for anchor in deep_anchors[::3].tolist():
        rollout = (probe.anchor_pos == anchor) & (probe.depth >= 1)
        changed = probe.changed(rollout.nonzero().squeeze(-1))
        others = probe.anchor_pos != anchor
        torch.testing.assert_close(changed[others], probe.base[others], rtol=0, atol=1e-6)
        assert not torch.allclose(changed[rollout], probe.base[rollout])


def test_documents_never_see_each_other():
    probe = _Probe(grad=False, lengths=torch.tensor([12, 12]))
    first_doc = probe.anchor_pos < 12
    changed = probe.changed((~first_doc).nonzero().squeeze(-1))
    torch.testing.assert_close(changed[first_doc], probe.base[first_doc], rtol=0, atol=1e-6)
    assert not torch.allclose(changed[~first_doc], probe.base[~first_doc])


# --- gradients and activation checkpointing --------------------------------------------------------------


def _loss(model, seed=0):
    anchor_pos, depth, ids, projected, position_ids = flat_inputs(model, SEQ, seed=seed)
    hidden = model.forward_peagle(ids, projected, position_ids, _mask(anchor_pos, depth))
    logits = model.compute_logits(hidden)
    return torch.nn.functional.cross_entropy(logits[0], torch.arange(logits.shape[1]) % logits.shape[-1])


def test_gradients_reach_mask_hidden_and_every_layer_on_cpu():
    model = tiny_model().train()
    _loss(model).backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert parameter.grad.abs().sum() > 0, name


def test_gradient_checkpointing_gives_same_gradients(monkeypatch):
    direct = tiny_model().train()
    checkpointed = copy.deepcopy(direct)
    checkpointed.gradient_checkpointing_enable()
    calls = []
    real_checkpoint = torch.utils.checkpoint.checkpoint

    def counting_checkpoint(fn, *args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return real_checkpoint(fn, *args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting_checkpoint)
    loss_direct, loss_checkpointed = _loss(direct), _loss(checkpointed)
    assert calls == [False] * direct.config.num_hidden_layers
    loss_direct.backward()
    loss_checkpointed.backward()
    torch.testing.assert_close(loss_checkpointed, loss_direct)
    grads = dict(checkpointed.named_parameters())
    for name, parameter in direct.named_parameters():
        torch.testing.assert_close(grads[name].grad, parameter.grad, msg=name)
    checkpointed.eval()
    _loss(checkpointed)
    assert len(calls) == direct.config.num_hidden_layers  # not in eval


# --- compile detection, dispatch and fallback ------------------------------------------------------------


def _fake(device, dtype=torch.float32, head_dim=16):
    with FakeTensorMode():
        return torch.empty(1, 2, 40, head_dim, device=device, dtype=dtype)


@pytest.mark.parametrize(
    ("q", "k", "v", "expected"),
    [
        (("cuda",), ("cuda",), ("cuda",), True),
        (("cuda", torch.bfloat16), ("cuda", torch.bfloat16), ("cuda", torch.bfloat16), True),
        (("cuda", torch.float16, 64), ("cuda", torch.float16, 64), ("cuda", torch.float16, 64), True),
        (("cuda", torch.float32, 8), ("cuda", torch.float32, 8), ("cuda", torch.float32, 8), False),
        (("cuda",), ("cuda",), ("cuda", torch.float32, 8), False),
        (("cuda", torch.float64), ("cuda", torch.float64), ("cuda", torch.float64), False),
        (("cuda", torch.bfloat16), ("cuda",), ("cuda",), False),
        (("cpu",), ("cpu",), ("cpu",), False),
        (("cpu", torch.bfloat16, 64), ("cpu", torch.bfloat16, 64), ("cpu", torch.bfloat16, 64), False),
        (("cuda",), ("cpu",), ("cuda",), False),
    ],
)
def test_compile_detection(q, k, v, expected):
    assert peagle_draft._peagle_compile_supported(_fake(*q), _fake(*k), _fake(*v)) is expected


def _attention_inputs():
    anchor_pos, depth = cod_indices(SEQ)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, anchor_pos.numel(), 16) for _ in range(3))
    return q, k, v, _mask(anchor_pos, depth)


def test_compiled_callable_used_where_supported(monkeypatch, restore_compiled):
    q, k, v, block_mask = _attention_inputs()
    sentinel = torch.full_like(q, 5.0)
    monkeypatch.setattr(peagle_draft, "_peagle_compile_supported", lambda *tensors: True)
    monkeypatch.setattr(peagle_draft, "_peagle_flex_attention_compile_failed", False)
    monkeypatch.setattr(peagle_draft, COMPILED, lambda *args, **kwargs: sentinel)
    assert peagle_draft._peagle_flex_attention(q, k, v, block_mask, 0.25) is sentinel
    monkeypatch.setattr(peagle_draft, "_peagle_compile_supported", lambda *tensors: False)
    assert not torch.equal(peagle_draft._peagle_flex_attention(q, k, v, block_mask, 0.25), sentinel)


def test_compile_failure_warns_once_sets_flag_returns_eager_never_retries(monkeypatch, caplog, restore_compiled):
    q, k, v, block_mask = _attention_inputs()
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("inductor exploded")

    monkeypatch.setattr(peagle_draft, "_peagle_compile_supported", lambda *tensors: True)
    monkeypatch.setattr(peagle_draft, "_peagle_flex_attention_compile_failed", False)
    monkeypatch.setattr(peagle_draft, COMPILED, broken)
    eager = flex_attention(q, k, v, block_mask=block_mask, scale=0.25)
    with caplog.at_level(logging.WARNING, logger=peagle_draft.logger.name):
        results = [peagle_draft._peagle_flex_attention(q, k, v, block_mask, 0.25) for _ in range(3)]
    for result in results:
        torch.testing.assert_close(result, eager)
    assert calls == [1]
    assert peagle_draft._peagle_flex_attention_compile_failed is True
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "inductor exploded" in warnings[0].getMessage()


def test_reload_under_patched_compile_recreates_the_module_data(monkeypatch):
    """NeMo Automodel's own check, against this module: reloading it under a patched torch.compile
    shows the import-time compile's arguments, and the reload re-creates the module data."""
    import importlib

    saved = dict(vars(peagle_draft))
    captured = {}

    def compile_fn(fn, **kwargs):
        captured["fn"], captured["kwargs"] = fn, kwargs
        return fn

    monkeypatch.setattr(torch, "compile", compile_fn)
    monkeypatch.setattr(peagle_draft, "_peagle_flex_attention_compile_failed", True)
    try:
        importlib.reload(peagle_draft)
        assert captured["fn"] is peagle_draft.flex_attention is flex_attention
        assert captured["kwargs"] == {"mode": "max-autotune-no-cudagraphs", "dynamic": True}
        assert getattr(peagle_draft, COMPILED) is flex_attention
        assert peagle_draft._peagle_flex_attention_compile_failed is False
        assert peagle_draft.logger is logging.getLogger("peagle_ext.peagle_draft")
        monkeypatch.undo()
        importlib.reload(peagle_draft)
        assert getattr(peagle_draft, COMPILED)._torchdynamo_orig_callable is flex_attention
    finally:
        # Put back the original objects: the host classes derive from the original mixins.
        vars(peagle_draft).clear()
        vars(peagle_draft).update(saved)


def test_import_makes_the_compiled_callable_and_compiles_nothing():
    code = (
        "import peagle_ext.peagle_draft as m\n"
        "from torch._dynamo.utils import counters\n"
        "from torch.nn.attention.flex_attention import flex_attention\n"
        f"assert m.{COMPILED}._torchdynamo_orig_callable is flex_attention\n"
        "assert not counters['frames'] and not counters['stats'], dict(counters)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, cwd=Path(__file__).resolve().parents[2])


def test_module_exports_automodels_names():
    """The names, host classes and signatures of NeMo Automodel's peagle_draft module, at the documented path."""
    import inspect
    import sys

    from peagle_ext.draft import llama as draft_llama

    assert sys.modules["peagle_ext.peagle_draft"] is peagle_draft
    hosts = {
        "_PeagleAttentionMixin": draft_llama.Eagle3LlamaAttention,
        "_PeagleDecoderLayerMixin": draft_llama.Eagle3LlamaDecoderLayer,
        "_PeagleVanillaLayerMixin": draft_llama.Eagle3LlamaPeagleLayer,
        "_PeagleDraftMixin": draft_llama.LlamaEagle3DraftModel,
    }
    for mixin, host in hosts.items():
        assert issubclass(host, getattr(peagle_draft, mixin)), (host, mixin)

    def assert_leading_parameters(fn, names):
        """Automodel's parameters first, in its order; anything after them optional (our extensions)."""
        parameters = list(inspect.signature(fn).parameters.values())
        assert [p.name for p in parameters[: len(names)]] == names, fn
        extras = parameters[len(names):]
        assert all(p.default is not inspect.Parameter.empty for p in extras), (fn, extras)

    assert_leading_parameters(peagle_draft._PeagleAttentionMixin.forward_peagle,
                          ["self", "combined_states", "position_ids", "block_mask"])
    assert_leading_parameters(peagle_draft._PeagleDecoderLayerMixin.forward_peagle,
                          ["self", "input_embeds", "hidden_states", "position_ids", "block_mask"])
    assert_leading_parameters(peagle_draft._PeagleVanillaLayerMixin.forward_peagle,
                          ["self", "hidden_states", "position_ids", "block_mask"])
    mixin = peagle_draft._PeagleDraftMixin
    assert_leading_parameters(mixin.forward_peagle,
                          ["self", "sampled_input_ids", "sampled_projected_hidden", "position_ids", "block_mask"])
    assert_leading_parameters(mixin._init_peagle_parameters, ["self", "config"])
    assert_leading_parameters(mixin.masked_projected_hidden, ["self"])
    assert_leading_parameters(mixin._run_draft_layer, ["self", "layer_fn", "args", "kwargs"])
    assert_leading_parameters(mixin.build_peagle_block_mask,
                              ["self", "anchor_pos", "depth", "lengths", "total_seq_len"])
    assert_leading_parameters(peagle_draft._peagle_compile_supported, ["q", "k", "v"])
    assert_leading_parameters(peagle_draft._peagle_flex_attention, ["q", "k", "v", "block_mask", "scale"])
    assert peagle_draft._peagle_flex_attention_compile_failed is False
    assert peagle_draft.logger.name == "peagle_ext.peagle_draft"
