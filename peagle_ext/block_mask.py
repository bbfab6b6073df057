"""``build_block_mask``: the P-EAGLE BlockMask from per-element metadata, without the dense grid."""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask

from . import _native
from ._inputs import MaskInputs, check_fits, normalize_mask_inputs
from ._block_index import BlockIndex
from ._python_builder import block_index_from_grids, build_python, grid_from_lists
from .mask_mod import mask_mod_from_inputs

# "cuda_emulated" is a test aid: the CUDA pipeline's code run on CPU tensors by a sequential
# launcher, slow and exact. "auto" never picks it and available_backends() does not list it.
BACKENDS = ("python", "cpu", "cuda", "cuda_emulated")
BACKEND_DEVICE = {"cpu": "cpu", "cuda": "cuda", "cuda_emulated": "cpu"}  # the native backends' devices


def available_backends() -> list[str]:
    """Backends this install can run here, fastest first within each device."""
    status = _native.native_status()
    return [backend for backend in ("cuda", "cpu") if status[backend] is None] + ["python"]


def _choose_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS + ("auto",):
        raise ValueError(f"backend must be one of {BACKENDS + ('auto',)}, got {backend!r}")
    status = _native.native_status()
    if backend == "auto":
        native = "cuda" if device.type == "cuda" else "cpu"
        return native if status[native] is None else "python"
    if backend != "python":
        if status[backend] is not None:
            raise RuntimeError(
                f"backend {backend!r} is not available: {status[backend]}; available: {available_backends()}"
            )
        if device.type != BACKEND_DEVICE[backend]:
            raise ValueError(
                f"backend {backend!r} needs {BACKEND_DEVICE[backend]} tensors, but anchor_pos is on {device}"
            )
    return backend


# Peak bytes per tile of a build (its tile grids, sorted lists and their transposes), measured by
# benchmarks/bench_hostile.py with margin; the kernels' run on [queries, padding, keys] holds two
# grids of the whole set besides.
_PYTHON_BYTES_PER_TILE = 48
_NATIVE_BYTES_PER_TILE = 24


