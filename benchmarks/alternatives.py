"""What the tree beside the draft's chain gives: its next-best first tokens (``alternatives``), the
prompt-lookup branches (``lookup``: how far they reach) and the branch of the draft folder's
continuation index (``--index-shares``: none, or the share below which its continuations are
cut). Held-out prompts at batch 1, greedy, decoded plainly and then speculatively with each
combination of settings, one prompt after another in one process (so every figure of a prompt
shares the machine's state). Prints, per setting, the acceptance length, the share of steps that
took an alternative, that ended in a lookup branch and in the index's branch, tokens/s and the
speedup over plain decoding; every output is checked equal to the plain decode.

    python benchmarks/alternatives.py --target DIR --gguf-file F --draft RUN_OUT/draft -k 1 3 5 \\
        --alternatives 0 1 2 3 [--lookup 0 5] [--index-shares none 0.3] [--prompts FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from peagle_ext.cli.evaluate import chat_prompts  # noqa: E402
from peagle_ext.draft.data_engine import HELD_OUT_PROMPTS  # noqa: E402
from peagle_ext.draft.hf import load_transformers_target  # noqa: E402
from peagle_ext.draft.llama import LlamaEagle3DraftModel  # noqa: E402
from peagle_ext.draft.speculative import (  # noqa: E402
    TransformersTarget,
    draft_for_decoding,
    speculative_generate,
    target_generate,
)
from peagle_ext.draft.speculative.lookup import INDEX_FILE, ContinuationIndex  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--target", required=True)
    parser.add_argument("--gguf-file", default=None)
    parser.add_argument("--draft", required=True, help="a saved draft (the draft/ of a train run)")
    parser.add_argument("--prompts", default=None, help="a file of user messages, one per line (default: the "
                                                        "built-in held-out prompts)")
    parser.add_argument("-k", type=int, nargs="+", default=[1, 3, 5])
    parser.add_argument("--alternatives", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--lookup", type=int, nargs="+", default=[0],
                        help="how far the prompt-lookup branches reach, each measured")
    parser.add_argument("--index-shares", nargs="+", default=["none"], metavar="none|SHARE",
                        help=f"without the draft folder's {INDEX_FILE} (none), or with it, its continuations cut "
                             "below each share given")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_transformers_target(args.target, args.gguf_file)
    draft = draft_for_decoding(LlamaEagle3DraftModel.from_pretrained(args.draft).eval(), "auto")
    target = TransformersTarget(model, draft.config.eagle_aux_hidden_state_layer_ids, tokenizer.pad_token_id or 0)
    shares = [None if share == "none" else float(share) for share in args.index_shares]
    index = ContinuationIndex.load(os.path.join(args.draft, INDEX_FILE)) if any(s is not None for s in shares) else None
    messages = HELD_OUT_PROMPTS
    if args.prompts:
        with open(args.prompts, encoding="utf-8") as handle:
            messages = [line.strip() for line in handle if line.strip()]
    prompts = chat_prompts(messages, tokenizer)
    eos = tokenizer.eos_token_id
    # a first decode of each kind packs the weights, untimed
    target_generate(target, prompts[:1], 2, eos)
    speculative_generate(target, draft, prompts[:1], 1, 2, eos_token_id=eos)
    figures = []
    for k in args.k:
        plain_seconds, tokens = 0.0, 0
        runs = {(a, n, share): {"seconds": 0.0, "accepted": [], "taken": 0, "branch": 0, "indexed": 0}
                for a in args.alternatives for n in args.lookup for share in shares if n or share is None}
        for prompt in prompts:
            plain, seconds = target_generate(target, [prompt], args.new_tokens, eos)
            plain_seconds, tokens = plain_seconds + seconds, tokens + len(plain[0])
            for (a, n, share), run in runs.items():
                if share is not None:
                    index.min_share = share
                result = speculative_generate(target, draft, [prompt], k, args.new_tokens, eos_token_id=eos,
                                              alternatives=a, lookup=n, index=None if share is None else index)
                row = result.rows[0]
                if row.generated_ids != plain[0]:
                    print(f"K = {k}, {a} alternatives, lookup {n}, index {share}: an output differs from plain "
                          "decoding", file=sys.stderr)
                    return 1
                run["seconds"] += result.seconds
                run["accepted"] += row.accepted
                run["taken"] += row.alternatives_taken
                run["branch"] += row.lookups_taken
                run["indexed"] += row.indexed_taken
        for (a, n, share), run in runs.items():
            steps = len(run["accepted"])
            figure = {"K": k, "alternatives": a, "lookup": n, "index_min_share": share,
                      "acceptance_length": 1 + sum(run["accepted"]) / steps,
                      "steps_taking_an_alternative": run["taken"] / steps,
                      "steps_taking_the_lookup_branch": run["branch"] / steps,
                      "steps_taking_the_index_branch": run["indexed"] / steps,
                      "tokens_per_second": tokens / run["seconds"], "plain_tokens_per_second": tokens / plain_seconds,
                      "speedup": plain_seconds / run["seconds"]}
            figures.append(figure)
            index_text = "no index" if share is None else f"index cut below {share:g}"
            print(f"K = {k}, {a} alternatives, lookup {n}, {index_text}: acceptance length "
                  f"{figure['acceptance_length']:.3f}, of {steps} steps {figure['steps_taking_an_alternative']:.1%} "
                  f"took an alternative, {figure['steps_taking_the_lookup_branch']:.1%} a lookup branch and "
                  f"{figure['steps_taking_the_index_branch']:.1%} the index's, "
                  f"{figure['tokens_per_second']:.1f} tokens/s against {figure['plain_tokens_per_second']:.1f} "
                  f"plain ({figure['speedup']:.2f}x)", flush=True)
    print(f"{len(prompts)} prompts, {args.new_tokens} new tokens each, batch 1, greedy; all outputs equal to plain "
          "decoding")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"prompts": len(prompts), "new_tokens": args.new_tokens, "figures": figures}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
