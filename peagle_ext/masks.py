"""The masks of other draft-training methods, exact and without the dense grid.

Each function gives the BlockMask that ``create_block_mask`` gives over the rule it names (the
rule speculators' own mask_mod evaluates), for any input: document ids in any order (including
ids that are not contiguous runs and negative ids), padding (-1), windows of any size, sizes that
are not multiples of the block size. Each rule is, per query, a union of a few key intervals, so
:func:`peagle_ext.block_mask_from_intervals` builds it; where the documents are not contiguous
runs a query's keys are not a few intervals, and the P-EAGLE engine (:func:`build_block_mask`,
exact for any document ids) or one interval per document run builds it instead.
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask

from ._inputs import FIELD_MAX, check_fits
from .block_mask import build_block_mask
from .intervals import block_mask_from_intervals

_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
# Peak bytes per interval while the intervals are built and merged (starts, ends, their clamped,
# sorted and merged copies, int64 each, with margin).
_BYTES_PER_INTERVAL = 128


def _check_document_ids(document_ids) -> torch.Tensor:
    if not isinstance(document_ids, torch.Tensor):
        raise TypeError(f"document_ids must be a torch.Tensor, got {type(document_ids).__name__}")
    if document_ids.dtype not in _INT_DTYPES:
        raise TypeError(f"document_ids must be an integer tensor, got {document_ids.dtype}")
    if document_ids.dim() == 2 and document_ids.shape[0] == 1:  # speculators' [1, S]
        document_ids = document_ids[0]
    if document_ids.dim() != 1 or document_ids.numel() == 0:
        raise ValueError(f"document_ids must be a non-empty [S] (or [1, S]) tensor, got shape "
                         f"{tuple(document_ids.shape)}")
    if document_ids.device.type == "meta":
        raise ValueError("document_ids must hold values, not be on the meta device")
    if document_ids.numel() > FIELD_MAX:
        raise ValueError(f"document_ids must hold at most 2^31 - 1 positions, got {document_ids.numel()}")
    return document_ids.long()


def _check_int(name: str, value, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_window(sliding_window, total_seq_len: int) -> int | None:
    """The window as an int in [0, total_seq_len], or None. The rule excludes every key with a
    window <= 0 and none beyond the ones a window of total_seq_len excludes, so this is the same
    mask, and sums with positions never leave int64 (an int past it would not even convert)."""
    if sliding_window is None:
        return None
    return min(max(_check_int("sliding_window", sliding_window), 0), total_seq_len)


def _check_total_seq_len(document_ids: torch.Tensor, total_seq_len) -> int:
    _check_int("total_seq_len", total_seq_len, 1)
    if document_ids.numel() != total_seq_len:
        raise ValueError(f"document_ids must hold total_seq_len={total_seq_len} entries, got {document_ids.numel()}")
    return total_seq_len


def _run_starts(document_ids: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(first position of each position's run of equal ids, whether every real document is one run)."""
    positions = torch.arange(document_ids.numel(), device=document_ids.device)
    begins = torch.ones_like(document_ids, dtype=torch.bool)
    begins[1:] = document_ids[1:] != document_ids[:-1]
    run_start = torch.cummax(torch.where(begins, positions, 0), 0).values
    run_ids = document_ids[begins]
    real_runs = run_ids[run_ids != -1]
    return run_start, real_runs.numel() == torch.unique(real_runs).numel()


def _dense_documents(document_ids: torch.Tensor, padding_alone: bool) -> torch.Tensor:
    """Document ids as the P-EAGLE engine reads them: real documents numbered 0.., -1 kept as
    padding, or, with ``padding_alone``, each -1 position a document of its own (it sees itself)."""
    values, dense = torch.unique(document_ids, return_inverse=True)
    padding = document_ids == -1
    if padding_alone:
        return torch.where(padding, values.numel() + torch.arange(document_ids.numel(), device=dense.device), dense)
    return torch.where(padding, -1, dense)


def _causal_context(document_ids, run_start, positions, sliding_window):
    """Per query position q, its document's causal keys as one interval [lo, q + 1) (empty for
    padding or a window <= 0), for documents that are contiguous runs."""
    lo = run_start
    if sliding_window is not None:
        lo = torch.maximum(lo, positions - sliding_window + 1)
    end = torch.where(document_ids != -1, positions + 1, lo)
    return lo, torch.maximum(end, lo)


