"""A batch of sequences in one training step: loss and gradients equal those of the rows' own steps
(weighted by their supervised counts, as one global batch), flat and partitioned."""

from __future__ import annotations

import pytest
import torch

import peagle_ext
from peagle_ext.draft.training import peagle_training_step

from draft_helpers import single_thread, tiny_model  # noqa: F401 (autouse fixture)

SEQ, ROWS = 40, 3


def batch_inputs(model):
    generator = torch.Generator().manual_seed(5)
    config = model.draft_config
    ids = torch.randint(config.vocab_size, (ROWS, SEQ), generator=generator)
    aux = torch.randn(ROWS, SEQ, config.num_aux_hidden_states * config.target_hidden_size, generator=generator)
    target = torch.randn(ROWS, SEQ, config.vocab_size, generator=generator)
    loss_mask = (torch.rand(ROWS, SEQ, generator=generator) < 0.8).long()
    lengths = [torch.tensor([SEQ]), torch.tensor([15, 20]), torch.tensor([10, 12, 8])]
    anchor_pos, depth = peagle_ext.generate_cod_sample_indices(SEQ, loss_mask, 4, generator=generator)
    assert len({int((a < SEQ).sum()) for a in anchor_pos}) > 1, "rows of different lengths: padding is exercised"
    return ids, aux, target, loss_mask, lengths, anchor_pos, depth


def gradients(model):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("partitions, keys_only", [(1, True), (2, True), (3, True), (3, False)])
def test_a_batch_step_equals_its_rows_steps(layers, partitions, keys_only):
    model = tiny_model(num_hidden_layers=layers).train()
    ids, aux, target, loss_mask, lengths, anchor_pos, depth = batch_inputs(model)
    options = dict(sequence_partitions=partitions, keys_only_completion=keys_only)

    model.zero_grad(set_to_none=True)
    out = peagle_training_step(model, ids, aux, loss_mask, target_logits=target, lengths=lengths,
                               anchor_pos=anchor_pos, depth=depth, **options)
    if partitions == 1:
        out.loss.backward()
    batched_grads = gradients(model)

    total = out.num_supervised
    expected_loss, expected_grads, counts = 0.0, None, torch.zeros_like(out.depth_count)
    for row in range(ROWS):
        real = anchor_pos[row] < SEQ
        model.zero_grad(set_to_none=True)
        alone = peagle_training_step(model, ids[row], aux[row], loss_mask[row], target_logits=target[row],
                                     lengths=lengths[row], anchor_pos=anchor_pos[row, real],
                                     depth=depth[row, real], **options)
        weight = alone.num_supervised / total
        if partitions == 1:
            alone.loss.backward()
        expected_loss += float(alone.loss.detach()) * weight
        grads = [g * weight for g in gradients(model)]
        expected_grads = grads if expected_grads is None else [a + b for a, b in zip(expected_grads, grads)]
        counts += alone.depth_count
    assert torch.equal(out.depth_count, counts)
    torch.testing.assert_close(out.loss.detach(), torch.tensor(expected_loss), atol=1e-5, rtol=1e-5)
    for (name, _), got, want in zip(model.named_parameters(), batched_grads, expected_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    assert any(float(g.abs().sum()) > 0 for g in batched_grads)


def test_a_batch_step_samples_its_rows_when_no_layout_is_given():
    model = tiny_model()
    ids, aux, target, loss_mask, lengths, _, _ = batch_inputs(model)
    out = peagle_training_step(model, ids, aux, loss_mask, target_logits=target, lengths=lengths,
                               generator=torch.Generator().manual_seed(0))
    assert out.loss.requires_grad and out.num_supervised > 0
