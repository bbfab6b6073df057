"""Tokens per second of the data engine's response generation at a few batch sizes, on a real target.

    python benchmarks/data_engine.py --target DIR [--gguf-file F] [--batch-sizes 16 32 64 128] [--threads 1]

Prompts: instructions the target synthesizes itself (Magpie), as ``python -m peagle_ext train``
makes them. Prints, per batch size, response tokens, seconds and tokens/s (states captured).
``--compare-sdpa`` also decodes each batch with transformers' own SDPA attention (which copies the
keys and values once per query head under the padding mask) in place of the grouped decode
attention, and prints the ratio of the two.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from peagle_ext.draft import data_engine  # noqa: E402
from peagle_ext.draft.data_engine import generate_samples, synthesize_instructions  # noqa: E402
from peagle_ext.draft.hf import load_transformers_target  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--target", required=True)
    parser.add_argument("--gguf-file", default=None)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--max-tokens", type=int, default=192)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompts-jsonl", default=None,
                        help="take the instructions from a train run's OUT/data/prompts.jsonl instead")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                        help="the target copy's dtype, as train --data-dtype")
    parser.add_argument("--compare-sdpa", action="store_true",
                        help="also decode with transformers' own SDPA attention and print the ratio")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_transformers_target(args.target, args.gguf_file)
    model = model.to(getattr(torch, args.dtype))
    layers = model.config.num_hidden_layers
    started = time.monotonic()
    if args.prompts_jsonl:
        with open(args.prompts_jsonl) as handle:
            messages = [json.loads(line) for line in handle][: max(args.batch_sizes)]
    else:
        messages = synthesize_instructions(model, tokenizer, max(args.batch_sizes), batch_size=128)
    print(f"{len(messages)} instructions ({time.monotonic() - started:.1f} s); e.g. {messages[:3]}", flush=True)
    grouped = data_engine.grouped_decode_attention
    for batch_size in args.batch_sizes:
        rate = {}
        for attention in ["grouped", "sdpa"] if args.compare_sdpa else ["grouped"]:
            # the engine's decode looks the context manager up in its module at every step
            data_engine.grouped_decode_attention = grouped if attention == "grouped" else contextlib.nullcontext
            started = time.monotonic()
            batch = next(generate_samples(model, tokenizer, messages[:batch_size], [2, layers // 2, layers - 3],
                                          max_tokens=args.max_tokens, batch_size=batch_size))
            seconds = time.monotonic() - started
            tokens = sum(len(s.response_ids) for s in batch)
            rate[attention] = tokens / seconds
            print(f"batch {batch_size:>3} ({attention:>7} attention): {tokens:>6} response tokens in "
                  f"{seconds:6.1f} s = {rate[attention]:6.1f} tokens/s", flush=True)
        data_engine.grouped_decode_attention = grouped
        if len(rate) == 2:  # in bfloat16 the two may decode other tokens: compare rates
            print(f"batch {batch_size:>3}: grouped decode attention {rate['grouped'] / rate['sdpa']:.2f}x the "
                  "tokens/s of transformers' SDPA", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
