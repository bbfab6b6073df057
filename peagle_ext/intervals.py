"""``block_mask_from_intervals``: the exact BlockMask of "query q sees the keys of a few intervals".

Query q sees key k exactly when ``starts[q, m] <= k < ends[q, m]`` for some m. Most attention
masks of packed training are such unions of a few intervals per query (a document's causal prefix
or window, one diagonal key per test-time step, an anchor's prefix and its own block), so one
engine turns them into the BlockMask that ``create_block_mask`` gives, in time proportional to the
queries plus the tiles, never the Q_LEN x KV_LEN grid.

How (the same in the python path and the compiled kernels, csrc/rule/interval_rule.h):

* each query's intervals are clamped to [0, KV_LEN), sorted by start and merged into disjoint,
  non-touching intervals (M is small);
* a merged interval [s, e) touches the kv-blocks [s // KVB, ceil(e / KVB)) and covers whole the
  kv-blocks [ceil(s / KVB), e // KVB) (a tail kv-block is never covered whole: its padding keys
  are seen by none, as in create_block_mask);
* per q-block, two difference rows over the kv-blocks count the queries that touch and that cover
  each kv-block; a prefix sum gives the counts. A tile is non-empty when a query touches it, and
  full when all Q_BLOCK_SIZE queries cover it (so a tail q-block is never full).
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask, _dense_to_ordered

from . import _native
from ._block_index import BlockIndex, num_blocks
from ._inputs import FIELD_MAX, check_fits

INTERVAL_BACKENDS = ("python", "cpu", "cuda", "cuda_emulated")
_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)

# Peak bytes per tile of a python build: two int32 difference rows and their sums, the bool grids
# and their int32 lists (measured with margin, as the P-EAGLE builders' figures).
_PYTHON_BYTES_PER_TILE = 40
_NATIVE_BYTES_PER_TILE = 24


class IntervalMaskMod:
    """The mask_mod of an interval mask: q sees k iff ``starts[q, m] <= k < ends[q, m]`` for some m.

    Holds ``starts`` and ``ends`` (int64 [Q, M], or [B, Q, M] read at row ``b``) as plain attributes,
    so a BlockMask carrying it pickles and moves between devices (:meth:`to`).
    """

    def __init__(self, starts: torch.Tensor, ends: torch.Tensor):
        self.starts = starts
        self.ends = ends

    @property
    def batched(self) -> bool:
        return self.starts.dim() == 3

    def __call__(self, b, h, q_idx, kv_idx):
        seen = kv_idx < 0  # all False, with kv_idx's shape and device
        # One comparison per interval, unrolled: M is small, and the result stays a plain
        # elementwise expression that create_block_mask's vmap and flex_attention's compiler take.
        for m in range(self.starts.shape[-1]):
            start = self.starts[b, q_idx, m] if self.batched else self.starts[q_idx, m]
            end = self.ends[b, q_idx, m] if self.batched else self.ends[q_idx, m]
            seen = seen | ((start <= kv_idx) & (kv_idx < end))
        return seen

    def to(self, device, non_blocking: bool = False) -> IntervalMaskMod:
        return IntervalMaskMod(self.starts.to(device, non_blocking=non_blocking),
                               self.ends.to(device, non_blocking=non_blocking))

    def __repr__(self) -> str:
        return f"IntervalMaskMod(shape={tuple(self.starts.shape)}, device={self.starts.device})"


def _block_sizes(BLOCK_SIZE) -> tuple[int, int]:
    pair = BLOCK_SIZE if isinstance(BLOCK_SIZE, tuple) else (BLOCK_SIZE, BLOCK_SIZE)
    if len(pair) != 2 or any(isinstance(size, bool) or not isinstance(size, int) for size in pair):
        raise TypeError(f"BLOCK_SIZE must be an int or a pair of ints, got {BLOCK_SIZE!r}")
    if not all(1 <= size <= FIELD_MAX for size in pair):
        raise ValueError(f"BLOCK_SIZE must be in [1, 2^31 - 1], got {BLOCK_SIZE!r}")
    return pair


def _check_intervals(starts, ends, kv_len, validate: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """starts and ends as int64 [B, Q, M] (B = 1 for 2-D input), after the checks."""
    for name, value in (("starts", starts), ("ends", ends)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if value.dtype not in _INT_DTYPES:
            raise TypeError(f"{name} must be an integer tensor, got {value.dtype}")
        if value.dim() not in (2, 3):
            raise ValueError(f"{name} must be [Q, M] or [B, Q, M], got shape {tuple(value.shape)}")
        if value.device.type == "meta":
            raise ValueError(f"{name} must hold values, not be on the meta device")
    if starts.shape != ends.shape:
        raise ValueError(f"starts and ends must have one shape, got {tuple(starts.shape)} and {tuple(ends.shape)}")
    if starts.device != ends.device:
        raise ValueError(f"starts and ends must be on one device, got {starts.device} and {ends.device}")
    if isinstance(kv_len, bool) or not isinstance(kv_len, int):
        raise TypeError(f"kv_len must be an int, got {type(kv_len).__name__}")
    if not 1 <= kv_len <= FIELD_MAX:
        raise ValueError(f"kv_len must be in [1, 2^31 - 1], got {kv_len}")
    if starts.shape[-2] < 1 or starts.shape[-2] > FIELD_MAX:
        raise ValueError(f"starts must hold 1 to 2^31 - 1 queries (dim -2), got {starts.shape[-2]}")
    if starts.dim() == 3 and not 1 <= starts.shape[0] <= 65535:
        raise ValueError(f"starts must hold 1 to 65535 rows (dim 0), got {starts.shape[0]}")
    starts, ends = starts.to(torch.int64), ends.to(torch.int64)
    if starts.dim() == 2:
        starts, ends = starts[None], ends[None]
    if starts.shape[-1] == 0:  # no intervals: one empty one per query says the same
        starts = ends = starts.new_zeros(*starts.shape[:-1], 1)
    if validate:
        for name, value in (("starts", starts), ("ends", ends)):
            outside = (value < 0) | (value > kv_len)
            if bool(outside.any()):
                where = tuple(int(i) for i in outside.nonzero()[0])
                raise ValueError(f"{name} must lie in [0, kv_len={kv_len}], got {int(value[where])} at index "
                                 f"{where if starts.shape[0] > 1 else where[1:]} (validate=False clamps instead)")
    return starts.contiguous(), ends.contiguous()


def merged_intervals(starts: torch.Tensor, ends: torch.Tensor, kv_len: int):
    """Each query's intervals clamped to [0, kv_len], sorted and merged, along the last dim.

    Returns (start, end, last): a merged interval [start, end) sits at each position where ``last``
    is True (the last interval of a merged group); elsewhere the values are partial and unused. An
    empty merged interval (start >= end) comes only from empty input intervals.
    """
    start, end = starts.clamp(0, kv_len), ends.clamp(0, kv_len)
    empty = end <= start
    # An empty interval becomes [kv_len, kv_len): after every real one, merging into nothing.
    start, end = start.masked_fill(empty, kv_len), end.masked_fill(empty, kv_len)
    start, order = torch.sort(start, dim=-1, stable=True)
    end = end.gather(-1, order)
    reach = torch.cummax(end, dim=-1).values  # the end of everything merged so far
    new_group = torch.ones_like(empty)
    new_group[..., 1:] = start[..., 1:] > reach[..., :-1]  # touching intervals merge ([a, b) + [b, c))
    last = torch.ones_like(empty)
    last[..., :-1] = new_group[..., 1:]
    group_start = torch.cummax(start.masked_fill(~new_group, -1), dim=-1).values
    return group_start, reach, last


def _tile_counts(lo, hi, row, num_rows, num_columns):
    """[num_rows, num_columns] int32: per row, how many of the ranges [lo, hi) hold each column."""
    keep = hi > lo
    lo, hi, row = lo[keep], hi[keep], row[keep]
    diff = torch.zeros(num_rows * (num_columns + 1), dtype=torch.int32, device=lo.device)
    ones = torch.ones_like(lo, dtype=torch.int32)
    diff.index_add_(0, row * (num_columns + 1) + lo, ones)
    diff.index_add_(0, row * (num_columns + 1) + hi, -ones)
    return torch.cumsum(diff.view(num_rows, num_columns + 1), dim=1, dtype=torch.int32)[:, :num_columns]


def interval_tile_grids(starts, ends, kv_len, q_block_size, kv_block_size):
    """(partial, full) bool [B, nQ, nKV] tile grids of int64 [B, Q, M] intervals (the python path)."""
    batch, num_queries, _ = starts.shape
    num_q_blocks, num_kv_blocks = num_blocks(num_queries, q_block_size), num_blocks(kv_len, kv_block_size)
    start, end, last = merged_intervals(starts, ends, kv_len)
    keep = last & (end > start)
    rows = (torch.arange(batch, device=starts.device)[:, None, None] * num_q_blocks
            + torch.arange(num_queries, device=starts.device)[None, :, None] // q_block_size).expand_as(start)
    start, end, rows = start[keep], end[keep], rows[keep]
    touched = _tile_counts(start // kv_block_size, (end + kv_block_size - 1) // kv_block_size, rows,
                           batch * num_q_blocks, num_kv_blocks)
    covered = _tile_counts((start + kv_block_size - 1) // kv_block_size, end // kv_block_size, rows,
                           batch * num_q_blocks, num_kv_blocks)
    full = covered == q_block_size
    partial = (touched > 0) & ~full
    shape = (batch, num_q_blocks, num_kv_blocks)
    return partial.view(shape), full.view(shape)


def _ordered(grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """create_block_mask's (count, indices) of a [B, rows, cols] grid, as [B, 1, rows], [B, 1, rows, cols]."""
    counts, indices = _dense_to_ordered(grid)
    return counts[:, None], indices[:, None]


