"""The pure-PyTorch builder: the block index from interval arithmetic, never the dense grid.

How it works (the same algorithm as csrc/peagle_tile_rule.h, vectorized):

* For a query q the visible keys are two sets, each contiguous in a sorted order of the keys:
  - context: depth-0 keys of q's document with anchor in (lo_q, a_q], where lo_q = -1 without
    a window, else min(a_q + d_q - W, a_q - 1) (widened to keep q's own depth-0 element);
    contiguous when depth-0 keys are sorted by (document, anchor);
  - rollout: keys of depth >= 1 with anchor a_q and depth <= d_q; contiguous when those keys
    are sorted by (anchor, depth).
  Both sorted lists are laid end to end in one "rank" space, so each query holds two rank
  intervals, found by binary search.
* A tile (q-block Qt, kv-block T) is non-empty when some interval of a query in Qt contains a
  rank whose key lies in T. Per q-block the intervals are merged, and each merged interval is
  walked run by run, a run being consecutive ranks whose keys share a kv-block.
* A tile is full when it is not a tail tile, every query of Qt is a real element, every key of T
  is visible, and every key of T lies in every query's interval: compared through the min/max
  ranks of T's keys and the max start / min end of Qt's intervals.

Memory is O(N + P + nQ * nKV) (the walk goes in bounded chunks); nothing has N x N elements.
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import _dense_to_ordered

from ._block_index import BlockIndex, num_blocks
from ._inputs import MaskInputs

# Runs marked per step of a walk (see _nonempty_tiles): about 40 bytes each at its peak.
_WALK_CHUNK = 1 << 20


def ordered_from_grid(grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(count, indices) [1, 1, rows] and [1, 1, rows, cols] of a [rows, cols] bool grid: present
    columns ascending, then the absent ones ascending, by create_block_mask's own conversion."""
    counts, indices = _dense_to_ordered(grid)
    return counts[None, None], indices[None, None]


