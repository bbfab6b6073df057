"""The whole draft recipe behind ``python -m peagle_ext train``: data from the target itself, a
P-EAGLE (or EAGLE-3) draft trained within a time budget, saved in speculators' layout, and its
speculative decoding measured against plain decoding on held-out prompts of another kind.

    from peagle_ext.draft.recipe import TrainConfig, run
    summary = run(TrainConfig(target="DIR", out="OUT", budget_minutes=60))

The budget covers everything from loading the target to the results: after loading, the rest is
split into the data share, the training share and the evaluation share; each phase stops at its
deadline (a phase never borrows from the next). The data (:mod:`peagle_ext.draft.data_engine`) is
cached in ``OUT/data``; a second run over the same ``OUT`` starts from it and adds to it.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field

import torch

from .data_engine import HELD_OUT_PROMPTS, SampleCache, generate_samples, synthesize_instructions
from .hf import chat_template_ids, json_ready, load_transformers_target
from .llama import Eagle3DraftConfig, LlamaEagle3DraftModel
from .speculative.lookup import INDEX_FILE, ContinuationIndex
from .training import eagle_pairs, peagle_training_step

# The least training time that makes a draft worth saving; a smaller share is refused up front.
MIN_TRAIN_SECONDS = 10.0
METHODS = ("peagle", "eagle3")
# how the draft's layers start: as the target's layers after the last auxiliary one, or at random
INITS = ("target", "random")


@dataclass
class TrainConfig:
    """Everything one run reads (the command's options)."""

    target: str
    out: str
    budget_minutes: float
    gguf_file: str | None = None
    method: str = "peagle"  # one of METHODS
    ks: list[int] = field(default_factory=lambda: [1, 3, 5, 7])
    prompts_file: str | None = None
    verifier: str | None = None  # recorded in the checkpoint; default: the target's path
    data_share: float = 0.4  # data volume, more than epochs, is what the draft lacks
    eval_share: float = 0.15
    response_tokens: int = 192
    gen_batch: int = 64
    data_dtype: str = "bfloat16"  # the target's copy that makes the data (bfloat16: about 2x faster on CPU)
    draft_vocab: int = 8192
    layers: int = 1
    init: str = "target"  # one of INITS
    depths: int = 3  # the draft pays at K <= 3 here; deeper depths cost steps that depth 0 needs
    lr: float = 3e-3
    warmup_steps: int = 30
    down_sample_ratio: float = 0.7  # COD: depth d keeps a share max(ratio**d, ratio_min) of the positions
    down_sample_ratio_min: float = 0.2
    bf16_autocast: bool = True  # the training step's matrix products in bfloat16 (weights stay float32)
    step_tokens: int = 512  # tokens (positions) packed into one training step
    eval_tokens: int = 48
    draft_dtype: str = "auto"  # the draft's dtype in the evaluation's decoding (draft_for_decoding)
    max_eval_prompts: int = len(HELD_OUT_PROMPTS)
    prompt_lookup: bool = True
    index: bool = True  # a continuation index of the training responses beside the draft, verified as a branch
    threads: int | None = None
    seed: int = 0

    def shares(self) -> dict[str, float]:
        """Seconds of each phase if loading took none."""
        total = 60 * self.budget_minutes
        train = 1 - self.data_share - self.eval_share
        return {"data": total * self.data_share, "training": total * train, "evaluation": total * self.eval_share}


def check_budget(config: TrainConfig) -> None:
    """A config that cannot run (an unknown method or init, shares that leave no training, a
    budget whose training share cannot train) is refused before any work (ValueError)."""
    for name, allowed in (("method", METHODS), ("init", INITS)):
        if getattr(config, name) not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(config, name)!r}")
    if not 0 < config.data_share < 1 or not 0 < config.eval_share < 1 or config.data_share + config.eval_share >= 1:
        raise ValueError(f"data_share ({config.data_share}) and eval_share ({config.eval_share}) must be in (0, 1) "
                         "and leave a training share")
    training = config.shares()["training"]
    if training < MIN_TRAIN_SECONDS:
        least = MIN_TRAIN_SECONDS / (1 - config.data_share - config.eval_share) / 60
        raise ValueError(f"--budget-minutes {config.budget_minutes:g} leaves {training:.1f} s to train, less than "
                         f"the {MIN_TRAIN_SECONDS:.0f} s a draft needs; give at least {least:.2f}")


