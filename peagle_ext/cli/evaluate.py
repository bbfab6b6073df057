"""``python -m peagle_ext eval``: speculative decoding with a draft checkpoint against a target, and
its acceptance and speed against plain decoding, as JSON.

    python -m peagle_ext eval --draft DIR --target tiny --prompts FILE -k 4 --max-new-tokens 32 --json out.json
    python -m peagle_ext eval --draft DIR --target MODEL_DIR [--gguf-file F.gguf] --prompts FILE -k 5 ...

With ``--target tiny`` the target is the demo's tiny target (``train-demo``'s, for the draft's
vocabulary and ``--target-seed``) and each line of the prompts file holds token ids. With a
transformers model folder each line is one user message, or a JSON line holding a list of chat
messages (or ``{"messages": [...]}``); either goes through the tokenizer's chat template with the
generation prompt.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import torch

from ..draft.hf import chat_template_ids, json_ready, load_transformers_target  # noqa: F401 (their old home)
from . import UsageError, check_writable, int_at_least, parser_for


def parse_args(argv: list[str]):
    parser = parser_for("eval")
    parser.add_argument("--draft", required=True, metavar="DIR", help="the draft checkpoint directory")
    parser.add_argument("--target", required=True, metavar="tiny|DIR",
                        help="'tiny' (the demo's target) or a transformers model folder")
    parser.add_argument("--gguf-file", metavar="NAME", default=None, help="a GGUF file in the target folder to load")
    parser.add_argument("--prompts", required=True, metavar="FILE",
                        help="one prompt per line: token ids (tiny), a user message, or JSON chat messages")
    parser.add_argument("-k", "--num-speculative-tokens", type=int_at_least(1), default=5, dest="k",
                        help="tokens proposed per step (default 5)")
    parser.add_argument("--max-new-tokens", type=int_at_least(1), default=64, help="new tokens per prompt (default 64)")
    parser.add_argument("--json", metavar="OUT", default=None, help="write the measurements here")
    parser.add_argument("--batch-size", type=int_at_least(1), default=8, help="prompts decoded together (default 8)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0: greedy verification (default); > 0: rejection sampling")
    parser.add_argument("--seed", type=int_at_least(0), default=0, help="seed of the draws when sampling (default 0)")
    parser.add_argument("--target-seed", type=int_at_least(0), default=0,
                        help="the tiny target's seed (train-demo --seed)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the plain-decoding baseline")
    parser.add_argument("--ignore-eos", action="store_true",
                        help="do not stop at the tokenizer's end-of-sequence token")
    parser.add_argument("--threads", type=int_at_least(1), default=None, help="torch intra-op threads")
    args = parser.parse_args(argv)
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise UsageError(f"argument --temperature: must be a finite number >= 0, got {args.temperature}")
    if not os.path.isfile(os.path.join(args.draft, "config.json")):
        raise UsageError(f"argument --draft: {args.draft} holds no config.json (expected a draft checkpoint directory)")
    if args.target != "tiny":
        if not os.path.isdir(args.target):
            raise UsageError(f"argument --target: {args.target} is neither 'tiny' nor a directory")
        if args.gguf_file is not None and not os.path.isfile(os.path.join(args.target, args.gguf_file)):
            raise UsageError(f"argument --gguf-file: no file {args.gguf_file} in {args.target}")
        if args.gguf_file is None and not os.path.isfile(os.path.join(args.target, "config.json")):
            raise UsageError(f"argument --target: {args.target} holds no config.json (give --gguf-file for a GGUF)")
    elif args.gguf_file is not None:
        raise UsageError("argument --gguf-file: only with a transformers model folder as --target")
    try:
        with open(args.prompts) as handle:
            args.prompt_lines = [line.rstrip("\n") for line in handle if line.strip()]
    except OSError as error:
        raise UsageError(f"argument --prompts: cannot read {args.prompts} ({error.strerror or error})") from None
    if not args.prompt_lines:
        raise UsageError(f"argument --prompts: {args.prompts} holds no prompt")
    if args.json is not None:
        check_writable("--json", args.json)
    return args


def tiny_prompts(lines: list[str], vocab_size: int) -> list[list[int]]:
    prompts = []
    for number, line in enumerate(lines, 1):
        try:
            ids = [int(token) for token in line.split()]
        except ValueError:
            raise UsageError(f"argument --prompts: line {number} is not token ids: {line[:40]!r}") from None
        if any(not 0 <= i < vocab_size for i in ids):
            raise UsageError(f"argument --prompts: line {number} has ids outside [0, {vocab_size})")
        prompts.append(ids)
    return prompts


def chat_prompts(lines: list[str], tokenizer) -> list[list[int]]:
    """Each line a user message, or JSON chat messages, through the chat template (generation prompt on)."""
    prompts = []
    for number, line in enumerate(lines, 1):
        messages = [{"role": "user", "content": line}]
        if line.lstrip().startswith(("[", "{")):
            try:
                parsed = json.loads(line)
            except json.JSONDecodeError as error:
                raise UsageError(f"argument --prompts: line {number} is not valid JSON ({error.msg})") from None
            messages = parsed["messages"] if isinstance(parsed, dict) and "messages" in parsed else parsed
            if not (isinstance(messages, list) and messages and all(
                    isinstance(m, dict) and {"role", "content"} <= m.keys() for m in messages)):
                raise UsageError(f"argument --prompts: line {number} is not a list of chat messages "
                                 "({'role': ..., 'content': ...})")
        prompts.append(chat_template_ids(tokenizer, messages))
    return prompts


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    from ..draft.llama import LlamaEagle3DraftModel
    from ..draft.speculative import TokenwiseTarget, TransformersTarget, measure

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        draft = LlamaEagle3DraftModel.from_pretrained(args.draft).eval()
    except (OSError, KeyError, TypeError, ValueError) as error:
        raise UsageError(f"argument --draft: {error}") from None
    config, eos = draft.config, None
    if args.target == "tiny":
        from .train_demo import TARGET_HIDDEN, demo_target

        if config.target_hidden_size != TARGET_HIDDEN or config.num_aux_hidden_states != 3:
            raise UsageError(f"argument --target: the tiny target gives 3 states of {TARGET_HIDDEN}; this draft reads "
                             f"{config.num_aux_hidden_states} of {config.target_hidden_size}")
        prompts = tiny_prompts(args.prompt_lines, config.vocab_size)
        target = TokenwiseTarget(demo_target(config.vocab_size, args.target_seed))
    else:
        if not config.eagle_aux_hidden_state_layer_ids:
            raise UsageError("argument --draft: the checkpoint names no eagle_aux_hidden_state_layer_ids, so the "
                             "target's states it reads are unknown")
        started = time.perf_counter()
        print(f"eval: loading {os.path.join(args.target, args.gguf_file or '')} ...", file=sys.stderr, flush=True)
        model, tokenizer = load_transformers_target(args.target, args.gguf_file)
        print(f"eval: target loaded in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        if model.config.vocab_size != config.vocab_size or model.config.hidden_size != config.target_hidden_size:
            raise UsageError(f"argument --draft: it is for a target of vocabulary {config.vocab_size} and hidden size "
                             f"{config.target_hidden_size}; {args.target} has {model.config.vocab_size} and "
                             f"{model.config.hidden_size}")
        prompts = chat_prompts(args.prompt_lines, tokenizer)
        target = TransformersTarget(model, config.eagle_aux_hidden_state_layer_ids, tokenizer.pad_token_id or 0)
        eos = None if args.ignore_eos else tokenizer.eos_token_id

    def progress(done):
        print(f"eval: {done}/{len(prompts)} prompts", file=sys.stderr, flush=True)

    report = measure(target, draft, prompts, args.k, args.max_new_tokens, batch_size=args.batch_size,
                     temperature=args.temperature, seed=args.seed, eos_token_id=eos, baseline=not args.no_baseline,
                     progress=progress)
    rates = " ".join("-" if math.isnan(r) else f"{r:.2f}" for r in report["conditional_acceptance"])
    print(f"{report['method']} draft, K = {args.k}, {len(prompts)} prompts, {report['new_tokens']} new tokens: "
          f"acceptance length {report['acceptance_length']:.3f} tokens per target forward")
    print(f"acceptance per draft position (given the ones before): {rates}")
    print(f"forwards: target {report['target_forwards']}, draft {report['draft_forwards']}")
    speed = report["tokens_per_second"]
    if "target" in speed:
        print(f"tokens/s: speculative {speed['speculative']:.1f}, plain target {speed['target']:.1f} "
              f"(speedup {report['speedup']:.2f}x)")
        if args.temperature == 0:
            same = sum(p["matches_target"] for p in report["prompts"])
            print(f"greedy outputs equal to the plain decode: {same}/{len(prompts)}")
    if args.json is not None:
        with open(args.json, "w") as handle:
            json.dump(json_ready(report), handle, indent=1)
        print(f"measurements written to {args.json}")
    return 0
