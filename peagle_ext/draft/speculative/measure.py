"""Speculative decoding against plain decoding on the same prompts, as a JSON-ready report."""

from __future__ import annotations

import torch

from .loop import SpeculativeResult, _is_int, decode_plan, speculative_generate, target_generate

# Greedy speculative decoding takes the target's argmax at every position, as plain decoding does,
# but reads it from a forward over K + 1 tokens, whose sums round differently from a one-token
# forward's. Where the target's two best logits lie within that rounding of each other, the two
# decodes may take different tokens (and go separate ways from there). A difference is counted as
# such a tie when the two tokens' logits, recomputed by one forward over the prompt and the tokens
# both decodes agree on, differ by at most this share of the larger logit's magnitude (at least 1).
TIE_TOLERANCE = 1e-4


def measure(target, draft, prompts: list[list[int]], num_speculative_tokens: int, max_new_tokens: int, *,
            batch_size: int = 8, temperature: float = 0.0, seed: int = 0, eos_token_id: int | None = None,
            baseline: bool = True, progress=None, alternatives: int | None = None,
            lookup: int | None = None, index=None) -> dict:
    """Speculative decoding of ``prompts`` in batches of ``batch_size``, and (``baseline``) the
    target's plain greedy decoding of the same batches, as a JSON-ready dict: ``method``, ``draft_dtype``
    (the dtype the draft decoded in), ``acceptance_length``
    (tokens per verification forward), ``conditional_acceptance`` (per draft position, the rate of
    acceptance given the positions before it accepted), forward counts, ``tokens_per_second`` of
    both and their ratio ``speedup``, and per prompt ``generated_ids``, ``acceptance_length``,
    ``conditional_acceptance``, forward counts and (greedy, with the baseline)
    ``matches_target``: whether the tokens equal the plain decode's, and where they do not,
    ``first_difference`` (:func:`first_difference`: whether it is a tie of the target's logits).
    ``alternatives``: as in :func:`speculative_generate` (``alternatives``: the number verified;
    ``alternatives_taken``: the steps that took one) and ``lookup`` (``lookup``: the branches'
    reach; ``lookups_taken``: the steps that ended in one) and ``index`` (``index``: whether its
    branch was verified; ``indexed_taken``: the steps that ended in it). ``progress(done)`` is
    called after each batch.
    Before any timing, one short decode of each kind on the first prompt sets up what a first
    decode sets up (the target's packed weights), so neither side pays for it."""
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if not _is_int(seed):
        raise ValueError(f"seed must be an int, got {seed!r}")
    generator = torch.Generator(device=target.device).manual_seed(seed)
    # resolved once for all prompts, so that every batch verifies the same tree
    _, alternatives, lookup = decode_plan(target, draft, prompts, num_speculative_tokens, max_new_tokens, temperature,
                                          eos_token_id, alternatives, lookup, index)
    index = index if lookup else None  # a default reach shortened to nothing leaves no branch to extend
    warm_up = min(2, max_new_tokens)  # within the position bound the decodes themselves are checked against
    speculative_generate(target, draft, prompts[:1], num_speculative_tokens, warm_up, temperature, generator,
                         eos_token_id, alternatives=alternatives, lookup=lookup, index=index)
    if baseline:
        target_generate(target, prompts[:1], warm_up, eos_token_id)
    generator.manual_seed(seed)
    rows, spec_seconds, plain_seconds, plain_ids = [], 0.0, 0.0, []
    for begin in range(0, len(prompts), batch_size):
        batch = prompts[begin:begin + batch_size]
        result = speculative_generate(target, draft, batch, num_speculative_tokens, max_new_tokens, temperature,
                                      generator, eos_token_id, alternatives=alternatives, lookup=lookup, index=index)
        rows += result.rows
        spec_seconds += result.seconds
        if baseline:
            ids, seconds = target_generate(target, batch, max_new_tokens, eos_token_id)
            plain_ids += ids
            plain_seconds += seconds
        if progress is not None:
            progress(min(begin + batch_size, len(prompts)))
    whole = SpeculativeResult(rows, num_speculative_tokens, spec_seconds)
    new_tokens = sum(len(row.generated_ids) for row in rows)
    report = {
        "method": "peagle" if draft.config.parallel_drafting else "eagle3",
        "draft_dtype": str(draft.model.fc.weight.dtype).removeprefix("torch."),
        "num_speculative_tokens": num_speculative_tokens, "temperature": temperature,
        "acceptance_length": whole.acceptance_length,
        "conditional_acceptance": whole.conditional_acceptance(),
        "alternatives": alternatives,
        "alternatives_taken": sum(row.alternatives_taken for row in rows),
        "lookup": lookup,
        "lookups_taken": sum(row.lookups_taken for row in rows),
        "index": index is not None,
        "indexed_taken": sum(row.indexed_taken for row in rows),
        "target_forwards": sum(row.target_forwards for row in rows),
        "draft_forwards": sum(row.draft_forwards for row in rows),
        "new_tokens": new_tokens,
        "tokens_per_second": {"speculative": new_tokens / spec_seconds},
        "prompts": [],
    }
    if baseline:
        report["tokens_per_second"]["target"] = sum(len(ids) for ids in plain_ids) / plain_seconds
        report["speedup"] = report["tokens_per_second"]["speculative"] / report["tokens_per_second"]["target"]
    for index, row in enumerate(rows):
        entry = {"generated_ids": row.generated_ids, "acceptance_length": row.acceptance_length,
                 "conditional_acceptance": whole.conditional_acceptance([row]),
                 "target_forwards": row.target_forwards, "draft_forwards": row.draft_forwards}
        if baseline and temperature == 0:
            entry["matches_target"] = row.generated_ids == plain_ids[index]
            if not entry["matches_target"]:
                entry["first_difference"] = first_difference(target, prompts[index], row.generated_ids,
                                                             plain_ids[index])
        report["prompts"].append(entry)
    return report


