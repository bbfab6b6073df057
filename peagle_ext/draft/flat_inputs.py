"""The flat P-EAGLE forward of one sequence: its inputs from a target's outputs, and the draft's logits
at the supervised elements.

Both the draft model's ``forward`` (``peagle_training_inputs=``) and the training step use these, so
the model needs nothing from :mod:`peagle_ext.draft.training`.
"""

from __future__ import annotations

import torch


def build_peagle_inputs(model, input_ids, aux_hidden_states, anchor_pos, depth):
    """The flat P-EAGLE inputs for N COD elements of one sequence, or of each row of a batch.

    input_ids: [S]; aux_hidden_states: [S, num_aux * target_hidden]; anchor_pos, depth: int [N].
    Returns (ids [1, N]: real ids at depth 0, ``mask_token_id`` deeper; projected [1, N, H]:
    ``fc``-projected aux states at depth 0, the projected ``mask_hidden`` deeper;
    position_ids [1, N]: ``anchor_pos + depth``). A batch: input_ids [B, S], aux_hidden_states
    [B, S, A], anchor_pos and depth [B, N] (padding elements anchored at S read position S - 1:
    they see nothing and nothing sees them), giving [B, N] and [B, N, H]. A draft without parallel
    drafting (EAGLE-3: no ``mask_hidden``) takes depth-0 elements only.
    """
    real = (depth == 0).unsqueeze(-1)
    mask_id = torch.full_like(anchor_pos, model.draft_config.mask_token_id)
    states = model.project_hidden_states(aux_hidden_states)
    if anchor_pos.dim() == 1:
        ids = torch.where(real.squeeze(-1), input_ids[anchor_pos], mask_id)
        projected = states[anchor_pos]
    else:
        position = anchor_pos.clamp(max=input_ids.shape[-1] - 1)
        ids = torch.where(real.squeeze(-1), input_ids.gather(1, position), mask_id)
        projected = states.gather(1, position[..., None].expand(-1, -1, states.shape[-1]))
    if model.draft_config.parallel_drafting:
        projected = torch.where(real, projected, model.masked_projected_hidden().to(projected.dtype))
    elif not bool(real.all()):
        raise ValueError("depth must be 0 everywhere for a draft without parallel_drafting (it has no mask_hidden)")
    position_ids = anchor_pos + depth
    if anchor_pos.dim() == 1:
        return ids.unsqueeze(0), projected.unsqueeze(0), position_ids.unsqueeze(0)
    return ids, projected, position_ids


def supervised_draft_logits(model, input_ids, aux_hidden_states, anchor_pos, depth, block_mask, rows,
                            query_rows=None, query_block_mask=None, key_value_gather=None) -> torch.Tensor:
    """One flat P-EAGLE forward over the N elements (anchor_pos, depth: int [N]) of a sequence,
    and the draft's logits at the elements ``rows`` (int [M]): [M, draft_vocab]. With
    ``query_rows`` (int [Q]) only those elements are queries in the last layer (see
    ``forward_peagle``) and ``rows`` index them. A batch ([B, N] elements, see
    :func:`build_peagle_inputs`; ``query_rows`` [B, Q]): ``rows`` is a (row [M], element [M]) pair.
    ``key_value_gather``: the elements are one rank's share under context parallelism, and every
    layer attends to the keys and values it gathers (see ``forward_peagle``).

    This is what ``LlamaEagle3DraftModel.forward(peagle_training_inputs=...)`` runs, so that a
    DistributedDataParallel wrapper around the draft sees the whole step's forward.
    """
    ids, projected, position_ids = build_peagle_inputs(model, input_ids, aux_hidden_states, anchor_pos, depth)
    hidden = model.forward_peagle(ids, projected, position_ids, block_mask, query_rows=query_rows,
                                  query_block_mask=query_block_mask, key_value_gather=key_value_gather)
    return model.compute_logits(hidden[rows] if isinstance(rows, tuple) else hidden[0][rows])