def document_causal_block_mask(document_ids: torch.Tensor, sliding_window: int | None = None,
                               BLOCK_SIZE: int | tuple[int, int] = 128) -> BlockMask:
    """Packed documents, causal: q sees k iff ``doc[q] != -1 and doc[q] == doc[k] and k <= q``
    (and ``k > q - sliding_window`` with a window). S x S, ``S = len(document_ids)``."""
    document_ids = _check_document_ids(document_ids)
    sliding_window = _check_window(sliding_window, document_ids.numel())
    run_start, contiguous = _run_starts(document_ids)
    positions = torch.arange(document_ids.numel(), device=document_ids.device)
    if contiguous or (sliding_window is not None and sliding_window <= 0):
        lo, hi = _causal_context(document_ids, run_start, positions, sliding_window)
        return block_mask_from_intervals(lo[:, None], hi[:, None], document_ids.numel(), BLOCK_SIZE=BLOCK_SIZE,
                                         validate=False)
    # Depth 0 everywhere, the P-EAGLE rule is exactly this one, over any document ids.
    return build_block_mask(positions, torch.zeros_like(positions), document_ids=_dense_documents(document_ids, False),
                            sliding_window=sliding_window, BLOCK_SIZE=BLOCK_SIZE)


def eagle3_block_mask(document_ids: torch.Tensor, total_seq_len: int, num_steps: int,
                      sliding_window: int | None = None, BLOCK_SIZE: int | tuple[int, int] = 128) -> BlockMask:
    """EAGLE-3 test-time training: speculators' ``create_combined_mask_mod`` rule with Q_LEN =
    total_seq_len and KV_LEN = num_steps x total_seq_len: q sees k iff ``k % S == q`` (its own
    position in every step's copy) or (``k <= q``, same document, not padding, and
    ``k > q - sliding_window`` with a window)."""
    document_ids = _check_document_ids(document_ids)
    total_seq_len = _check_total_seq_len(document_ids, total_seq_len)
    num_steps = _check_int("num_steps", num_steps, 1)
    if num_steps * total_seq_len > FIELD_MAX:
        raise ValueError(f"num_steps x total_seq_len (KV_LEN) must be at most 2^31 - 1, got {num_steps} x "
                         f"{total_seq_len}")
    check_fits(f"EAGLE-3 intervals for {total_seq_len} queries and {num_steps} steps",
               _BYTES_PER_INTERVAL * total_seq_len * (num_steps + 1), document_ids.device)
    sliding_window = _check_window(sliding_window, total_seq_len)
    run_start, contiguous = _run_starts(document_ids)
    positions = torch.arange(total_seq_len, device=document_ids.device)
    kv_len = num_steps * total_seq_len
    if contiguous or (sliding_window is not None and sliding_window <= 0):
        lo, hi = _causal_context(document_ids, run_start, positions, sliding_window)
        diagonal = positions[:, None] + total_seq_len * torch.arange(num_steps, device=positions.device)[None, :]
        starts, ends = torch.cat([lo[:, None], diagonal], 1), torch.cat([hi[:, None], diagonal + 1], 1)
        return block_mask_from_intervals(starts, ends, kv_len, BLOCK_SIZE=BLOCK_SIZE, validate=False)
    # The P-EAGLE rule with keys apart: key t * S + p is (anchor p, depth t), every query q is
    # (anchor q, depth num_steps - 1), so its own chain is its diagonal in every copy; the window
    # grows by that depth to stay q - W; each padding position is a document of its own, as
    # speculators' padding queries see their diagonal and nothing else.
    steps = torch.arange(num_steps, device=positions.device)
    return build_block_mask(
        positions, torch.full_like(positions, num_steps - 1),
        document_ids=_dense_documents(document_ids, True),
        sliding_window=None if sliding_window is None else sliding_window + num_steps - 1,
        kv_anchor_pos=positions.repeat(num_steps), kv_depth=steps.repeat_interleave(total_seq_len),
        BLOCK_SIZE=BLOCK_SIZE)


def _document_run_intervals(document_ids, anchors, lo):
    """Per anchor a, the keys of a's document in [lo, a) as one interval per run of that document:
    int64 [n, R] starts and ends (R the most runs any anchor needs, empty intervals padding)."""
    length = document_ids.numel()
    begins = torch.ones_like(document_ids, dtype=torch.bool)
    begins[1:] = document_ids[1:] != document_ids[:-1]
    run_begin = torch.nonzero(begins).flatten()
    run_end = torch.cat([run_begin[1:], run_begin.new_tensor([length])])
    run_doc = document_ids[run_begin]
    # Runs in (document, position) order: each document's runs are one stretch, in position order.
    order = torch.argsort(run_doc, stable=True)
    run_begin, run_end, run_doc = run_begin[order], run_end[order], run_doc[order]
    doc_rank = torch.unique(run_doc, return_inverse=True)[1]  # dense, order-preserving: keys below stay sorted
    span = length + 1
    anchor_doc = document_ids[anchors.clamp(0, length - 1)]
    anchor_rank = torch.searchsorted(torch.unique(run_doc), anchor_doc)
    first = torch.searchsorted(doc_rank * span + run_end, anchor_rank * span + lo, right=True)
    past = torch.searchsorted(doc_rank * span + run_begin, anchor_rank * span + anchors)
    count = (past - first).clamp(min=0)
    width = max(int(count.max()), 1)
    check_fits(f"{anchors.numel()} anchors x {width} document runs of intervals",
               _BYTES_PER_INTERVAL * anchors.numel() * width, anchors.device)
    run = first[:, None] + torch.arange(width, device=anchors.device)[None, :]
    valid = (run < past[:, None]) & (anchor_doc != -1)[:, None] & (anchors >= 0)[:, None]
    run = run.clamp(max=run_begin.numel() - 1)
    starts = torch.maximum(run_begin[run], lo[:, None])
    ends = torch.minimum(run_end[run], anchors[:, None])
    return torch.where(valid, starts, 0), torch.where(valid, ends, 0)


