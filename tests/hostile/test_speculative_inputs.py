"""Careless and hostile arguments to speculative_generate and target_generate: every one refused by a
ValueError naming the argument before any work (no decode starts, no memory is asked for), or given
its documented meaning (a temperature below GREEDY_BELOW_TEMPERATURE decodes greedily)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from peagle_ext.draft.llama import Eagle3DraftConfig, LlamaEagle3DraftModel
from peagle_ext.draft.speculative import (
    GREEDY_BELOW_TEMPERATURE,
    TokenwiseTarget,
    TransformersTarget,
    measure,
    speculative_generate,
    target_generate,
)
from peagle_ext.draft.speculative.lookup import ContinuationIndex
from peagle_ext.draft.tiny_target import demo_target

from draft_helpers import single_thread  # noqa: F401 (autouse fixture)

VOCAB = 32


def draft(max_positions: int = 64, parallel: bool = True) -> LlamaEagle3DraftModel:
    torch.manual_seed(0)
    return LlamaEagle3DraftModel(Eagle3DraftConfig(
        hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1,
        vocab_size=VOCAB, draft_vocab_size=VOCAB, target_hidden_size=32, parallel_drafting=parallel, num_depths=4,
        max_position_embeddings=max_positions)).eval()


class NoStart(TokenwiseTarget):
    """The demo's target, failing the test if a decode starts."""

    def start(self, prompts):
        raise AssertionError("the decode started before the arguments were checked")


@pytest.fixture(scope="module")
def module():
    torch.manual_seed(1)
    return demo_target(VOCAB)


def refused(module, message, target_class=NoStart, **arguments):
    arguments = dict(prompts=[[1, 2, 3]], num_speculative_tokens=3, max_new_tokens=4) | arguments
    the_draft = arguments.pop("draft", None) or draft()
    with pytest.raises(ValueError, match=message):
        speculative_generate(target_class(module), the_draft, **arguments)


@pytest.mark.parametrize("eos", [[36], "36", -1, 1.5, 10**30, True, False, VOCAB, math.nan, torch.tensor([3])])
def test_eos_token_id_must_be_a_token_of_the_vocabulary(module, eos):
    refused(module, "eos_token_id", eos_token_id=eos)


@pytest.mark.parametrize("alternatives", [-1, 1.5, True, "1", VOCAB, 10**30, math.nan, torch.tensor(1)])
def test_alternatives_must_be_a_count_below_the_drafts_vocabulary(module, alternatives):
    refused(module, "alternatives", alternatives=alternatives)


def test_alternatives_are_verified_in_greedy_decoding_only(module):
    refused(module, "alternatives: .* greedy decoding", alternatives=1, temperature=0.7)


@pytest.mark.parametrize("lookup", [-1, 1.5, True, "1", 10**30, math.nan, torch.tensor(1), [3]])
def test_lookup_must_be_a_count_within_the_positions(module, lookup):
    refused(module, "lookup", lookup=lookup)


def test_lookup_is_verified_in_greedy_decoding_only(module):
    refused(module, "lookup: .* greedy decoding", lookup=1, temperature=0.7)


def test_a_lookup_branch_past_the_positions_is_refused_and_the_default_one_shortened(module):
    # 40 + 8 + 20 - 1 = 67 positions, more than the draft's 64
    refused(module, r"\+ lookup \(20\) - 1 = 67 positions, more than the draft's max_position_embeddings \(64\)",
            prompts=[[1] * 40], max_new_tokens=8, lookup=20)
    # at the bound for K = 3 (54 + 8 + 3 - 1 = 64): the default branch is cut to 3 tokens and the decode runs
    result = speculative_generate(TokenwiseTarget(module), draft(), [[1] * 54], 3, 8)
    assert result.lookup == 3 and len(result.rows[0].generated_ids) == 8
    result = speculative_generate(TokenwiseTarget(module), draft(), [[1] * 40], 3, 8)
    assert result.lookup == 5  # room for the whole default


@pytest.mark.parametrize("index, message", [
    ([[1, 2]], "index must be None or a ContinuationIndex, got list"),
    ("continuations.pt", "index must be None or a ContinuationIndex, got str"),
    (ContinuationIndex.build([[1, VOCAB, 2]]), r"index: it holds token ids up to 32, past the vocabulary \(32"),
])
def test_index_must_be_an_index_of_this_vocabulary(module, index, message):
    refused(module, message, index=index)


def test_the_index_branch_needs_greedy_decoding_and_lookup_branches(module):
    index = ContinuationIndex.build([[1, 2, 3, 1, 2]])
    refused(module, "index: .* greedy decoding", index=index, temperature=0.7)
    refused(module, "index: its branch reaches as far as the lookup branches, and lookup is 0", index=index, lookup=0)


@pytest.mark.parametrize("prompts", [
    [[1.0, 2.0]], [[True, 2]], [[1, 2.5]], [["1"]], [[1, -1]], [[1, VOCAB]], [[10**30]], [[1], []], [], "abc",
    [[[1, 2]]], [torch.tensor([1.0, 2.0])], [torch.tensor([True])], [torch.tensor([[1, 2]])], [torch.tensor([VOCAB])],
    [[1], "12"], None, 5])
def test_prompts_must_be_lists_of_token_ids_in_the_vocabulary(module, prompts):
    refused(module, "prompts", prompts=prompts)


@given(st.lists(st.lists(st.one_of(st.integers(), st.floats(allow_nan=True), st.booleans()), max_size=6),
                max_size=3))
