"""The compiled extension: loading it, its fake kernel, and what it can run here.

Two top-level modules (see setup.py), so a source checkout on ``sys.path`` still finds the
installed kernels. ``peagle_ext_C`` registers every schema, ``torch.ops.peagle_ext.build_block_index``'s
CPU kernel, ``build_block_index_emulated`` (the CUDA pipeline's code run on CPU tensors by a
sequential launcher: a test aid, the backend "cuda_emulated") and ``build_info``;
``peagle_ext_cuda``, present when the CUDA kernels were built, adds the CUDA kernel. Both are built
on the LibTorch stable ABI, so one build loads into every torch >= 2.10; the CUDA one needs a
CUDA runtime (a CPU-only torch has none), the CPU one does not. A missing or broken extension never
breaks ``import peagle_ext``: the python backend serves and :func:`native_status` says why the
native ones are unavailable.
"""

from __future__ import annotations

import functools
import hashlib

import torch

from ._block_index import BlockIndex, num_blocks

OPS = ("build_block_index", "build_block_index_emulated")
INTERVAL_OPS = ("build_interval_block_index", "build_interval_block_index_emulated")


def _register_fake() -> None:
    """Output shapes depend only on N and the block sizes, so the ops trace under torch.compile."""
    for op in OPS:
        if hasattr(torch.ops.peagle_ext, op):  # a library built from older sources may lack one
            torch.library.register_fake(f"peagle_ext::{op}")(_build_block_index_fake)
    for op in INTERVAL_OPS:
        if hasattr(torch.ops.peagle_ext, op):
            torch.library.register_fake(f"peagle_ext::{op}")(_build_interval_block_index_fake)


def _build_block_index_fake(anchor_pos, depth, doc_of_position, sliding_window, q_block_size, kv_block_size,
                            kv_anchor_pos=None, kv_depth=None, schedule_seed=0):
    """The eight int32 outputs, shaped as the kernels shape them: [B, 1, ...], B = 1 for 1-D inputs."""
    rows = anchor_pos.shape[0] if anchor_pos.dim() == 2 else 1
    keys = anchor_pos if kv_anchor_pos is None else kv_anchor_pos
    num_q_blocks = num_blocks(anchor_pos.shape[-1], q_block_size)
    num_kv_blocks = num_blocks(keys.shape[-1], kv_block_size)
    return _empty_block_index(anchor_pos, rows, num_q_blocks, num_kv_blocks)


def _empty_block_index(like: torch.Tensor, rows: int, num_q_blocks: int, num_kv_blocks: int) -> tuple:
    """The eight int32 outputs [rows, 1, ...] of a block index, uninitialized, on ``like``'s device
    (every op's fake kernel)."""

    def ints(*shape):
        return like.new_empty((rows, 1, *shape), dtype=torch.int32)

    return (
        ints(num_q_blocks), ints(num_q_blocks, num_kv_blocks),
        ints(num_q_blocks), ints(num_q_blocks, num_kv_blocks),
        ints(num_kv_blocks), ints(num_kv_blocks, num_q_blocks),
        ints(num_kv_blocks), ints(num_kv_blocks, num_q_blocks),
    )


def _build_interval_block_index_fake(starts, ends, kv_len, q_block_size, kv_block_size, schedule_seed=0):
    """The eight int32 outputs of the interval op, [B, 1, ...] for [B, Q, M] bounds."""
    rows, num_q_blocks, num_kv_blocks = starts.shape[0], num_blocks(starts.shape[1], q_block_size), num_blocks(
        kv_len, kv_block_size)
    return _empty_block_index(starts, rows, num_q_blocks, num_kv_blocks)


REBUILD_HINT = ("reinstall from the source to rebuild it for this environment: "
                "pip install --no-build-isolation --no-deps --force-reinstall .")


@functools.cache
def _load() -> tuple[str | None, str | None, str | None]:
    """(build_info, error, cuda_error): build_info like "cpu;cuda:80,90" when the CPU library
    loaded, else error says why; cuda_error says why the CUDA library built beside it did not load."""
    try:
        import peagle_ext_C  # noqa: F401  (loading the library registers torch.ops.peagle_ext.*)
    except ImportError as error:  # not compiled, or for a torch older than 2.10
        return None, f"compiled extension not importable ({error})", None
    _register_fake()
    info = torch.ops.peagle_ext.build_info()
    cuda_error = None
    if ";cuda:" in info:
        try:
            import peagle_ext_cuda  # noqa: F401  (registers the CUDA kernel)
        except ImportError as error:  # a CPU-only torch, or no CUDA runtime on this machine
            cuda_error = f"the CUDA kernels' library did not load ({error})"
    return info, None, cuda_error


