"""The compiled extension: loading it, its fake kernel, and what it can run here.

The library is the top-level module ``peagle_ext_C`` (see setup.py), so a source checkout on
``sys.path`` still finds the installed kernels. Loading it registers
``torch.ops.peagle_ext.build_block_index`` (CPU and CUDA kernels),
``torch.ops.peagle_ext.build_block_index_emulated`` (the CUDA pipeline's code run on CPU tensors by
a sequential launcher: a test aid, the backend "cuda_emulated") and ``build_info``. A missing or
broken extension never breaks ``import peagle_ext``: the python backend serves and
:func:`native_status` says why the native ones are unavailable.
"""

from __future__ import annotations

import functools
import hashlib

import torch

from ._block_index import BlockIndex, num_blocks


OPS = ("build_block_index", "build_block_index_emulated")


def _register_fake() -> None:
    """Output shapes depend only on N and the block sizes, so the ops trace under torch.compile."""
    for op in OPS:
        if hasattr(torch.ops.peagle_ext, op):  # a library built from older sources may lack one
            torch.library.register_fake(f"peagle_ext::{op}")(_build_block_index_fake)


def _build_block_index_fake(anchor_pos, depth, doc_of_position, sliding_window, q_block_size, kv_block_size,
                            schedule_seed=0):
    """The eight int32 outputs, shaped as the kernels shape them."""
    n = anchor_pos.shape[0]
    num_q_blocks, num_kv_blocks = num_blocks(n, q_block_size), num_blocks(n, kv_block_size)

    def ints(*shape):
        return anchor_pos.new_empty((1, 1, *shape), dtype=torch.int32)

    return (
        ints(num_q_blocks), ints(num_q_blocks, num_kv_blocks),
        ints(num_q_blocks), ints(num_q_blocks, num_kv_blocks),
        ints(num_kv_blocks), ints(num_kv_blocks, num_q_blocks),
        ints(num_kv_blocks), ints(num_kv_blocks, num_q_blocks),
    )


@functools.lru_cache(maxsize=None)
def _load() -> tuple[str | None, str | None]:
    """(build_info, error): build_info like "cpu;cuda:80,90" when the library loaded."""
    try:
        import peagle_ext_C  # noqa: F401  (loading the library registers torch.ops.peagle_ext.*)
    except ImportError as error:  # not compiled, or compiled against another torch
        return None, f"compiled extension not importable ({error})"
    _register_fake()
    return torch.ops.peagle_ext.build_info(), None


def build_native(anchor_pos, depth, doc_of_position, sliding_window, q_block_size, kv_block_size,
                 emulated: bool = False) -> BlockIndex:
    """Run the compiled op: the CPU or CUDA kernel, by the tensors' device, or with ``emulated`` the
    CUDA pipeline run on CPU tensors. The library must have loaded."""
    arguments = (anchor_pos, depth, doc_of_position, sliding_window, q_block_size, kv_block_size)
    if not emulated:
        return BlockIndex(*torch.ops.peagle_ext.build_block_index(*arguments))
    return BlockIndex(*torch.ops.peagle_ext.build_block_index_emulated(*arguments, schedule_seed(*arguments)))


def schedule_seed(anchor_pos, depth, doc_of_position, sliding_window, q_block_size, kv_block_size) -> int:
    """The emulated pipeline's block and thread order for these inputs (sequential_launcher.h): one
    of its own for each input, as the GPU gives no order either, and the same one on a rerun."""
    sums = (int(anchor_pos.sum()), int(depth.sum()), int(doc_of_position.sum()))
    key = (anchor_pos.numel(), doc_of_position.numel(), sliding_window, q_block_size, kv_block_size) + sums
    # Not hash(): it differs between processes (hash(None) on Python < 3.12), and a failing schedule
    # must replay in the next run.
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (2**62) + 1


def compiled_kernels() -> list[str]:
    """Kernels compiled into the installed extension: subset of ["cpu", "cuda"]."""
    info, _ = _load()
    if info is None:
        return []
    return [part.split(":")[0] for part in info.split(";")]


def cuda_archs() -> str | None:
    """CUDA architectures the CUDA kernels were built for, e.g. "80,90"."""
    info, _ = _load()
    for part in (info or "").split(";"):
        if part.startswith("cuda:"):
            return part[len("cuda:"):]
    return None


def library_path() -> str | None:
    """Where the loaded compiled library lies (None when it did not load)."""
    info, _ = _load()
    if info is None:
        return None
    import peagle_ext_C

    return peagle_ext_C.__file__


def native_status() -> dict[str, str | None]:
    """For each native backend ("cpu", "cuda", "cuda_emulated"): None when it can run here, else
    the reason it cannot. "cuda_emulated" (CPU tensors) is in every build that has the CPU kernel."""
    info, error = _load()
    status: dict[str, str | None] = {}
    for backend in ("cpu", "cuda"):
        if error is not None:
            status[backend] = error
        elif backend not in compiled_kernels():
            status[backend] = f"the extension was built without {backend.upper()} kernels"
        elif backend == "cuda" and not torch.cuda.is_available():
            status[backend] = "no CUDA device is available"
        else:
            status[backend] = None
    status["cuda_emulated"] = status["cpu"]
    if error is None and not hasattr(torch.ops.peagle_ext, "build_block_index_emulated"):
        status["cuda_emulated"] = "the extension was built without the emulated CUDA pipeline"
    return status