@torch.no_grad()
def first_difference(target, prompt: list[int], speculative_ids: list[int], plain_ids: list[int]) -> dict:
    """Where a greedy speculative decode first differs from the plain one: ``position`` (index in
    the new tokens), each decode's token there (None past its end), the target's logits of the two
    tokens recomputed by one forward over ``prompt`` and the agreed tokens (``logit_gap``: their
    difference) and ``tie``: whether the gap lies within rounding (``TIE_TOLERANCE``), the one way
    the two decodes may differ (see above)."""
    position = next((i for i, (a, b) in enumerate(zip(speculative_ids, plain_ids)) if a != b),
                    min(len(speculative_ids), len(plain_ids)))
    tokens = [ids[position] if position < len(ids) else None for ids in (speculative_ids, plain_ids)]
    found = {"position": position, "speculative_token": tokens[0], "target_token": tokens[1], "logit_gap": None,
             "tie": False}
    if None in tokens:  # one decode stopped where the other went on: not a choice between two tokens
        return found
    logits = target.start([[int(t) for t in prompt] + list(plain_ids[:position])])[3][0, -1].float()
    pair = logits[tokens]
    gap = float((pair[0] - pair[1]).abs())
    found["logit_gap"] = gap
    found["tie"] = gap <= TIE_TOLERANCE * max(1.0, float(pair.abs().max()))
    return found


def output_agreement(report: dict) -> tuple[int, int, int]:
    """Of a greedy ``measure`` report's prompts (with its baseline): (outputs equal to the plain
    decode, outputs that differ first at a tie of the target's logits, outputs that differ otherwise)."""
    equal = sum(p["matches_target"] for p in report["prompts"])
    ties = sum(not p["matches_target"] and p.get("first_difference", {}).get("tie", False) for p in report["prompts"])
    return equal, ties, len(report["prompts"]) - equal - ties


def agreement_text(report: dict) -> str:
    """``output_agreement`` in words, e.g. "35/36 equal; 1 differs first at a tie of the target's logits"."""
    equal, ties, other = output_agreement(report)
    text = f"{equal}/{len(report['prompts'])} equal"
    if ties:
        text += f"; {ties} differ{'s' if ties == 1 else ''} first at a tie of the target's logits"
    if other:
        text += f"; {other} differ{'s' if other == 1 else ''} otherwise (a defect)"
    return text