# --- progress -----------------------------------------------------------------------------------


class Progress:
    """A tqdm bar on a terminal; elsewhere (a log file, CI) or without tqdm, a line at the start,
    at each quarter and at the end."""

    def __init__(self, total: float, desc: str, unit: str):
        self.total, self.desc, self.unit, self.done, self.quarter = total, desc, unit, 0.0, 0
        self.bar = None
        if sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True)
            except ImportError:  # tqdm is optional (the models extra): lines instead
                pass
        if self.bar is None:
            print(f"{desc}: 0/{total:.0f} {unit}", file=sys.stderr, flush=True)
        self.postfix = ""

    def update(self, done: float, postfix: str = "") -> None:
        self.done, self.postfix = done, postfix
        if self.bar is not None:
            self.bar.n = min(done, self.total)
            self.bar.set_postfix_str(postfix, refresh=True)
            return
        quarter = int(4 * done / self.total) if self.total else 4
        if quarter > self.quarter and quarter < 4:
            self.quarter = quarter
            print(f"{self.desc}: {done:.0f}/{self.total:.0f} {self.unit} {postfix}", file=sys.stderr, flush=True)

    def close(self, summary: str = "") -> None:
        if self.bar is not None:
            self.bar.close()
        print(f"{self.desc}: done, {summary or self.postfix}", file=sys.stderr, flush=True)


# --- data ---------------------------------------------------------------------------------------


def read_prompts_file(path: str) -> list[str]:
    """One user message per non-empty line."""
    with open(path) as handle:
        return [line.strip() for line in handle if line.strip()]


def make_data(model, tokenizer, config: TrainConfig, layer_ids, deadline: float, seeds: list[str]):
    """(samples, figures): the cached samples of ``OUT/data`` plus new ones until ``deadline``:
    seed prompts first, then instructions the target synthesizes, in pools of a few batches. A
    copy of the target in ``config.data_dtype`` makes them (bfloat16 halves the time of a forward
    on CPUs with bfloat16 instructions; the draft is still measured against the float32 target)."""
    meta = {"target": os.path.abspath(config.target), "gguf_file": config.gguf_file, "aux_layer_ids": layer_ids,
            "response_tokens": config.response_tokens}
    meta["data_dtype"] = config.data_dtype
    cache = SampleCache(os.path.join(config.out, "data"), meta)
    if config.data_dtype != "float32":
        model = copy.deepcopy(model).to(getattr(torch, config.data_dtype))
    samples = cache.load()
    cached_tokens = sum(len(s.response_ids) for s in samples)
    done = {s.message for s in samples}
    known = seeds + cache.prompts()
    todo = [m for m in dict.fromkeys(known) if m not in done]
    started = time.monotonic()
    new_tokens = synthesized = 0
    synth_seconds = 0.0
    bar = Progress(deadline - started, "data (s)", "s")
    seed = config.seed + len(cache.shards())  # a resumed run samples other instructions
    while time.monotonic() < deadline:
        if len(todo) < config.gen_batch:
            synth_started = time.monotonic()
            fresh = synthesize_instructions(model, tokenizer, 4 * config.gen_batch, batch_size=2 * config.gen_batch,
                                            seed=seed, deadline=deadline, seen=known)
            synth_seconds += time.monotonic() - synth_started
            seed += 1
            if not fresh and not todo:
                break
            cache.add_prompts(fresh)
            known += fresh
            todo += fresh
            synthesized += len(fresh)
        pool, todo = todo[: 4 * config.gen_batch], todo[4 * config.gen_batch:]
        for batch in generate_samples(model, tokenizer, pool, layer_ids, max_tokens=config.response_tokens,
                                      batch_size=config.gen_batch, deadline=deadline):
            cache.save(batch)
            samples += batch
            new_tokens += sum(len(s.response_ids) for s in batch)
            elapsed = time.monotonic() - started
            bar.update(elapsed, f"{len(samples)} sequences, {new_tokens} new tokens ({new_tokens / elapsed:.0f}/s)")
            done.update(s.message for s in batch)
        todo = [m for m in pool if m not in done] + todo
    seconds = time.monotonic() - started
    bar.close(f"{len(samples)} sequences, {new_tokens} new response tokens in {seconds:.0f} s")
    figures = {"sequences": len(samples), "response_tokens": cached_tokens + new_tokens,
               "cached_response_tokens": cached_tokens, "new_response_tokens": new_tokens,
               "synthesized_prompts": synthesized, "synthesis_seconds": synth_seconds, "data_seconds": seconds,
               "new_tokens_per_second": new_tokens / seconds if seconds else 0.0}
    return samples, figures


