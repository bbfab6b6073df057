"""Validation and normalization of the P-EAGLE mask arguments.

Every builder and the mask_mod go through :func:`normalize_mask_inputs`, so a bad argument is
refused once, here, with a message that names it, before anything reaches C++ or CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The kernels pack (document, anchor) and (anchor, depth) into int64 sort keys of two 31-bit fields.
FIELD_MAX = 2**31 - 1

_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)

# Below this, a size estimate is not worth asking the device how much memory it has left.
_SMALL_BYTES = 1 << 30


def available_memory_bytes(device: torch.device) -> int:
    """Free memory for new tensors on ``device``: the GPU's free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def check_fits(what: str, needed_bytes: int, device: torch.device) -> None:
    """MemoryError, before anything is allocated, when ``what`` would need more memory than ``device``
    has free; the message gives the estimate."""
    if needed_bytes > _SMALL_BYTES and needed_bytes > available_memory_bytes(device):
        raise MemoryError(f"{what} would need about {needed_bytes / 2**30:.1f} GiB, more than the "
                          f"{available_memory_bytes(device) / 2**30:.1f} GiB free on {device}")


@dataclass(frozen=True)
class MaskInputs:
    """The rule's inputs in one canonical form, for one row or a batch of B rows (each its own mask).

    anchor_pos, depth:       int64 [N] or [B, N], the chain start and COD round of each query element.
    kv_anchor_pos, kv_depth: int64 [KV] or [B, KV], the same for each key element; the very same
                             tensors as anchor_pos and depth when queries and keys are one set.
    doc_of_position:         int64 [P] or [B, P], the document of each original position, -1 for
                             padding. In a batch an anchor equal to P marks a padding element.
    sliding_window:          None (unbounded causal context) or an int in [1, P + 2^31 - 1): a
                             wider window excludes nothing and is normalized to None.
    block_size:              (Q_BLOCK_SIZE, KV_BLOCK_SIZE).
    """

    anchor_pos: torch.Tensor
    depth: torch.Tensor
    doc_of_position: torch.Tensor
    sliding_window: int | None
    block_size: tuple[int, int]
    kv_anchor_pos: torch.Tensor
    kv_depth: torch.Tensor

    @property
    def num_elements(self) -> int:
        """Q_LEN: the number of query elements (of each row)."""
        return self.anchor_pos.shape[-1]

    @property
    def num_keys(self) -> int:
        """KV_LEN: the number of key elements (of each row)."""
        return self.kv_anchor_pos.shape[-1]

    @property
    def num_rows(self) -> int | None:
        """B for a batch of rows, None for one row given as 1-D tensors."""
        return self.anchor_pos.shape[0] if self.anchor_pos.dim() == 2 else None

    def row(self, index: int) -> MaskInputs:
        """Row ``index`` of a batch as 1-D inputs (the keys still the queries' own tensors when they
        are one set)."""
        anchor_pos, depth = self.anchor_pos[index], self.depth[index]
        keys = (anchor_pos, depth) if self.keys_are_queries else (self.kv_anchor_pos[index], self.kv_depth[index])
        return MaskInputs(anchor_pos, depth, self.doc_of_position[index], self.sliding_window, self.block_size, *keys)

    @property
    def keys_are_queries(self) -> bool:
        return self.kv_anchor_pos is self.anchor_pos and self.kv_depth is self.depth

    @property
    def device(self) -> torch.device:
        return self.anchor_pos.device


def _check_int_tensor(name: str, value, ndim: int = 1) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in _INT_DTYPES:
        raise TypeError(f"{name} must have an integer dtype, got {value.dtype}")
    if value.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(value.shape)}")
    return value


