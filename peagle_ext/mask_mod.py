"""The P-EAGLE visibility rule as a flex_attention mask_mod.

This is the element-level specification. Every builder in this package must describe exactly
the blocks that ``create_block_mask`` finds when it evaluates this function on the dense grid.

The mask_mod is an instance of :class:`PeagleMaskMod`, a module-level class that holds its
tensors, so that a BlockMask carrying it pickles (DataLoader workers, ``torch.save``) and can be
moved to another device whole (:meth:`PeagleMaskMod.to`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ._inputs import _INT_DTYPES, FIELD_MAX, MaskInputs, normalize_mask_inputs


class PeagleMaskMod:
    """Query q sees key k (see :func:`create_peagle_mask_mod` for the rule).

    Holds the rule's inputs as plain attributes: ``anchor_pos``, ``depth`` (int64 [Q_LEN], the
    queries), ``kv_anchor_pos``, ``kv_depth`` (int64 [KV_LEN], the keys: the very same tensors as
    the queries' when they are one set), ``doc_of_position`` (int64 [P], -1 for padding) and
    ``sliding_window`` (None or an int >= 1). For a batch of rows each tensor has a leading [B]
    dim and the mask_mod reads row ``b``.

    An element is padding (sees nothing, seen by none) when its anchor lies outside [0, P), its
    depth is negative or its anchor's document is negative, exactly as the kernels read
    unvalidated input: so the document table is never indexed out of bounds, and the mask_mod and
    the block lists describe one mask even with ``validate=False``. Documents and depths past
    2^31 - 1 (also only reachable unvalidated) are clamped there, as the kernels' sort keys do.
    """

    def __init__(self, anchor_pos: torch.Tensor, depth: torch.Tensor, doc_of_position: torch.Tensor,
                 sliding_window: int | None = None, kv_anchor_pos: torch.Tensor | None = None,
                 kv_depth: torch.Tensor | None = None):
        self.anchor_pos = anchor_pos
        self.depth = depth
        self.doc_of_position = doc_of_position
        self.sliding_window = sliding_window
        self.kv_anchor_pos = anchor_pos if kv_anchor_pos is None else kv_anchor_pos
        self.kv_depth = depth if kv_depth is None else kv_depth
        self._check()

    # The attributes a PeagleMaskMod holds: what a pickle of one must hold, and nothing else.
    _FIELDS = ("anchor_pos", "depth", "doc_of_position", "sliding_window", "kv_anchor_pos", "kv_depth")

    def __setstate__(self, state) -> None:
        """Unpickling (pickle, DataLoader workers, torch.load): the loaded fields are checked as the
        constructor checks them, so a damaged or foreign pickle fails here, by name, and not later
        inside flex_attention."""
        if not isinstance(state, dict) or set(state) != set(self._FIELDS):
            fields = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise TypeError(f"a pickled PeagleMaskMod must hold exactly the fields {list(self._FIELDS)}, got {fields}")
        self.__dict__.update(state)
        self._check()

    def _check(self) -> None:
        """Types, shapes and devices of the fields (not values: any value reads as the rule says,
        out-of-range ones as padding)."""
        tensors = {name: getattr(self, name) for name in self._FIELDS if name != "sliding_window"}
        for name, tensor in tensors.items():
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"PeagleMaskMod.{name} must be a torch.Tensor, got {type(tensor).__name__}")
            if tensor.dtype not in _INT_DTYPES:
                raise TypeError(f"PeagleMaskMod.{name} must have an integer dtype, got {tensor.dtype}")
            if tensor.device != self.anchor_pos.device:
                raise ValueError(f"PeagleMaskMod.{name} is on {tensor.device}, anchor_pos on {self.anchor_pos.device}")
        if self.anchor_pos.dim() not in (1, 2):
            raise ValueError(f"PeagleMaskMod.anchor_pos must be 1-D [Q_LEN] or 2-D [B, Q_LEN], got shape "
                             f"{tuple(self.anchor_pos.shape)}")
        for name, tensor in tensors.items():
            if tensor.dim() != self.anchor_pos.dim() or (self.batched and tensor.shape[0] != self.anchor_pos.shape[0]):
                raise ValueError(f"PeagleMaskMod.{name} has shape {tuple(tensor.shape)}, anchor_pos "
                                 f"{tuple(self.anchor_pos.shape)}: every field is [length], or [B, length] for a batch")
        for anchors, depths in (("anchor_pos", "depth"), ("kv_anchor_pos", "kv_depth")):
            if tensors[anchors].shape != tensors[depths].shape:
                raise ValueError(f"PeagleMaskMod.{anchors} and {depths} must have one shape, got "
                                 f"{tuple(tensors[anchors].shape)} and {tuple(tensors[depths].shape)}")
        if self.doc_of_position.shape[-1] == 0:
            raise ValueError("PeagleMaskMod.doc_of_position must hold at least one position")
        window = self.sliding_window
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise TypeError(f"PeagleMaskMod.sliding_window must be None or an int >= 1, got {window!r}")

    @property
    def keys_are_queries(self) -> bool:
        return self.kv_anchor_pos is self.anchor_pos and self.kv_depth is self.depth

    @property
    def batched(self) -> bool:
        """A batch of rows: every tensor has a leading [B] dim, and row ``b`` is read for batch index b."""
        return self.anchor_pos.dim() == 2

    def _read(self, table: torch.Tensor, b, index):
        return table[b, index] if self.batched else table[index]

    def _document(self, b, anchor: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
        """Each element's document, -1 for padding (any negative document read means padding)."""
        last_position = self.doc_of_position.shape[-1] - 1
        in_range = (anchor >= 0) & (anchor <= last_position) & (depth >= 0)
        doc = self._read(self.doc_of_position, b, anchor.clamp(0, last_position))
        return torch.where(in_range & (doc >= 0), doc.clamp(max=FIELD_MAX), -1)

    def __call__(self, b, h, q_idx, kv_idx):
        a_q, a_k = self._read(self.anchor_pos, b, q_idx), self._read(self.kv_anchor_pos, b, kv_idx)
        d_q, d_k = self._read(self.depth, b, q_idx), self._read(self.kv_depth, b, kv_idx)
        doc_q = self._document(b, a_q, d_q)
        same_doc = (doc_q >= 0) & (doc_q == self._document(b, a_k, d_k))
        context = (d_k == 0) & (a_k <= a_q)
        if self.sliding_window is not None:
            context = context & (a_k > a_q + d_q - self.sliding_window)
        own_rollout = (a_k == a_q) & (d_k.clamp(max=FIELD_MAX) <= d_q.clamp(max=FIELD_MAX))
        return same_doc & (context | own_rollout)

    def map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> PeagleMaskMod:
        """A copy with ``fn`` applied to each tensor (once to a tensor the queries and keys share)."""
        anchor_pos, depth = fn(self.anchor_pos), fn(self.depth)
        keys = (None, None) if self.keys_are_queries else (fn(self.kv_anchor_pos), fn(self.kv_depth))
        return PeagleMaskMod(anchor_pos, depth, fn(self.doc_of_position), self.sliding_window, *keys)

    def to(self, device, non_blocking: bool = False) -> PeagleMaskMod:
        return self.map_tensors(lambda tensor: tensor.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> PeagleMaskMod:
        return self.map_tensors(torch.Tensor.pin_memory)

    def __repr__(self) -> str:
        rows = f"B={self.anchor_pos.shape[0]}, " if self.batched else ""
        return (f"PeagleMaskMod({rows}Q_LEN={self.anchor_pos.shape[-1]}, KV_LEN={self.kv_anchor_pos.shape[-1]}, "
                f"positions={self.doc_of_position.shape[-1]}, sliding_window={self.sliding_window}, "
                f"device={self.anchor_pos.device})")


def mask_mod_from_inputs(inputs: MaskInputs) -> PeagleMaskMod:
    """The rule over already-validated inputs (see :func:`create_peagle_mask_mod`)."""
    keys = (None, None) if inputs.keys_are_queries else (inputs.kv_anchor_pos, inputs.kv_depth)
    return PeagleMaskMod(inputs.anchor_pos, inputs.depth, inputs.doc_of_position, inputs.sliding_window, *keys)


def create_peagle_mask_mod(anchor_pos, depth, lengths=None, total_seq_len=None, *, document_ids=None,
                           sliding_window=None, kv_anchor_pos=None, kv_depth=None) -> PeagleMaskMod:
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
    earlier-or-equal depth of q's own rollout. The result is a :class:`PeagleMaskMod`: it pickles.
    """
    inputs = normalize_mask_inputs(anchor_pos, depth, lengths, total_seq_len, document_ids=document_ids,
                                   sliding_window=sliding_window, kv_anchor_pos=kv_anchor_pos, kv_depth=kv_depth)
    return mask_mod_from_inputs(inputs)