def draft_vocabulary(samples, vocab_size: int, size: int):
    """(the ``size`` most frequent response tokens, filled up with the lowest other ids; the share
    of response tokens they cover)."""
    counts = collections.Counter(t for s in samples for t in s.response_ids)
    vocab = [t for t, _ in counts.most_common(size)]
    chosen = set(vocab)
    filler = (t for t in range(vocab_size) if t not in chosen)
    vocab += [next(filler) for _ in range(size - len(vocab))]
    coverage = sum(counts[t] for t in vocab) / max(1, sum(counts.values()))
    return sorted(vocab), coverage


# --- the draft and its training -----------------------------------------------------------------


def make_draft(model, config: TrainConfig, vocab_ids, layer_ids, verifier: str) -> LlamaEagle3DraftModel:
    """A draft shaped like the target's layers (``config.layers`` of them), with the target's
    embeddings (frozen) and its lm_head rows of the draft vocabulary as the starting lm_head; with
    ``config.init`` "target", its layers start as the target's (:func:`start_from_target_layers`)."""
    target = model.config
    rope = getattr(target, "rope_parameters", None) or {"rope_theta": getattr(target, "rope_theta", 10000.0)}
    torch.manual_seed(config.seed)
    parallel = config.method == "peagle"
    draft_config = Eagle3DraftConfig(
        hidden_size=target.hidden_size, intermediate_size=target.intermediate_size,
        num_attention_heads=target.num_attention_heads, num_key_value_heads=target.num_key_value_heads,
        head_dim=getattr(target, "head_dim", None) or target.hidden_size // target.num_attention_heads,
        num_hidden_layers=config.layers, vocab_size=target.vocab_size,
        draft_vocab_size=min(config.draft_vocab, target.vocab_size), target_hidden_size=target.hidden_size,
        rms_norm_eps=target.rms_norm_eps, rope_theta=float(rope.get("rope_theta", 10000.0)),
        max_position_embeddings=target.max_position_embeddings, parallel_drafting=parallel,
        num_depths=config.depths if parallel else 1, eagle_aux_hidden_state_layer_ids=list(layer_ids),
        mask_token_id=target.vocab_size - 1, verifier_name_or_path=verifier)
    draft = LlamaEagle3DraftModel(draft_config)
    if draft.has_vocab_compression:
        draft.set_draft_vocab(torch.tensor(vocab_ids[: draft_config.draft_vocab_size]))
    with torch.no_grad():
        draft.model.embed_tokens.weight.copy_(model.get_input_embeddings().weight)
        draft.lm_head.weight.copy_(model.lm_head.weight[draft.draft_to_target_ids()])
    if config.init == "target":
        start_from_target_layers(draft, model, layer_ids[-1])
    draft.freeze_embeddings()
    return draft