def grid_from_lists(counts: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The [rows, cols] bool grid a (count, indices) list pair describes: each row's first
    counts[row] indices are present (the inverse of :func:`ordered_from_grid`; no host sync)."""
    counts, indices = counts.reshape(-1), indices.reshape(counts.numel(), -1).long()
    present = torch.arange(indices.shape[1], device=indices.device)[None, :] < counts[:, None]
    return torch.zeros_like(present).scatter_(1, indices, present)


def block_index_from_grids(partial: torch.Tensor, full: torch.Tensor) -> BlockIndex:
    """Assemble the kv-side lists and their q-side transposes from [nQ, nKV] tile grids."""
    return BlockIndex(
        *ordered_from_grid(partial),
        *ordered_from_grid(full),
        *ordered_from_grid(partial.t()),
        *ordered_from_grid(full.t()),
    )


def _segment_reduce(values: torch.Tensor, segment: torch.Tensor, size: int, reduce: str, init: int):
    out = torch.full((size,), init, dtype=values.dtype, device=values.device)
    return out.scatter_reduce(0, segment, values, reduce=reduce, include_self=True)


def _sorted_keys(keys: torch.Tensor, members: torch.Tensor):
    """Sort the keys of the member elements; return (sorted keys, element index of each rank)."""
    element = torch.nonzero(members).flatten()
    sorted_keys, order = torch.sort(keys[element], stable=True)
    return sorted_keys, element[order]


def _document(anchor: torch.Tensor, doc_of_position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(doc, real) of elements: the document of each anchor, -1 for padding and for an anchor
    outside the sequence (only reachable with validate=False: it is never read)."""
    num_positions = doc_of_position.numel()
    in_range = (anchor >= 0) & (anchor < num_positions)
    doc = torch.where(in_range, doc_of_position[anchor.clamp(0, num_positions - 1)], -1)
    return doc, doc >= 0


def query_intervals(inputs: MaskInputs):
    """Per query, its context and rollout rank intervals over the sorted keys, and the rank ->
    key element map.

    Returns (context_start, context_end, rollout_start, rollout_end, key_of_rank,
    num_context_keys, real_query); intervals are half-open, rollout ranks follow the context ranks.
    """
    doc_of_position = inputs.doc_of_position
    num_positions = doc_of_position.numel()
    anchor, depth = inputs.anchor_pos, inputs.depth
    kv_anchor, kv_depth = inputs.kv_anchor_pos, inputs.kv_depth
    doc, real = _document(anchor, doc_of_position)
    kv_doc, kv_real = _document(kv_anchor, doc_of_position)
    # Rollout keys are (anchor, depth) packed as anchor * depth_span + depth; a query's bound uses
    # its own depth, so the span exceeds every depth on either side.
    depth_span = int(torch.maximum(depth.max(), kv_depth.max())) + 1

    context_keys, context_elements = _sorted_keys(kv_doc * num_positions + kv_anchor, kv_real & (kv_depth == 0))
    rollout_keys, rollout_elements = _sorted_keys(kv_anchor * depth_span + kv_depth, kv_real & (kv_depth > 0))
    num_context = context_keys.numel()

    lowest_excluded = torch.full_like(anchor, -1)
    if inputs.sliding_window is not None:
        lowest_excluded = torch.minimum(anchor + depth - inputs.sliding_window, anchor - 1)
    context_lo = doc * num_positions + (lowest_excluded + 1).clamp(min=0)
    context_start = torch.searchsorted(context_keys, context_lo)
    context_end = torch.searchsorted(context_keys, doc * num_positions + anchor, right=True)
    rollout_start = num_context + torch.searchsorted(rollout_keys, anchor * depth_span + 1)
    rollout_end = num_context + torch.searchsorted(rollout_keys, anchor * depth_span + depth, right=True)
    # Padding queries see nothing: give them empty intervals.
    zero = torch.zeros_like(context_start)
    context_start, context_end = torch.where(real, context_start, zero), torch.where(real, context_end, zero)
    rollout_start, rollout_end = torch.where(real, rollout_start, zero), torch.where(real, rollout_end, zero)
    key_of_rank = torch.cat([context_elements, rollout_elements])
    return context_start, context_end, rollout_start, rollout_end, key_of_rank, num_context, real


def _nonempty_tiles(starts, ends, q_block, kv_tile_of_rank, num_q_blocks, num_kv_blocks):
    """Mark every tile (Qt, T) where some interval of a query in Qt holds a key of kv-block T."""
    device = starts.device
    nonempty = torch.zeros(num_q_blocks, num_kv_blocks, dtype=torch.bool, device=device)
    keep = ends > starts
    starts, ends, q_block = starts[keep], ends[keep], q_block[keep]
    if starts.numel() == 0:
        return nonempty
    span = kv_tile_of_rank.numel() + 1
    # Merge intervals per q-block: offset each q-block into its own stretch of the line, sort,
    # and start a new segment wherever an interval begins past everything merged so far.
    offset = q_block * span
    order = torch.argsort(offset + starts)
    starts, ends, q_block, offset = starts[order], ends[order], q_block[order], offset[order]
    reach = torch.cummax(offset + ends, 0).values
    new_segment = torch.ones(starts.numel(), dtype=torch.bool, device=device)
    new_segment[1:] = offset[1:] + starts[1:] > reach[:-1]
    segment = torch.cumsum(new_segment, 0) - 1
    num_segments = int(segment[-1]) + 1
    segment_start = starts[new_segment]
    segment_end = _segment_reduce(ends, segment, num_segments, "amax", 0)
    segment_q_block = q_block[new_segment]

    # Runs: maximal stretches of consecutive ranks whose keys share a kv-block.
    run_begins = torch.ones_like(kv_tile_of_rank, dtype=torch.bool)
    run_begins[1:] = kv_tile_of_rank[1:] != kv_tile_of_rank[:-1]
    run_of_rank = torch.cumsum(run_begins, 0) - 1
    tile_of_run = kv_tile_of_rank[run_begins]
    first_run = run_of_rank[segment_start]
    runs_per_segment = run_of_rank[segment_end - 1] - first_run + 1
    # The walk visits sum(runs_per_segment) runs, up to nQ * KV when keys of many kv-blocks
    # interleave in rank order; it goes in chunks of about _WALK_CHUNK runs (whole segments), so
    # its memory stays O(chunk) however long it is.
    walked = torch.cumsum(runs_per_segment, 0)
    marks = torch.arange(_WALK_CHUNK, max(int(walked[-1]), _WALK_CHUNK), _WALK_CHUNK, device=device)
    chunk_ends = torch.searchsorted(walked, marks, right=True)
    bounds = [0, *chunk_ends.tolist(), num_segments]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if hi > lo:
            _mark_runs(nonempty, segment_q_block[lo:hi], first_run[lo:hi], runs_per_segment[lo:hi], tile_of_run)
    return nonempty


def _mark_runs(nonempty, q_block, first_run, runs, tile_of_run) -> None:
    """Mark (q_block[s], tile of run r) for each segment s and each of its runs first_run[s] + [0, runs[s])."""
    device = nonempty.device
    walk_segment = torch.repeat_interleave(torch.arange(q_block.numel(), device=device), runs)
    walk_step = torch.arange(walk_segment.numel(), device=device) - (torch.cumsum(runs, 0) - runs)[walk_segment]
    nonempty[q_block[walk_segment], tile_of_run[first_run[walk_segment] + walk_step]] = True


def build_python(inputs: MaskInputs) -> BlockIndex:
    """Exact partial/full kv blocks and their transposes for any input the rule accepts."""
    q_block_size, kv_block_size = inputs.block_size
    num_q_blocks = num_blocks(inputs.num_elements, q_block_size)
    num_kv_blocks = num_blocks(inputs.num_keys, kv_block_size)
    device = inputs.device
    (context_start, context_end, rollout_start, rollout_end,
     key_of_rank, num_context, real) = query_intervals(inputs)
    kv_tile_of_rank = key_of_rank // kv_block_size
    q_block = torch.arange(inputs.num_elements, device=device) // q_block_size

    nonempty = _nonempty_tiles(
        torch.cat([context_start, rollout_start]),
        torch.cat([context_end, rollout_end]),
        torch.cat([q_block, q_block]),
        kv_tile_of_rank,
        num_q_blocks,
        num_kv_blocks,
    )

    # Full tiles. Row side: all QB queries real, and the tightest interval bounds over the row.
    big = key_of_rank.numel() + 1
    row_real = _segment_reduce(real.to(torch.int64), q_block, num_q_blocks, "sum", 0) == q_block_size
    row_context_start = _segment_reduce(context_start, q_block, num_q_blocks, "amax", 0)
    row_context_end = _segment_reduce(context_end, q_block, num_q_blocks, "amin", big)
    row_rollout_start = _segment_reduce(rollout_start, q_block, num_q_blocks, "amax", 0)
    row_rollout_end = _segment_reduce(rollout_end, q_block, num_q_blocks, "amin", big)
    # Column side: all KVB keys visible to someone (in a sorted list), and their rank extremes.
    rank = torch.arange(key_of_rank.numel(), device=device)
    is_context = rank < num_context
    col_listed = _segment_reduce(torch.ones_like(rank), kv_tile_of_rank, num_kv_blocks, "sum", 0)
    col_complete = col_listed == kv_block_size

    def column_extremes(selected):
        tile = kv_tile_of_rank[selected]
        low = _segment_reduce(rank[selected], tile, num_kv_blocks, "amin", big)
        high = _segment_reduce(rank[selected], tile, num_kv_blocks, "amax", -1)
        return low, high, high >= 0

    context_low, context_high, has_context = column_extremes(is_context)
    rollout_low, rollout_high, has_rollout = column_extremes(~is_context)
    context_covered = ~has_context[None, :] | (
        (row_context_start[:, None] <= context_low[None, :]) & (context_high[None, :] < row_context_end[:, None])
    )
    rollout_covered = ~has_rollout[None, :] | (
        (row_rollout_start[:, None] <= rollout_low[None, :]) & (rollout_high[None, :] < row_rollout_end[:, None])
    )
    full = row_real[:, None] & col_complete[None, :] & context_covered & rollout_covered
    partial = nonempty & ~full
    return block_index_from_grids(partial, full)