def test_any_prompt_list_is_decoded_or_refused_by_name(prompts):
    """Random prompt lists: valid ones decode, every other one is a ValueError naming prompts."""
    torch.manual_seed(1)
    target = TokenwiseTarget(demo_target(VOCAB))
    valid = bool(prompts) and all(p and all(type(t) is int and 0 <= t < VOCAB for t in p) for p in prompts)
    if valid:
        result = speculative_generate(target, draft(), prompts, 2, 3)
        assert all(len(row.generated_ids) == 3 for row in result.rows)
    else:
        with pytest.raises(ValueError, match="prompts"):
            speculative_generate(target, draft(), prompts, 2, 3)


def test_prompt_and_new_tokens_are_bounded_by_the_drafts_positions(module):
    refused(module, r"draft's max_position_embeddings \(64\)", prompts=[[1] * 60], max_new_tokens=8)
    refused(module, r"draft's max_position_embeddings \(64\)", max_new_tokens=10**9)
    refused(module, r"draft's max_position_embeddings \(64\)", prompts=[[1] * 30_000])


def test_prompt_and_new_tokens_are_bounded_by_the_targets_positions():
    transformers = pytest.importorskip("transformers", reason="the transformers target needs transformers")
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    target = TransformersTarget(transformers.LlamaForCausalLM(config).eval(), [1])
    with pytest.raises(ValueError, match=r"target's max_position_embeddings \(32\)"):
        speculative_generate(target, draft(), [[1] * 20], 3, 11)
    with pytest.raises(ValueError, match=r"target's max_position_embeddings \(32\)"):
        target_generate(target, [[1] * 20], 13)


def test_the_position_bound_is_exact():
    """At the bound (longest prompt + max_new_tokens + K - 1 = the limit) the decode runs, and no
    position the target or the draft reads reaches the limit; one token more is refused."""
    transformers = pytest.importorskip("transformers", reason="the transformers target needs transformers")
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    the_draft = draft(max_positions=32)
    seen = []

    def record(module, args, kwargs, output):
        positions = kwargs.get("position_ids", args[1] if len(args) > 1 else None)
        if positions is not None:
            seen.append(int(positions.max()))

    hooks = [model.model.rotary_emb.register_forward_hook(record, with_kwargs=True)]
    hooks += [m.register_forward_hook(record, with_kwargs=True) for m in the_draft.modules()
              if type(m).__name__ == "LlamaRotaryEmbedding"]
    try:
        result = speculative_generate(TransformersTarget(model, [0, 1, 2]), the_draft, [[1] * 20], 3, 10)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(result.rows[0].generated_ids) == 10
    assert seen and max(seen) < 32, max(seen)
    with pytest.raises(ValueError, match=r"max_position_embeddings \(32\)"):
        speculative_generate(TransformersTarget(model, [0, 1, 2]), the_draft, [[1] * 20], 3, 11)


def test_memory_beyond_what_is_available_is_refused_with_the_estimate(module):
    """A draft that takes a million positions and 30,000-token prompts in a batch of 64: the
    prefill's attention alone is terabytes; the message gives the estimate."""
    with pytest.raises(ValueError, match=r"prompts and max_new_tokens: .* needs about [0-9.]+ GiB"):
        speculative_generate(NoStart(demo_target(VOCAB)), draft(10**6), [[1] * 30_000] * 64, 3, 4)


@pytest.mark.parametrize("temperature", [1e-40, 1e-30, 5e-324, GREEDY_BELOW_TEMPERATURE / 2])
@pytest.mark.parametrize("parallel", [True, False], ids=["peagle", "eagle3"])
def test_a_temperature_below_the_bound_decodes_greedily(module, temperature, parallel):
    target = TokenwiseTarget(module)
    prompts = [[1, 2, 3], [4]]
    greedy = speculative_generate(target, draft(parallel=parallel), prompts, 3, 12)
    tiny = speculative_generate(target, draft(parallel=parallel), prompts, 3, 12, temperature=temperature,
                                generator=torch.Generator().manual_seed(0))
    assert [row.generated_ids for row in tiny.rows] == [row.generated_ids for row in greedy.rows]


@pytest.mark.parametrize("temperature", [-1e-40, math.inf, math.nan, True, "0.5", None, [0.5]])
def test_temperature_must_be_a_finite_number_at_least_0(module, temperature):
    refused(module, "temperature", temperature=temperature)


@pytest.mark.parametrize("name, value", [("num_speculative_tokens", 0), ("num_speculative_tokens", 2.0),
                                         ("num_speculative_tokens", True), ("max_new_tokens", -3),
                                         ("max_new_tokens", "4"), ("max_new_tokens", None)])
def test_counts_must_be_positive_ints(module, name, value):
    refused(module, name, **{name: value})


@pytest.mark.parametrize("arguments, message", [
    (dict(prompts=[[1, 2.0]]), "prompts"), (dict(eos_token_id="3"), "eos_token_id"),
    (dict(max_new_tokens=10**9), r"target's max_position_embeddings \(64\)")])
def test_target_generate_checks_the_same(module, arguments, message):
    target = NoStart(module)
    target.max_positions = 64
    with pytest.raises(ValueError, match=message):
        target_generate(target, **(dict(prompts=[[1, 2]], max_new_tokens=3) | arguments))


@pytest.mark.parametrize("name, value", [("batch_size", 0), ("batch_size", 1.5), ("batch_size", True),
                                         ("seed", "0"), ("seed", 1.0)])
def test_measure_checks_its_own_arguments(module, name, value):
    with pytest.raises(ValueError, match=name):
        measure(NoStart(module), draft(), [[1, 2]], 2, 3, **{name: value})