@torch.no_grad()
def start_from_target_layers(draft, model, first_layer: int) -> int:
    """Start the draft's decoder layers as the target's layers ``first_layer``, ``first_layer`` + 1,
    ... (the last one repeated if the draft has more), its final norm as the target's, and its
    ``fc`` as passing the last auxiliary state through unchanged. With the last auxiliary state the
    input of target layer ``first_layer`` (vLLM's capture point), depth 0 starts out computing what
    the target's next layers do with it, in the space the target's lm_head reads; the first layer's
    q/k/v read the hidden half of their ``[embeddings, hidden]`` input as the target's do, and start
    at zero on the embedding half. A weight whose shape differs from the target's (another
    architecture) keeps its random start. Returns the number of tensors copied (0: no layer
    ``first_layer`` in the target, or not a Llama-like one)."""
    source_layers = getattr(getattr(model, "base_model", None), "layers", None)
    if source_layers is None or not 0 <= first_layer < len(source_layers):
        return 0
    copied = 0

    def copy(into: torch.Tensor, source) -> bool:
        nonlocal copied
        if not (isinstance(source, torch.Tensor) and into.shape == source.shape):
            return False
        into.copy_(source)
        copied += 1
        return True

    def weight(module, path: str):
        for name in path.split("."):
            module = getattr(module, name, None)
        return module

    hidden = draft.draft_config.hidden_size
    for index, layer in enumerate(draft.model.layers):
        source = source_layers[min(first_layer + index, len(source_layers) - 1)]
        for name in ("q_proj", "k_proj", "v_proj"):
            into = getattr(layer.self_attn, name).weight
            target_weight = weight(source, f"self_attn.{name}.weight")
            if layer.self_attn.fuse_input and into.shape[1] == 2 * hidden:
                if copy(into[:, hidden:], target_weight):
                    into[:, :hidden] = 0  # the embedding half: learned from zero
            else:
                copy(into, target_weight)
        names = ["self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "post_attention_layernorm"]
        for name in names:
            copy(weight(layer, name).weight, weight(source, f"{name}.weight"))
        norm = layer.hidden_norm if index == 0 and hasattr(layer, "hidden_norm") else layer.input_layernorm
        copy(norm.weight, weight(source, "input_layernorm.weight"))
    if copied:
        copy(draft.model.norm.weight, weight(model.base_model, "norm.weight"))
        fc = draft.model.fc.weight  # [H, num_aux * target_hidden]: the last auxiliary state passes through
        if fc.shape[0] == fc.shape[1] // draft.draft_config.num_aux_hidden_states:
            fc.zero_()
            fc[:, -fc.shape[0]:] = torch.eye(fc.shape[0])
    return copied


def training_pairs(sample):
    """One sequence's EAGLE pairs (token p+1 with the states at p, supervised by the target at p+1;
    the response supervised): (input_ids, aux, last hidden, loss mask), one shorter than the states."""
    tokens = torch.tensor(sample.prompt_ids + sample.response_ids)
    loss_mask = torch.zeros(len(tokens))
    loss_mask[len(sample.prompt_ids):] = 1
    aux, last = sample.aux, sample.last
    # the states stop one short of the last token: pad them, then drop the pair that reads the pad
    input_ids, aux_in, last_in, mask = eagle_pairs(tokens, torch.cat([aux, aux[-1:]]).float(),
                                                   torch.cat([last, last[-1:]]).float(), loss_mask)
    return input_ids[:-1], aux_in[:-1], last_in[:-1], mask[:-1]


def packed_batches(samples, step_tokens: int, generator):
    """Endless packed steps: (input_ids, aux, last, loss_mask, lengths) of whole sequences up to
    ``step_tokens`` positions (at least one sequence), in a fresh random order each epoch."""
    while True:
        order = torch.randperm(len(samples), generator=generator).tolist()
        parts, size = [], 0
        for index in order:
            pairs = training_pairs(samples[index])
            if parts and size + len(pairs[0]) > step_tokens:
                yield _pack(parts)
                parts, size = [], 0
            parts.append(pairs)
            size += len(pairs[0])
        if parts:
            yield _pack(parts)


def _pack(parts):
    input_ids, aux, last, mask = (torch.cat(column) for column in zip(*parts))
    return input_ids, aux, last, mask, torch.tensor([len(part[0]) for part in parts])


def train_draft(draft, model, samples, config: TrainConfig, deadline: float):
    """AdamW steps of :func:`peagle_training_step` over packed sequences until ``deadline``: the
    learning rate warms up over ``warmup_steps``, then follows a cosine to 5% over the time left.
    Returns figures: steps, seconds, epochs, the last steps' loss and per-depth accuracy."""
    generator = torch.Generator().manual_seed(config.seed)
    parameters = [p for p in draft.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.lr)
    batches = packed_batches(samples, config.step_tokens, generator)
    started = time.monotonic()
    total = max(deadline - started, 1e-6)
    draft.train()
    warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight")  # rms_norm under autocast
    step, positions, recent = 0, 0, collections.deque(maxlen=50)
    bar = Progress(total, "training (s)", "s")
    while time.monotonic() < deadline:
        input_ids, aux, last, mask, lengths = next(batches)
        fraction = min(1.0, (time.monotonic() - started) / total)
        scale = min(1.0, (step + 1) / config.warmup_steps) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * fraction)))
        for group in optimizer.param_groups:
            group["lr"] = config.lr * scale
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(input_ids.device.type, dtype=torch.bfloat16, enabled=config.bf16_autocast):
            out = peagle_training_step(draft, input_ids, aux, mask, target_last_hidden=last,
                                       target_lm_head=model.lm_head, lengths=lengths, generator=generator,
                                       down_sample_ratio=config.down_sample_ratio,
                                       down_sample_ratio_min=config.down_sample_ratio_min)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        step += 1
        positions += len(input_ids)
        recent.append((out.loss.item(), out.depth_accuracy))
        loss = sum(r[0] for r in recent) / len(recent)
        bar.update(time.monotonic() - started, f"step {step}, loss {loss:.3f}")
    draft.eval()
    seconds = time.monotonic() - started
    accuracy = torch.nanmean(torch.stack([r[1] for r in recent]), 0).tolist() if recent else []
    loss = sum(r[0] for r in recent) / len(recent) if recent else math.nan
    bar.close(f"{step} steps in {seconds:.0f} s, loss {loss:.3f}")
    total_positions = sum(len(s.prompt_ids) + len(s.response_ids) - 1 for s in samples)
    return {"training_steps": step, "training_seconds": seconds, "epochs": positions / max(1, total_positions),
            "final_loss": loss, "depth_accuracy": accuracy}


