"""Build times of peagle_ext.masks against create_block_mask (eager and torch.compile'd) on the CPU.

    python benchmarks/bench_masks.py [--lengths 4096 ... 65536] [--families document eagle3 dflash]
                                     [--dense-limit-gb 6] [--repeats 3] [--no-compiled]

Families, each over S positions in documents of 1-4K tokens with a padded tail:
- document: document-causal, S x S;
- eagle3: EAGLE-3's first test-time step over speculators' create_combined_mask_mod rule, S x S
  (each later step extends it by a diagonal block, without create_block_mask);
- dflash: DFlash, 512 anchors x block 16 queries against S + 8192 keys (speculators' defaults).
The create_block_mask figures evaluate speculators' own mask_mods (the document one: its causal and
document parts) over the dense grid; a size whose dense grid (about 3 bytes per query-key pair at
its peak) would exceed --dense-limit-gb is skipped and marked so. Each figure is the median of warm
builds after one warm-up (the compiled one after its compilation; peagle_ext over at least 15
builds, with the best of them beside), in this one process.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from torch.nn.attention.flex_attention import and_masks, create_block_mask

from peagle_ext import available_backends
from peagle_ext.masks import dflash_block_mask, document_causal_block_mask, eagle3_block_mask

DENSE_BYTES_PER_PAIR = 3
NUM_ANCHORS, DFLASH_BLOCK = 512, 16


def build_seconds(build, repeats: int) -> list[float]:
    build()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        build()
        times.append(time.perf_counter() - start)
    return times


def median_seconds(build, repeats: int) -> float:
    return statistics.median(build_seconds(build, repeats))


def document_ids(length: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    ids, doc = [], 0
    while len(ids) < length * 15 // 16:
        ids += [doc] * int(torch.randint(1024, 4096, (1,), generator=generator))
        doc += 1
    ids = ids[: length * 15 // 16]
    return torch.tensor(ids + [-1] * (length - len(ids)))


def family(name: str, length: int):
    """(our build, speculators' mask_mod, Q_LEN, KV_LEN) for one family at S = length."""
    from speculators.models.dflash.attention import create_anchor_block_mask_mod
    from speculators.models.eagle3.attention import create_combined_mask_mod

    ids = document_ids(length, length)
    if name == "document":
        def causal(b, h, q, k):
            return q >= k

        def document(b, h, q, k):
            return (ids[q] != -1) & (ids[q] == ids[k])

        return lambda: document_causal_block_mask(ids), and_masks(causal, document), length, length
    if name == "eagle3":
        return lambda: eagle3_block_mask(ids, length, 1), create_combined_mask_mod(ids, length), length, length
    anchors = torch.sort(torch.randperm(length - DFLASH_BLOCK, generator=torch.Generator().manual_seed(1))[
        :NUM_ANCHORS]).values
    mask_mod, q_len, kv_len = create_anchor_block_mask_mod(ids, length, anchors, DFLASH_BLOCK)
    return lambda: dflash_block_mask(ids, length, anchors, DFLASH_BLOCK), mask_mod, q_len, kv_len


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536])
    parser.add_argument("--families", nargs="+", default=["document", "eagle3", "dflash"],
                        choices=["document", "eagle3", "dflash"])
    parser.add_argument("--dense-limit-gb", type=float, default=6.0,
                        help="skip create_block_mask where its dense grid would need more (default: 6)")
    parser.add_argument("--repeats", type=int, default=3, help="timed builds per figure (default: 3)")
    parser.add_argument("--no-compiled", action="store_true", help="skip torch.compile(create_block_mask)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, backends here: {available_backends()}")
    compiled = torch.compile(create_block_mask)
    header = (f"{'family':9} {'S':>6} {'Q_LEN':>6} {'KV_LEN':>6} {'peagle_ext':>11} {'(best)':>10} "
              f"{'eager cbm':>14} "
              f"{'compiled cbm':>14}")
    print(header)
    print("-" * len(header))
    for name in args.families:
        for length in args.lengths:
            ours, mask_mod, q_len, kv_len = family(name, length)
            ours_times = build_seconds(ours, max(15, args.repeats))  # cheap: more builds, less noise
            ours_s, ours_best = statistics.median(ours_times), min(ours_times)
            dense_gb = DENSE_BYTES_PER_PAIR * q_len * kv_len / 2**30
            if dense_gb > args.dense_limit_gb:
                eager = compiled_figure = f"skip ({dense_gb:.0f} GB)"
            else:
                def dense(builder=create_block_mask, mask_mod=mask_mod, q_len=q_len, kv_len=kv_len):
                    return builder(mask_mod, None, None, q_len, kv_len, device="cpu")

                eager = f"{median_seconds(dense, args.repeats) * 1e3:9.1f} ms"
                compiled_figure = "-" if args.no_compiled else (
                    f"{median_seconds(lambda: dense(compiled), args.repeats) * 1e3:9.1f} ms")
            print(f"{name:9} {length:>6} {q_len:>6} {kv_len:>6} {ours_s * 1e3:8.1f} ms {ours_best * 1e3:7.1f} ms "
                  f"{eager:>14} {compiled_figure:>14}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
