"""Peak memory and time of one P-EAGLE training step, flat against sequence-partitioned.

    python benchmarks/bench_partition.py [--lengths 4096 8192 16384] [--segments 1 2 4 8] [--json FILE]

A tiny draft (hidden 32, one layer of 2 heads of 16, vocabulary 256, target hidden 32) trains on one
random sequence of S positions with 8 COD depths. Each (S, K, mode) is measured in a fresh process:
one warm-up step, then the median time of the next steps and the rise of peak RSS (VmHWM) during
one step above the RSS before it. Modes: "flat" (K = 1), "partitioned" (every segment element a
query), "keys-only completion" (a segment's completion elements are keys only: Q_LEN < KV_LEN masks).

On the CPU, flex_attention has no backward (torch 2.14.1), so the draft's attention runs the dense
fallback (scaled_dot_product_attention with the mask materialized from the BlockMask's mask_mod):
the figures show what partitioning saves there, where the dense Q x KV mask dominates.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

MODES = ("flat", "partitioned", "keys-only completion")


def measure(seq_len: int, segments: int, mode: str, steps: int) -> dict:
    """In this process: time and peak-RSS rise of training steps (see the module docstring)."""
    import torch

    from peagle_ext._measure import peak_rss_bytes, reset_peak_rss
    from peagle_ext.draft.llama import Eagle3DraftConfig, LlamaEagle3DraftModel
    from peagle_ext.draft.training import peagle_training_step

    torch.manual_seed(0)
    config = Eagle3DraftConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
                               num_hidden_layers=1, vocab_size=256, draft_vocab_size=256, target_hidden_size=32,
                               parallel_drafting=True, num_depths=8, max_position_embeddings=seq_len)
    model = LlamaEagle3DraftModel(config).train()
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(256, (seq_len,), generator=generator)
    aux = torch.randn(seq_len, 3 * 32, generator=generator)
    target = torch.randn(seq_len, 256, generator=generator)
    loss_mask = torch.ones(seq_len)
    extra = {} if mode == "flat" else {"sequence_partitions": segments,
                                       "keys_only_completion": mode == "keys-only completion"}

    def step() -> float:
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        out = peagle_training_step(model, input_ids, aux, loss_mask, target_logits=target,
                                   generator=torch.Generator().manual_seed(1), **extra)
        if out.loss.requires_grad:
            out.loss.backward()
        return time.perf_counter() - start

    step()  # warm-up: first-touch page faults, allocator growth
    base = reset_peak_rss()
    times = [step()]
    peak = peak_rss_bytes() - base
    times += [step() for _ in range(steps - 1)]
    return {"median_s": statistics.median(times), "peak_bytes": peak, "steps": steps}


def run_fresh(seq_len: int, segments: int, mode: str, steps: int) -> dict:
    """measure() in a fresh process, so that its peak RSS is its own."""
    command = [sys.executable, __file__, "--one", str(seq_len), str(segments), mode, "--steps", str(steps)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        last_line = (result.stderr.strip().splitlines() or ["?"])[-1]
        reason = "out of memory" if result.returncode in (-9, 137) else last_line
        return {"failed": reason}
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--segments", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per measurement (after one warm-up)")
    parser.add_argument("--max-flat-len", type=int, default=16384,
                        help="skip the flat step above this length (at 16384 it peaks at ~17 GiB on the CPU)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--one", nargs=3, metavar=("S", "K", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        seq_len, segments, mode = int(args.one[0]), int(args.one[1]), args.one[2]
        print(json.dumps(measure(seq_len, segments, mode, args.steps)))
        return 0

    rows = []
    print(f"{'S':>6} {'K':>3} {'mode':<22} {'step s':>8} {'peak MiB':>9}")
    for seq_len in args.lengths:
        for segments in args.segments:
            for mode in (("flat",) if segments == 1 else MODES[1:]):
                if mode == "flat" and seq_len > args.max_flat_len:
                    entry = {"skipped": f"above --max-flat-len {args.max_flat_len}"}
                else:
                    print(f"  measuring S {seq_len} K {segments} {mode} ...", file=sys.stderr, flush=True)
                    entry = run_fresh(seq_len, segments, mode, args.steps)
                rows.append({"seq_len": seq_len, "segments": segments, "mode": mode, **entry})
                if "median_s" in entry:
                    cells = f"{entry['median_s']:8.2f} {entry['peak_bytes'] / 2**20:9.0f}"
                else:
                    cells = f"{'':>8} {'':>9}  {entry.get('skipped') or entry.get('failed')}"
                print(f"{seq_len:>6} {segments:>3} {mode:<22} {cells}", flush=True)
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"cpus": os.cpu_count(), "rows": rows}, out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