@torch.no_grad()
def depth_accuracy(draft, model, samples, config: TrainConfig, seed: int = 1) -> list[float]:
    """Teacher-forced top-1 agreement with the target per COD depth over ``samples`` (every
    supervised position at every depth: no down-sampling)."""
    generator = torch.Generator().manual_seed(seed)
    hits = torch.zeros(draft.draft_config.num_depths)
    counts = torch.zeros_like(hits)
    for sample in samples:
        input_ids, aux, last, mask = training_pairs(sample)
        if not bool(mask.any()):
            continue
        out = peagle_training_step(draft, input_ids, aux, mask, target_last_hidden=last, target_lm_head=model.lm_head,
                                   down_sample_ratio=1.0, down_sample_ratio_min=1.0, generator=generator)
        count = out.depth_count.float()[: len(hits)]
        hits += torch.nan_to_num(out.depth_accuracy[: len(hits)]) * count
        counts += count
    return (hits / counts.clamp(min=1)).where(counts > 0, torch.tensor(math.nan)).tolist()


# --- evaluation ---------------------------------------------------------------------------------


def _transformers_generate(model, prompts, k: int | None, max_new_tokens: int, eos):
    """transformers' own ``generate`` of each prompt (batch 1, greedy), plain (``k`` None) or with
    prompt-lookup decoding of ``k`` tokens: tokens/s."""
    tokens, seconds = 0, 0.0
    lookup = {} if k is None else {"prompt_lookup_num_tokens": k}
    for prompt in prompts:
        ids = torch.tensor([prompt])
        started = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                             eos_token_id=eos, pad_token_id=eos, **lookup)
        seconds += time.perf_counter() - started
        tokens += out.shape[1] - ids.shape[1]
    return tokens / seconds


