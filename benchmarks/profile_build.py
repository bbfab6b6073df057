"""Where one build's time goes: the host's share and the device's, op by op.

    python benchmarks/profile_build.py [--device cuda] [--lengths 8192 65536] [--builds 200]

For each length (one document, 8 COD depths, BLOCK_SIZE 128, validate=False on CUDA):

- enqueue: the host's time per build, builds issued back to back without waiting for the device
  (Python, validation, dispatch, allocations, launches);
- throughput: the time per build once the device has finished them all (on CUDA, the larger of
  the host's share and the kernels' own time);
- the torch profiler's table over 20 builds: host time per op and, on CUDA, the kernels' times.

benchmarks/gpu_check.sh runs it on the GPU, so that a build slower than its target says whether the
host or the kernels are to blame.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from torch.profiler import ProfilerActivity, profile

import peagle_ext
from peagle_ext import build_block_mask
from peagle_ext._measure import cod_inputs


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def per_build_us(build, builds: int, device: str) -> tuple[float, float]:
    """(enqueue, throughput) in microseconds per build."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(builds):
        build()
    issued = time.perf_counter()
    synchronize(device)
    done = time.perf_counter()
    return (issued - start) / builds * 1e6, (done - start) / builds * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 65536])
    parser.add_argument("--builds", type=int, default=200)
    parser.add_argument("--rows", type=int, default=14, help="rows of each profiler table")
    args = parser.parse_args()
    device = args.device
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    sort_by = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    print(f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else "")
          + f", peagle_ext from {os.path.dirname(peagle_ext.__file__)}")
    for seq_len in args.lengths:
        anchor_pos, depth, lengths = cod_inputs(seq_len, 8, device)

        def build(anchor_pos=anchor_pos, depth=depth, lengths=lengths, seq_len=seq_len):
            return build_block_mask(anchor_pos, depth, lengths, seq_len, backend=device, validate=device != "cuda")

        for _ in range(5):  # allocator and caches warm
            build()
        enqueue, throughput = per_build_us(build, args.builds, device)
        print(f"\n== S = {seq_len} (N {anchor_pos.numel()}), backend {device}: enqueue {enqueue:.1f} us per build, "
              f"throughput {throughput:.1f} us per build ({args.builds} builds back to back)")
        with profile(activities=activities) as profiler:
            for _ in range(20):
                build()
            synchronize(device)
        print(profiler.key_averages().table(sort_by=sort_by, row_limit=args.rows))


if __name__ == "__main__":
    main()