def _block_index(inputs: MaskInputs, backend: str) -> BlockIndex:
    q_block_size, kv_block_size = inputs.block_size
    rows, columns = -(-inputs.num_elements // q_block_size), -(-inputs.num_keys // kv_block_size)
    tiles = rows * columns
    what = (f"a {rows} x {columns}-tile block mask (Q_LEN {inputs.num_elements}, KV_LEN {inputs.num_keys}, "
            f"BLOCK_SIZE {inputs.block_size})")
    whole_set_tiles = -(-(inputs.num_elements + inputs.num_keys) // q_block_size) * -(
        -(inputs.num_elements + inputs.num_keys) // kv_block_size)
    # The kernels take one element set, so queries apart from the keys cost them the whole set's
    # tiles; where that is far more than the wanted Q x KV tiles (one query against a million keys),
    # the python builder, which builds only those, gives the same index for a fraction of the memory.
    if backend == "python" or (not inputs.keys_are_queries and whole_set_tiles > 16 * tiles + 65536):
        check_fits(what, _PYTHON_BYTES_PER_TILE * tiles, inputs.device)
        return build_python(inputs)
    if not inputs.keys_are_queries:
        check_fits(what, _NATIVE_BYTES_PER_TILE * whole_set_tiles, inputs.device)
        return _native_apart(inputs, backend)
    check_fits(what, _NATIVE_BYTES_PER_TILE * tiles, inputs.device)
    return _run_kernels(anchor_pos=inputs.anchor_pos, depth=inputs.depth, doc_of_position=inputs.doc_of_position,
                        window=inputs.sliding_window, block_size=inputs.block_size, backend=backend)


def _run_kernels(anchor_pos, depth, doc_of_position, window, block_size, backend: str) -> BlockIndex:
    # A block larger than the set holds all of it, as a tail block (never full), just as a block of
    # N + 1 does: the kernels get that, so no size of theirs grows with an oversized BLOCK_SIZE.
    limit = anchor_pos.numel() + 1
    return _native.build_native(anchor_pos, depth, doc_of_position, window, min(block_size[0], limit),
                                min(block_size[1], limit), emulated=backend == "cuda_emulated")


def _native_apart(inputs: MaskInputs, backend: str) -> BlockIndex:
    """The Q x KV index of queries apart from the keys, from the kernels, which take one element set.

    They run on [queries, padding, keys], the queries padded with elements on a padding position
    up to a whole q-block and then to a kv-block boundary, so that the queries' q-blocks and the
    keys' kv-blocks are whole blocks of that set: its tile grid holds the wanted one at rows
    [0, nQ) and columns [offset, offset + nKV). The padding sees nothing and is seen by none, so a
    query block with padding in it is never full, as create_block_mask's tail block; the last key
    block is the set's last block, with the same tail. A block size past its side's length is cut
    to that length + 1 (the same single tail block), so the padding stays below Q + both block
    sizes. Costs about (Q + KV)^2 tiles instead of Q x KV.
    """
    num_queries, num_keys = inputs.num_elements, inputs.num_keys
    q_block_size, kv_block_size = min(inputs.block_size[0], num_queries + 1), min(inputs.block_size[1], num_keys + 1)
    query_rows = -(-num_queries // q_block_size)
    padded = -(-(query_rows * q_block_size) // kv_block_size) * kv_block_size
    padding_position = inputs.doc_of_position.numel()
    doc_of_position = torch.cat([inputs.doc_of_position, inputs.doc_of_position.new_full((1,), -1)])
    filler = inputs.anchor_pos.new_full((padded - num_queries,), padding_position)
    anchor_pos = torch.cat([inputs.anchor_pos, filler, inputs.kv_anchor_pos])
    depth = torch.cat([inputs.depth, torch.zeros_like(filler), inputs.kv_depth])
    index = _run_kernels(anchor_pos, depth, doc_of_position, inputs.sliding_window, (q_block_size, kv_block_size),
                         backend)
    offset = padded // kv_block_size
    columns = slice(offset, offset + -(-num_keys // kv_block_size))
    partial = grid_from_lists(index.kv_num_blocks, index.kv_indices)[:query_rows, columns]
    full = grid_from_lists(index.full_kv_num_blocks, index.full_kv_indices)[:query_rows, columns]
    return block_index_from_grids(partial, full)


def build_block_mask(
    anchor_pos: torch.Tensor,
    depth: torch.Tensor,
    lengths: torch.Tensor | None = None,
    total_seq_len: int | None = None,
    *,
    document_ids: torch.Tensor | None = None,
    sliding_window: int | None = None,
    BLOCK_SIZE: int | tuple[int, int] = 128,
    backend: str = "auto",
    validate: bool = True,
    kv_anchor_pos: torch.Tensor | None = None,
    kv_depth: torch.Tensor | None = None,
) -> BlockMask:
    """Build the P-EAGLE flex_attention BlockMask over N flattened COD elements.

    Describes exactly the partial and full blocks (and their q-side transposes) that
    ``create_block_mask(create_peagle_mask_mod(<same arguments>), None, None, N, N,
    BLOCK_SIZE=BLOCK_SIZE)`` describes, carries the rule's mask_mod, and lives on anchor_pos's
    device. No tensor with Q_LEN x KV_LEN elements is ever allocated.

    Args:
        anchor_pos, depth: int32/int64 [N] (see :func:`create_peagle_mask_mod`).
        lengths, total_seq_len / document_ids / sliding_window: the documents and window, as in
            :func:`create_peagle_mask_mod`.
        BLOCK_SIZE: int or (Q_BLOCK_SIZE, KV_BLOCK_SIZE).
        backend: "auto" (the fastest available for the tensors' device), "python", "cpu", "cuda",
            or "cuda_emulated" (a test aid: the CUDA kernels' code run on CPU tensors, one thread
            at a time; exact and slow, never picked by "auto").
        validate: check argument values (one device sync on CUDA). ``False`` keeps the CUDA path
            free of host syncs and capturable in a CUDA graph; unchecked out-of-range values then
            give a wrong mask but never an out-of-bounds read.
        kv_anchor_pos, kv_depth: int [KV], the key elements when they differ from the query
            elements (``anchor_pos``/``depth``), e.g. queries that are a subset of the keys: the mask
            is then Q_LEN x KV_LEN, ``create_block_mask(create_peagle_mask_mod(..., kv_anchor_pos=,
            kv_depth=), None, None, Q_LEN, KV_LEN)``'s.
    """
    inputs = normalize_mask_inputs(anchor_pos, depth, lengths, total_seq_len, document_ids=document_ids,
                                   sliding_window=sliding_window, BLOCK_SIZE=BLOCK_SIZE, validate=validate,
                                   kv_anchor_pos=kv_anchor_pos, kv_depth=kv_depth)
    index = _block_index(inputs, _choose_backend(backend, inputs.device))
    return BlockMask(
        (inputs.num_elements, inputs.num_keys),
        *index,
        BLOCK_SIZE=inputs.block_size,
        mask_mod=mask_mod_from_inputs(inputs),
    )