def evaluate(model, tokenizer, draft, layer_ids, config: TrainConfig, deadline: float, index=None) -> dict:
    """Speculative decoding at batch 1, greedy, for each K of ``config.ks`` against the target's plain
    decoding of the same prompts (timed next to it), and prompt lookup at the middle K; as many
    held-out prompts as the time to ``deadline`` allows (estimated from one plain decode). ``index``:
    a continuation index whose branch the decoding verifies too."""
    from .speculative import TransformersTarget, draft_for_decoding, measure, target_generate

    eos = tokenizer.eos_token_id
    draft = draft_for_decoding(draft, config.draft_dtype)
    prompts = [chat_template_ids(tokenizer, [{"role": "user", "content": m}])
               for m in HELD_OUT_PROMPTS[: config.max_eval_prompts]]
    target = TransformersTarget(model, layer_ids, tokenizer.pad_token_id or 0)
    started = time.monotonic()
    _, one = target_generate(target, prompts[:1], config.eval_tokens, eos)  # also a warm-up
    runs_per_prompt = 2 * len(config.ks) + (2 if config.prompt_lookup else 0)
    affordable = int((deadline - time.monotonic()) / (1.5 * one * runs_per_prompt))
    count = max(1, min(len(prompts), affordable))
    prompts = prompts[:count]
    bar = Progress(len(config.ks) * count, "evaluation (prompt runs)", "runs")
    results = {}
    for at, k in enumerate(config.ks):
        if at and time.monotonic() >= deadline:
            break
        report = measure(target, draft, prompts, k, config.eval_tokens, batch_size=1, eos_token_id=eos, baseline=True,
                         progress=lambda done, at=at: bar.update(at * count + done), index=index)
        report["matches_target"] = all(p.get("matches_target", True) for p in report["prompts"])
        results[f"K={k}"] = report
    lookup = None
    if config.prompt_lookup and time.monotonic() < deadline:
        k = config.ks[len(config.ks) // 2]
        # transformers' generate runs the model's own layers (no packed weights): its prompt lookup is
        # compared with its plain decoding
        lookup = {"num_speculative_tokens": k,
                  "tokens_per_second": _transformers_generate(model, prompts, k, config.eval_tokens, eos),
                  "generate_tokens_per_second": _transformers_generate(model, prompts, None, config.eval_tokens, eos)}
    bar.close(f"{count} held-out prompts in {time.monotonic() - started:.0f} s")
    return {"held_out_prompts": count, "eval_tokens": config.eval_tokens, "results": results, "prompt_lookup": lookup,
            "draft_dtype": next(iter(results.values()))["draft_dtype"],  # every K decoded with the same draft
            "eval_seconds": time.monotonic() - started}


def plot(summary: dict, path: str) -> bool:
    """Acceptance per draft position for each K, and tokens/s against plain decoding; False when
    matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    results = summary["evaluation"]["results"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name, report in results.items():
        rates = [math.nan if r is None else r for r in report["conditional_acceptance"]]
        left.plot(range(1, len(rates) + 1), rates, marker="o",
                  label=f"{name}: acceptance length {report['acceptance_length']:.2f}")
    left.set_xticks(range(1, 1 + max((len(r["conditional_acceptance"]) for r in results.values()), default=1)))
    left.set_xlabel("draft position")
    left.set_ylabel("acceptance given the earlier positions accepted")
    left.set_ylim(0, 1)
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    names, speeds = [], []
    for name, report in results.items():
        names += [f"plain ({name})", f"{summary['method']} {name}"]
        speeds += [report["tokens_per_second"]["target"], report["tokens_per_second"]["speculative"]]
    lookup = summary["evaluation"]["prompt_lookup"]
    if lookup:
        if lookup.get("generate_tokens_per_second"):
            names.append("transformers generate")
            speeds.append(lookup["generate_tokens_per_second"])
        names.append(f"prompt lookup K={lookup['num_speculative_tokens']}")
        speeds.append(lookup["tokens_per_second"])
    colors = ["0.6" if n.startswith("plain") else "C1" if n.startswith(("prompt", "transformers")) else "C0"
              for n in names]
    right.barh(range(len(names)), speeds, color=colors)
    right.set_yticks(range(len(names)), names, fontsize=8)
    right.invert_yaxis()
    right.set_xlabel("tokens/s (batch 1, greedy)")
    right.grid(alpha=0.3, axis="x")
    figure.suptitle(f"{summary['target_name']}: held-out prompts, {summary['training']['training_steps']} steps, "
                    f"{summary['data']['response_tokens']} response tokens", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


# --- the run ------------------------------------------------------------------------------------


def run(config: TrainConfig) -> dict:
    """Load the target, make or reuse data, train, save ``OUT/draft``, evaluate, and write
    ``OUT/results.json`` and ``OUT/results.png``; returns the summary. Raises ValueError when the
    budget cannot train or no training sequence was made."""
    check_budget(config)
    started = time.monotonic()
    end = started + 60 * config.budget_minutes
    if config.threads:
        torch.set_num_threads(config.threads)
    os.makedirs(config.out, exist_ok=True)
    seeds = read_prompts_file(config.prompts_file) if config.prompts_file else []
    print(f"train: loading {os.path.join(config.target, config.gguf_file or '')} ...", file=sys.stderr, flush=True)
    model, tokenizer = load_transformers_target(config.target, config.gguf_file)
    load_seconds = time.monotonic() - started
    layers = model.config.num_hidden_layers
    layer_ids = sorted({min(2, layers - 1), layers // 2, max(0, layers - 3)})
    if len(layer_ids) < 3:  # a target too shallow for three distinct layers reads its first three
        layer_ids = [0, min(1, layers), min(2, layers)]
    print(f"train: target loaded in {load_seconds:.0f} s ({layers} layers, hidden {model.config.hidden_size}, "
          f"vocabulary {model.config.vocab_size}); auxiliary layers {layer_ids}", file=sys.stderr, flush=True)
    rest = end - time.monotonic()
    train_share = 1 - config.data_share - config.eval_share
    if rest * train_share < MIN_TRAIN_SECONDS:
        raise ValueError(f"--budget-minutes {config.budget_minutes:g}: loading the target took {load_seconds:.0f} s, "
                         f"leaving {rest * train_share:.1f} s to train (at least {MIN_TRAIN_SECONDS:.0f} s needed)")
    data_deadline = time.monotonic() + rest * config.data_share
    samples, data = make_data(model, tokenizer, config, layer_ids, data_deadline, seeds)
    if not samples:
        raise ValueError(f"--budget-minutes {config.budget_minutes:g}: no training sequence was made in the data "
                         f"share ({data['data_seconds']:.0f} s); give a larger budget")
    vocab, coverage = draft_vocabulary(samples, model.config.vocab_size, min(config.draft_vocab,
                                                                             model.config.vocab_size))
    data["draft_vocab_coverage"] = coverage
    eval_seconds = (end - started) * config.eval_share
    verifier = config.verifier or os.path.abspath(config.target)
    draft = make_draft(model, config, vocab, layer_ids, verifier)
    training = train_draft(draft, model, samples, config, end - eval_seconds)
    draft_dir = os.path.join(config.out, "draft")
    draft.save_pretrained(draft_dir, verifier=verifier)
    print(f"train: draft saved to {draft_dir}; accuracy per depth (last steps): "
          + " ".join(f"{a:.2f}" for a in training["depth_accuracy"]), file=sys.stderr, flush=True)
    index, index_path = None, os.path.join(draft_dir, INDEX_FILE)
    if config.index:
        index_started = time.monotonic()
        index = ContinuationIndex.build([sample.response_ids for sample in samples])
        index.save(index_path)
        data["index_keys"] = sum(keys.numel() for keys in index.keys)
        data["index_seconds"] = time.monotonic() - index_started
    elif os.path.exists(index_path):  # an earlier run's index does not belong to this draft
        os.remove(index_path)
    evaluation = evaluate(model, tokenizer, draft, layer_ids, config, end, index)
    summary = {
        "target_name": os.path.basename(os.path.normpath(config.target)) + (f"/{config.gguf_file}"
                                                                             if config.gguf_file else ""),
        "method": config.method, "config": dataclasses.asdict(config), "threads": torch.get_num_threads(),
        "aux_layer_ids": layer_ids, "load_seconds": load_seconds, "data": data, "training": training,
        "evaluation": evaluation, "total_seconds": time.monotonic() - started,
    }
    with open(os.path.join(config.out, "results.json"), "w") as handle:
        json.dump(json_ready(summary), handle, indent=1)
    summary["plot"] = plot(summary, os.path.join(config.out, "results.png"))
    return summary


def report_lines(summary: dict) -> list[str]:
    """The run's figures as a few readable lines."""
    from .speculative.measure import agreement_text

    data, training, evaluation = summary["data"], summary["training"], summary["evaluation"]
    lines = [
        f"data: {data['sequences']} sequences, {data['response_tokens']} response tokens "
        f"({data['new_response_tokens']} new in {data['data_seconds']:.0f} s, {data['new_tokens_per_second']:.0f}/s); "
        f"draft vocabulary covers {data['draft_vocab_coverage']:.1%}",
        f"training: {training['training_steps']} steps in {training['training_seconds']:.0f} s "
        f"({training['epochs']:.1f} epochs), loss {training['final_loss']:.3f}, accuracy per depth "
        + " ".join(f"{a:.2f}" for a in training["depth_accuracy"]),
        f"evaluation: {evaluation['held_out_prompts']} held-out prompts, {evaluation['eval_tokens']} new tokens each, "
        f"batch 1, greedy, draft in {evaluation.get('draft_dtype', 'float32')}",
        f"{'K':>3} {'accept len':>10} {'spec tok/s':>10} {'plain tok/s':>11} {'speedup':>8}  acceptance per position",
    ]
    for report in evaluation["results"].values():
        rates = " ".join("-" if r is None or math.isnan(r) else f"{r:.2f}" for r in report["conditional_acceptance"])
        speed = report["tokens_per_second"]
        lines.append(f"{report['num_speculative_tokens']:>3} {report['acceptance_length']:>10.3f} "
                     f"{speed['speculative']:>10.1f} {speed['target']:>11.1f} {report['speedup']:>7.2f}x  {rates}"
                     + ("" if report["matches_target"] else f"  (outputs: {agreement_text(report)})"))
    reports = list(evaluation["results"].values())

    def shares(taken: str) -> str:  # per K, the share of verification steps (target_forwards counts each prefill)
        return ", ".join(f"K = {r['num_speculative_tokens']}: "
                         f"{r[taken] / max(1, r['target_forwards'] - len(r['prompts'])):.1%}" for r in reports)

    if reports and reports[0].get("alternatives"):
        lines.append(f"{reports[0]['alternatives']} alternative first tokens verified per step; steps that took one: "
                     f"{shares('alternatives_taken')}")
    if reports and reports[0].get("lookup"):
        lines.append(f"prompt-lookup branches reaching {reports[0]['lookup']} tokens verified per step; steps that "
                     f"took one: {shares('lookups_taken')}")
    if reports and reports[0].get("index"):
        lines.append(f"the continuation index's branch ({data['index_keys']} keys, {INDEX_FILE} beside the draft) "
                     f"verified per step; steps that ended in it: {shares('indexed_taken')}")
    lookup = evaluation["prompt_lookup"]
    if lookup:
        generate = lookup.get("generate_tokens_per_second")
        lines.append(f"transformers' generate (its own layers, unpacked): {generate:.1f} tokens/s; its prompt lookup, "
                     f"K = {lookup['num_speculative_tokens']}: {lookup['tokens_per_second']:.1f} tokens/s "
                     f"({lookup['tokens_per_second'] / generate:.2f}x)" if generate else
                     f"prompt lookup (transformers), K = {lookup['num_speculative_tokens']}: "
                     f"{lookup['tokens_per_second']:.1f} tokens/s")
    lines.append(f"total {summary['total_seconds']:.0f} s")
    return lines