def dflash_block_mask(document_ids: torch.Tensor, total_seq_len: int, anchor_positions: torch.Tensor,
                      block_size: int, sliding_window: int | None = None, sliding_window_non_causal: bool = False,
                      BLOCK_SIZE: int | tuple[int, int] = 128) -> BlockMask:
    """DFlash: speculators' ``create_anchor_block_mask_mod`` rule, Q_LEN = n_anchors x block_size,
    KV_LEN = total_seq_len + Q_LEN. Query q of anchor block j (anchor a) sees the base keys of a's
    document (not padding) before a (and ``>= a - sliding_window`` with a window), and the keys of
    its own block ``total_seq_len + [j * block_size, (j + 1) * block_size)``, only up to itself
    when there is a window and ``sliding_window_non_causal`` is False.

    Anchors lie in [-total_seq_len, total_seq_len) (a negative anchor has no base keys before it).
    Documents that are not contiguous runs cost one interval per run of a document before an anchor.
    """
    document_ids = _check_document_ids(document_ids)
    total_seq_len = _check_total_seq_len(document_ids, total_seq_len)
    block_size = _check_int("block_size", block_size, 1)
    sliding_window = _check_window(sliding_window, total_seq_len)
    if not isinstance(sliding_window_non_causal, bool):
        raise TypeError(f"sliding_window_non_causal must be a bool, got {type(sliding_window_non_causal).__name__}")
    if not isinstance(anchor_positions, torch.Tensor) or anchor_positions.dtype not in _INT_DTYPES:
        raise TypeError("anchor_positions must be an integer torch.Tensor")
    if anchor_positions.dim() != 1 or anchor_positions.numel() == 0:
        raise ValueError(f"anchor_positions must be a non-empty 1-D tensor, got shape {tuple(anchor_positions.shape)}")
    if anchor_positions.device.type == "meta":
        raise ValueError("anchor_positions must hold values, not be on the meta device")
    if total_seq_len + anchor_positions.numel() * block_size > FIELD_MAX:
        raise ValueError(f"total_seq_len + len(anchor_positions) x block_size (KV_LEN) must be at most 2^31 - 1, "
                         f"got {total_seq_len} + {anchor_positions.numel()} x {block_size}")
    anchors = anchor_positions.to(document_ids.device, torch.long)
    if bool(((anchors < -total_seq_len) | (anchors >= total_seq_len)).any()):
        raise ValueError(f"anchor_positions must lie in [-total_seq_len, total_seq_len) = [{-total_seq_len}, "
                         f"{total_seq_len}), got {anchors.min().item()}..{anchors.max().item()}")
    num_anchors = anchors.numel()
    q_len = num_anchors * block_size
    non_causal = sliding_window is None or sliding_window_non_causal
    lo = torch.zeros_like(anchors) if sliding_window is None else (anchors - sliding_window).clamp(min=0)
    base_starts, base_ends = _document_run_intervals(document_ids, anchors, lo)
    check_fits(f"DFlash intervals for {q_len} queries", _BYTES_PER_INTERVAL * q_len * (base_starts.shape[1] + 1),
               anchors.device)
    query = torch.arange(q_len, device=anchors.device)
    block = query // block_size
    own_start = total_seq_len + block * block_size
    own_end = own_start + block_size if non_causal else total_seq_len + query + 1
    starts = torch.cat([base_starts[block], own_start[:, None]], 1)
    ends = torch.cat([base_ends[block], own_end[:, None]], 1)
    return block_mask_from_intervals(starts, ends, total_seq_len + q_len, BLOCK_SIZE=BLOCK_SIZE, validate=False)


__all__ = ["dflash_block_mask", "document_causal_block_mask", "eagle3_block_mask"]