def build_native(inputs, emulated: bool = False) -> BlockIndex:
    """Run the compiled op on validated inputs (a MaskInputs): the CPU or CUDA kernel, by the
    tensors' device, or with ``emulated`` the CUDA pipeline run on CPU tensors. The library must
    have loaded."""
    # The window is below P + 2^31 here (a wider one was normalized to None), so int64 holds it.
    keys = () if inputs.keys_are_queries else (inputs.kv_anchor_pos, inputs.kv_depth)
    arguments = (inputs.anchor_pos, inputs.depth, inputs.doc_of_position, inputs.sliding_window, *inputs.block_size)
    if not emulated:
        return BlockIndex(*torch.ops.peagle_ext.build_block_index(*arguments, *keys))
    seed = schedule_seed(*arguments, *keys)
    return BlockIndex(*torch.ops.peagle_ext.build_block_index_emulated(*arguments, *(keys or (None, None)), seed))


def schedule_seed(anchor_pos, depth, doc_of_position, sliding_window, q_block_size, kv_block_size, *keys) -> int:
    """The emulated pipeline's block and thread order for these inputs (sequential_launcher.h): one
    of its own for each input, as the GPU gives no order either, and the same one on a rerun."""
    sums = (int(anchor_pos.sum()), int(depth.sum()), int(doc_of_position.sum())) + tuple(int(k.sum()) for k in keys)
    key = (anchor_pos.numel(), doc_of_position.numel(), sliding_window, q_block_size, kv_block_size) + sums
    # Not hash(): it differs between processes (hash(None) on Python < 3.12), and a failing schedule
    # must replay in the next run.
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (2**62) + 1


def compiled_kernels() -> list[str]:
    """Kernels compiled into the installed extension: subset of ["cpu", "cuda"]."""
    info = _load()[0]
    if info is None:
        return []
    return [part.split(":")[0] for part in info.split(";")]


def cuda_archs() -> str | None:
    """CUDA architectures the CUDA kernels were built for, e.g. "80,90"."""
    for part in (_load()[0] or "").split(";"):
        if part.startswith("cuda:"):
            return part[len("cuda:"):]
    return None


def library_path() -> str | None:
    """Where the loaded CPU library lies (None when it did not load); the CUDA one lies beside it."""
    if _load()[0] is None:
        return None
    import peagle_ext_C

    return peagle_ext_C.__file__


def native_status() -> dict[str, str | None]:
    """For each native backend ("cpu", "cuda", "cuda_emulated"): None when it can run here, else
    the reason it cannot. "cuda_emulated" (CPU tensors) is in every build that has the CPU kernel."""
    _, error, cuda_error = _load()
    status: dict[str, str | None] = {}
    for backend in ("cpu", "cuda"):
        if error is not None:
            status[backend] = error
        elif backend not in compiled_kernels():
            status[backend] = f"the extension was built without {backend.upper()} kernels"
        elif backend == "cuda" and cuda_error is not None:
            status[backend] = cuda_error
        elif backend == "cuda" and not torch.cuda.is_available():
            status[backend] = "no CUDA device is available"
        else:
            status[backend] = None
    status["cuda_emulated"] = status["cpu"]
    if error is None and not hasattr(torch.ops.peagle_ext, "build_block_index_emulated"):
        status["cuda_emulated"] = "the extension was built without the emulated CUDA pipeline"
    return status


def interval_status() -> dict[str, str | None]:
    """native_status() for the interval op: None where its kernel can run here, else why not (a
    library built from older sources has the P-EAGLE op but not this one)."""
    status = dict(native_status())
    kernels = {"cpu": (INTERVAL_OPS[0], "CPU"), "cuda": (INTERVAL_OPS[0], "CUDA"),
               "cuda_emulated": (INTERVAL_OPS[1], "CPU")}
    for backend, (op, key) in kernels.items():
        if status[backend] is None and not (hasattr(torch.ops.peagle_ext, op) and
                                            torch._C._dispatch_has_kernel_for_dispatch_key(f"peagle_ext::{op}", key)):
            status[backend] = f"the extension was built without the {key} kernel of {op}"
    return status


def build_interval_native(starts, ends, kv_len, q_block_size, kv_block_size, emulated: bool = False) -> BlockIndex:
    """The compiled interval op on checked int64 [B, Q, M] bounds: the CPU or CUDA kernel by the
    tensors' device, or with ``emulated`` the CUDA kernel's code run on CPU tensors."""
    if not emulated:
        return BlockIndex(*torch.ops.peagle_ext.build_interval_block_index(starts, ends, kv_len, q_block_size,
                                                                           kv_block_size))
    key = (tuple(starts.shape), kv_len, q_block_size, kv_block_size, int(starts.sum()), int(ends.sum()))
    seed = int.from_bytes(hashlib.blake2b(repr(key).encode(), digest_size=8).digest(), "little") % (2**62) + 1
    return BlockIndex(*torch.ops.peagle_ext.build_interval_block_index_emulated(starts, ends, kv_len, q_block_size,
                                                                                kv_block_size, seed))