def _build_python(starts, ends, kv_len, q_block_size, kv_block_size) -> BlockIndex:
    partial, full = interval_tile_grids(starts, ends, kv_len, q_block_size, kv_block_size)
    return BlockIndex(*_ordered(partial), *_ordered(full), *_ordered(partial.transpose(1, 2)),
                      *_ordered(full.transpose(1, 2)))


def _choose_backend(backend: str, device: torch.device) -> str:
    if backend not in INTERVAL_BACKENDS + ("auto",):
        raise ValueError(f"backend must be one of {INTERVAL_BACKENDS + ('auto',)}, got {backend!r}")
    status = _native.interval_status()
    if backend == "auto":
        native = "cuda" if device.type == "cuda" else "cpu"
        return native if status[native] is None else "python"
    if backend == "python":
        return backend
    if status[backend] is not None:
        raise RuntimeError(f"backend {backend!r} is not available: {status[backend]}")
    wanted = "cuda" if backend == "cuda" else "cpu"
    if device.type != wanted:
        raise ValueError(f"backend {backend!r} needs {wanted} tensors, but starts is on {device}")
    return backend


def block_mask_from_intervals(starts: torch.Tensor, ends: torch.Tensor, kv_len: int, *,
                              BLOCK_SIZE: int | tuple[int, int] = 128, backend: str = "auto",
                              validate: bool = True) -> BlockMask:
    """The BlockMask of "query q sees key k iff ``starts[q, m] <= k < ends[q, m]`` for some m".

    Exactly what ``create_block_mask(mask_mod, B, None, Q, kv_len, BLOCK_SIZE=BLOCK_SIZE)`` gives
    for that rule (partial and full blocks and their q-side transposes), carrying the rule as a
    picklable :class:`IntervalMaskMod`; never a Q x kv_len tensor.

    Args:
        starts, ends: integer tensors [Q, M], or [B, Q, M] for a batch of B rows (each its own
            mask, ``B`` given to create_block_mask). An interval with ``end <= start`` is empty;
            intervals may overlap and come in any order.
        kv_len: KV_LEN, the number of keys.
        BLOCK_SIZE: int or (Q_BLOCK_SIZE, KV_BLOCK_SIZE).
        backend: "auto" (the compiled kernel for the tensors' device when built, else "python"),
            "python", "cpu", "cuda", or "cuda_emulated" (the CUDA kernel's code run on CPU tensors).
        validate: refuse bounds outside [0, kv_len] (one host sync on CUDA). ``False`` clamps them
            to [0, kv_len] instead, which the rule itself does (keys outside it do not exist), and
            keeps the CUDA path free of host syncs and capturable in a CUDA graph.
    """
    q_block_size, kv_block_size = _block_sizes(BLOCK_SIZE)
    batched = isinstance(starts, torch.Tensor) and starts.dim() == 3
    starts, ends = _check_intervals(starts, ends, kv_len, validate)
    chosen = _choose_backend(backend, starts.device)
    batch, num_queries = starts.shape[0], starts.shape[1]
    tiles = num_blocks(num_queries, q_block_size) * num_blocks(kv_len, kv_block_size) * batch
    what = f"a {batch} x {num_queries} x {kv_len} interval block mask (BLOCK_SIZE {(q_block_size, kv_block_size)})"
    if chosen == "python":
        check_fits(what, _PYTHON_BYTES_PER_TILE * tiles, starts.device)
        index = _build_python(starts, ends, kv_len, q_block_size, kv_block_size)
    else:
        check_fits(what, _NATIVE_BYTES_PER_TILE * tiles, starts.device)
        index = _native.build_interval_native(starts, ends, kv_len, q_block_size, kv_block_size,
                                              emulated=chosen == "cuda_emulated")
    mask_mod = IntervalMaskMod(starts if batched else starts[0], ends if batched else ends[0])
    return BlockMask((num_queries, kv_len), *index, BLOCK_SIZE=(q_block_size, kv_block_size), mask_mod=mask_mod)


__all__ = ["IntervalMaskMod", "block_mask_from_intervals"]
