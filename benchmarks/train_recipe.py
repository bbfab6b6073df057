"""Training-recipe experiments on the data a ``python -m peagle_ext train`` run cached: each variant
trains a draft for the same wall time, then its teacher-forced accuracy per COD depth is measured on
held-out sequences (the target's responses to the held-out prompts) and on training sequences.

    python benchmarks/train_recipe.py --target DIR [--gguf-file F] --data RUN_OUT --seconds 180 \
        --variants base lr3e-3 layers2 ratio0.9 mask_mean overfit --json out.json --plot out.png
    python benchmarks/train_recipe.py --replot a.json b.json --plot both.png --target - --data -

Variants: ``base`` (the command's defaults), ``lrX`` (peak learning rate X), ``layersN`` (N draft
layers), ``ratioR`` (COD down-sampling ratio R, min max(0.2, R - 0.4): more deep elements, so a
larger share of the loss on the deep depths), ``mask_mean`` (``mask_hidden`` starts at the mean of
the training auxiliary states instead of a std-1 normal), ``overfit`` (8 sequences only: can the
deep depths be learned at all?), ``vocabN`` (a draft vocabulary of N tokens), ``frozen_head`` (the
lm_head stays at the target's rows), ``depthsN`` (N COD depths, not the default 3: a draft
trains the depths decoding at K = N reads, and no others), ``random_init`` (the draft's layers start at random, not as
the target's: ``TrainConfig.init``), ``target_layerN`` (they start as the target's layers from N on,
not from the last auxiliary layer: ``recipe.start_from_target_layers``); ``a+b`` combines
variants. The figure of merit is the estimated acceptance length at K = 5, 1 + sum over k = 1..5 of
the product of the held-out accuracies of depths 0..k-1, next to the accuracies themselves. The
accuracies are measured over the draft vocabulary; ``--loop-k K ...`` also decodes the held-out
prompts through the speculative loop (batch 1, greedy, ``--loop-tokens`` new tokens, the draft as
``train`` evaluates it) and reports the acceptance length and per-position acceptance at each K,
over the target's whole vocabulary.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from peagle_ext.draft import recipe  # noqa: E402
from peagle_ext.draft.data_engine import HELD_OUT_PROMPTS, SampleCache, generate_samples  # noqa: E402
from peagle_ext.draft.hf import chat_template_ids, load_transformers_target  # noqa: E402
from peagle_ext.draft.speculative import TransformersTarget, draft_for_decoding, measure  # noqa: E402


def estimated_acceptance(accuracy, k=5):
    """1 + the expected accepted proposals when depth d is right with probability accuracy[d]."""
    total, product = 1.0, 1.0
    for depth in range(k):
        rate = accuracy[depth] if depth < len(accuracy) else math.nan
        product *= 0.0 if math.isnan(rate) else rate
        total += product
    return total


def variant_config(base: recipe.TrainConfig, name: str) -> recipe.TrainConfig:
    if "+" in name:  # a combination: each part in turn
        for part in name.split("+"):
            base = variant_config(base, part)
        return base
    if name == "random_init" or name.startswith("target_layer"):  # target_layerN: copied after make_draft
        return dataclasses.replace(base, init="random")
    if name.startswith("lr"):
        return dataclasses.replace(base, lr=float(name[2:]))
    if name.startswith("layers"):
        return dataclasses.replace(base, layers=int(name[6:]))
    if name.startswith("depths"):
        return dataclasses.replace(base, depths=int(name[6:]))
    if name.startswith("vocab"):
        return dataclasses.replace(base, draft_vocab=int(name[5:]))
    if name.startswith("ratio"):
        ratio = float(name[5:])
        return dataclasses.replace(base, down_sample_ratio=ratio, down_sample_ratio_min=max(0.2, ratio - 0.4))
    return base


def draw(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for row in rows:
        for axis, key in zip(axes, ("held_out_accuracy", "train_accuracy")):
            axis.plot(range(len(row[key])), row[key], marker="o", label=f"{row['variant']} ({row['steps']} steps)")
    for axis, title in zip(axes, ("held-out sequences", "training sequences")):
        axis.set_title(f"teacher-forced accuracy per depth, {title}", fontsize=9)
        axis.set_xlabel("COD depth")
        axis.grid(alpha=0.3)
        axis.set_ylim(0, 1)
    axes[1].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--target", required=True)
    parser.add_argument("--gguf-file", default=None)
    parser.add_argument("--data", required=True, help="the --out of a train run (its data/ is read)")
    parser.add_argument("--seconds", type=float, default=180.0, help="training time per variant")
    parser.add_argument("--variants", nargs="+", default=["base"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--loop-k", type=int, nargs="+", default=[], metavar="K",
                        help="also decode the held-out prompts through the speculative loop at these K")
    parser.add_argument("--loop-tokens", type=int, default=48, help="new tokens per prompt in the loop")
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot", default=None)
    parser.add_argument("--replot", nargs="+", metavar="JSON", default=None,
                        help="only draw --plot from the rows of earlier --json files")
    args = parser.parse_args()
    if args.replot:
        rows = [row for path in args.replot for row in json.load(open(path))]
        draw(rows, args.plot)
        return 0
    torch.set_num_threads(args.threads)
    model, tokenizer = load_transformers_target(args.target, args.gguf_file)
    layers = model.config.num_hidden_layers
    layer_ids = [2, layers // 2, layers - 3]
    with open(os.path.join(args.data, "data", "meta.json")) as handle:
        meta = json.load(handle)
    samples = SampleCache(os.path.join(args.data, "data"), meta).load()
    held_meta = {**meta, "held_out": True}
    held_cache = SampleCache(os.path.join(args.data, "heldout"), held_meta)
    held = held_cache.load()
    if not held:
        data_model = copy.deepcopy(model).to(getattr(torch, meta.get("data_dtype", "float32")))
        for batch in generate_samples(data_model, tokenizer, HELD_OUT_PROMPTS, layer_ids,
                                      max_tokens=meta["response_tokens"], batch_size=len(HELD_OUT_PROMPTS)):
            held_cache.save(batch)
            held += batch
    print(f"{len(samples)} training sequences ({sum(len(s.response_ids) for s in samples)} response tokens), "
          f"{len(held)} held-out sequences", flush=True)
    base = recipe.TrainConfig(target=args.target, out=args.data, budget_minutes=1.0)
    prompts = [chat_template_ids(tokenizer, [{"role": "user", "content": m}]) for m in HELD_OUT_PROMPTS]
    target = TransformersTarget(model, layer_ids, tokenizer.pad_token_id or 0) if args.loop_k else None
    rows = []
    for name in args.variants:
        config = variant_config(base, name)
        train_set = samples[:8] if "overfit" in name.split("+") else samples
        vocab, _ = recipe.draft_vocabulary(samples, model.config.vocab_size, config.draft_vocab)
        draft = recipe.make_draft(model, config, vocab, layer_ids, "target")
        for part in name.split("+"):
            if part.startswith("target_layer"):
                recipe.start_from_target_layers(draft, model, int(part[len("target_layer"):]))
        if "frozen_head" in name.split("+"):
            draft.lm_head.weight.requires_grad_(False)
        if "mask_mean" in name.split("+"):
            with torch.no_grad():
                mean = torch.cat([s.aux.float() for s in samples[:256]]).mean(0)
                draft.mask_hidden.copy_(mean.view(1, 1, -1))
        started = time.monotonic()
        figures = recipe.train_draft(draft, model, train_set, config, started + args.seconds)
        held_accuracy = recipe.depth_accuracy(draft, model, held, config)
        train_accuracy = recipe.depth_accuracy(draft, model, train_set[:16], config)
        row = {"variant": name, "steps": figures["training_steps"], "epochs": figures["epochs"],
               "loss": figures["final_loss"], "held_out_accuracy": held_accuracy, "train_accuracy": train_accuracy,
               "estimated_acceptance_k5": estimated_acceptance(held_accuracy, 5)}
        decoding = draft_for_decoding(draft, config.draft_dtype) if args.loop_k else None
        for k in args.loop_k:
            report = measure(target, decoding, prompts, k, args.loop_tokens, batch_size=1,
                             eos_token_id=tokenizer.eos_token_id, baseline=False)
            row[f"loop_K={k}"] = {"acceptance_length": report["acceptance_length"],
                                  "conditional_acceptance": report["conditional_acceptance"]}
            print(f"  loop, K={k}: acceptance length {report['acceptance_length']:.3f}, per position "
                  + " ".join(f"{a:.2f}" for a in report["conditional_acceptance"]), flush=True)
        rows.append(row)
        print(f"{name:<10} {row['steps']:>5} steps ({row['epochs']:.1f} epochs) loss {row['loss']:.3f}  est. acc. "
              f"length K=5 {row['estimated_acceptance_k5']:.2f}\n  held-out per depth "
              + " ".join(f"{a:.2f}" for a in held_accuracy) + "\n  training per depth "
              + " ".join(f"{a:.2f}" for a in train_accuracy), flush=True)
        if args.json:
            with open(args.json, "w") as handle:
                json.dump(rows, handle, indent=1)
    if args.plot:
        draw(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
