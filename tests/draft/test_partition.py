"""Sequence partitioning: the segments hold what their queries see, and a partitioned training
step accumulates exactly the flat step's gradients."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import peagle_ext
from peagle_ext.draft.training import peagle_training_step

from draft_helpers import random_sequence, single_thread, tiny_model  # noqa: F401 (autouse fixture)
from strategies import arbitrary_cases, cod_cases


def _seq_length(case) -> int:
    return case.kwargs["total_seq_len"] if "lengths" in case.kwargs else case.kwargs["document_ids"].numel()


@settings(max_examples=40)
@given(case=st.one_of(cod_cases(max_seq_len=120), arbitrary_cases(max_elements=150)), num_segments=st.integers(1, 6))
def test_each_segment_holds_every_key_its_own_queries_see(case, num_segments):
    """Own elements partition the flat ones; a segment's own queries see (under the rule) only keys
    in the segment, and so do, recursively, the completion elements (exactness at every layer)."""
    seq_length = _seq_length(case)
    n = case.anchor_pos.numel()
    rule = peagle_ext.create_peagle_mask_mod(case.anchor_pos, case.depth, **case.kwargs)
    everything = torch.arange(n)
    zero = torch.zeros((), dtype=torch.int64)
    visible = rule(zero, zero, everything[:, None], everything[None, :])  # small N: the dense rule is the reference
    owners = torch.zeros(n, dtype=torch.int64)
    for elements, own in peagle_ext.cod_segments(case.anchor_pos, case.depth, seq_length, num_segments):
        owners[elements[own]] += 1
        inside = torch.zeros(n, dtype=torch.bool)
        inside[elements] = True
        # Every element of the segment (own or completion) sees only keys inside it.
        assert not (visible[elements] & ~inside[None, :]).any()
    assert torch.equal(owners, torch.ones(n, dtype=torch.int64))


def test_assignment_follows_the_rollout():
    anchor_pos = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 3, 3, 5])
    depth = torch.tensor([0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 1])
    # L = 8, K = 2: positions 0-3 -> 0, 4-7 -> 1; deeper elements by anchor + 1.
    assert peagle_ext.assign_cod_segments(anchor_pos, depth, 8, 2).tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1]
    with pytest.raises(ValueError, match="num_segments must be an int in \\[1, 2147483647\\]"):
        peagle_ext.assign_cod_segments(anchor_pos, depth, 8, 0)
    with pytest.raises(ValueError, match="seq_length"):
        peagle_ext.assign_cod_segments(anchor_pos, depth, 0, 2)
    with pytest.raises(TypeError, match="anchor_pos must be an integer tensor"):
        peagle_ext.assign_cod_segments(anchor_pos.float(), depth, 8, 2)
    with pytest.raises(ValueError, match=r"same shape, got \(11,\) and \(1, 11\)"):
        peagle_ext.assign_cod_segments(anchor_pos, depth[None], 8, 2)
    # Elementwise, as NeMo Automodel's: a [1, N] pair gives the [1, N] assignment.
    assert torch.equal(peagle_ext.assign_cod_segments(anchor_pos[None], depth[None], 8, 2),
                       peagle_ext.assign_cod_segments(anchor_pos, depth, 8, 2)[None])
    with pytest.raises(TypeError, match="anchor_pos must be a 1-D integer tensor"):
        peagle_ext.cod_segments(anchor_pos[None], depth[None], 8, 2)


SEQ = 40


def _step_gradients(model, inputs, **kwargs):
    model.zero_grad(set_to_none=True)
    out = peagle_training_step(model, *inputs, **kwargs)
    if out.loss.requires_grad:
        out.loss.backward()
    return out, {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize(
    "layout",
    [
        dict(),
        dict(lengths=torch.tensor([13, 9, 11])),  # three documents and a padding tail of 7
        dict(lengths=torch.tensor([25, 15]), sliding_window=6),
    ],
    ids=["one-document", "documents-and-padding", "sliding-window"],
)
@pytest.mark.parametrize("num_layers", [1, 2])
def test_partitioned_step_accumulates_the_flat_gradients(layout, num_layers):
    model = tiny_model(num_hidden_layers=num_layers).train()
    with torch.no_grad():  # norms off their all-ones init so that every parameter matters
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    ids, aux = random_sequence(model, SEQ)
    loss_mask = (torch.rand(SEQ, generator=torch.Generator().manual_seed(3)) < 0.8).float()
    anchor_pos, depth = peagle_ext.generate_cod_sample_indices(SEQ, loss_mask, 5, down_sample_ratio=0.9,
                                                               generator=torch.Generator().manual_seed(4))
    target = torch.randn(SEQ, model.config.vocab_size, generator=torch.Generator().manual_seed(5))
    common = dict(target_logits=target, anchor_pos=anchor_pos, depth=depth, **layout)
    flat, flat_grads = _step_gradients(model, (ids, aux, loss_mask), **common)
    assert flat.loss.requires_grad and flat.num_supervised > 0
    for num_segments, keys_only in ((2, True), (3, True), (7, True), (3, False), (7, False)):
        split, split_grads = _step_gradients(model, (ids, aux, loss_mask), sequence_partitions=num_segments,
                                             keys_only_completion=keys_only, **common)
        assert not split.loss.requires_grad
        torch.testing.assert_close(split.loss, flat.loss.detach(), atol=1e-6, rtol=1e-5)
        assert torch.equal(split.depth_count, flat.depth_count)
        torch.testing.assert_close(split.depth_accuracy, flat.depth_accuracy, equal_nan=True)
        for name, grad in flat_grads.items():
            torch.testing.assert_close(split_grads[name], grad, atol=1e-5, rtol=1e-4,
                                       msg=lambda m, name=name: f"{name}: {m}")


def test_partitioned_step_rejects_bad_partition_counts():
    model = tiny_model()
    ids, aux = random_sequence(model, 12)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="sequence_partitions must be an int >= 1"):
            peagle_training_step(model, ids, aux, torch.ones(12), target_logits=torch.randn(12, 96),
                                 sequence_partitions=bad)
