"""The slots of a draft forward after a target forward, laid out as vLLM 0.33's proposer lays them
out (its ``copy_and_expand_eagle_inputs_kernel`` with shifted input ids, then ``mask_hidden`` on
the masked slots)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DraftSlots:
    """One draft forward's inputs, batch-major: ``input_ids`` [B, Q] (target vocabulary),
    ``hidden`` [B, Q, H] (projected target states or ``mask_hidden``), ``positions`` [B, Q],
    ``valid`` [B, Q] (False: a hole, neither attended to nor kept), ``keep`` [B, Q] (a context slot
    that later forwards attend to; False for the masked and sequential-step slots), and
    ``sample_index`` [B, P]: the slots whose outputs are the P proposals."""

    input_ids: torch.Tensor
    hidden: torch.Tensor
    positions: torch.Tensor
    valid: torch.Tensor
    keep: torch.Tensor
    sample_index: torch.Tensor


def draft_slots(target_ids, target_positions, target_hidden, target_valid, last, next_ids, num_masked: int,
                mask_token_id: int = 0, mask_hidden: torch.Tensor | None = None) -> DraftSlots:
    """The slots of a draft's first forward after a target forward, as vLLM 0.33 lays them out.

    target_ids, target_positions: [B, M], the tokens the target just read and their positions;
    target_hidden: [B, M, H], their states already projected by the draft's ``fc``;
    target_valid: [B, M] (False for padding); last: [B], index of each row's last accepted slot;
    next_ids: [B], the target's next token there. Slot j < last reads ``target_ids[j + 1]``, slot
    ``last`` reads ``next_ids``, slots after it are holes (rejected); then ``num_masked`` slots read
    ``mask_token_id`` and ``mask_hidden`` [H] at positions ``target_positions[last] + 1, + 2, ...``.
    The proposals come from slot ``last`` and the masked slots.
    """
    batch, width = target_ids.shape
    column = torch.arange(width, device=target_ids.device).expand(batch, width)
    last = last.view(batch, 1)
    shifted = torch.cat([target_ids[:, 1:], target_ids[:, -1:]], dim=1)
    ids = torch.where(column == last, next_ids.view(batch, 1), shifted)
    valid = target_valid & (column <= last)
    ids = torch.where(valid, ids, torch.zeros_like(ids))
    hidden, positions, keep = target_hidden, target_positions, valid
    sample_index = last
    if num_masked:
        if mask_hidden is None:
            raise ValueError("num_masked > 0 needs mask_hidden (a P-EAGLE draft's projected mask_hidden)")
        start = target_positions.gather(1, last)
        offsets = torch.arange(1, num_masked + 1, device=target_ids.device)
        ids = torch.cat([ids, torch.full((batch, num_masked), mask_token_id, dtype=ids.dtype, device=ids.device)], 1)
        hidden = torch.cat([hidden, mask_hidden.view(1, 1, -1).to(hidden.dtype).expand(batch, num_masked, -1)], 1)
        positions = torch.cat([positions, start + offsets], 1)
        ones = torch.ones(batch, num_masked, dtype=torch.bool, device=ids.device)
        valid = torch.cat([valid, ones], 1)
        keep = torch.cat([keep, ~ones], 1)
        sample_index = torch.cat([last, width + offsets.view(1, -1).expand(batch, -1) - 1], 1)
    return DraftSlots(ids, hidden, positions, valid, keep, sample_index)
