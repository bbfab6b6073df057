"""How near a draft's first proposal comes when it misses: decode held-out prompts through the
speculative loop at K = 1 (batch 1, greedy) and count, at every verification, whether the target's
token is among the draft's n best first-position tokens, for n = 1..--top. The n = 1 share is the
loop's first-position acceptance; the others bound what verifying the n best first tokens side by
side (a tree) could add. The loop runs without alternatives or lookup branches here;
``benchmarks/alternatives.py`` measures what verifying them gives.

    python benchmarks/draft_topk.py --target DIR --gguf-file F --draft RUN_OUT/draft --prompts 16
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from peagle_ext.cli.evaluate import chat_prompts  # noqa: E402
from peagle_ext.draft.data_engine import HELD_OUT_PROMPTS  # noqa: E402
from peagle_ext.draft.hf import load_transformers_target  # noqa: E402
from peagle_ext.draft.llama import LlamaEagle3DraftModel  # noqa: E402
from peagle_ext.draft.speculative import TransformersTarget, draft_for_decoding, loop, speculative_generate  # noqa: E402


@contextlib.contextmanager
def first_position_ranks(draft, top: int, hits: torch.Tensor):
    """While active, every greedy verification adds to hits[n - 1] when the target's first token
    is among the draft's n best (hits[top] counts the verifications)."""
    propose, verify, last_logits = loop.propose, loop._greedy_verify, {}
    vocab = draft.draft_to_target_ids()

    def recording_propose(*args, **kwargs):
        chosen, draft_logits, forwards = propose(*args, **kwargs)
        last_logits["first"] = draft_logits[:, 0].float()
        return chosen, draft_logits, forwards

    def counting_verify(proposals, logits):
        truth = logits[:, 0].argmax(-1).view(-1, 1)
        best = vocab[last_logits["first"].topk(top, -1).indices]
        found = (best == truth).int().cummax(-1).values.sum(0)
        hits[:top] += found
        hits[top] += truth.shape[0]
        return verify(proposals, logits)

    loop.propose, loop._greedy_verify = recording_propose, counting_verify
    try:
        yield
    finally:
        loop.propose, loop._greedy_verify = propose, verify


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--target", required=True)
    parser.add_argument("--gguf-file", default=None)
    parser.add_argument("--draft", required=True, help="a saved draft (the draft/ of a train run)")
    parser.add_argument("--prompts", type=int, default=16, help="how many of the held-out prompts")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--top", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_transformers_target(args.target, args.gguf_file)
    draft = draft_for_decoding(LlamaEagle3DraftModel.from_pretrained(args.draft).eval(), "auto")
    target = TransformersTarget(model, draft.config.eagle_aux_hidden_state_layer_ids, tokenizer.pad_token_id or 0)
    hits = torch.zeros(args.top + 1, dtype=torch.int64)
    with first_position_ranks(draft, args.top, hits):
        for prompt in chat_prompts(HELD_OUT_PROMPTS[:args.prompts], tokenizer):
            speculative_generate(target, draft, [prompt], 1, args.new_tokens, eos_token_id=tokenizer.eos_token_id,
                                 alternatives=0, lookup=0)
    steps = int(hits[args.top])
    print(f"{steps} verifications; the target's token among the draft's n best first tokens: "
          + ", ".join(f"n = {n}: {int(hits[n - 1]) / steps:.3f}" for n in range(1, args.top + 1)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
