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

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from ..cod import cod_segments, generate_cod_sample_indices
from .llama import LlamaEagle3DraftModel


@dataclass
class PeagleStepOutput:
    """What one training step returns.

    loss: scalar, KL(target || draft) summed over supervised elements / their total count (under
        DistributedDataParallel: this rank's sum / all ranks' count x the number of ranks);
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
    mask_id = torch.full_like(anchor_pos, model.draft_config.mask_token_id)
    ids = torch.where(real.squeeze(-1), input_ids[anchor_pos], mask_id)
    projected = model.project_hidden_states(aux_hidden_states)[anchor_pos]
    if model.draft_config.parallel_drafting:
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


def supervised_draft_logits(model, input_ids, aux_hidden_states, anchor_pos, depth, block_mask, rows,
                            query_rows=None, query_block_mask=None) -> torch.Tensor:
    """One flat P-EAGLE forward over the N elements (anchor_pos, depth: int [N]) of a sequence,
    and the draft's logits at the elements ``rows`` (int [M]): [M, draft_vocab]. With
    ``query_rows`` (int [Q]) only those elements are queries in the last layer (see
    ``forward_peagle``) and ``rows`` index them.

    This is what ``LlamaEagle3DraftModel.forward(peagle_training_inputs=...)`` runs, so that a
    DistributedDataParallel wrapper around the draft sees the whole step's forward.
    """
    ids, projected, position_ids = build_peagle_inputs(model, input_ids, aux_hidden_states, anchor_pos, depth)
    hidden = model.forward_peagle(ids, projected, position_ids, block_mask, query_rows=query_rows,
                                  query_block_mask=query_block_mask)[0]
    return model.compute_logits(hidden[rows])


def _world(model) -> tuple[int, object]:
    """(number of ranks, process group) when ``model`` is a DistributedDataParallel wrapper, else (1, None)."""
    if isinstance(model, DistributedDataParallel):
        group = model.process_group
        return torch.distributed.get_world_size(group), group
    return 1, None


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
    sliding_window: int | None = None,
    sequence_partitions: int = 1,
    keys_only_completion: bool = True,
) -> PeagleStepOutput:
    """Forward one packed sequence through the draft's P-EAGLE pass and compute the loss.

    input_ids: [S]; aux_hidden_states: [S, num_aux * target_hidden]; loss_mask: [S];
    target_logits: [S, vocab] or target_last_hidden: [S, target_hidden] with target_lm_head (a
    Linear or its weight [vocab, target_hidden]); lengths: document lengths packed from 0
    (default: one document of S); sliding_window: the mask's optional window W. COD indices are
    sampled (``num_depths`` default ``config.num_depths``) unless anchor_pos and depth are given.

    ``sequence_partitions`` K: with K == 1 one flat forward; the returned loss carries its graph
    and the caller calls ``backward()``. With K > 1 the elements are split into K segments
    (:func:`peagle_ext.cod_segments`: each segment's own elements plus the depth-0 elements before
    them) and each segment runs its own forward and backward, so only one segment's activations
    are alive at a time; the gradients accumulated in ``.grad`` equal those of the flat step's
    ``loss.backward()``, and the returned loss is detached. ``keys_only_completion`` (the default):
    in the draft's last layer (its only one, for one-layer drafts) a segment's completion elements
    are keys only, through a mask whose queries are the segment's own elements (Q_LEN < KV_LEN);
    they need states of their own only for the layers before it.

    ``model`` may be the draft or a ``DistributedDataParallel`` wrapping it (each rank passes its
    own sequence and samples its own layout). The loss is then normalized by the supervised count
    of all ranks together (one all-reduce) and multiplied by the number of ranks, so that DDP's
    gradient averaging yields the gradient of the global batch's loss; the mean of the ranks'
    losses is that loss. Partitioned steps run every forward through the wrapper and synchronize
    gradients once, in the last segment's backward (``no_sync`` before it).
    """
    draft = model.module if isinstance(model, DistributedDataParallel) else model
    if isinstance(sequence_partitions, bool) or not isinstance(sequence_partitions, int) or sequence_partitions < 1:
        raise ValueError(f"sequence_partitions must be an int >= 1, got {sequence_partitions!r}")
    seq_len = input_ids.numel()
    device = input_ids.device
    if lengths is None:
        lengths = torch.tensor([seq_len], device=device)
    num_depths = draft.draft_config.num_depths if num_depths is None else num_depths
    if anchor_pos is None or depth is None:
        anchor_pos, depth = generate_cod_sample_indices(
            seq_len, loss_mask, num_depths, down_sample_ratio, down_sample_ratio_min, max_anchors=max_anchors,
            generator=generator,
        )
    reference = anchor_pos + depth
    supervised = (loss_mask[reference] != 0) & (reference < lengths.sum())

    world_size, group = _world(model)
    total_supervised = supervised.sum()
    if world_size > 1:
        torch.distributed.all_reduce(total_supervised, group=group)
    scale = world_size / total_supervised.clamp(min=1).to(torch.float32)

    if sequence_partitions == 1:
        parts = [(torch.arange(anchor_pos.numel(), device=device), torch.ones_like(supervised))]
    else:
        parts = [(elements, own) for elements, own in cod_segments(anchor_pos, depth, seq_len, sequence_partitions)
                 if elements.numel()]
    num_depths = max(num_depths, int(depth.max()) + 1)
    hits = torch.zeros(num_depths, device=device)
    count = torch.zeros(num_depths, dtype=torch.int64, device=device)
    total_kl = torch.zeros((), device=device)
    num_layers = len(draft.model.layers)
    for index, (elements, own) in enumerate(parts):
        part_anchor, part_depth = anchor_pos[elements], depth[elements]
        # The queries: the segment's own elements when its completion is keys only, else all.
        query_rows = torch.nonzero(own).flatten() if sequence_partitions > 1 and keys_only_completion else None
        queries = elements if query_rows is None else elements[query_rows]
        rows = torch.nonzero((own if query_rows is None else own[query_rows]) & supervised[queries]).flatten()
        synced_later = world_size > 1 and sequence_partitions > 1 and index < len(parts) - 1
        with model.no_sync() if synced_later else contextlib.nullcontext():
            masks = {}
            if query_rows is None or num_layers > 1:
                masks["block_mask"] = draft.build_peagle_block_mask(part_anchor, part_depth, lengths, seq_len,
                                                                    sliding_window=sliding_window)
            if query_rows is not None:
                masks["query_block_mask"] = draft.build_peagle_block_mask(
                    anchor_pos[queries], depth[queries], lengths, seq_len, sliding_window=sliding_window,
                    kv_anchor_pos=part_anchor, kv_depth=part_depth)
            logits = model(peagle_training_inputs=dict(
                input_ids=input_ids, aux_hidden_states=aux_hidden_states, anchor_pos=part_anchor,
                depth=part_depth, block_mask=masks.get("block_mask"), rows=rows, query_rows=query_rows,
                query_block_mask=masks.get("query_block_mask")))
            draft_log_probs = F.log_softmax(logits.float(), dim=-1)
            with torch.no_grad():
                target = _target_draft_logits(draft, reference[queries[rows]], target_logits, target_last_hidden,
                                              target_lm_head)
                target_log_probs = F.log_softmax(target.float(), dim=-1)
            kl = F.kl_div(draft_log_probs, target_log_probs, reduction="sum", log_target=True)
            if sequence_partitions > 1:
                (kl * scale).backward()
        total_kl = total_kl + (kl.detach() if sequence_partitions > 1 else kl)
        with torch.no_grad():
            correct = (draft_log_probs.argmax(-1) == target_log_probs.argmax(-1)).float()
            count += torch.bincount(depth[queries[rows]], minlength=num_depths)
            hits += torch.bincount(depth[queries[rows]], weights=correct, minlength=num_depths)

    accuracy = hits / count.clamp(min=1)
    accuracy[count == 0] = math.nan
    return PeagleStepOutput(total_kl * scale, accuracy, count)
