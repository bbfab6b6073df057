"""Measuring BlockMask builders: inputs, timing, peak memory, host syncs (no presentation).

``python -m peagle_ext bench`` and the scripts in benchmarks/ measure through this module; what
they print or write is theirs.

- Times are medians after a warm-up, all in one process so that ratios compare like with like.
  On CUDA each run is timed by events recorded around it (a synchronize after each, so a build's
  time includes its host-side launch work).
- CPU peak memory is measured in a fresh process per (method, length): the rise of peak RSS
  (VmHWM, reset through /proc/self/clear_refs) over the RSS once the inputs exist. CUDA peak memory
  is ``max_memory_allocated`` above what was allocated before the build.
- Host syncs are counted under ``torch.cuda.set_sync_debug_mode("warn")`` in one warm call.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
import warnings

import torch

from ._block_index import num_blocks
from ._inputs import available_memory_bytes

# Eager create_block_mask materializes the dense mask plus int64 temporaries: about 11 bytes per
# (q, kv) pair as measured with peak_memory_bytes (8 GB at N = 27.6K).
EAGER_BYTES_PER_PAIR = 11


def cod_inputs(seq_len: int, depths: int, device: str, seed: int = 0):
    """One document of seq_len positions, COD-sampled with the trainers' defaults."""
    from .cod import generate_cod_sample_indices

    anchor_pos, depth = generate_cod_sample_indices(
        seq_len, torch.ones(seq_len), num_depths=depths, generator=torch.Generator().manual_seed(seed)
    )
    lengths = torch.tensor([seq_len])
    return anchor_pos.to(device), depth.to(device), lengths.to(device)


def eager_fits(num_elements: int, device: str) -> bool:
    need = EAGER_BYTES_PER_PAIR * num_elements**2
    have = available_memory_bytes(torch.device(device))
    return need < 0.7 * have


def make_builder(method: str, anchor_pos, depth, lengths, seq_len: int):
    """A zero-argument callable that builds the BlockMask with `method`."""
    from torch.nn.attention.flex_attention import create_block_mask

    from .block_mask import build_block_mask
    from .mask_mod import create_peagle_mask_mod

    n = anchor_pos.numel()
    if method in ("python", "cpu", "cuda"):
        # On the GPU without the value checks: they read tensors back (one host sync).
        validate = anchor_pos.device.type != "cuda"
        return lambda: build_block_mask(anchor_pos, depth, lengths, seq_len, backend=method, validate=validate)
    if method == "cuda_graph":
        # The cuda backend captured once in a CUDA graph and replayed: the build's GPU time alone,
        # without the host-side work (Python, dispatch, launches) that a plain call pays.
        def plain():
            return build_block_mask(anchor_pos, depth, lengths, seq_len, backend="cuda", validate=False)

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            plain()  # allocations warm, outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = plain()
        return lambda: (graph.replay(), captured)[1]
    mask_mod = create_peagle_mask_mod(anchor_pos, depth, lengths, seq_len)
    if method == "create_block_mask":
        return lambda: create_block_mask(mask_mod, None, None, n, n, device=anchor_pos.device)
    if method == "compiled_create_block_mask":
        # A fresh compile per length: static shapes, its fastest form (a reused graph would have
        # gone dynamic after the second length and run several times slower).
        torch._dynamo.reset()
        compiled = torch.compile(create_block_mask)
        return lambda: compiled(mask_mod, None, None, n, n, device=anchor_pos.device)
    raise ValueError(f"unknown method {method!r}")


def time_call(fn, device: str, repeats: int, budget_s: float) -> tuple[float, int]:
    """Median seconds of fn() after a warm-up, and how many timed runs that took. On CUDA each run
    is timed by events recorded before and after it on the current stream."""

    def once() -> float:
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    if device == "cuda":  # the caching allocator and the kernels' first loads settle in a few calls
        for _ in range(3):
            once()

    warm = once()
    runs = max(1, min(repeats, int(budget_s / max(warm, 1e-9))))
    return statistics.median(once() for _ in range(runs)), runs


def cuda_peak_bytes(build) -> int:
    """Peak CUDA memory of one (warm) build above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    build()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def peak_memory_bytes(method: str, seq_len: int, depths: int, device: str) -> int | None:
    """Peak memory of one build above the inputs (a fresh process on CPU, so RSS peaks are its own)."""
    if device == "cuda":
        anchor_pos, depth, lengths = cod_inputs(seq_len, depths, device)
        build = make_builder(method, anchor_pos, depth, lengths, seq_len)
        build()  # compile / warm caches first
        return cuda_peak_bytes(build)
    command = [sys.executable, "-m", "peagle_ext._measure", method, str(seq_len), str(depths)]
    env = dict(os.environ, TORCHINDUCTOR_COMPILE_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        return None
    return max(0, int(result.stdout.strip().splitlines()[-1]))


def _peak_rss_of_one_build(method: str, seq_len: int, depths: int) -> int:
    """In this process: the rise of peak RSS during one CPU build, the inputs already made."""
    anchor_pos, depth, lengths = cod_inputs(seq_len, depths, "cpu")
    build = make_builder(method, anchor_pos, depth, lengths, seq_len)
    base = reset_peak_rss()
    build()
    return peak_rss_bytes() - base


def count_host_syncs(fn) -> int:
    """Host-device synchronizations in one call of fn, as torch's sync debug mode reports them."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(warning.message) for warning in caught)


