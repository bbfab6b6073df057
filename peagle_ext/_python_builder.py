"""The pure-PyTorch builder: the block index from interval arithmetic, never the dense grid.

How it works (the same algorithm as csrc/rule/tile_rule.h, vectorized):

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
* A tile is full when every key of T is seen by every query of Qt: no tail on either side, every
  element real, and a few extremes of the two blocks compared (row_summary, column_summary,
  tile_is_full: the names and the test of rule/tile_rule.h).

Memory is O(N + P + nQ * nKV) (the walk goes in bounded chunks); nothing has N x N elements.
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import _dense_to_ordered

from ._block_index import BlockIndex, num_blocks
from ._inputs import FIELD_MAX, MaskInputs

FIELD_BASE = FIELD_MAX + 1  # above every value the extremes compare, as the C++ cells' kCellBase

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


def _document(anchor: torch.Tensor, depth: torch.Tensor,
              doc_of_position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(doc, real) of elements, as element_info reads them: the document of each anchor, -1 for
    padding and for an element outside the rule's domain (an anchor outside the sequence, a
    negative depth: only reachable with validate=False)."""
    num_positions = doc_of_position.numel()
    in_range = (anchor >= 0) & (anchor < num_positions) & (depth >= 0)
    doc = torch.where(in_range, doc_of_position[anchor.clamp(0, num_positions - 1)], -1)
    return doc.clamp(max=FIELD_MAX), doc >= 0  # documents clamped as the kernels' sort keys clamp them


