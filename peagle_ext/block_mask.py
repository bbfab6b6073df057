"""``build_block_mask``: the P-EAGLE BlockMask from per-element metadata, without the dense grid."""

from __future__ import annotations

import math

import torch
from torch.nn.attention.flex_attention import BlockMask

from . import _native
from ._block_index import BlockIndex, num_blocks
from ._inputs import MaskInputs, normalize_mask_inputs
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


def _block_index(inputs: MaskInputs, backend: str) -> BlockIndex:
    if backend == "python":
        return build_python(inputs)
    if not inputs.keys_are_queries:
        return _native_apart(inputs, backend)
    return _run_kernels(inputs.anchor_pos, inputs.depth, inputs.doc_of_position, inputs, backend)


def _run_kernels(anchor_pos, depth, doc_of_position, inputs: MaskInputs, backend: str) -> BlockIndex:
    # The kernels read the window as int64; a window past every sequence means "no window" anyway.
    window = None if inputs.sliding_window is None else min(inputs.sliding_window, 2**62)
    return _native.build_native(anchor_pos, depth, doc_of_position, window, *inputs.block_size,
                                emulated=backend == "cuda_emulated")


def _native_apart(inputs: MaskInputs, backend: str) -> BlockIndex:
    """The Q x KV index of queries apart from the keys, from the kernels, which take one element set.

    They run on [queries, padding, keys], the queries padded with elements on a padding position
    up to a multiple of both block sizes, so that the queries' q-blocks and the keys' kv-blocks
    are whole blocks of that set: its tile grid holds the wanted one at rows [0, nQ) and columns
    [offset, offset + nKV). The padding sees nothing and is seen by none, so a query block with
    padding in it is never full, as create_block_mask's tail block; the last key block is the
    set's last block, with the same tail. Costs about (Q + KV)^2 tiles instead of Q x KV.
    """
    q_block_size, kv_block_size = inputs.block_size
    num_queries, num_keys = inputs.num_elements, inputs.num_keys
    whole = math.lcm(q_block_size, kv_block_size)  # whole q-blocks and whole kv-blocks alike
    padded = num_blocks(num_queries, whole) * whole
    padding_position = inputs.doc_of_position.numel()
    doc_of_position = torch.cat([inputs.doc_of_position, inputs.doc_of_position.new_full((1,), -1)])
    filler = inputs.anchor_pos.new_full((padded - num_queries,), padding_position)
    anchor_pos = torch.cat([inputs.anchor_pos, filler, inputs.kv_anchor_pos])
    depth = torch.cat([inputs.depth, torch.zeros_like(filler), inputs.kv_depth])
    index = _run_kernels(anchor_pos, depth, doc_of_position, inputs, backend)
    rows, offset = num_blocks(num_queries, q_block_size), padded // kv_block_size
    columns = slice(offset, offset + num_blocks(num_keys, kv_block_size))
    partial = grid_from_lists(index.kv_num_blocks, index.kv_indices)[:rows, columns]
    full = grid_from_lists(index.full_kv_num_blocks, index.full_kv_indices)[:rows, columns]
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
