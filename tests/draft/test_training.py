"""The P-EAGLE training step: flat inputs, KL loss, per-depth accuracy, and that it learns."""

from __future__ import annotations

import math

import pytest
import torch

from peagle_ext.draft.tiny_target import TinyTarget
from peagle_ext.draft.training import build_peagle_inputs, eagle_pairs, peagle_training_step

from draft_helpers import cod_indices, random_sequence, single_thread, tiny_model  # noqa: F401 (autouse fixture)

SEQ = 24


def test_eagle_pairs_shift():
    tokens = torch.arange(5)
    aux = torch.arange(5.0)[:, None].expand(5, 3)
    logits = torch.arange(5.0)[:, None].expand(5, 7) * 10
    ids, paired_aux, paired_logits, mask = eagle_pairs(tokens, aux, logits, torch.tensor([0, 1, 1, 0, 1]))
    assert ids.tolist() == [1, 2, 3, 4]
    assert paired_aux[:, 0].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert paired_logits[:, 0].tolist() == [10.0, 20.0, 30.0, 40.0]
    assert mask.tolist() == [1, 1, 0, 1]


def test_build_peagle_inputs():
    model = tiny_model()
    ids, aux = random_sequence(model, SEQ)
    anchor_pos, depth = cod_indices(SEQ)
    flat_ids, projected, positions = build_peagle_inputs(model, ids, aux, anchor_pos, depth)
    n = anchor_pos.numel()
    assert flat_ids.shape == positions.shape == (1, n) and projected.shape == (1, n, 32)
    real = depth == 0
    assert torch.equal(flat_ids[0, real], ids[anchor_pos[real]])
    assert (flat_ids[0, ~real] == model.config.mask_token_id).all()
    assert torch.equal(positions[0], anchor_pos + depth)
    torch.testing.assert_close(projected[0, real], aux[anchor_pos[real]] @ model.model.fc.weight.T)
    torch.testing.assert_close(projected[0, ~real], model.masked_projected_hidden().expand(int((~real).sum()), -1))


def _step(model, ids, aux, loss_mask, **kwargs):
    anchor_pos, depth = cod_indices(SEQ)
    return peagle_training_step(model, ids, aux, loss_mask, anchor_pos=anchor_pos, depth=depth, **kwargs)


def test_loss_is_kl_over_supervised_elements_with_one_total_count():
    model = tiny_model()
    ids, aux = random_sequence(model, SEQ)
    target_logits = torch.randn(SEQ, 96, generator=torch.Generator().manual_seed(3))
    loss_mask = torch.ones(SEQ)
    loss_mask[[2, 5, 6, 19]] = 0
    out = _step(model, ids, aux, loss_mask, target_logits=target_logits)

    anchor_pos, depth = cod_indices(SEQ)
    reference = anchor_pos + depth
    supervised = loss_mask[reference] != 0
    flat = build_peagle_inputs(model, ids, aux, anchor_pos, depth)
    block_mask = model.build_peagle_block_mask(anchor_pos, depth, torch.tensor([SEQ]), SEQ)
    logits = model.compute_logits(model.forward_peagle(*flat, block_mask))[0]
    p = target_logits[reference].softmax(-1)
    per_element = (p * (p.log() - logits.log_softmax(-1))).sum(-1)
    torch.testing.assert_close(out.loss, per_element[supervised].sum() / supervised.sum())
    counts = torch.bincount(depth[supervised], minlength=4)
    assert out.depth_count.tolist() == counts.tolist() and out.num_supervised == int(supervised.sum())
    hits = (logits.argmax(-1) == target_logits[reference].argmax(-1)) & supervised
    expected_accuracy = torch.bincount(depth[hits], minlength=4) / counts
    torch.testing.assert_close(out.depth_accuracy, expected_accuracy.float())


