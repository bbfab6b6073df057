"""Context parallelism for the P-EAGLE training step: one sequence's COD elements split across the
ranks of a process group, each rank running the draft for its share only.

    cp_group = torch.distributed.new_group([0, 1])     # the ranks that hold one sample between them
    out = peagle_training_step(draft, input_ids, aux_hidden_states, loss_mask, target_logits=logits,
                               context_parallel_group=cp_group)   # the same sample on every rank
    out.loss.backward()
    all_reduce_gradients(draft, cp_group)              # or DDP over the data x context mesh does it
    optimizer.step()

How (:func:`peagle_ext.draft.training.peagle_training_step` calls the pieces here):

* the COD layout is drawn on the group's first rank and broadcast (:func:`share_layout`); a layout
  given to the step is checked against the first rank's instead;
* the elements, in their flat order, are cut into one contiguous share per rank of about equal
  attention work (:func:`attention_work`: the keys each element sees, which grow with its position
  and depth, not the element count);
* each rank runs every layer for its own elements only; in every layer's attention it rotates its
  keys by its own elements' positions, then :class:`KeyValueGather` gathers the keys and values
  of all ranks (the backward sends each rank the gradients of its own), and its queries attend
  to all of them through a BlockMask of its share's queries against all keys, so the softmax is
  the single process's exactly and no rank ever builds the N x N mask;
* each rank's loss is the KL over its own supervised elements; gradients flow through its own
  elements and, via the gather's backward, through its keys as other ranks' queries used them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["ContextParallel", "KeyValueGather", "all_reduce_gradients", "attention_work", "context_parallel",
           "share_layout", "split_shares"]


@dataclass(frozen=True)
class ContextParallel:
    """A checked context-parallel group: ``group``, this process's ``rank`` in it, its ``size``,
    and ``source``, the global rank of its first member (where the COD layout is drawn)."""

    group: object
    rank: int
    size: int
    source: int


def context_parallel(group, model=None, sequence_partitions: int = 1) -> ContextParallel | None:
    """Check ``group`` (the step's ``context_parallel_group``) and what it is combined with.

    ``group``: None (no context parallelism), a ``torch.distributed`` ProcessGroup this process
    belongs to, or a one-dimensional DeviceMesh (its group). ``model`` may be a
    DistributedDataParallel wrapper only when its process group holds every rank of ``group``
    (data parallelism over the whole data x context mesh). ``sequence_partitions`` must be 1.
    """
    if group is None:
        return None
    mesh_type = _device_mesh_type()
    if mesh_type is not None and isinstance(group, mesh_type):
        if group.ndim != 1:
            raise ValueError(f"context_parallel_group must be a one-dimensional DeviceMesh, got {group.ndim} "
                             f"dimensions (pass mesh['cp'], say)")
        group = group.get_group()
    if not dist.is_available() or not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"context_parallel_group must be a torch.distributed ProcessGroup (or a one-dimensional "
                        f"DeviceMesh) that this process belongs to, got {type(group).__name__}")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("context_parallel_group does not hold this process's rank")
    if isinstance(sequence_partitions, int) and sequence_partitions > 1:
        raise ValueError(f"sequence_partitions must be 1 with context_parallel_group (each rank already runs only "
                         f"its share of the elements), got {sequence_partitions}")
    members = dist.get_process_group_ranks(group)
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        data_ranks = set(dist.get_process_group_ranks(model.process_group))
        if not data_ranks.issuperset(members):
            raise ValueError("context_parallel_group holds ranks that the DistributedDataParallel wrapper's process "
                             "group does not: wrap the draft in DDP over the whole data x context mesh")
    return ContextParallel(group, rank, len(members), members[0])


def _device_mesh_type():
    try:
        from torch.distributed.device_mesh import DeviceMesh
    except ImportError:  # a torch built without distributed
        return None
    return DeviceMesh


def share_layout(cp: ContextParallel, anchor_pos, depth, given: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The group's COD layout on every rank: the first rank's (anchor_pos, depth), broadcast (two
    small broadcasts). Where ``given`` (the caller passed a layout), this rank's must equal it:
    every rank then raises one ValueError on a mismatch anywhere (one all-reduce)."""
    source = cp.rank == 0
    header = torch.zeros(3, dtype=torch.int64, device=device)  # dims, rows (1 for [N]), N
    if source:
        n = anchor_pos.shape[-1]
        header.copy_(torch.tensor([anchor_pos.dim(), anchor_pos.numel() // max(n, 1), n]))
    dist.broadcast(header, src=cp.source, group=cp.group)
    dims, rows, n = header.tolist()
    layout = torch.empty(2, rows, n, dtype=torch.int64, device=device)
    if source:
        layout.copy_(torch.stack([anchor_pos.reshape(rows, n), depth.reshape(rows, n)]))
    dist.broadcast(layout, src=cp.source, group=cp.group)
    shape = (rows, n) if dims == 2 else (n,)
    mismatch = torch.zeros(1, dtype=torch.int64, device=device)
    if given and not source:
        mismatch[0] = int(anchor_pos.shape != shape or depth.shape != shape or not torch.equal(
            anchor_pos.to(device, torch.int64), layout[0].reshape(shape)) or not torch.equal(
            depth.to(device, torch.int64), layout[1].reshape(shape)))
    dist.all_reduce(mismatch, group=cp.group)
    if mismatch.item():
        raise ValueError("anchor_pos and depth differ between the ranks of context_parallel_group: give every rank "
                         "the same layout, or none (the first rank then draws it for all)")
    return layout[0].reshape(shape), layout[1].reshape(shape)


def attention_work(anchor_pos, depth, lengths, seq_len: int, sliding_window: int | None = None) -> torch.Tensor:
    """The keys each element sees under the P-EAGLE rule: the depth-0 elements of its document before
    its anchor (within the window), plus its rollout up to itself (``depth + 1`` elements, the
    depth-0 one at its anchor first); 0 for padding. Exact for COD layouts (every rollout
    complete), an estimate for others. anchor_pos, depth: [N] with lengths [D], or [B, N] with
    lengths [B, D] (zero-padded). Returns int64 of anchor_pos's shape, in O(N + S) per row."""
    anchors, depths = anchor_pos.reshape(-1, anchor_pos.shape[-1]), depth.reshape(-1, depth.shape[-1])
    row_lengths = lengths.reshape(anchors.shape[0], -1).to(anchors.device, torch.int64)
    positions = torch.arange(seq_len, device=anchors.device)
    work = []
    for anchor, element_depth, doc_lengths in zip(anchors.to(torch.int64), depths.to(torch.int64), row_lengths):
        ends = doc_lengths.cumsum(0)
        starts = torch.cat([ends.new_zeros(1), ends])[torch.searchsorted(ends, positions, right=True)]
        inside = (anchor >= 0) & (anchor < ends[-1].clamp(max=seq_len)) & (element_depth >= 0)
        at = anchor.clamp(0, seq_len - 1)
        context = (element_depth == 0) & inside
        before = torch.zeros(seq_len + 1, dtype=torch.int64, device=anchors.device)  # depth-0 anchors < p
        before[1:] = torch.bincount(at[context], minlength=seq_len).cumsum(0)
        low = starts[at]
        if sliding_window is not None:
            low = torch.maximum(low, at + element_depth - sliding_window + 1)
        seen = before[at] - before[low.clamp(max=at)] + element_depth + 1
        work.append(torch.where(inside, seen, 0))
    return torch.stack(work).reshape(anchor_pos.shape)


def split_shares(work: torch.Tensor, parts: int) -> list[int]:
    """Cut N elements of ``work`` (int [N]) into ``parts`` contiguous shares of about equal total
    work, none empty: the ``parts + 1`` boundaries, 0 first and N last."""
    n = work.numel()
    if n < parts:
        raise ValueError(f"context_parallel_group has {parts} ranks, more than the step's {n} elements")
    cumulative = work.to(torch.float64).cumsum(0)
    if cumulative[-1] <= 0:  # nothing sees anything: share the elements evenly
        cumulative = torch.arange(1, n + 1, dtype=torch.float64, device=work.device)
    targets = cumulative[-1] * torch.arange(1, parts, dtype=torch.float64, device=work.device) / parts
    # the first element whose prefix reaches the target
    reached = torch.searchsorted(cumulative, targets).clamp(max=n - 1)
    before = torch.where(reached > 0, cumulative[(reached - 1).clamp(min=0)], 0)
    # cut before or after that element, whichever lands nearer the target
    cuts = torch.where(targets - before < cumulative[reached] - targets, reached, reached + 1).tolist()
    boundaries = [0]
    for share, cut in enumerate(cuts, start=1):
        boundaries.append(min(max(cut, boundaries[-1] + 1), n - (parts - share)))
    return boundaries + [n]


class KeyValueGather:
    """The ``key_value_gather`` of one step: a rank's keys and values [B, kv_heads, own, D] in, every
    rank's [B, kv_heads, N, D] out in the flat element order (the shares are contiguous and in rank
    order). One all-gather per layer forward (keys and values together), one reduce-scatter in its
    backward: each rank receives the sum, over all ranks' queries, of its own keys' and values'
    gradients."""

    def __init__(self, cp: ContextParallel, boundaries: list[int]):
        self.cp = cp
        self.sizes = [high - low for low, high in zip(boundaries, boundaries[1:])]
        self.width = max(self.sizes)  # each share padded to this for the collective
        self.real_rows = None
        if min(self.sizes) != self.width:
            self.real_rows = torch.cat([torch.arange(size) + rank * self.width for rank, size in enumerate(self.sizes)])

    def __call__(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        packed = torch.stack([keys, values]).movedim(3, 0)  # [own, 2, B, kv_heads, D]: elements first
        gathered = _GatherShares.apply(packed, self).movedim(0, 3)
        return gathered[0], gathered[1]


def _all_gather_single(output, local, group):
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.14
    gather(output, local, group=group)


def _reduce_scatter_single(output, everything, group):
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    scatter(output, everything, group=group)


class _GatherShares(torch.autograd.Function):
    """[own, ...] -> [N, ...]: every rank's share along dim 0 (see :class:`KeyValueGather`)."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, gather: KeyValueGather) -> torch.Tensor:
        ctx.gather = gather
        padded = local.new_zeros((gather.width, *local.shape[1:]))
        padded[: local.shape[0]] = local
        everything = local.new_empty((gather.cp.size * gather.width, *local.shape[1:]))
        _all_gather_single(everything, padded, gather.cp.group)
        if gather.real_rows is None:
            return everything
        return everything.index_select(0, gather.real_rows.to(everything.device))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gather = ctx.gather
        grad = grad.contiguous()
        if gather.real_rows is not None:
            padded = grad.new_zeros((gather.cp.size * gather.width, *grad.shape[1:]))
            grad = padded.index_copy_(0, gather.real_rows.to(grad.device), grad)
        mine = grad.new_empty((gather.width, *grad.shape[1:]))
        _reduce_scatter_single(mine, grad, gather.cp.group)
        return mine[: gather.sizes[gather.cp.rank]], None


@torch.no_grad()
def all_reduce_gradients(module: torch.nn.Module, group) -> None:
    """Sum the parameters' ``.grad`` over ``group`` in place (one all-reduce per dtype): what a
    context-parallel step needs after ``loss.backward()`` when no data-parallel wrapper reduces the
    gradients, so that every rank holds the single-process step's gradients."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    for dtype in dict.fromkeys(grad.dtype for grad in grads):  # one order on every rank
        same = [grad for grad in grads if grad.dtype == dtype]
        flat = torch.cat([grad.reshape(-1) for grad in same])
        dist.all_reduce(flat, group=group)
        for grad, summed in zip(same, flat.split([grad.numel() for grad in same])):
            grad.copy_(summed.view_as(grad))
