"""Speculative decoding against plain decoding on the same prompts, as a JSON-ready report."""

from __future__ import annotations

import torch

from .loop import SpeculativeResult, _is_int, speculative_generate, target_generate


def measure(target, draft, prompts: list[list[int]], num_speculative_tokens: int, max_new_tokens: int, *,
            batch_size: int = 8, temperature: float = 0.0, seed: int = 0, eos_token_id: int | None = None,
            baseline: bool = True, progress=None) -> dict:
    """Speculative decoding of ``prompts`` in batches of ``batch_size``, and (``baseline``) the
    target's plain greedy decoding of the same batches, as a JSON-ready dict: ``method``, ``draft_dtype``
    (the dtype the draft decoded in), ``acceptance_length``
    (tokens per verification forward), ``conditional_acceptance`` (per draft position, the rate of
    acceptance given the positions before it accepted), forward counts, ``tokens_per_second`` of
    both and their ratio ``speedup``, and per prompt ``generated_ids``, ``acceptance_length``,
    ``conditional_acceptance``, forward counts and (greedy, with the baseline)
    ``matches_target``: whether the tokens equal the plain decode's. ``progress(done)`` is called
    after each batch."""
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if not _is_int(seed):
        raise ValueError(f"seed must be an int, got {seed!r}")
    generator = torch.Generator(device=target.device).manual_seed(seed)
    rows, spec_seconds, plain_seconds, plain_ids = [], 0.0, 0.0, []
    for begin in range(0, len(prompts), batch_size):
        batch = prompts[begin:begin + batch_size]
        result = speculative_generate(target, draft, batch, num_speculative_tokens, max_new_tokens, temperature,
                                      generator, eos_token_id)
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
        report["prompts"].append(entry)
    return report
