"""Tokens per second of the data engine's response generation at a few batch sizes, on a real target.

    python benchmarks/data_engine.py --target DIR [--gguf-file F] [--batch-sizes 16 32 64 128] [--threads 1]

Prompts: instructions the target synthesizes itself (Magpie), as ``python -m peagle_ext train``
makes them. Prints, per batch size, response tokens, seconds and tokens/s (states captured).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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
    for batch_size in args.batch_sizes:
        started = time.monotonic()
        batch = next(generate_samples(model, tokenizer, messages[:batch_size], [2, layers // 2, layers - 3],
                                      max_tokens=args.max_tokens, batch_size=batch_size))
        seconds = time.monotonic() - started
        tokens = sum(len(s.response_ids) for s in batch)
        print(f"batch {batch_size:>3}: {tokens:>6} response tokens in {seconds:6.1f} s = {tokens / seconds:6.1f} "
              f"tokens/s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
