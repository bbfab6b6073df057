"""COD (conditional-on-draft) sampling of the elements that P-EAGLE trains on."""

from __future__ import annotations

import torch

from ._inputs import FIELD_MAX


def cod_depth_count(valid: int, depth: int, down_sample_ratio: float, down_sample_ratio_min: float) -> int:
    """How many elements depth d >= 1 keeps, before capping by the pool and max_anchors."""
    return max(0, int((valid - depth) * max(down_sample_ratio**depth, down_sample_ratio_min)))


def generate_cod_sample_indices(
    seq_length: int,
    loss_mask: torch.Tensor,
    num_depths: int = 8,
    down_sample_ratio: float = 0.7,
    down_sample_ratio_min: float = 0.2,
    max_anchors: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample the flattened COD layout for one sequence.

    Depth 0 keeps every position 0..seq_length-1 in order. Depth d >= 1 draws, without
    replacement, ``int((valid - d) * max(r**d, r_min))`` reference positions (capped by the pool
    and by ``max_anchors``) from the pool of depth d-1's reference positions shifted by one,
    restricted to positions < seq_length with ``loss_mask == 1``; position 0 is never in a pool,
    so no anchor is negative. ``valid`` is the number of positions with ``loss_mask == 1``.
    Each depth is sorted; its anchors are ``position - d``.

    Args:
        seq_length: length of the original sequence.
        loss_mask: [seq_length], 1 where the position is supervised.
        num_depths: number of COD depths, depth 0 included.
        generator: makes the draw reproducible (a CPU generator; draws happen on CPU).

    Returns:
        (anchor_pos, depth), int64 [N] on ``loss_mask``'s device, depth-major.
    """
    if isinstance(seq_length, bool) or not isinstance(seq_length, int) or not 1 <= seq_length <= FIELD_MAX:
        raise ValueError(f"seq_length must be an int in [1, {FIELD_MAX}], got {seq_length!r}")
    if not isinstance(loss_mask, torch.Tensor) or loss_mask.dim() != 1:
        raise ValueError("loss_mask must be a 1-D tensor")
    if loss_mask.numel() != seq_length:
        raise ValueError(f"loss_mask has {loss_mask.numel()} entries, expected seq_length={seq_length}")
    if isinstance(num_depths, bool) or not isinstance(num_depths, int) or not 1 <= num_depths <= FIELD_MAX:
        raise ValueError(f"num_depths must be an int in [1, {FIELD_MAX}], got {num_depths!r}")
    for name, ratio in (("down_sample_ratio", down_sample_ratio), ("down_sample_ratio_min", down_sample_ratio_min)):
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
            raise TypeError(f"{name} must be a number, got {type(ratio).__name__}")
    if not 0.0 < down_sample_ratio <= 1.0:
        raise ValueError(f"down_sample_ratio must be in (0, 1], got {down_sample_ratio}")
    if not 0.0 <= down_sample_ratio_min <= 1.0:
        raise ValueError(f"down_sample_ratio_min must be in [0, 1], got {down_sample_ratio_min}")
    if max_anchors is not None and (isinstance(max_anchors, bool) or not isinstance(max_anchors, int) or max_anchors < 0):
        raise ValueError(f"max_anchors must be None or an int >= 0, got {max_anchors!r}")

    device = loss_mask.device
    supervised = loss_mask.detach().to("cpu") != 0
    valid = int(supervised.sum())
    positions = torch.arange(seq_length, dtype=torch.int64)
    anchors, depths = [positions], [torch.zeros(seq_length, dtype=torch.int64)]
    previous = positions
    for d in range(1, num_depths):
        pool = previous + 1
        pool = pool[(pool >= 1) & (pool < seq_length)]
        pool = pool[supervised[pool]]
        count = min(cod_depth_count(valid, d, down_sample_ratio, down_sample_ratio_min), pool.numel())
        if max_anchors is not None:
            count = min(count, max_anchors)
        if count == 0:
            break
        chosen = pool[torch.randperm(pool.numel(), generator=generator)[:count]].sort().values
        anchors.append(chosen - d)
        depths.append(torch.full((count,), d, dtype=torch.int64))
        previous = chosen
    return torch.cat(anchors).to(device), torch.cat(depths).to(device)


def assign_cod_segments(anchor_pos: torch.Tensor, depth: torch.Tensor, seq_length: int, num_segments: int) -> torch.Tensor:
    """The segment of every COD element under P-EAGLE's sequence partitioning (Algorithm 1 of
    arXiv:2602.01469, as NeMo Automodel 0.7.0 assigns it).

    The sequence's positions are cut into ``num_segments`` equal stretches (boundaries
    ``s * seq_length / num_segments``). A depth-0 element belongs to the stretch holding its
    position ``anchor_pos``; an element of depth >= 1 inherits, link by link, the segment of its
    depth-1 ancestor, i.e. the stretch holding ``anchor_pos + 1``. So a rollout never straddles two
    segments, and a segment's queries need, besides their own segment, only depth-0 keys of
    earlier positions: :func:`cod_segments` adds those (the causal completion).

    Args:
        anchor_pos, depth: int [N], any values (the rule's arrays, COD layout or not).
        seq_length: the original sequence length L >= 1.
        num_segments: K >= 1.

    Returns:
        int64 [N], each element's segment in [0, K); positions past L fall in the last one.
    """
    _check_segment_args(anchor_pos, depth, seq_length, num_segments)
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
    segment = assign_cod_segments(anchor_pos, depth, seq_length, num_segments)
    context = depth == 0
    pairs = []
    for k in range(num_segments):
        own = segment == k
        elements = torch.nonzero(own | (context & (segment < k))).flatten()
        pairs.append((elements, own[elements]))
    return pairs


def _check_segment_args(anchor_pos, depth, seq_length, num_segments) -> None:
    for name, tensor in (("anchor_pos", anchor_pos), ("depth", depth)):
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 1 or tensor.dtype.is_floating_point:
            raise TypeError(f"{name} must be a 1-D integer tensor")
    if anchor_pos.shape != depth.shape:
        raise ValueError(f"anchor_pos and depth must have the same length, got {anchor_pos.numel()} and {depth.numel()}")
    for name, value in (("seq_length", seq_length), ("num_segments", num_segments)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= FIELD_MAX:
            raise ValueError(f"{name} must be an int in [1, {FIELD_MAX}], got {value!r}")
