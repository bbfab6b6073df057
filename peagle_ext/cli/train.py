"""``python -m peagle_ext train``: train a P-EAGLE (or EAGLE-3) draft for a transformers causal LM
within a time budget, from data the target makes itself, and measure it.

    python -m peagle_ext train --target DIR [--gguf-file F] --out OUT --budget-minutes 60

Writes ``OUT/data`` (the cached data, reused by a later run), ``OUT/draft`` (speculators' layout),
``OUT/results.json`` and ``OUT/results.png``. The recipe is :mod:`peagle_ext.draft.recipe`.
"""

from __future__ import annotations

import os
import sys

from . import UsageError, check_directory_writable, check_path, int_at_least, parser_for, positive_float


def parse_args(argv: list[str]):
    from ..draft.recipe import INITS, METHODS, TrainConfig
    from ..draft.speculative import DRAFT_DTYPES

    defaults = TrainConfig(target="", out="", budget_minutes=0)
    parser = parser_for("train")
    parser.add_argument("--target", required=True, metavar="DIR", help="a transformers model folder")
    parser.add_argument("--gguf-file", metavar="NAME", default=None, help="a GGUF file in the target folder to load")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="directory for the cached data, the draft, results.json and results.png")
    parser.add_argument("--budget-minutes", required=True, type=positive_float, metavar="M",
                        help="wall time of the whole run, loading to results")
    parser.add_argument("--method", choices=list(METHODS), default=defaults.method,
                        help="draft kind (default %(default)s)")
    parser.add_argument("-k", "--num-speculative-tokens", type=int_at_least(1, 64), nargs="+", dest="ks",
                        default=defaults.ks, metavar="K", help="K values evaluated (default %(default)s)")
    parser.add_argument("--prompts", metavar="FILE", default=None,
                        help="seed user messages, one per line, used before synthesized ones")
    parser.add_argument("--verifier", metavar="NAME", default=None,
                        help="the target's hub id recorded in the checkpoint (default: the --target path)")
    parser.add_argument("--layers", type=int_at_least(1, 64), default=defaults.layers,
                        help="draft decoder layers (default %(default)s)")
    parser.add_argument("--init", choices=list(INITS), default=defaults.init,
                        help="the draft's layers start as the target's layers after its last auxiliary one, or at "
                             "random (default %(default)s)")
    parser.add_argument("--depths", type=int_at_least(1, 64), default=defaults.depths,
                        help="P-EAGLE COD depths trained (default %(default)s)")
    parser.add_argument("--lr", type=positive_float, default=defaults.lr,
                        help="peak learning rate (default %(default)s)")
    parser.add_argument("--draft-vocab", type=int_at_least(2), default=defaults.draft_vocab,
                        help="draft vocabulary size (default %(default)s)")
    parser.add_argument("--response-tokens", type=int_at_least(1, 65536), default=defaults.response_tokens,
                        help="longest response generated for the data (default %(default)s)")
    parser.add_argument("--gen-batch", type=int_at_least(1, 4096), default=defaults.gen_batch,
                        help="prompts decoded together for the data (default %(default)s)")
    parser.add_argument("--data-share", type=positive_float, default=defaults.data_share,
                        help="share of the budget for making data (default %(default)s)")
    parser.add_argument("--eval-share", type=positive_float, default=defaults.eval_share,
                        help="share of the budget for the evaluation (default %(default)s)")
    parser.add_argument("--data-dtype", choices=["bfloat16", "float32"], default=defaults.data_dtype,
                        help="dtype of the target's copy that makes the data (default %(default)s)")
    parser.add_argument("--step-tokens", type=int_at_least(1), default=defaults.step_tokens,
                        help="positions packed into one training step (default %(default)s)")
    parser.add_argument("--eval-tokens", type=int_at_least(1, 65536), default=defaults.eval_tokens,
                        help="new tokens per held-out prompt (default %(default)s)")
    parser.add_argument("--draft-dtype", choices=list(DRAFT_DTYPES), default=defaults.draft_dtype,
                        help="the draft's dtype when the evaluation decodes (auto: bfloat16 on a CPU with native "
                             "bfloat16, else as trained; the saved draft stays float32; default %(default)s)")
    parser.add_argument("--threads", type=int_at_least(1, os.cpu_count() or 1), default=None,
                        help="torch intra-op threads, at most the CPUs here (default: torch's)")
    parser.add_argument("--seed", type=int_at_least(0), default=defaults.seed, help="seed (default %(default)s)")
    parser.add_argument("--no-index", action="store_true",
                        help="write no continuation index of the training responses beside the draft (its branch "
                             "is verified with the draft's proposals)")
    args = parser.parse_args(argv)
    for option in ("--out", "--target") + (("--prompts",) if args.prompts is not None else ()):
        check_path(option, getattr(args, option[2:]))
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"argument --out: {args.out} exists and is not a directory")
    if not os.path.isdir(args.target):
        raise UsageError(f"argument --target: {args.target} is not a directory")
    if args.gguf_file is not None and not os.path.isfile(os.path.join(args.target, args.gguf_file)):
        raise UsageError(f"argument --gguf-file: no file {args.gguf_file} in {args.target}")
    if args.gguf_file is None and not os.path.isfile(os.path.join(args.target, "config.json")):
        raise UsageError(f"argument --target: {args.target} holds no config.json (give --gguf-file for a GGUF)")
    if args.prompts is not None:
        try:
            with open(args.prompts) as handle:
                if not any(line.strip() for line in handle):
                    raise UsageError(f"argument --prompts: {args.prompts} holds no prompt")
        except (OSError, UnicodeDecodeError) as error:
            raise UsageError(f"argument --prompts: cannot read {args.prompts} ({error})") from None
    check_directory_writable("--out", args.out)
    config = TrainConfig(
        target=args.target, out=args.out, budget_minutes=args.budget_minutes, gguf_file=args.gguf_file,
        method=args.method, ks=sorted(set(args.ks)), prompts_file=args.prompts, verifier=args.verifier,
        layers=args.layers, init=args.init, depths=args.depths, lr=args.lr, draft_vocab=args.draft_vocab,
        response_tokens=args.response_tokens, gen_batch=args.gen_batch, data_dtype=args.data_dtype,
        data_share=args.data_share, eval_share=args.eval_share,
        step_tokens=args.step_tokens,
        eval_tokens=args.eval_tokens, draft_dtype=args.draft_dtype, threads=args.threads, seed=args.seed,
        index=not args.no_index)
    from ..draft.recipe import check_budget

    try:
        check_budget(config)
    except ValueError as error:
        raise UsageError(str(error)) from None
    return config


def main(argv: list[str]) -> int:
    config = parse_args(argv)
    from ..draft.recipe import report_lines, run

    try:
        summary = run(config)
    except ValueError as error:
        print(f"python -m peagle_ext train: error: {error}", file=sys.stderr)
        return 1
    print("\n".join(report_lines(summary)))
    written = ["results.json"] + (["results.png"] if summary["plot"] else [])
    print(f"written: {config.out}/draft, " + ", ".join(f"{config.out}/{name}" for name in written))
    return 0
