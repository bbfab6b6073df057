"""Training a P-EAGLE draft: the flat COD inputs and the loss of one step.

One training step over one packed sequence of S positions (documents packed from position 0):

    out = peagle_training_step(model, input_ids, aux_hidden_states, loss_mask, target_logits=logits)
    out.loss.backward(); optimizer.step()

Alignment contract: position p of the inputs pairs the token the draft reads, ``input_ids[p]``,
with the target's auxiliary states ``aux_hidden_states[p]``, and ``target[p]`` (logits, or last
hidden state through the target's lm_head) is the distribution the draft must match there. A COD
element with anchor a and depth d has reference position r = a + d and is supervised by
``target[r]`` where ``loss_mask[r]`` is set. :func:`eagle_pairs` builds this pairing from raw
target outputs the EAGLE way (token t+1 with the states that produced it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..cod import generate_cod_sample_indices
from .llama import LlamaEagle3DraftModel


@dataclass
class PeagleStepOutput:
    """What one training step returns.

    loss: scalar, KL(target || draft) summed over supervised elements / their total count;
    depth_accuracy: float [num_depths], top-1 agreement per COD depth (NaN: none supervised);
    depth_count: int64 [num_depths], supervised elements per depth.
    """

    loss: torch.Tensor
    depth_accuracy: torch.Tensor
    depth_count: torch.Tensor

    @property
    def num_supervised(self) -> int:
        return int(self.depth_count.sum())


def eagle_pairs(tokens, aux_hidden_states, target_logits, loss_mask=None):
    """Pair raw target outputs the EAGLE way: position p reads token ``tokens[p+1]`` with the
    states the target computed at p, and must match the target's logits at p+1.

    tokens: [S+1]; aux_hidden_states: [S+1, A]; target_logits: [S+1, V]; loss_mask: [S+1] or None.
    Returns (input_ids [S], aux_hidden_states [S, A], target_logits [S, V], loss_mask [S] or None).
    """
    shifted_mask = None if loss_mask is None else loss_mask[1:]
    return tokens[1:], aux_hidden_states[:-1], target_logits[1:], shifted_mask


def build_peagle_inputs(model, input_ids, aux_hidden_states, anchor_pos, depth):
    """The flat P-EAGLE inputs for N COD elements of one sequence.

    input_ids: [S]; aux_hidden_states: [S, num_aux * target_hidden]; anchor_pos, depth: int [N].
    Returns (ids [1, N]: real ids at depth 0, ``mask_token_id`` deeper; projected [1, N, H]:
    ``fc``-projected aux states at depth 0, the projected ``mask_hidden`` deeper;
    position_ids [1, N]: ``anchor_pos + depth``). A draft without parallel drafting (EAGLE-3: no
    ``mask_hidden``) takes depth-0 elements only.
    """
    real = (depth == 0).unsqueeze(-1)
    mask_id = torch.full_like(anchor_pos, model.config.mask_token_id)
    ids = torch.where(real.squeeze(-1), input_ids[anchor_pos], mask_id)
    projected = model.project_hidden_states(aux_hidden_states)[anchor_pos]
    if model.config.parallel_drafting:
        projected = torch.where(real, projected, model.masked_projected_hidden().to(projected.dtype))
    elif not bool(real.all()):
        raise ValueError("depth must be 0 everywhere for a draft without parallel_drafting (it has no mask_hidden)")
    return ids.unsqueeze(0), projected.unsqueeze(0), (anchor_pos + depth).unsqueeze(0)


def _target_draft_logits(model, rows, target_logits, target_last_hidden, target_lm_head):
    """The target's logits over the draft vocabulary at reference positions ``rows``: [M, draft_vocab]."""
    vocab = model.draft_to_target_ids()
    if target_logits is not None:
        return target_logits[rows][:, vocab]
    if target_last_hidden is None or target_lm_head is None:
        raise ValueError("give target_logits, or target_last_hidden together with target_lm_head")
    weight = getattr(target_lm_head, "weight", target_lm_head)
    bias = getattr(target_lm_head, "bias", None)
    return F.linear(target_last_hidden[rows], weight[vocab], None if bias is None else bias[vocab])


def peagle_training_step(
    model: LlamaEagle3DraftModel,
    input_ids: torch.Tensor,
    aux_hidden_states: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    target_logits: torch.Tensor | None = None,
    target_last_hidden: torch.Tensor | None = None,
    target_lm_head=None,
    lengths: torch.Tensor | None = None,
    num_depths: int | None = None,
    down_sample_ratio: float = 0.7,
    down_sample_ratio_min: float = 0.2,
    max_anchors: int | None = None,
    generator: torch.Generator | None = None,
    anchor_pos: torch.Tensor | None = None,
    depth: torch.Tensor | None = None,
) -> PeagleStepOutput:
    """Forward one packed sequence through the draft's P-EAGLE pass and compute the loss.

    input_ids: [S]; aux_hidden_states: [S, num_aux * target_hidden]; loss_mask: [S];
    target_logits: [S, vocab] or target_last_hidden: [S, target_hidden] with target_lm_head (a
    Linear or its weight [vocab, target_hidden]); lengths: document lengths packed from 0
    (default: one document of S). COD indices are sampled (``num_depths`` default
    ``config.num_depths``) unless anchor_pos and depth are given. Does not call backward.
    """
    seq_len = input_ids.numel()
    device = input_ids.device
    if lengths is None:
        lengths = torch.tensor([seq_len], device=device)
    num_depths = model.config.num_depths if num_depths is None else num_depths
    if anchor_pos is None or depth is None:
        anchor_pos, depth = generate_cod_sample_indices(
            seq_len, loss_mask, num_depths, down_sample_ratio, down_sample_ratio_min, max_anchors, generator
        )
    ids, projected, position_ids = build_peagle_inputs(model, input_ids, aux_hidden_states, anchor_pos, depth)
    block_mask = model.build_peagle_block_mask(anchor_pos, depth, lengths, seq_len)
    hidden = model.forward_peagle(ids, projected, position_ids, block_mask)[0]

    reference = anchor_pos + depth
    supervised = (loss_mask[reference] != 0) & (reference < lengths.sum())
    rows = supervised.nonzero().squeeze(-1)
    draft_log_probs = F.log_softmax(model.compute_logits(hidden[rows]).float(), dim=-1)
    with torch.no_grad():
        target = _target_draft_logits(model, reference[rows], target_logits, target_last_hidden, target_lm_head)
        target_log_probs = F.log_softmax(target.float(), dim=-1)
    kl = F.kl_div(draft_log_probs, target_log_probs, reduction="sum", log_target=True)
    loss = kl / max(rows.numel(), 1)

    with torch.no_grad():
        num_depths = max(num_depths, int(depth.max()) + 1)
        correct = (draft_log_probs.argmax(-1) == target_log_probs.argmax(-1)).float()
        count = torch.bincount(depth[rows], minlength=num_depths)
        hits = torch.bincount(depth[rows], weights=correct, minlength=num_depths)
        accuracy = hits / count.clamp(min=1)
        accuracy[count == 0] = math.nan
    return PeagleStepOutput(loss, accuracy, count)