def context_first(anchor: torch.Tensor, depth: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    """The lowest anchor of the depth-0 keys each query sees (element_info's context_first): 0
    without a window, else the window's bound widened to keep the query's own depth-0 element."""
    if sliding_window is None:
        return torch.zeros_like(anchor)
    lowest_excluded = torch.minimum(anchor + depth - sliding_window, anchor - 1)
    return (lowest_excluded + 1).clamp(min=0)


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
    doc, real = _document(anchor, depth, doc_of_position)
    kv_doc, kv_real = _document(kv_anchor, kv_depth, doc_of_position)
    # Rollout keys are (anchor, depth) packed as anchor * depth_span + depth; a query's bound uses
    # its own depth, so the span exceeds every depth on either side.
    depth_span = int(torch.maximum(depth.max(), kv_depth.max())) + 1

    context_keys, context_elements = _sorted_keys(kv_doc * num_positions + kv_anchor, kv_real & (kv_depth == 0))
    rollout_keys, rollout_elements = _sorted_keys(kv_anchor * depth_span + kv_depth, kv_real & (kv_depth > 0))
    num_context = context_keys.numel()

    context_lo = doc * num_positions + context_first(anchor, depth, inputs.sliding_window)
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
    """Exact partial/full kv blocks and their transposes for any input the rule accepts; a batch
    row by row (this backend serves where nothing was compiled, so it stays plain)."""
    if inputs.num_rows is None:
        return _build_row(inputs)
    rows = [_build_row(inputs.row(index)) for index in range(inputs.num_rows)]
    return BlockIndex(*(torch.cat(parts) for parts in zip(*rows)))


def _block_min(values, block, size, selected):
    """Per block, the minimum of ``values`` over the ``selected`` elements (FIELD_BASE: none)."""
    return _segment_reduce(values[selected], block[selected], size, "amin", FIELD_BASE)


def _block_max(values, block, size, selected):
    """Per block, the maximum of ``values`` over the ``selected`` elements (-1: none)."""
    return _segment_reduce(values[selected], block[selected], size, "amax", -1)


def row_summary(inputs: MaskInputs, real, q_block, num_q_blocks) -> dict:
    """The q-block side of the full-tile test (QueryExtremes / row_summary of rule/tile_rule.h):
    whether all Q_BLOCK_SIZE queries are real (no tail), and extremes over the real queries."""
    q_block_size = inputs.block_size[0]
    doc, _ = _document(inputs.anchor_pos, inputs.depth, inputs.doc_of_position)
    anchor = inputs.anchor_pos
    count = _segment_reduce(real.to(torch.int64), q_block, num_q_blocks, "sum", 0)
    return {
        "all_real": count == q_block_size,
        "doc_min": _block_min(doc, q_block, num_q_blocks, real),
        "doc_max": _block_max(doc, q_block, num_q_blocks, real),
        "anchor_min": _block_min(anchor, q_block, num_q_blocks, real),
        "anchor_max": _block_max(anchor, q_block, num_q_blocks, real),
        "first_max": _block_max(context_first(anchor, inputs.depth, inputs.sliding_window), q_block, num_q_blocks,
                                real),
        "depth_min": _block_min(inputs.depth, q_block, num_q_blocks, real),
    }


def column_summary(inputs: MaskInputs, num_kv_blocks) -> dict:
    """The kv-block side (KeyExtremes / column_summary): whether all KV_BLOCK_SIZE keys are real (no
    tail), and extremes over its depth-0 (context) keys and its deeper (rollout) keys apart."""
    anchor, depth = inputs.kv_anchor_pos, inputs.kv_depth
    doc, real = _document(anchor, depth, inputs.doc_of_position)
    kv_block = torch.arange(anchor.numel(), device=anchor.device) // inputs.block_size[1]
    context, rollout = real & (depth == 0), real & (depth > 0)
    count = _segment_reduce(real.to(torch.int64), kv_block, num_kv_blocks, "sum", 0)
    return {
        "complete": count == inputs.block_size[1],
        "has_context": _block_max(anchor, kv_block, num_kv_blocks, context) >= 0,
        "has_rollout": _block_max(anchor, kv_block, num_kv_blocks, rollout) >= 0,
        "context_doc_min": _block_min(doc, kv_block, num_kv_blocks, context),
        "context_doc_max": _block_max(doc, kv_block, num_kv_blocks, context),
        "context_anchor_min": _block_min(anchor, kv_block, num_kv_blocks, context),
        "context_anchor_max": _block_max(anchor, kv_block, num_kv_blocks, context),
        "rollout_anchor_min": _block_min(anchor, kv_block, num_kv_blocks, rollout),
        "rollout_anchor_max": _block_max(anchor, kv_block, num_kv_blocks, rollout),
        "rollout_depth_max": _block_max(depth, kv_block, num_kv_blocks, rollout),
    }


def tile_is_full(row: dict, column: dict) -> torch.Tensor:
    """[nQ, nKV]: every key of the kv-block seen by every query of the q-block (tile_is_full of
    rule/tile_rule.h): its depth-0 keys share the queries' one document and lie in
    [max first_q, min a_q]; its deeper keys all sit on the one anchor every query has, no deeper
    than the shallowest query."""
    r = {name: value[:, None] for name, value in row.items()}
    c = {name: value[None, :] for name, value in column.items()}
    one_document = r["doc_min"] == r["doc_max"]
    context_seen = ~c["has_context"] | (
        one_document & (c["context_doc_min"] == r["doc_min"]) & (c["context_doc_max"] == r["doc_min"])
        & (r["first_max"] <= c["context_anchor_min"]) & (c["context_anchor_max"] <= r["anchor_min"]))
    one_anchor = r["anchor_min"] == r["anchor_max"]
    rollout_seen = ~c["has_rollout"] | (
        one_anchor & (c["rollout_anchor_min"] == r["anchor_min"]) & (c["rollout_anchor_max"] == r["anchor_min"])
        & (c["rollout_depth_max"] <= r["depth_min"]))
    return r["all_real"] & c["complete"] & context_seen & rollout_seen


def _build_row(inputs: MaskInputs) -> BlockIndex:
    """build_python for one row (1-D inputs): [1, 1, ...] index tensors."""
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

    full = nonempty & tile_is_full(row_summary(inputs, real, q_block, num_q_blocks),
                                   column_summary(inputs, num_kv_blocks))
    partial = nonempty & ~full
    return block_index_from_grids(partial, full)
