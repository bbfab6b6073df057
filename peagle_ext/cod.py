"""COD (conditional-on-draft) sampling of the elements that P-EAGLE trains on."""

from __future__ import annotations

import torch


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
    if isinstance(seq_length, bool) or not isinstance(seq_length, int) or seq_length < 1:
        raise ValueError(f"seq_length must be a positive int, got {seq_length!r}")
    if not isinstance(loss_mask, torch.Tensor) or loss_mask.dim() != 1:
        raise ValueError("loss_mask must be a 1-D tensor")
    if loss_mask.numel() != seq_length:
        raise ValueError(f"loss_mask has {loss_mask.numel()} entries, expected seq_length={seq_length}")
    if isinstance(num_depths, bool) or not isinstance(num_depths, int) or num_depths < 1:
        raise ValueError(f"num_depths must be an int >= 1, got {num_depths!r}")
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
