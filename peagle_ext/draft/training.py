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

from .._inputs import normalize_mask_inputs, stack_lengths
from ..cod import cod_segments, generate_cod_sample_indices
from . import context_parallel as cp_parts
from .flat_inputs import build_peagle_inputs, supervised_draft_logits
from .llama import LlamaEagle3DraftModel

__all__ = ["PeagleStepOutput", "build_peagle_inputs", "eagle_pairs", "peagle_training_step", "supervised_draft_logits"]


@dataclass
class PeagleStepOutput:
    """What one training step returns.

    loss: scalar, KL(target || draft) summed over supervised elements / their total count (under
        DistributedDataParallel: this rank's sum / all ranks' count x the number of ranks; with a
        context-parallel group, the group's sum: the same on every rank of the group);
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
    context_parallel_group=None,
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

    A batch of B sequences of one length S in one forward: input_ids [B, S], aux_hidden_states
    [B, S, A], loss_mask [B, S], the target [B, S, ...], lengths a list of B tensors or a
    zero-padded [B, D], anchor_pos/depth (if given) [B, N] with padding elements anchored at S
    (:func:`peagle_ext.pad_rows`; sampled so when not given). The loss is the KL sum over every
    row's supervised elements over their total count, so that loss and gradients equal those of
    the rows' own steps weighted by their supervised counts; partitioned steps run segment k of
    every row in one forward.

    ``model`` may be the draft or a ``DistributedDataParallel`` wrapping it (each rank passes its
    own sequence and samples its own layout). The loss is then normalized by the supervised count
    of all ranks together (one all-reduce) and multiplied by the number of ranks, so that DDP's
    gradient averaging yields the gradient of the global batch's loss; the mean of the ranks'
    losses is that loss. Partitioned steps run every forward through the wrapper and synchronize
    gradients once, in the last segment's backward (``no_sync`` before it).

    ``context_parallel_group`` (a ``torch.distributed`` ProcessGroup, or a one-dimensional
    DeviceMesh; see :mod:`peagle_ext.draft.context_parallel`): every rank of the group passes the
    same sample, and the step's elements are shared between them, each rank running the draft
    and its mask (queries: its share; keys: all elements) for its own share only. The COD layout
    is drawn on the group's first rank and broadcast (a given one is checked to be the same on
    every rank). The returned loss, depth_accuracy and depth_count are the whole step's, the same
    on every rank; after ``loss.backward()`` (every rank calls it) the sum of the ranks' gradients
    is the single-process step's: :func:`~peagle_ext.draft.context_parallel.all_reduce_gradients`
    sums them, or ``model`` is a DistributedDataParallel wrapper over the whole data x context
    mesh (its average then gives the global batch's gradient, the returned loss being the group's
    sample's share of the global batch's loss, as under DDP alone). ``sequence_partitions`` must be 1.
    """
    draft = model.module if isinstance(model, DistributedDataParallel) else model
    if isinstance(sequence_partitions, bool) or not isinstance(sequence_partitions, int) or sequence_partitions < 1:
        raise ValueError(f"sequence_partitions must be an int >= 1, got {sequence_partitions!r}")
    cp = cp_parts.context_parallel(context_parallel_group, model, sequence_partitions)
    batched = input_ids.dim() == 2
    seq_len = input_ids.shape[-1]
    if lengths is None:
        lengths = torch.tensor([seq_len], device=input_ids.device)
        if batched:
            lengths = lengths.expand(input_ids.shape[0], 1)
    elif batched and isinstance(lengths, (list, tuple)):
        lengths = stack_lengths(lengths).to(input_ids.device)
    num_depths = draft.draft_config.num_depths if num_depths is None else num_depths
    given = anchor_pos is not None and depth is not None
    if not given and (cp is None or cp.rank == 0):
        anchor_pos, depth = generate_cod_sample_indices(seq_len, loss_mask, num_depths, down_sample_ratio,
                                                        down_sample_ratio_min, max_anchors=max_anchors,
                                                        generator=generator)
    if cp is not None:
        anchor_pos, depth = cp_parts.share_layout(cp, anchor_pos, depth, given, input_ids.device)
        return _context_parallel_step(model, draft, cp, input_ids, aux_hidden_states, loss_mask, lengths, anchor_pos,
                                      depth, num_depths, sliding_window, target_logits, target_last_hidden,
                                      target_lm_head)
    reference, supervised = _supervision(anchor_pos, depth, loss_mask, lengths)
    scale = _loss_scale(model, supervised)
    if batched:
        anchor_pos, depth, supervised, reference, segments = _batch_segment_plan(
            anchor_pos, depth, seq_len, sequence_partitions, keys_only_completion, supervised, reference)
    else:
        segments = _segment_plan(anchor_pos, depth, seq_len, sequence_partitions, keys_only_completion, supervised)
    partitioned = sequence_partitions > 1
    world_size, _ = _world(model)
    metrics = _DepthMetrics(max(num_depths, int(depth.max()) + 1), input_ids.device)
    total_kl = torch.zeros((), device=input_ids.device)
    for index, segment in enumerate(segments):
        # A partitioned step's gradients are reduced across ranks once, in its last backward.
        synced_later = world_size > 1 and partitioned and index < len(segments) - 1
        with model.no_sync() if synced_later else contextlib.nullcontext():
            kl, draft_log_probs, target_log_probs = _segment_forward(
                model, draft, segment, anchor_pos, depth, input_ids, aux_hidden_states, lengths, sliding_window,
                reference, target_logits, target_last_hidden, target_lm_head)
            if partitioned:  # this segment's activations go now; a flat step leaves backward() to the caller
                (kl * scale).backward()
        total_kl = total_kl + (kl.detach() if partitioned else kl)
        metrics.add(_take(depth, segment.queries)[segment.rows], draft_log_probs, target_log_probs)
    return PeagleStepOutput(total_kl * scale, *metrics.accuracy_and_count())


