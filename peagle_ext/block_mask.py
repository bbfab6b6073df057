"""``build_block_mask``: the P-EAGLE BlockMask from per-element metadata, without the dense grid."""

from __future__ import annotations

import os
import warnings

import torch
from torch.nn.attention.flex_attention import BlockMask

from . import _native
from ._block_index import BlockIndex, num_blocks
from ._inputs import MaskInputs, check_fits, normalize_mask_inputs
from ._python_builder import build_python
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
        if status[native] is None:
            return native
        _fall_back_to_python(native, status[native])
        return "python"
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


_fallbacks_warned: set[str] = set()


def _fall_back_to_python(native: str, reason: str) -> None:
    """backend="auto" serves the python backend where the native one cannot run: say so once per
    backend (it is several times slower), or refuse under PEAGLE_EXT_REQUIRE_NATIVE=1."""
    message = f"peagle_ext: the {native} kernel is unavailable ({reason}), so the python backend builds the mask"
    if os.environ.get("PEAGLE_EXT_REQUIRE_NATIVE") == "1":
        raise RuntimeError(f"{message}; PEAGLE_EXT_REQUIRE_NATIVE=1 refuses that")
    if native not in _fallbacks_warned:
        _fallbacks_warned.add(native)
        warnings.warn(f"{message}, several times slower; {_native.REBUILD_HINT}", RuntimeWarning, stacklevel=4)


# Peak bytes per tile of a build (its tile grids, sorted lists and their transposes), measured by
# benchmarks/bench_hostile.py, with margin.
_PYTHON_BYTES_PER_TILE = 48
_NATIVE_BYTES_PER_TILE = 24


def _block_index(inputs: MaskInputs, backend: str) -> BlockIndex:
    q_block_size, kv_block_size = inputs.block_size
    rows, columns = num_blocks(inputs.num_elements, q_block_size), num_blocks(inputs.num_keys, kv_block_size)
    batch = inputs.num_rows or 1
    what = (f"{batch} x a {rows} x {columns}-tile block mask (Q_LEN {inputs.num_elements}, KV_LEN {inputs.num_keys}, "
            f"BLOCK_SIZE {inputs.block_size})")
    if backend == "python":
        check_fits(what, _PYTHON_BYTES_PER_TILE * rows * columns * batch, inputs.device)
        return build_python(inputs)
    check_fits(what, _NATIVE_BYTES_PER_TILE * rows * columns * batch, inputs.device)
    return _native.build_native(inputs, emulated=backend == "cuda_emulated")


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

    A batch of B rows, each its own mask, gives the BlockMask of B rows that
    ``create_block_mask(mask_mod, B, None, N, N)`` gives (its mask_mod reads ``b``), in one build:
    ``anchor_pos``/``depth`` [B, N] (rows brought to one N with padding elements, whose anchor is
    the number of positions: :func:`pad_rows`), ``lengths`` as a list of B tensors or a zero-padded
    [B, D] tensor (one ``total_seq_len`` for all), or ``document_ids`` [B, S]; keys apart [B, KV].

    Args:
        anchor_pos, depth: int32/int64 [N] or [B, N] (see :func:`create_peagle_mask_mod`).
        lengths, total_seq_len / document_ids / sliding_window: the documents and window, as in
            :func:`create_peagle_mask_mod` (per row for a batch, as above).
        BLOCK_SIZE: int or (Q_BLOCK_SIZE, KV_BLOCK_SIZE).
        backend: "auto" (the fastest available for the tensors' device), "python", "cpu", "cuda",
            or "cuda_emulated" (a test aid: the CUDA kernels' code run on CPU tensors, one thread
            at a time; exact and slow, never picked by "auto").
        validate: check argument values (one device sync on CUDA). ``False`` keeps the CUDA path
            free of host syncs and capturable in a CUDA graph; unchecked out-of-range values then
            give a wrong mask but never an out-of-bounds read.
        kv_anchor_pos, kv_depth: int [KV] (or [B, KV]), the key elements when they differ from the query
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