def matches_cpu_kernel(mask, anchor_pos, depth, lengths, seq_len: int) -> bool | None:
    """Whether a mask built on the GPU holds the CPU backend's blocks (None: no CPU backend to ask)."""
    from .block_mask import available_backends, build_block_mask
    from .testing import assert_block_masks_equal

    reference_backend = "cpu" if "cpu" in available_backends() else "python"
    reference = build_block_mask(anchor_pos.cpu(), depth.cpu(), lengths.cpu(), seq_len, backend=reference_backend)
    try:
        assert_block_masks_equal(mask, reference)
    except AssertionError:
        return False
    return True


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> int:
    """Reset this process's peak RSS (VmHWM) to its current RSS and return that, in bytes.

    (getrusage's ru_maxrss would not do: it survives fork and exec, so a child inherits the
    parent's peak.)"""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    return _status_kib("VmHWM") * 1024


def run(lengths, depths: int, device: str, backends, compiled: bool, compiled_max_len: int, repeats: int,
        memory: bool, budget_s: float, progress=None, on_entry=None, on_row=None) -> list[dict]:
    """Measure every method at every length: one row per length, ``{"seq_len", "num_elements",
    "tiles", "methods": {method: entry}}``, an entry holding ``median_s``, ``runs`` and, where
    measured, ``peak_bytes``, ``compile_s``, ``host_syncs``, ``matches_cpu``, or ``skipped`` (why).
    ``progress(text)`` is told what is being measured, ``on_entry(seq_len, n, method, entry)`` gets
    each entry, and ``on_row(rows)`` the rows so far after each length."""
    rows = []
    ours = list(backends) + (["cuda_graph"] if device == "cuda" and "cuda" in backends else [])
    methods = ours + ["create_block_mask"] + (["compiled_create_block_mask"] if compiled else [])
    total, done = len(lengths) * len(methods), 0
    for seq_len in lengths:
        anchor_pos, depth, doc_lengths = cod_inputs(seq_len, depths, device)
        n = anchor_pos.numel()
        tiles = num_blocks(n, 128)
        row = {"seq_len": seq_len, "num_elements": n, "tiles": f"{tiles}x{tiles}", "methods": {}}
        for method in methods:
            done += 1
            if progress is not None:
                progress(f"[{done}/{total}] seq_len {seq_len} (N {n}): {method}")
            entry: dict = {}
            if method == "create_block_mask" and not eager_fits(n, device):
                entry["skipped"] = f"needs ~{EAGER_BYTES_PER_PAIR * n * n / 2**30:.0f} GiB for the dense mask"
            elif method == "compiled_create_block_mask" and seq_len > compiled_max_len:
                entry["skipped"] = f"above --compiled-max-len {compiled_max_len}"
            elif device == "cuda":
                entry = measure_on_gpu(method, method in ours, anchor_pos, depth, doc_lengths, seq_len, repeats,
                                       budget_s, memory)
            else:
                build = make_builder(method, anchor_pos, depth, doc_lengths, seq_len)
                if method == "compiled_create_block_mask":
                    start = time.perf_counter()
                    build()
                    entry["compile_s"] = time.perf_counter() - start
                entry["median_s"], entry["runs"] = time_call(build, device, repeats, budget_s)
                if memory:
                    entry["peak_bytes"] = peak_memory_bytes(method, seq_len, depths, device)
            row["methods"][method] = entry
            if on_entry is not None:
                on_entry(seq_len, n, method, entry)
        rows.append(row)
        if on_row is not None:
            on_row(rows)
    return rows


def measure_on_gpu(method: str, ours: bool, anchor_pos, depth, lengths, seq_len: int, repeats: int,
                   budget_s: float, memory: bool) -> dict:
    """One method at one length on the GPU: compile time (compiled create_block_mask), median time
    by CUDA events, host syncs, peak memory (same process, the same compiled function), and for our
    backends whether the mask holds the CPU kernel's blocks. Running out of GPU memory skips it."""
    entry: dict = {}
    try:
        build = make_builder(method, anchor_pos, depth, lengths, seq_len)
        if method == "compiled_create_block_mask":
            start = time.perf_counter()
            build()
            torch.cuda.synchronize()
            entry["compile_s"] = time.perf_counter() - start
        entry["median_s"], entry["runs"] = time_call(build, "cuda", repeats, budget_s)
        entry["host_syncs"] = count_host_syncs(build)
        if memory:
            entry["peak_bytes"] = cuda_peak_bytes(build)
        if ours:
            entry["matches_cpu"] = matches_cpu_kernel(build(), anchor_pos, depth, lengths, seq_len)
    except torch.cuda.OutOfMemoryError:
        entry = {"skipped": "out of GPU memory"}
    torch.cuda.empty_cache()
    return entry


if __name__ == "__main__":  # the fresh process of peak_memory_bytes: METHOD SEQ_LEN DEPTHS
    print(_peak_rss_of_one_build(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