def _supervision(anchor_pos, depth, loss_mask, lengths) -> tuple[torch.Tensor, torch.Tensor]:
    """(reference, supervised) per element: its reference position ``anchor + depth``, and whether
    the target supervises it there (``loss_mask`` set, inside the documents). A batch's ([B, N],
    lengths [B, D]) padding elements, anchored at S, are never supervised."""
    reference = anchor_pos + depth
    if reference.dim() == 1:
        return reference, (loss_mask[reference] != 0) & (reference < lengths.sum())
    inside = reference < lengths.sum(-1, keepdim=True)
    return reference, (loss_mask.gather(1, reference.clamp(max=loss_mask.shape[-1] - 1)) != 0) & inside


def _take(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``values[index]`` for one sequence ([N], index [E]); row by row for a batch ([B, N], [B, E])."""
    return values[index] if index.dim() == 1 else values.gather(1, index)


def _loss_scale(model, supervised: torch.Tensor) -> torch.Tensor:
    """What a KL sum is multiplied by: the number of ranks over the supervised count of all ranks
    (one all-reduce under DDP), so that DDP's gradient averaging gives the global batch's loss."""
    world_size, group = _world(model)
    total_supervised = supervised.sum()
    if world_size > 1:
        torch.distributed.all_reduce(total_supervised, group=group)
    return world_size / total_supervised.clamp(min=1).to(torch.float32)


@dataclass
class _Segment:
    """One forward of a step. elements: int [E], the elements it runs over (indices into the
    step's elements); query_rows: int [Q] into ``elements``, the last layer's queries when the
    completion is keys only, else None (every element a query); queries: int [Q], the query
    elements (indices into the step's elements); rows: int [M] into the queries, the supervised
    ones among the segment's own elements. For a batch: elements [B, E], query_rows and queries
    [B, Q] (each row filled up with a padding element), rows a (row [M], query [M]) pair."""

    elements: torch.Tensor
    query_rows: torch.Tensor | None
    queries: torch.Tensor
    rows: torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def _segment_plan(anchor_pos, depth, seq_len: int, sequence_partitions: int, keys_only_completion: bool,
                  supervised: torch.Tensor) -> list[_Segment]:
    """The step's forwards: one over every element, or one per non-empty COD segment
    (:func:`peagle_ext.cod_segments`)."""
    if sequence_partitions == 1:
        everything = torch.arange(anchor_pos.numel(), device=anchor_pos.device)
        return [_Segment(everything, None, everything, torch.nonzero(supervised).flatten())]
    segments = []
    for elements, own in cod_segments(anchor_pos, depth, seq_len, sequence_partitions):
        if not elements.numel():
            continue
        query_rows = torch.nonzero(own).flatten() if keys_only_completion else None
        queries = elements if query_rows is None else elements[query_rows]
        own_queries = own if query_rows is None else own[query_rows]
        rows = torch.nonzero(own_queries & supervised[queries]).flatten()
        segments.append(_Segment(elements, query_rows, queries, rows))
    return segments


def _batch_segment_plan(anchor_pos, depth, seq_len: int, sequence_partitions: int, keys_only_completion: bool,
                        supervised, reference):
    """_segment_plan for a batch ([B, N] elements): segment k of every row in one forward, rows
    filled up to one size with a padding element (anchored at S) appended to every row. Returns the
    elements, supervision and reference with that column appended, and the segments."""
    rows, n = anchor_pos.shape
    padding = n  # the appended element's index in every row
    anchor_pos = torch.cat([anchor_pos, anchor_pos.new_full((rows, 1), seq_len)], 1)
    depth = torch.cat([depth, depth.new_zeros((rows, 1))], 1)
    supervised = torch.cat([supervised, supervised.new_zeros((rows, 1))], 1)
    reference = anchor_pos + depth
    device = anchor_pos.device
    if sequence_partitions == 1:
        everything = torch.arange(n + 1, device=device).expand(rows, -1)
        return anchor_pos, depth, supervised, reference, [
            _Segment(everything, None, everything, tuple(torch.nonzero(supervised).t()))]
    per_row = []  # per row, its segments as (elements, own) over the row's real elements
    for row in range(rows):
        real = torch.nonzero(anchor_pos[row] < seq_len).flatten()
        per_row.append([(real[elements], own) for elements, own in
                        cod_segments(anchor_pos[row, real], depth[row, real], seq_len, sequence_partitions)])

    def filled(tensors, length):
        return torch.stack([torch.cat([t, t.new_full((length - t.numel(),), padding)]) for t in tensors])

    segments = []
    for k in range(sequence_partitions):
        parts = [row_segments[k] for row_segments in per_row]
        if not any(elements.numel() for elements, _ in parts):
            continue
        width = max(elements.numel() for elements, _ in parts) + 1  # at least one padding slot per row
        elements = filled([e for e, _ in parts], width)
        own = torch.stack([torch.cat([o, o.new_zeros(width - o.numel())]) for _, o in parts])
        if keys_only_completion:
            own_rows = [torch.nonzero(o).flatten() for _, o in parts]
            slot = width - 1  # a padding slot of every row
            query_rows = torch.stack([torch.cat([r, r.new_full((max(map(len, own_rows)) - r.numel(),), slot)])
                                      for r in own_rows])
        else:
            query_rows = None
        queries = elements if query_rows is None else elements.gather(1, query_rows)
        own_queries = own if query_rows is None else own.gather(1, query_rows)
        picked = tuple(torch.nonzero(own_queries & supervised.gather(1, queries)).t())
        segments.append(_Segment(elements, query_rows, queries, picked))
    return anchor_pos, depth, supervised, reference, segments


def _segment_forward(model, draft, segment: _Segment, anchor_pos, depth, input_ids, aux_hidden_states, lengths,
                     sliding_window, reference, target_logits, target_last_hidden, target_lm_head):
    """One segment's masks and forward (through ``model``, the DDP wrapper if any) and its KL sum
    against the target: (kl, draft log-probs [M, V], target log-probs [M, V])."""
    seq_len = input_ids.shape[-1]
    part_anchor, part_depth = _take(anchor_pos, segment.elements), _take(depth, segment.elements)
    block_mask = query_block_mask = None
    if segment.query_rows is None or len(draft.model.layers) > 1:  # a one-layer draft's last layer is its only one
        block_mask = draft.build_peagle_block_mask(part_anchor, part_depth, lengths, seq_len,
                                                   sliding_window=sliding_window)
    if segment.query_rows is not None:
        query_block_mask = draft.build_peagle_block_mask(
            _take(anchor_pos, segment.queries), _take(depth, segment.queries), lengths, seq_len,
            sliding_window=sliding_window, kv_anchor_pos=part_anchor, kv_depth=part_depth)
    logits = model(peagle_training_inputs=dict(
        input_ids=input_ids, aux_hidden_states=aux_hidden_states, anchor_pos=part_anchor, depth=part_depth,
        block_mask=block_mask, rows=segment.rows, query_rows=segment.query_rows, query_block_mask=query_block_mask))
    positions = _take(reference, segment.queries)[segment.rows]  # where the target supervises them
    return _kl_to_target(draft, logits, positions, segment.rows, target_logits, target_last_hidden, target_lm_head)


def _kl_to_target(draft, logits, positions, rows, target_logits, target_last_hidden, target_lm_head):
    """The KL sum of the draft's ``logits`` [M, V] against the target at reference ``positions``
    ([M]; of rows ``rows[0]`` for a batch, whose ``rows`` is a pair): (kl, draft log-probs,
    target log-probs)."""
    draft_log_probs = F.log_softmax(logits.float(), dim=-1)
    with torch.no_grad():
        if isinstance(rows, tuple):
            positions = (rows[0], positions)
        target = _target_draft_logits(draft, positions, target_logits, target_last_hidden, target_lm_head)
        target_log_probs = F.log_softmax(target.float(), dim=-1)
    kl = F.kl_div(draft_log_probs, target_log_probs, reduction="sum", log_target=True)
    return kl, draft_log_probs, target_log_probs


def _context_parallel_step(model, draft, cp, input_ids, aux_hidden_states, loss_mask, lengths, anchor_pos, depth,
                           num_depths, sliding_window, target_logits, target_last_hidden, target_lm_head):
    """The step under context parallelism (see :mod:`peagle_ext.draft.context_parallel`): this rank's
    share of the elements, its forward with every layer's keys and values gathered from all ranks,
    and the group's loss and metrics."""
    seq_len = input_ids.shape[-1]
    # The mask builder's own checks of the layout, documents and window, before any share is cut.
    checked = normalize_mask_inputs(anchor_pos, depth, lengths, seq_len, sliding_window=sliding_window)
    reference, supervised = _supervision(anchor_pos, depth, loss_mask, lengths)
    work = cp_parts.attention_work(anchor_pos, depth, lengths, seq_len, checked.sliding_window)
    boundaries = cp_parts.split_shares(work.reshape(-1, work.shape[-1]).sum(0), cp.size)
    mine = slice(boundaries[cp.rank], boundaries[cp.rank + 1])
    own_anchor, own_depth, own_supervised = anchor_pos[..., mine], depth[..., mine], supervised[..., mine]
    rows = torch.nonzero(own_supervised)
    rows = tuple(rows.t()) if own_supervised.dim() == 2 else rows.flatten()
    block_mask = draft.build_peagle_block_mask(own_anchor, own_depth, lengths, seq_len, sliding_window=sliding_window,
                                               kv_anchor_pos=anchor_pos, kv_depth=depth)
    logits = model(peagle_training_inputs=dict(
        input_ids=input_ids, aux_hidden_states=aux_hidden_states, anchor_pos=own_anchor, depth=own_depth,
        block_mask=block_mask, rows=rows, key_value_gather=cp_parts.KeyValueGather(cp, boundaries)))
    kl, draft_log_probs, target_log_probs = _kl_to_target(
        draft, logits, reference[..., mine][rows], rows, target_logits, target_last_hidden, target_lm_head)

    # Gradients flow through this rank's KL alone (summed over the ranks, they are the step's);
    # the value is the group's KL, exactly the same number on every rank.
    world_size, data_group = _world(model)
    count = own_supervised.sum()
    torch.distributed.all_reduce(count, group=data_group if world_size > 1 else cp.group)
    gradient_scale = world_size / count.clamp(min=1).to(torch.float32)
    value_scale = gradient_scale / cp.size if world_size > 1 else gradient_scale
    group_kl = kl.detach().clone()
    torch.distributed.all_reduce(group_kl, group=cp.group)
    loss = value_scale * group_kl + gradient_scale * (kl - kl.detach())

    metrics = _DepthMetrics(max(num_depths, int(depth.max()) + 1), input_ids.device)
    metrics.add(own_depth[rows], draft_log_probs, target_log_probs)
    torch.distributed.all_reduce(metrics.hits, group=cp.group)
    torch.distributed.all_reduce(metrics.count, group=cp.group)
    return PeagleStepOutput(loss, *metrics.accuracy_and_count())


class _DepthMetrics:
    """Top-1 agreement with the target per COD depth, summed over a step's segments."""

    def __init__(self, num_depths: int, device):
        self.hits = torch.zeros(num_depths, device=device)
        self.count = torch.zeros(num_depths, dtype=torch.int64, device=device)

    @torch.no_grad()
    def add(self, depth, draft_log_probs, target_log_probs) -> None:
        correct = (draft_log_probs.argmax(-1) == target_log_probs.argmax(-1)).float()
        self.count += torch.bincount(depth, minlength=self.count.numel())
        self.hits += torch.bincount(depth, weights=correct, minlength=self.hits.numel())

    def accuracy_and_count(self) -> tuple[torch.Tensor, torch.Tensor]:
        accuracy = self.hits / self.count.clamp(min=1)
        accuracy[self.count == 0] = math.nan
        return accuracy, self.count
