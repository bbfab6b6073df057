"""GPU-only draft checks: compiled flex_attention at head dim >= 16, bf16, block lists that matter."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask

import peagle_ext
from peagle_ext import peagle_draft
from peagle_ext.draft.training import build_peagle_inputs, peagle_training_step

from draft_helpers import cod_indices, random_sequence, single_thread, tiny_model  # noqa: F401 (autouse fixture)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SEQ = 300  # N ~ 700 elements: several 128-blocks, so the compiled kernel reads the block lists


def _gpu_model(dtype=torch.bfloat16, **overrides):
    fields = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                  draft_vocab_size=128)
    fields.update(overrides)
    return tiny_model(**fields).to("cuda", dtype)


def _inputs(model, seq_len=SEQ):
    anchor_pos, depth = cod_indices(seq_len, 4)
    ids, aux = random_sequence(model, seq_len)
    ids, aux = ids.cuda(), aux.cuda().to(model.lm_head.weight.dtype)
    anchor_pos, depth = anchor_pos.cuda(), depth.cuda()
    return anchor_pos, depth, ids, aux


@pytest.fixture(autouse=True)
def compile_not_failed(monkeypatch):
    monkeypatch.setattr(peagle_draft, "_peagle_flex_attention_compile_failed", False)


def test_compile_supported_on_cuda_bf16_head_dim_16():
    q = torch.randn(1, 4, 64, 16, device="cuda", dtype=torch.bfloat16)
    assert peagle_draft._peagle_compile_supported(q, q, q)
    assert not peagle_draft._peagle_compile_supported(q[..., :8], q[..., :8], q[..., :8])


def test_compiled_forward_matches_eager_in_bf16(monkeypatch):
    model = _gpu_model()
    anchor_pos, depth, ids, aux = _inputs(model)
    flat = build_peagle_inputs(model, ids, aux, anchor_pos, depth)
    lengths = torch.tensor([200, 90], device="cuda")
    with torch.no_grad():
        block_mask = model.build_peagle_block_mask(anchor_pos, depth, lengths, SEQ)
        compiled = model.forward_peagle(*flat, block_mask)
        assert peagle_draft._peagle_flex_attention_compile_failed is False
        monkeypatch.setattr(peagle_draft, "_peagle_flex_attention_compile_failed", True)  # force eager
        eager = model.forward_peagle(*flat, block_mask)
    torch.testing.assert_close(compiled.float(), eager.float(), atol=5e-2, rtol=5e-2)


def test_compiled_output_same_whichever_builder_made_the_mask():
    model = _gpu_model(torch.float32)
    anchor_pos, depth, ids, aux = _inputs(model)
    flat = build_peagle_inputs(model, ids, aux, anchor_pos, depth)
    lengths = torch.tensor([150, 120], device="cuda")
    n = anchor_pos.numel()
    masks = {b: peagle_ext.build_block_mask(anchor_pos, depth, lengths, SEQ, backend=b)
             for b in peagle_ext.available_backends() if b != "cpu"}
    rule = peagle_ext.create_peagle_mask_mod(anchor_pos, depth, lengths, SEQ)
    masks["create_block_mask"] = create_block_mask(rule, None, None, n, n, device="cuda")
    with torch.no_grad():
        outputs = {name: model.forward_peagle(*flat, mask) for name, mask in masks.items()}
    assert peagle_draft._peagle_flex_attention_compile_failed is False
    reference = outputs.pop("create_block_mask")
    for name, output in outputs.items():
        torch.testing.assert_close(output, reference, atol=1e-4, rtol=1e-4, msg=name)


def test_compiled_training_step_backward_in_bf16():
    model = _gpu_model().train()
    anchor_pos, depth, ids, aux = _inputs(model)
    logits = torch.randn(SEQ, 128, device="cuda")
    out = peagle_training_step(model, ids, aux, torch.ones(SEQ, device="cuda"), target_logits=logits,
                               anchor_pos=anchor_pos, depth=depth)
    out.loss.backward()
    assert peagle_draft._peagle_flex_attention_compile_failed is False
    assert torch.isfinite(out.loss)
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
    assert model.mask_hidden.grad.abs().sum() > 0


def test_compiled_forward_and_backward_in_bf16_with_our_mask_equal_to_the_oracles():
    """The P-EAGLE forward and backward through compiled flex_attention in bf16: the CUDA kernel's
    BlockMask holds create_block_mask's blocks, and gives its outputs and gradients."""
    anchor_pos, depth, ids, aux = _inputs(_gpu_model())
    lengths = torch.tensor([180, 110], device="cuda")
    n = anchor_pos.numel()
    ours = peagle_ext.build_block_mask(anchor_pos, depth, lengths, SEQ, backend="cuda")
    rule = peagle_ext.create_peagle_mask_mod(anchor_pos, depth, lengths, SEQ)
    oracle = create_block_mask(rule, None, None, n, n, device="cuda")
    peagle_ext.assert_block_masks_equal(ours, oracle)
    results = {}
    for name, mask in (("ours", ours), ("oracle", oracle)):
        model = _gpu_model().train()  # the same seed: the same weights each time
        flat = build_peagle_inputs(model, ids, aux, anchor_pos, depth)
        hidden = model.forward_peagle(*flat, mask)
        hidden.float().square().mean().backward()
        grads = {key: parameter.grad for key, parameter in model.named_parameters() if parameter.grad is not None}
        results[name] = (hidden.detach(), grads)
    assert peagle_draft._peagle_flex_attention_compile_failed is False
    (hidden, grads), (expected_hidden, expected_grads) = results["ours"], results["oracle"]
    assert hidden.dtype == torch.bfloat16 and grads.keys() == expected_grads.keys() and grads
    torch.testing.assert_close(hidden, expected_hidden)
    for key in grads:
        torch.testing.assert_close(grads[key], expected_grads[key], msg=key)
