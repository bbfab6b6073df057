"""What the mask tests share: the backends under test, the rule written out pair by pair (independent of
the package), the oracle, and byte comparisons. Test modules import it (``from helpers import ...``);
conftest.py holds the fixtures."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask

import peagle_ext
from peagle_ext import _native
from peagle_ext._block_index import BlockIndex
from peagle_ext.block_mask import BACKEND_DEVICE as NATIVE_BACKEND_DEVICE

# Every backend and the device the tests give it tensors on (the python backend runs on any device;
# its CPU run is the one every machine has). "cuda_emulated" is the CUDA pipeline's code run on CPU
# tensors by a sequential launcher, so the CPU suite covers what the GPU runs.
BACKEND_DEVICE = {"python": "cpu", **NATIVE_BACKEND_DEVICE}


def backends_here() -> list[str]:
    """Every backend that runs here (the python one always), for tests that compare them all."""
    return [backend for backend in BACKEND_DEVICE if backend == "python" or _native.native_status()[backend] is None]


def skip_unless_backend(backend: str) -> None:
    if backend == "python":
        return
    reason = _native.native_status()[backend]
    if reason is not None:
        pytest.skip(f"backend {backend!r} unavailable: {reason}")


def dense_rule(anchor_pos, depth, lengths=None, total_seq_len=None, *, document_ids=None, sliding_window=None,
               kv_anchor_pos=None, kv_depth=None) -> torch.Tensor:
    """The P-EAGLE rule for every (query, key) pair: bool [Q, KV], True where query q sees key k.

    Written from the rule's statement alone (docs/rule.md), sharing no code with the package, for
    inputs the package accepts: query q sees key k when both anchors lie in the same document (not
    padding) and k is depth-0 context at or before q's anchor (inside the window, when there is one)
    or an earlier-or-equal depth of q's own chain."""
    if document_ids is not None:
        doc = document_ids.long()
    else:
        position = torch.arange(total_seq_len, device=anchor_pos.device)
        ends = torch.cumsum(lengths.long(), 0)  # document i holds positions [ends[i-1], ends[i])
        doc = torch.where(position < lengths.sum(), torch.searchsorted(ends, position, right=True), -1)
    kv_anchor_pos = anchor_pos if kv_anchor_pos is None else kv_anchor_pos
    kv_depth = depth if kv_depth is None else kv_depth
    a_q, d_q = anchor_pos.long()[:, None], depth.long()[:, None]
    a_k, d_k = kv_anchor_pos.long()[None, :], kv_depth.long()[None, :]
    same_document = (doc[a_q] != -1) & (doc[a_q] == doc[a_k])
    context = (d_k == 0) & (a_k <= a_q)
    if sliding_window is not None:
        context &= a_k > a_q + d_q - sliding_window
    own_chain = (a_k == a_q) & (d_k <= d_q)
    return same_document & (context | own_chain)


def oracle_block_mask(anchor_pos, depth, lengths=None, total_seq_len=None, *, document_ids=None,
                      sliding_window=None, BLOCK_SIZE=128, kv_anchor_pos=None, kv_depth=None):
    """What create_block_mask finds by evaluating the rule (:func:`dense_rule`) on the dense
    Q_LEN x KV_LEN grid, on the inputs' device."""
    allowed = dense_rule(anchor_pos, depth, lengths, total_seq_len, document_ids=document_ids,
                         sliding_window=sliding_window, kv_anchor_pos=kv_anchor_pos, kv_depth=kv_depth)

    def rule(b, h, q_idx, kv_idx):
        return allowed[q_idx, kv_idx]

    q_len, kv_len = allowed.shape
    return create_block_mask(rule, None, None, q_len, kv_len, device=anchor_pos.device, BLOCK_SIZE=BLOCK_SIZE)


def assert_same_bytes(got, expected, label: str = "") -> None:
    """Both BlockMasks' eight index tensors equal element for element, the unread row tails included
    (after the set comparison, whose message says which blocks differ)."""
    peagle_ext.assert_block_masks_equal(got, expected)
    for name in BlockIndex._fields:
        assert torch.equal(getattr(got, name).cpu(), getattr(expected, name).cpu()), f"{label} {name}".strip()


def shuffled_noncontiguous_case(seq_len: int = 20000, seed: int = 3):
    """(anchor_pos, depth, document_ids): a COD sample in random element order over documents out of
    position order, with padding: the builders' general paths, at a size the oracle cannot reach."""
    generator = torch.Generator().manual_seed(seed)
    anchor_pos, depth = peagle_ext.generate_cod_sample_indices(seq_len, torch.ones(seq_len), generator=generator)
    order = torch.randperm(anchor_pos.numel(), generator=generator)
    document_ids = torch.randint(-1, 6, (seq_len,), generator=generator)
    return anchor_pos[order], depth[order], document_ids
