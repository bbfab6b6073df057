"""Build times of the mask shapes trainers build, on the CPU kernel (or --backend).

    python benchmarks/bench_mask_shapes.py [--lengths 16384 65536] [--segments 4 8] [--batch 8] [--json FILE]

1. Queries apart from keys: a sequence of S positions with 8 COD depths (N elements) cut into K
   contiguous segments of N/K queries, each against all N keys (a partitioned step's keys-only
   completion), against the whole N x N build: time per segment mask and its ratio to the N x N one.
2. Batches: B rows of their own COD samples and documents (S = 4096) in one batched build, against
   B builds of one row each.
Each figure is the median of warm builds after one warm-up, every method timed the same way in
this one process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

import peagle_ext


def median_seconds(build, repeats: int) -> float:
    build()  # warm-up: first-touch page faults, allocator growth
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        build()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cod_sample(seq_len: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    anchor_pos, depth = peagle_ext.generate_cod_sample_indices(seq_len, torch.ones(seq_len), generator=generator)
    lengths = torch.tensor([seq_len // 2, seq_len // 4, seq_len // 4])
    return anchor_pos, depth, lengths


def segments(seq_len: int, num_segments: int, backend: str, repeats: int) -> dict:
    anchor_pos, depth, lengths = cod_sample(seq_len, 0)
    n = anchor_pos.numel()
    full = median_seconds(lambda: peagle_ext.build_block_mask(anchor_pos, depth, lengths, seq_len, backend=backend),
                          repeats)
    bounds = [n * k // num_segments for k in range(num_segments + 1)]

    def one_segment(k: int):
        queries = slice(bounds[k], bounds[k + 1])
        return peagle_ext.build_block_mask(anchor_pos[queries], depth[queries], lengths, seq_len,
                                           kv_anchor_pos=anchor_pos, kv_depth=depth, backend=backend)

    segment = statistics.median(median_seconds(lambda k=k: one_segment(k), repeats) for k in range(num_segments))
    return {"seq_len": seq_len, "elements": n, "segments": num_segments, "full_s": full, "segment_s": segment,
            "segment_over_full": segment / full}


def batch(rows: int, seq_len: int, backend: str, repeats: int) -> dict:
    samples = [cod_sample(seq_len, seed) for seed in range(rows)]
    singles = median_seconds(lambda: [peagle_ext.build_block_mask(a, d, row_lengths, seq_len, backend=backend)
                                      for a, d, row_lengths in samples], repeats)
    anchor_pos, depth = peagle_ext.pad_rows([(a, d) for a, d, _ in samples], seq_len)
    lengths = [row_lengths for _, _, row_lengths in samples]
    batched = median_seconds(lambda: peagle_ext.build_block_mask(anchor_pos, depth, lengths, seq_len, backend=backend),
                             repeats)
    return {"rows": rows, "seq_len": seq_len, "single_rows_s": singles, "batched_s": batched,
            "batched_over_single_rows": batched / singles}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[16384, 65536])
    parser.add_argument("--segments", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--batch", type=int, default=8, help="rows of the batch measurement (0: skip it)")
    parser.add_argument("--backend", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    print(f"peagle_ext from {peagle_ext.__file__}, backend {args.backend}, torch threads {torch.get_num_threads()}")
    results = {"segments": [], "batch": None}
    print(f"{'S':>6} {'N':>7} {'K':>2} {'N x N ms':>9} {'segment ms':>10} {'segment / N x N':>15}")
    for seq_len in args.lengths:
        for num_segments in args.segments:
            row = segments(seq_len, num_segments, args.backend, args.repeats)
            results["segments"].append(row)
            print(f"{seq_len:>6} {row['elements']:>7} {num_segments:>2} {row['full_s'] * 1e3:9.2f} "
                  f"{row['segment_s'] * 1e3:10.2f} {row['segment_over_full']:15.2f}", flush=True)
    if args.batch and hasattr(peagle_ext, "pad_rows"):
        row = batch(args.batch, 4096, args.backend, args.repeats)
        results["batch"] = row
        print(f"batch of {row['rows']} rows (S = {row['seq_len']}): one batched build {row['batched_s'] * 1e3:.2f} ms, "
              f"{row['rows']} single-row builds {row['single_rows_s'] * 1e3:.2f} ms "
              f"(ratio {row['batched_over_single_rows']:.2f})")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
