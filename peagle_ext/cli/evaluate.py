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
from ..draft.speculative.draft import DRAFT_DTYPES
from ..draft.speculative.lookup import INDEX_FILE
from ..draft.speculative.loop import GREEDY_BELOW_TEMPERATURE, positions_needed
from . import UsageError, check_distinct_files, check_memory, check_path, check_writable, int_at_least, parser_for

# New tokens per prompt when --max-new-tokens is not given (fewer where the position limits allow fewer).
DEFAULT_NEW_TOKENS = 64
# The largest prompts file read (a stream without end, /dev/zero say, is refused at this size).
MAX_PROMPTS_BYTES = 64 << 20


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
    parser.add_argument("--max-new-tokens", type=int_at_least(1), default=None,
                        help=f"new tokens per prompt, at most what the draft's and target's position limits leave "
                             f"after the longest prompt (default {DEFAULT_NEW_TOKENS}, or that bound if lower)")
    parser.add_argument("--json", metavar="OUT", default=None, help="write the measurements here")
    parser.add_argument("--batch-size", type=int_at_least(1), default=8, help="prompts decoded together (default 8)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help=f"0 or below {GREEDY_BELOW_TEMPERATURE:g}: greedy verification; above: rejection sampling")
    parser.add_argument("--seed", type=int_at_least(0), default=0, help="seed of the draws when sampling (default 0)")
    parser.add_argument("--target-seed", type=int_at_least(0), default=0,
                        help="the tiny target's seed (train-demo --seed)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the plain-decoding baseline")
    parser.add_argument("--ignore-eos", action="store_true",
                        help="do not stop at the tokenizer's end-of-sequence token")
    parser.add_argument("--draft-dtype", choices=list(DRAFT_DTYPES), default="auto",
                        help="the draft's dtype while decoding (auto: bfloat16 on a CPU with native bfloat16, else "
                             "as saved; the output is the target's either way; default %(default)s)")
    parser.add_argument("--threads", type=int_at_least(1, os.cpu_count() or 1), default=None,
                        help="torch intra-op threads (at most the CPUs here)")
    parser.add_argument("--alternatives", type=int_at_least(0), default=None,
                        help="greedy decoding: the draft's next-best first tokens verified beside its proposals in "
                             "the same target forward (default 2 where greedy, 0 when sampling)")
    parser.add_argument("--lookup", type=int_at_least(0), default=None,
                        help="greedy decoding: how far past a step's first token the prompt-lookup branches reach "
                             "(what followed earlier occurrences of the context's last tokens), verified in the "
                             "same target forward (default 5 where greedy, 0 when sampling)")
    parser.add_argument("--index", metavar="FILE", default=None,
                        help=f"greedy decoding: a continuation index ({INDEX_FILE}, which train writes beside the "
                             "draft) whose continuation of the context is verified as one more branch (default: the "
                             "draft folder's, where it holds one)")
    parser.add_argument("--no-index", action="store_true", help="verify no continuation index's branch")
    args = parser.parse_args(argv)
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise UsageError(f"argument --temperature: must be a finite number >= 0, got {args.temperature}")
    if args.alternatives and args.temperature >= GREEDY_BELOW_TEMPERATURE:
        raise UsageError(f"argument --alternatives: alternative first tokens are verified in greedy decoding only; "
                         f"with --temperature {args.temperature} it must be 0")
    if args.lookup and args.temperature >= GREEDY_BELOW_TEMPERATURE:
        raise UsageError(f"argument --lookup: prompt-lookup branches are verified in greedy decoding only; "
                         f"with --temperature {args.temperature} it must be 0")
    if args.index is not None:
        if args.no_index:
            raise UsageError("argument --index: not with --no-index")
        if args.temperature >= GREEDY_BELOW_TEMPERATURE:
            raise UsageError(f"argument --index: its branch is verified in greedy decoding only; with --temperature "
                             f"{args.temperature} leave it out")
        if args.lookup == 0:
            raise UsageError("argument --index: its branch reaches as far as the lookup branches; not with --lookup 0")
        check_path("--index", args.index)
    for option in ("--draft", "--prompts") + (("--target",) if args.target != "tiny" else ()):
        check_path(option, getattr(args, option[2:]))
    if args.gguf_file is not None:
        check_path("--gguf-file", args.gguf_file)
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
    args.prompt_lines = read_prompt_lines(args.prompts)
    if args.json is not None:
        check_writable("--json", args.json)
        check_distinct_files({"--json": args.json}, [("--prompts", args.prompts)] + [
            ("--draft", os.path.join(args.draft, name)) for name in ("config.json", "model.safetensors", INDEX_FILE)]
            + ([("--index", args.index)] if args.index is not None else []))
    return args


def read_prompt_lines(path: str) -> list[str]:
    """The prompts file's non-blank lines: UTF-8 text of at most MAX_PROMPTS_BYTES."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_PROMPTS_BYTES + 1)
    except OSError as error:
        raise UsageError(f"argument --prompts: cannot read {path} ({error.strerror or error})") from None
    if len(data) > MAX_PROMPTS_BYTES:
        raise UsageError(f"argument --prompts: {path} is longer than {MAX_PROMPTS_BYTES >> 20} MiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise UsageError(f"argument --prompts: {path} is not UTF-8 text (byte 0x{data[error.start]:02x} on line "
                         f"{line})") from None
    lines = [line for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n") if line.strip()]
    if not lines:
        raise UsageError(f"argument --prompts: {path} holds no prompt")
    return lines


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


def position_limits(draft_config, target_config=None) -> list[tuple[str, int]]:
    """(whose, max_position_embeddings) of the draft and, where it has one, the target."""
    limits = [("the draft's", draft_config.max_position_embeddings)]
    target_limit = getattr(target_config, "max_position_embeddings", None)
    if isinstance(target_limit, int) and target_limit > 0:
        limits.append(("the target's", target_limit))
    return limits


def check_prompt_lengths(prompts: list[list[int]], args, limits: list[tuple[str, int]], attention_heads: int) -> int:
    """Usage errors, before decoding, for a prompt or --max-new-tokens past the position limits or
    a first forward past the memory here; returns the new tokens per prompt to decode.

    A prompt of P tokens decoding N new ones with K proposals a step reaches position
    P + N + K - 2 (the last step proposes K tokens past the last one kept), so P + N + K - 1
    positions must fit each limit (``positions_needed``, the rule the decode itself checks); an
    explicit --lookup longer than K takes K's place (the default branch shortens itself to fit)."""
    whose, limit = min(limits, key=lambda pair: pair[1])
    longest = max(range(len(prompts)), key=lambda index: len(prompts[index]))
    length = len(prompts[longest])
    reach = max(args.k, args.lookup or 0)  # explicit lookup branches may reach past the chain
    bound = limit - positions_needed(length, 0, reach)
    if bound < 1 and reach > args.k:
        raise UsageError(f"argument --lookup: branches of {args.lookup} tokens after the longest prompt (line "
                         f"{longest + 1}, {length} tokens) leave no room for a new token ({whose} "
                         f"max_position_embeddings is {limit})")
    if bound < 1:
        raise UsageError(f"argument --prompts: line {longest + 1} has {length} tokens; with -k {args.k} the longest "
                         f"prompt that leaves room for one new token is {limit - args.k} ({whose} "
                         f"max_position_embeddings is {limit})")
    if args.max_new_tokens is not None and args.max_new_tokens > bound:
        past = f"{args.k - 1} proposed" if reach == args.k else f"{args.lookup - 1} of the lookup branches"
        raise UsageError(f"argument --max-new-tokens: must be <= {bound}, got {args.max_new_tokens} ({whose} "
                         f"max_position_embeddings {limit}, less the longest prompt's {length} tokens (line "
                         f"{longest + 1}) and the {past} past the end)")
    # The first forward over a batch of the longest prompts: attention scores and weights (float32)
    # and masks of every head over every pair of its positions, the draft's and the target's.
    rows = min(args.batch_size, len(prompts))
    needed = rows * length * length * (8 * attention_heads + 2)
    check_memory("--prompts/--batch-size", needed, "cpu",
                 f"the first forward over {rows} prompt(s) of {length} tokens (line {longest + 1})")
    if args.max_new_tokens is None:
        args.max_new_tokens = min(DEFAULT_NEW_TOKENS, bound)
        if bound < DEFAULT_NEW_TOKENS:
            print(f"eval: {bound} new tokens per prompt, what {whose} max_position_embeddings ({limit}) leaves "
                  f"after the longest prompt", file=sys.stderr)
    return args.max_new_tokens


def continuation_index(args, vocab_size: int):
    """The continuation index to verify: ``--index``, else the draft folder's where it holds one and
    the decode verifies lookup branches (greedy, --lookup not 0); None with --no-index. A file that
    is not an index, or one of another vocabulary, is a usage error."""
    from ..draft.speculative.lookup import ContinuationIndex

    option, path = "--index", args.index
    if path is None:
        option, path = "--draft", os.path.join(args.draft, INDEX_FILE)
        greedy = args.temperature < GREEDY_BELOW_TEMPERATURE
        if args.no_index or not os.path.isfile(path) or not greedy or args.lookup == 0:
            return None
    try:
        index = ContinuationIndex.load(path)
    except ValueError as error:
        raise UsageError(f"argument {option}: {error}") from None
    if index.base > vocab_size:
        raise UsageError(f"argument {option}: {path} holds token ids up to {index.base - 1}, past the draft's "
                         f"vocabulary ({vocab_size} tokens)")
    return index


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
    from ..draft.speculative import TokenwiseTarget, TransformersTarget, draft_for_decoding, measure
    from ..draft.speculative.measure import agreement_text

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        draft = LlamaEagle3DraftModel.from_pretrained(args.draft).eval()
    except (OSError, KeyError, TypeError, ValueError) as error:
        raise UsageError(f"argument --draft: {error}") from None
    draft = draft_for_decoding(draft, args.draft_dtype)
    config, eos = draft.config, None
    index = continuation_index(args, config.vocab_size)
    if args.alternatives is not None and args.alternatives >= config.draft_vocab_size:
        raise UsageError(f"argument --alternatives: must be below the draft's vocabulary ({config.draft_vocab_size} "
                         f"tokens), got {args.alternatives}")
    if args.target == "tiny":
        from ..draft.tiny_target import TARGET_HIDDEN, demo_target

        if config.target_hidden_size != TARGET_HIDDEN or config.num_aux_hidden_states != 3:
            raise UsageError(f"argument --target: the tiny target gives 3 states of {TARGET_HIDDEN}; this draft reads "
                             f"{config.num_aux_hidden_states} of {config.target_hidden_size}")
        prompts = tiny_prompts(args.prompt_lines, config.vocab_size)
        check_prompt_lengths(prompts, args, position_limits(config), config.num_attention_heads)
        target = TokenwiseTarget(demo_target(config.vocab_size, args.target_seed))
    else:
        if not config.eagle_aux_hidden_state_layer_ids:
            raise UsageError("argument --draft: the checkpoint names no eagle_aux_hidden_state_layer_ids (the target "
                             "layers whose states it reads); a draft trained on this target by `python -m peagle_ext "
                             "train` names them, and a train-demo draft runs with --target tiny")
        started = time.perf_counter()
        print(f"eval: loading {os.path.join(args.target, args.gguf_file or '')} ...", file=sys.stderr, flush=True)
        model, tokenizer = load_transformers_target(args.target, args.gguf_file)
        print(f"eval: target loaded in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        if model.config.vocab_size != config.vocab_size or model.config.hidden_size != config.target_hidden_size:
            raise UsageError(f"argument --draft: it is for a target of vocabulary {config.vocab_size} and hidden size "
                             f"{config.target_hidden_size}; {args.target} has {model.config.vocab_size} and "
                             f"{model.config.hidden_size}")
        prompts = chat_prompts(args.prompt_lines, tokenizer)
        for number, ids in enumerate(prompts, 1):
            if any(not 0 <= i < config.vocab_size for i in ids):
                raise UsageError(f"argument --prompts: line {number} gives token ids outside the target's "
                                 f"vocabulary [0, {config.vocab_size})")
        check_prompt_lengths(prompts, args, position_limits(config, model.config),
                             config.num_attention_heads + model.config.num_attention_heads)
        target = TransformersTarget(model, config.eagle_aux_hidden_state_layer_ids, tokenizer.pad_token_id or 0)
        eos = None if args.ignore_eos else tokenizer.eos_token_id

    if index is not None and args.index is None and not getattr(target, "tree_attention", False):
        index = None  # the draft folder's index, for a target that reads chains only

    def progress(done):
        print(f"eval: {done}/{len(prompts)} prompts", file=sys.stderr, flush=True)

    report = measure(target, draft, prompts, args.k, args.max_new_tokens, batch_size=args.batch_size,
                     temperature=args.temperature, seed=args.seed, eos_token_id=eos, baseline=not args.no_baseline,
                     progress=progress, alternatives=args.alternatives, lookup=args.lookup, index=index)
    rates = " ".join("-" if math.isnan(r) else f"{r:.2f}" for r in report["conditional_acceptance"])
    print(f"{report['method']} draft ({report['draft_dtype']}), K = {args.k}, {len(prompts)} prompts, "
          f"{report['new_tokens']} new tokens: acceptance length {report['acceptance_length']:.3f} tokens per "
          "target forward")
    print(f"acceptance per draft position (given the ones before): {rates}")
    print(f"forwards: target {report['target_forwards']}, draft {report['draft_forwards']}")
    if report["alternatives"]:
        print(f"alternative first tokens verified per step: {report['alternatives']}; steps that took one: "
              f"{report['alternatives_taken']}")
    if report["lookup"]:
        print(f"prompt-lookup branches verified per step, reaching {report['lookup']} tokens; steps that took one: "
              f"{report['lookups_taken']}")
    if report["index"]:
        index_path = args.index or os.path.join(args.draft, INDEX_FILE)
        print(f"the continuation index's branch verified per step ({index_path}); steps that ended in it: "
              f"{report['indexed_taken']}")
    speed = report["tokens_per_second"]
    if "target" in speed:
        print(f"tokens/s: speculative {speed['speculative']:.1f}, plain target {speed['target']:.1f} "
              f"(speedup {report['speedup']:.2f}x)")
        if args.temperature < GREEDY_BELOW_TEMPERATURE:
            print(f"greedy outputs against the plain decode: {agreement_text(report)}")
    if args.json is not None:
        with open(args.json, "w") as handle:
            json.dump(json_ready(report), handle, indent=1)
        print(f"measurements written to {args.json}")
    return 0