def _check_int(name: str, value, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def normalize_block_size(BLOCK_SIZE) -> tuple[int, int]:
    """Accept an int or a (Q, KV) pair of positive ints (at most 2^31 - 1: the kernels' block counts
    are ceil(N / size), which a larger size would overflow)."""
    if isinstance(BLOCK_SIZE, (tuple, list)):
        if len(BLOCK_SIZE) != 2:
            raise ValueError(f"BLOCK_SIZE must be an int or a (Q, KV) pair, got {BLOCK_SIZE!r}")
        q, kv = BLOCK_SIZE
        return (_check_int("BLOCK_SIZE[0]", q, 1, FIELD_MAX), _check_int("BLOCK_SIZE[1]", kv, 1, FIELD_MAX))
    size = _check_int("BLOCK_SIZE", BLOCK_SIZE, 1, FIELD_MAX)
    return (size, size)


def doc_of_position_from_lengths(lengths: torch.Tensor, total_seq_len: int) -> torch.Tensor:
    """Documents packed in order from position 0; positions past sum(lengths) are padding (-1).
    ``lengths`` [D] gives [total_seq_len]; a batch's zero-padded [B, D] gives [B, total_seq_len].

    Built with searchsorted rather than repeat_interleave so that no output size has to be read
    back from the device (no host sync on CUDA), in five launches: every one costs the CUDA path
    host time per build.
    """
    ends = torch.cumsum(lengths.to(torch.int64), -1)
    positions = torch.arange(total_seq_len, dtype=torch.int64, device=lengths.device)
    if lengths.dim() == 2:
        positions = positions.expand(lengths.shape[0], total_seq_len).contiguous()
    doc = torch.searchsorted(ends, positions, right=True)
    return doc.masked_fill_(doc == lengths.shape[-1], -1)  # past every document's end: padding


def stack_lengths(lengths) -> torch.Tensor:
    """A batch's documents, one lengths tensor per row, as one zero-padded [B, D] tensor."""
    rows = [_check_int_tensor(f"lengths[{index}]", row) for index, row in enumerate(lengths)]
    if not rows:
        raise ValueError("lengths must hold one tensor per row, got none")
    width = max(1, max(row.numel() for row in rows))
    return torch.stack([torch.nn.functional.pad(row.to(torch.int64), (0, width - row.numel())) for row in rows])


def _check_elements(anchor_name: str, anchor_pos, depth_name: str, depth,
                    ndim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A pair of element arrays: integer tensors of ``ndim`` dims ([N], or [B, N] for a batch) of one
    non-zero shape on one device."""
    anchor_pos = _check_int_tensor(anchor_name, anchor_pos, ndim)
    depth = _check_int_tensor(depth_name, depth, ndim)
    if anchor_pos.shape != depth.shape:
        raise ValueError(f"{anchor_name} and {depth_name} must have the same shape, got {tuple(anchor_pos.shape)} "
                         f"and {tuple(depth.shape)}")
    if anchor_pos.numel() == 0:
        raise ValueError(f"{anchor_name} and {depth_name} must not be empty (N == 0)")
    if anchor_pos.shape[-1] > FIELD_MAX:
        raise ValueError(f"{anchor_name} and {depth_name} must have at most {FIELD_MAX} elements (per row), "
                         f"got {anchor_pos.shape[-1]}")
    if depth.device != anchor_pos.device:
        raise ValueError(f"{depth_name} is on {depth.device} but {anchor_name} is on {anchor_pos.device}")
    return anchor_pos, depth


def normalize_mask_inputs(
    anchor_pos,
    depth,
    lengths=None,
    total_seq_len=None,
    *,
    document_ids=None,
    sliding_window=None,
    BLOCK_SIZE=128,
    validate: bool = True,
    kv_anchor_pos=None,
    kv_depth=None,
) -> MaskInputs:
    """Check every argument of the P-EAGLE rule and return them in canonical form.

    ``kv_anchor_pos``/``kv_depth`` (given together) make the keys a set of elements of their own
    (KV_LEN != Q_LEN allowed); otherwise the queries are the keys.

    Raises TypeError/ValueError naming the argument. Types, shapes and devices are always
    checked. The checks that read tensor values (negative entries, anchors past the sequence,
    lengths past total_seq_len) synchronize once with the device; ``validate=False`` skips them so
    the CUDA path stays sync-free and capturable in a CUDA graph. The kernels never read out of
    bounds either way: they treat an out-of-range anchor as padding.
    """
    if isinstance(anchor_pos, torch.Tensor) and anchor_pos.dim() not in (1, 2):
        raise ValueError(f"anchor_pos must be 1-D [N], or 2-D [B, N] for a batch of rows, got shape "
                         f"{tuple(anchor_pos.shape)}")
    batched = isinstance(anchor_pos, torch.Tensor) and anchor_pos.dim() == 2  # a batch of rows: [B, N]
    ndim = 2 if batched else 1
    anchor_pos, depth = _check_elements("anchor_pos", anchor_pos, "depth", depth, ndim)
    device = anchor_pos.device
    if (kv_anchor_pos is None) != (kv_depth is None):
        raise ValueError("give kv_anchor_pos and kv_depth together (or neither: the queries are the keys)")
    separate_keys = kv_anchor_pos is not None
    if separate_keys:
        kv_anchor_pos, kv_depth = _check_elements("kv_anchor_pos", kv_anchor_pos, "kv_depth", kv_depth, ndim)
        if kv_anchor_pos.device != device:
            raise ValueError(f"kv_anchor_pos is on {kv_anchor_pos.device} but anchor_pos is on {device}")
        if batched and kv_anchor_pos.shape[0] != anchor_pos.shape[0]:
            raise ValueError(f"kv_anchor_pos must have anchor_pos's {anchor_pos.shape[0]} rows, "
                             f"got {kv_anchor_pos.shape[0]}")
    block_size = normalize_block_size(BLOCK_SIZE)
    if sliding_window is not None:
        sliding_window = _check_int("sliding_window", sliding_window, 1)

    if (lengths is None) == (document_ids is None):
        raise ValueError("give exactly one of lengths (with total_seq_len) and document_ids")
    if lengths is not None:
        if batched and isinstance(lengths, (list, tuple)):
            lengths = stack_lengths(lengths)
        lengths = _check_int_tensor("lengths", lengths, ndim)
        if batched and lengths.shape[0] != anchor_pos.shape[0]:
            raise ValueError(f"lengths must have one row per row of anchor_pos ({anchor_pos.shape[0]}), "
                             f"got {lengths.shape[0]}")
        if total_seq_len is None:
            raise ValueError("total_seq_len is required with lengths")
        total_seq_len = _check_int("total_seq_len", total_seq_len, 1, FIELD_MAX)
        if lengths.device != device:
            raise ValueError(f"lengths is on {lengths.device} but anchor_pos is on {device}")
        position_bound = "total_seq_len"
    else:
        if total_seq_len is not None:
            raise ValueError("total_seq_len goes with lengths; with document_ids it is len(document_ids)")
        document_ids = _check_int_tensor("document_ids", document_ids, ndim)
        if document_ids.numel() == 0:
            raise ValueError("document_ids must not be empty")
        if document_ids.shape[-1] > FIELD_MAX:
            raise ValueError(f"document_ids must have at most {FIELD_MAX} entries, got {document_ids.shape[-1]}")
        if batched and document_ids.shape[0] != anchor_pos.shape[0]:
            raise ValueError(f"document_ids must have one row per row of anchor_pos ({anchor_pos.shape[0]}), "
                             f"got {document_ids.shape[0]}")
        if document_ids.device != device:
            raise ValueError(f"document_ids is on {document_ids.device} but anchor_pos is on {device}")
        position_bound = "len(document_ids)"

    num_positions = total_seq_len if lengths is not None else document_ids.shape[-1]
    # A window wider than every a_q + d_q (< num_positions + FIELD_MAX once validated) excludes
    # nothing: it is no window, for every backend and the mask_mod alike, and no sum overflows.
    if sliding_window is not None and sliding_window >= num_positions + FIELD_MAX:
        sliding_window = None
    if lengths is not None:  # the position -> document table: an arange, searchsorted's output, a mask
        rows = lengths.shape[0] if lengths.dim() == 2 else 1
        check_fits(f"the document table of {f'{rows} rows of ' if lengths.dim() == 2 else ''}"
                   f"total_seq_len={total_seq_len} positions", 17 * rows * total_seq_len, device)

    anchor_pos = anchor_pos.to(torch.int64).contiguous()
    depth = depth.to(torch.int64).contiguous()
    if separate_keys:
        kv_anchor_pos = kv_anchor_pos.to(torch.int64).contiguous()
        kv_depth = kv_depth.to(torch.int64).contiguous()
    else:
        kv_anchor_pos, kv_depth = anchor_pos, depth
    if validate:
        _check_values(anchor_pos, depth, lengths, total_seq_len, document_ids, position_bound,
                      (kv_anchor_pos, kv_depth) if separate_keys else None, padding_anchor=batched)
    if lengths is not None:
        doc_of_position = doc_of_position_from_lengths(lengths, total_seq_len)
    else:
        doc_of_position = document_ids.to(torch.int64).contiguous()
    return MaskInputs(
        anchor_pos=anchor_pos,
        depth=depth,
        doc_of_position=doc_of_position,
        sliding_window=sliding_window,
        block_size=block_size,
        kv_anchor_pos=kv_anchor_pos,
        kv_depth=kv_depth,
    )


def _check_values(anchor_pos, depth, lengths, total_seq_len, document_ids, position_bound, keys=None,
                  padding_anchor: bool = False) -> None:
    """The value checks: one stacked reduction, so one device sync for all of them. ``keys``:
    (kv_anchor_pos, kv_depth) when the keys are elements of their own, checked as the queries are.
    ``padding_anchor``: a batch, whose rows may be padded with elements anchored at P."""
    num_positions = total_seq_len if lengths is not None else document_ids.shape[-1]
    element_stats = [anchor_pos.min(), anchor_pos.max(), depth.min(), depth.max()]
    if keys is not None:
        element_stats += [keys[0].min(), keys[0].max(), keys[1].min(), keys[1].max()]
    stats = list(element_stats)
    if lengths is not None and lengths.numel():
        lengths64 = lengths.to(torch.int64)
        # Each length's max first: once every one is <= total_seq_len (< 2^31), no sum can wrap.
        stats += [lengths64.min(), lengths64.max(), lengths64.sum(-1).max()]
    elif document_ids is not None:
        document_ids64 = document_ids.to(torch.int64)
        stats += [document_ids64.min(), document_ids64.max()]
    values = torch.stack(stats).tolist()
    element_values, values = values[: len(element_stats)], values[len(element_stats):]
    pairs = [("anchor_pos", "depth")] + ([("kv_anchor_pos", "kv_depth")] if keys is not None else [])
    for index, (anchor_name, depth_name) in enumerate(pairs):
        low_anchor, high_anchor, low_depth, high_depth = element_values[4 * index: 4 * index + 4]
        if low_anchor < 0:
            raise ValueError(f"{anchor_name} must be non-negative, got a minimum of {low_anchor}")
        if low_depth < 0:
            raise ValueError(f"{depth_name} must be non-negative, got a minimum of {low_depth}")
        if high_depth > FIELD_MAX:
            raise ValueError(f"{depth_name} must be <= {FIELD_MAX}, got a maximum of {high_depth}")
        if high_anchor > num_positions or (high_anchor == num_positions and not padding_anchor):
            bound = f"<= {position_bound}={num_positions} ({position_bound} marks a padding element in a batch)" \
                if padding_anchor else f"< {position_bound}={num_positions}"
            raise ValueError(f"{anchor_name} must be {bound}, got a maximum of {high_anchor}")
    if lengths is not None and lengths.numel():
        if values[0] < 0:
            raise ValueError(f"lengths must be non-negative, got a minimum of {values[0]}")
        if values[1] > total_seq_len:
            raise ValueError(f"lengths must each be <= total_seq_len={total_seq_len}, got a maximum of {values[1]}")
        if values[2] > total_seq_len:
            raise ValueError(f"lengths sum to {values[2]}{' in a row' if lengths.dim() == 2 else ''}, "
                             f"past total_seq_len={total_seq_len}")
    if document_ids is not None:
        if values[0] < -1:
            raise ValueError(f"document_ids values must be >= -1 (-1 marks padding), got {values[0]}")
        if values[1] > FIELD_MAX:
            raise ValueError(f"document_ids values must be <= {FIELD_MAX}, got {values[1]}")