def test_loss_zero_and_accuracy_one_when_target_is_the_draft():
    model = tiny_model()
    ids, aux = random_sequence(model, SEQ)
    anchor_pos, depth = torch.arange(SEQ), torch.zeros(SEQ, dtype=torch.int64)
    flat = build_peagle_inputs(model, ids, aux, anchor_pos, depth)
    with torch.no_grad():
        block_mask = model.build_peagle_block_mask(anchor_pos, depth, torch.tensor([SEQ]), SEQ)
        own_logits = model.compute_logits(model.forward_peagle(*flat, block_mask))[0]
    out = peagle_training_step(
        model, ids, aux, torch.ones(SEQ), target_logits=own_logits, anchor_pos=anchor_pos, depth=depth, num_depths=1
    )
    assert abs(out.loss.item()) < 1e-5
    assert out.depth_accuracy.tolist() == [1.0]


def test_last_hidden_with_lm_head_equals_logits_and_padding_is_unsupervised():
    model = tiny_model()
    ids, aux = random_sequence(model, SEQ)
    generator = torch.Generator().manual_seed(4)
    last_hidden, lm_head = torch.randn(SEQ, 16, generator=generator), torch.nn.Linear(16, 96, bias=False)
    kwargs = {"lengths": torch.tensor([10, 8])}  # positions 18.. are padding
    from_logits = _step(model, ids, aux, torch.ones(SEQ), target_logits=lm_head(last_hidden).detach(), **kwargs)
    from_hidden = _step(model, ids, aux, torch.ones(SEQ), target_last_hidden=last_hidden, target_lm_head=lm_head,
                        **kwargs)
    torch.testing.assert_close(from_hidden.loss, from_logits.loss)
    anchor_pos, depth = cod_indices(SEQ)
    assert from_logits.num_supervised == int((anchor_pos + depth < 18).sum())
    with pytest.raises(ValueError, match="target_logits"):
        _step(model, ids, aux, torch.ones(SEQ))


def test_loss_uses_only_the_draft_vocabulary():
    model = tiny_model(draft_vocab_size=40)
    model.set_draft_vocab(torch.arange(0, 80, 2))
    ids, aux = random_sequence(model, SEQ)
    target_logits = torch.randn(SEQ, 96, generator=torch.Generator().manual_seed(5))
    base = _step(model, ids, aux, torch.ones(SEQ), target_logits=target_logits).loss
    outside = target_logits.clone()
    outside[:, 1::2] += 50.0  # odd ids are outside the draft vocabulary
    torch.testing.assert_close(_step(model, ids, aux, torch.ones(SEQ), target_logits=outside).loss, base)
    inside = target_logits.clone()
    inside[:, 0] += 5.0
    assert not torch.allclose(_step(model, ids, aux, torch.ones(SEQ), target_logits=inside).loss, base)


def test_step_samples_cod_and_reports_every_depth():
    model = tiny_model()
    ids, aux = random_sequence(model, SEQ)
    out = peagle_training_step(
        model, ids, aux, torch.ones(SEQ), target_logits=torch.randn(SEQ, 96), num_depths=6,
        generator=torch.Generator().manual_seed(0)
    )
    assert out.depth_accuracy.shape == out.depth_count.shape == (6,)
    assert out.depth_count[0] == SEQ and (out.depth_count[1:] > 0).all()
    assert all(0.0 <= a <= 1.0 for a in out.depth_accuracy.tolist() if not math.isnan(a))


def test_loss_falls_over_30_adamw_steps():
    torch.manual_seed(0)
    target = TinyTarget(vocab_size=64, hidden_size=16, sharpness=6.0).eval()
    model = tiny_model(vocab_size=64, draft_vocab_size=64, target_hidden_size=16, mask_token_id=63).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(30):
        with torch.no_grad():
            tokens = target.sample(33, generator)
            ids, aux, logits, _ = eagle_pairs(tokens, *target(tokens))
        out = peagle_training_step(model, ids, aux, torch.ones(32), target_logits=logits, num_depths=3,
                                   generator=generator)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, losses
