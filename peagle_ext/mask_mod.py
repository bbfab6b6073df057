"""The P-EAGLE visibility rule as a flex_attention mask_mod (shared/DESIGN.md §1).

This is the element-level specification. Every builder in this package must describe exactly
the blocks that ``create_block_mask`` finds when it evaluates this function on the dense grid.
"""

from __future__ import annotations

from ._inputs import MaskInputs, normalize_mask_inputs


def mask_mod_from_inputs(inputs: MaskInputs):
    """The rule over already-validated inputs (see :func:`create_peagle_mask_mod`)."""
    anchor_pos, depth, doc = inputs.anchor_pos, inputs.depth, inputs.doc_of_position
    kv_anchor_pos, kv_depth = inputs.kv_anchor_pos, inputs.kv_depth
    window = inputs.sliding_window

    def peagle_mask_mod(b, h, q_idx, kv_idx):
        a_q, a_k = anchor_pos[q_idx], kv_anchor_pos[kv_idx]
        d_q, d_k = depth[q_idx], kv_depth[kv_idx]
        doc_q = doc[a_q]
        same_doc = (doc_q != -1) & (doc_q == doc[a_k])
        context = (d_k == 0) & (a_k <= a_q)
        if window is not None:
            context = context & (a_k > a_q + d_q - window)
        own_rollout = (a_k == a_q) & (d_k <= d_q)
        return same_doc & (context | own_rollout)

    return peagle_mask_mod


def create_peagle_mask_mod(anchor_pos, depth, lengths=None, total_seq_len=None, *, document_ids=None,
                           sliding_window=None, kv_anchor_pos=None, kv_depth=None):
    """Return a flex_attention mask_mod for the P-EAGLE rule over N flattened COD elements.

    Args:
        anchor_pos: int [N], chain start of each element in the original sequence.
        depth: int [N], COD round of each element (0 = the original token).
        lengths, total_seq_len: documents packed from position 0 (NeMo Automodel's form);
            positions past ``sum(lengths)`` up to ``total_seq_len`` are padding.
        document_ids: int [total_seq_len], document of each original position, -1 for padding
            (speculators' form). Give exactly one of ``lengths`` and ``document_ids``.
        sliding_window: optional W >= 1 bounding the depth-0 context to
            ``a_q + d_q - W < a_k <= a_q``.
        kv_anchor_pos, kv_depth: int [KV], the key elements when they are not the query elements
            (queries a subset of the keys, say); ``kv_idx`` then indexes these.

    Query q sees key k exactly when both anchors lie in the same (non-padding) document and k
    is either depth-0 context at or before q's anchor (within the window) or an
    earlier-or-equal depth of q's own rollout.
    """
    inputs = normalize_mask_inputs(anchor_pos, depth, lengths, total_seq_len, document_ids=document_ids,
                                   sliding_window=sliding_window, kv_anchor_pos=kv_anchor_pos, kv_depth=kv_depth)
    return mask_mod_from_inputs(inputs)
