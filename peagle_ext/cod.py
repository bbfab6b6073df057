"""COD (conditional-on-draft) sampling of the elements that P-EAGLE trains on."""

from __future__ import annotations

import torch

from ._inputs import FIELD_MAX


def cod_depth_count(valid: int, depth: int, down_sample_ratio: float, down_sample_ratio_min: float) -> int:
    """How many elements depth d >= 1 keeps when its pool is large enough: ``valid`` is the number
    of seed positions (every supervised position, or ``max_anchors`` of them)."""
    return max(0, int((valid - depth) * max(down_sample_ratio**depth, down_sample_ratio_min)))


def generate_cod_sample_indices(
    seq_length: int,
    loss_mask: torch.Tensor,
    num_depths: int = 8,
    down_sample_ratio: float = 0.7,
    down_sample_ratio_min: float = 0.2,
    filter_position_zero: bool = True,
    max_anchors: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample the flattened COD layout for one sequence, or for each row of a batch.

    The signature and the draws are those of NeMo Automodel 0.7.0's and speculators 0.9.0's
    ``generate_cod_sample_indices``: with the same global RNG state (``generator`` None) and a CPU
    ``loss_mask``, the result equals theirs element for element (see ``filter_position_zero`` for
    the one case where the two peers differ).

    Depth 0 keeps every position 0..seq_length-1 in order. The seeds are the supervised positions
    (``loss_mask == 1``), or ``max_anchors`` of them drawn at random when there are more. Depth
    d >= 1 keeps ``int((seeds - d) * max(r**d, r_min))`` reference positions drawn without
    replacement from its pool (all of the pool when it holds fewer), sorted: depth 1's pool is the
    seeds, depth d+1's is depth d's positions plus one (modulo seq_length), restricted to
    supervised positions. Each element's anchor is its position minus d.

    Args:
        seq_length: length of the original sequence.
        loss_mask: [seq_length] or [1, seq_length], 0/1 (any dtype, bool included); 1 where the
            position is supervised. [B, seq_length] with B > 1: a batch, each row sampled in turn
            (with the same arguments and generator), brought to one N by :func:`pad_rows`.
        num_depths: number of COD depths, depth 0 included.
        filter_position_zero: keep position 0 out of every pool, so no anchor is negative
            (Automodel's meaning; speculators 0.9.0 leaves a supervised position 0 in depth 1's
            pool and so starts chains at anchor -1, which the mask builders refuse). False keeps
            it in, and lets a chain wrap from position seq_length - 1 to 0, as both peers do.
        max_anchors: at most this many seeds (speculators' meaning).
        generator: makes the draw reproducible apart from the global RNG (draws happen on CPU).

    Returns:
        (anchor_pos, depth), int64 [N] on ``loss_mask``'s device, depth-major; [B, N] for a batch.
    """
    if isinstance(seq_length, bool) or not isinstance(seq_length, int) or not 1 <= seq_length <= FIELD_MAX:
        raise ValueError(f"seq_length must be an int in [1, {FIELD_MAX}], got {seq_length!r}")
    if isinstance(loss_mask, torch.Tensor) and loss_mask.dim() == 2 and loss_mask.shape[0] > 1:
        rows = [generate_cod_sample_indices(seq_length, row, num_depths, down_sample_ratio, down_sample_ratio_min,
                                            filter_position_zero, max_anchors, generator) for row in loss_mask]
        return pad_rows(rows, seq_length)
    supervised = _supervised_positions(loss_mask, seq_length)
    if isinstance(num_depths, bool) or not isinstance(num_depths, int) or not 1 <= num_depths <= FIELD_MAX:
        raise ValueError(f"num_depths must be an int in [1, {FIELD_MAX}], got {num_depths!r}")
    for name, ratio in (("down_sample_ratio", down_sample_ratio), ("down_sample_ratio_min", down_sample_ratio_min)):
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
            raise TypeError(f"{name} must be a number, got {type(ratio).__name__}")
    if not 0.0 < down_sample_ratio <= 1.0:
        raise ValueError(f"down_sample_ratio must be in (0, 1], got {down_sample_ratio}")
    if not 0.0 <= down_sample_ratio_min <= 1.0:
        raise ValueError(f"down_sample_ratio_min must be in [0, 1], got {down_sample_ratio_min}")
    if not isinstance(filter_position_zero, bool):
        raise TypeError(f"filter_position_zero must be a bool, got {filter_position_zero!r}")
    if max_anchors is not None and (isinstance(max_anchors, bool) or not isinstance(max_anchors, int)
                                    or max_anchors < 0):
        raise ValueError(f"max_anchors must be None or an int >= 0, got {max_anchors!r}")

    valid_positions = torch.nonzero(supervised).flatten()
    seeds = valid_positions
    if max_anchors is not None and seeds.numel() > max_anchors:
        seeds = seeds[torch.randperm(seeds.numel(), generator=generator)[:max_anchors]].sort().values

    anchors, depths = [torch.arange(seq_length, dtype=torch.int64)], [torch.zeros(seq_length, dtype=torch.int64)]
    pool = seeds[seeds != 0] if filter_position_zero else seeds
    for d in range(1, num_depths):
        count = cod_depth_count(seeds.numel(), d, down_sample_ratio, down_sample_ratio_min)
        if count == 0:
            break
        # The peers draw only when the pool is at least the count; drawing exactly when they do
        # keeps the RNG stream, and so the layout, identical to theirs.
        if pool.numel() >= count:
            chosen = pool[torch.randperm(pool.numel(), generator=generator)[:count]].sort().values
        else:
            chosen = pool
        anchors.append(chosen - d)
        depths.append(torch.full((chosen.numel(),), d, dtype=torch.int64))
        pool = (chosen + 1) % seq_length
        if filter_position_zero:
            pool = pool[pool != 0]
        pool = pool[supervised[pool]]
    device = loss_mask.device
    return torch.cat(anchors).to(device), torch.cat(depths).to(device)


def pad_rows(rows, num_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch's rows, a list of (anchor_pos, depth) pairs of int [N_i], as [B, max N_i] int64 tensors
    for :func:`build_block_mask`: each row filled up with padding elements, anchor ``num_positions``
    (the rows' total_seq_len or len(document_ids): no position, so they see nothing and are seen by
    none) and depth 0. A batch's masks equal its rows' own ones on the real elements."""
    if isinstance(num_positions, bool) or not isinstance(num_positions, int) or num_positions < 1:
        raise ValueError(f"num_positions must be a positive int, got {num_positions!r}")
    rows = list(rows)
    if not rows:
        raise ValueError("rows must hold at least one (anchor_pos, depth) pair")
    for index, row in enumerate(rows):
        if (not isinstance(row, (tuple, list)) or len(row) != 2 or not all(isinstance(t, torch.Tensor) for t in row)
                or row[0].dim() != 1 or row[0].shape != row[1].shape):
            raise ValueError(f"rows[{index}] must be an (anchor_pos, depth) pair of 1-D tensors of one length")
    for index, row in enumerate(rows):
        for name, tensor in zip(("anchor_pos", "depth"), row):
            # Padding casts to int64: a float would be truncated (NaN to -2^63), not refused.
            if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
                raise TypeError(f"rows[{index}]'s {name} must have an integer dtype, got {tensor.dtype}")
        if row[0].device != rows[0][0].device or row[1].device != rows[0][0].device:
            raise ValueError(f"rows[{index}] is on {row[0].device} and {row[1].device}, rows[0] on {rows[0][0].device}")
    width = max(anchor.numel() for anchor, _ in rows)
    pad = torch.nn.functional.pad
    anchor_pos = torch.stack([pad(a.to(torch.int64), (0, width - a.numel()), value=num_positions) for a, _ in rows])
    depth = torch.stack([pad(d.to(torch.int64), (0, width - d.numel()), value=0) for _, d in rows])
    return anchor_pos, depth


def _supervised_positions(loss_mask, seq_length: int) -> torch.Tensor:
    """bool [seq_length] on the CPU from a 0/1 ``loss_mask`` of shape [S] or [1, S]."""
    if not isinstance(loss_mask, torch.Tensor):
        raise TypeError(f"loss_mask must be a tensor, got {type(loss_mask).__name__}")
    if loss_mask.device.type == "meta":
        raise ValueError("loss_mask is on the meta device, which holds no values")
    if loss_mask.dim() == 2 and loss_mask.shape[0] == 1:
        loss_mask = loss_mask[0]
    if loss_mask.dim() != 1:
        raise ValueError(f"loss_mask must have shape [seq_length], [1, seq_length] or [B, seq_length], "
                         f"got {tuple(loss_mask.shape)}")
    if loss_mask.numel() != seq_length:
        raise ValueError(f"loss_mask has {loss_mask.numel()} entries, expected seq_length={seq_length}")
    loss_mask = loss_mask.detach().to("cpu")
    supervised = loss_mask == 1
    if not torch.all(supervised | (loss_mask == 0)):
        raise ValueError("loss_mask must hold only 0 and 1 (a supervised position is 1)")
    return supervised


def assign_cod_segments(anchor_pos: torch.Tensor, depth: torch.Tensor, seq_length: int,
                        num_segments: int) -> torch.Tensor:
    """The segment of every COD element under P-EAGLE's sequence partitioning (Algorithm 1 of
    arXiv:2602.01469, as NeMo Automodel 0.7.0 assigns it, with its signature).

    The sequence's positions are cut into ``num_segments`` equal stretches (boundaries
    ``s * seq_length / num_segments``). A depth-0 element belongs to the stretch holding its
    position ``anchor_pos``; an element of depth >= 1 inherits, link by link, the segment of its
    depth-1 ancestor, i.e. the stretch holding ``anchor_pos + 1``. So a rollout never straddles two
    segments, and a segment's queries need, besides their own segment, only depth-0 keys of
    earlier positions: :func:`cod_segments` adds those (the causal completion).

    Args:
        anchor_pos, depth: integer tensors of one shape (usually [N]; elementwise, as Automodel's),
            any values (the rule's arrays, COD layout or not).
        seq_length: the original sequence length L >= 1.
        num_segments: K >= 1.

    Returns:
        int64, ``anchor_pos``'s shape: each element's segment in [0, K); positions before 0 fall in
        the first segment and positions past L in the last one.
    """
    _check_segment_args(anchor_pos, depth, seq_length, num_segments, any_shape=True)
    # Clamped to [0, L] first (outside it the segment is the first or the last anyway), so that
    # the product below stays under 2^62 for any anchor.
    position = torch.where(depth == 0, anchor_pos.to(torch.int64), anchor_pos.to(torch.int64) + 1).clamp(0, seq_length)
    return torch.div(position * num_segments, seq_length, rounding_mode="floor").clamp(0, num_segments - 1)


def cod_segments(anchor_pos: torch.Tensor, depth: torch.Tensor, seq_length: int, num_segments: int):
    """The elements each segment holds: its own (see :func:`assign_cod_segments`) plus the causal
    completion, every depth-0 element of an earlier segment.

    With the completion, every element a segment's own queries may see under the P-EAGLE rule
    (depth-0 context at or before its anchor, its own rollout) is in the segment, and so are,
    recursively, the keys those context elements see: a forward over the segment gives its own
    elements exactly the states of the flat forward, at every layer.

    Returns a list of K pairs ``(elements, own)``: ``elements`` int64 [M_k], indices into the
    flat arrays in their original order; ``own`` bool [M_k], True for the segment's own elements
    (the rest are completion, needed as keys only). Every element is own in exactly one segment.
    """
    _check_segment_args(anchor_pos, depth, seq_length, num_segments)
    segment = assign_cod_segments(anchor_pos, depth, seq_length, num_segments)
    context = depth == 0
    pairs = []
    for k in range(num_segments):
        own = segment == k
        elements = torch.nonzero(own | (context & (segment < k))).flatten()
        pairs.append((elements, own[elements]))
    return pairs


def _check_segment_args(anchor_pos, depth, seq_length, num_segments, any_shape: bool = False) -> None:
    for name, tensor in (("anchor_pos", anchor_pos), ("depth", depth)):
        if not isinstance(tensor, torch.Tensor) or tensor.dtype.is_floating_point or tensor.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor")
        if not any_shape and tensor.dim() != 1:
            raise TypeError(f"{name} must be a 1-D integer tensor")
    if anchor_pos.shape != depth.shape:
        raise ValueError(f"anchor_pos and depth must have the same shape, got {tuple(anchor_pos.shape)} and "
                         f"{tuple(depth.shape)}")
    for name, value in (("seq_length", seq_length), ("num_segments", num_segments)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= FIELD_MAX:
            raise ValueError(f"{name} must be an int in [1, {FIELD_MAX}], got {value!r}")
