"""Speculative decoding: lossless under greedy verification (the output is the target's own greedy
decode, token for token), the target's distribution kept under rejection sampling, the cached
draft forward equal to forward_peagle, and a trained draft accepting far more than a random one."""

from __future__ import annotations

import math

import pytest
import torch

from peagle_ext.cli.train_demo import main as train_demo
from peagle_ext.draft import speculative
from peagle_ext.draft.llama import Eagle3DraftConfig, LlamaEagle3DraftModel
from peagle_ext.draft.speculative import (
    DraftCache,
    TokenwiseTarget,
    TransformersTarget,
    draft_forward,
    draft_slots,
    speculative_generate,
    target_generate,
)
from peagle_ext.draft.speculative.measure import agreement_text
from peagle_ext.draft.tiny_target import demo_acceptance, demo_target

from draft_helpers import single_thread, tiny_model  # noqa: F401 (autouse fixture)

VOCAB = 64
PROMPTS = [[1, 2, 3], [5], [7, 8, 9, 10, 11, 12], [40, 41]]


def as_eagle3(draft: LlamaEagle3DraftModel) -> LlamaEagle3DraftModel:
    """The same weights as a sequential EAGLE-3 draft (no mask_hidden)."""
    config = Eagle3DraftConfig(**{**draft.config.to_dict(), "parallel_drafting": False})
    eagle3 = LlamaEagle3DraftModel(config)
    eagle3.load_state_dict({k: v for k, v in draft.state_dict().items() if k != "mask_hidden"})
    return eagle3.eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A P-EAGLE draft trained by train-demo (4 depths) against the demo's target of VOCAB tokens."""
    out = tmp_path_factory.mktemp("demo") / "draft"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    assert train_demo(["--steps", "150", "--vocab", str(VOCAB), "--device", "cpu", "--out", str(out)]) == 0
    torch.set_num_threads(threads)
    return LlamaEagle3DraftModel.from_pretrained(out).eval()


def random_draft(parallel: bool, draft_vocab: int = VOCAB, layers: int = 2, target_hidden: int = 32, **options):
    torch.manual_seed(3)
    config = Eagle3DraftConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                               num_hidden_layers=layers, vocab_size=VOCAB if "vocab_size" not in options
                               else options.pop("vocab_size"), draft_vocab_size=draft_vocab,
                               target_hidden_size=target_hidden, parallel_drafting=parallel, num_depths=4,
                               max_position_embeddings=256, **options)
    return LlamaEagle3DraftModel(config).eval()


def tokenwise_greedy(module, prompt, count):
    """The target's own greedy decode: each next token the argmax over the whole sequence so far."""
    sequence, out = list(prompt), []
    for _ in range(count):
        token = int(module(torch.tensor(sequence))[1][-1].argmax())
        sequence.append(token)
        out.append(token)
    return out


# --- the draft's cached forward --------------------------------------------------------------


@pytest.mark.parametrize("options", [{}, {"norm_output": True, "norm_before_residual": True, "fc_norm": True}],
                         ids=["plain", "norms"])
def test_cached_draft_forward_equals_forward_peagle(options):
    """Two rows of different lengths (left padding), a prefill chunk, then a chunk with a rejected
    hole and K - 1 masked slots: every slot's state equals forward_peagle's over that row's COD
    elements (context at depth 0, the masked slots as one chain from the bonus slot)."""
    torch.manual_seed(0)
    draft = tiny_model(0, **options).eval()
    hidden_size, K = draft.config.hidden_size, 4
    lengths, width = [9, 6], 9
    ids = torch.randint(draft.config.vocab_size - 1, (2, width))
    aux = torch.randn(2, width, draft.config.num_aux_hidden_states * draft.config.target_hidden_size)
    valid = torch.arange(width).view(1, -1) >= torch.tensor([width - n for n in lengths]).view(-1, 1)
    positions = (valid.cumsum(1) - 1).clamp(min=0)
    cache = DraftCache(len(draft.model.layers))
    split = 5
    with torch.no_grad():
        projected = draft.project_hidden_states(aux)
        # chunk 1: the first `split` columns as context (the token after each is known)
        first = draft_slots(ids[:, :split], positions[:, :split], projected[:, :split], valid[:, :split],
                            torch.full((2,), split - 1), ids[:, split], 0)
        out1 = draft_forward(draft, first, cache)
        # chunk 2: the rest, the last column rejected (a hole), then K - 1 masked slots
        last = torch.full((2,), width - split - 2)
        bonus = torch.tensor([17, 23])
        second = draft_slots(ids[:, split:], positions[:, split:], projected[:, split:], valid[:, split:], last, bonus,
                             K - 1, draft.config.mask_token_id, draft.masked_projected_hidden()[0])
        out2 = draft_forward(draft, second, cache)
    assert not second.valid[:, width - split - 1].any() and second.valid[:, -(K - 1):].all()
    for row in range(2):
        slots = [(first, out1), (second, out2)]
        tokens = torch.cat([s.input_ids[row][s.valid[row]] for s, _ in slots])
        states = torch.cat([o[row][s.valid[row]] for s, o in slots])
        hidden = torch.cat([s.hidden[row][s.valid[row]] for s, _ in slots])
        pos = torch.cat([s.positions[row][s.valid[row]] for s, _ in slots])
        context = len(tokens) - (K - 1)
        anchor = torch.cat([torch.arange(context), torch.full((K - 1,), context - 1)])
        depth = torch.cat([torch.zeros(context, dtype=torch.int64), torch.arange(1, K)])
        assert torch.equal(pos, anchor + depth)
        mask = draft.build_peagle_block_mask(anchor, depth, torch.tensor([context]), context)
        with torch.no_grad():
            expected = draft.forward_peagle(tokens.view(1, -1), hidden.view(1, -1, hidden_size), pos.view(1, -1), mask)
        torch.testing.assert_close(states, expected[0], atol=1e-5, rtol=1e-5)


def test_draft_slots_need_mask_hidden_for_masked_slots():
    ids = torch.zeros(1, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match="mask_hidden"):
        draft_slots(ids, ids, torch.zeros(1, 3, 4), ids == 0, torch.tensor([2]), torch.tensor([1]), 2)


# --- lossless under greedy verification -------------------------------------------------------


@pytest.mark.parametrize("K", [1, 3, 6])
@pytest.mark.parametrize("kind", ["peagle-trained", "eagle3-trained", "peagle-random", "eagle3-random-vocab"])
def test_greedy_equals_the_tiny_targets_greedy_decode(trained, kind, K):
    target = demo_target(VOCAB)
    if kind == "peagle-trained":
        draft = trained
    elif kind == "eagle3-trained":
        draft = as_eagle3(trained)
    elif kind == "peagle-random":
        draft = random_draft(True)
    else:
        draft = random_draft(False, draft_vocab=40)
        draft.set_draft_vocab(torch.randperm(VOCAB)[:40])
    result = speculative_generate(TokenwiseTarget(target), draft, PROMPTS, K, 24)
    for prompt, row in zip(PROMPTS, result.rows):
        assert row.generated_ids == tokenwise_greedy(target, prompt, 24)
        assert row.target_forwards == 1 + len(row.accepted)
        assert row.draft_forwards == len(row.accepted) * (1 if draft.config.parallel_drafting else K)
        assert all(0 <= a <= max(K, result.lookup) for a in row.accepted)
    if kind.endswith("trained"):
        assert result.acceptance_length > 1.5  # proposals were accepted: the accept path ran


def test_trained_draft_accepts_clearly_more_than_an_untrained_one(trained):
    target = demo_target(VOCAB)
    untrained = random_draft(True)
    assert demo_acceptance(trained, target, 4) > demo_acceptance(untrained, target, 4) + 1.0


def tiny_llama(seed=0, vocab=VOCAB):
    transformers = pytest.importorskip("transformers", reason="the transformers target needs transformers")
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = transformers.LlamaForCausalLM(config).eval()
    # grouped keys and values under SDPA: the lossless tests below run the target's grouped attention
    assert model.config._attn_implementation == "sdpa" and config.num_key_value_heads < config.num_attention_heads
    return model


def llama_greedy(model, prompt, count):
    """The model's own greedy decode, recomputing the whole sequence each token (no cache, no EOS)."""
    sequence = list(prompt)
    with torch.no_grad():
        for _ in range(count):
            sequence.append(int(model(torch.tensor([sequence])).logits[0, -1].argmax()))
    return sequence[len(prompt):]


@pytest.fixture(scope="module")
def llama_and_reference():
    model = tiny_llama()
    return model, [llama_greedy(model, prompt, 16) for prompt in PROMPTS]


@pytest.fixture(scope="module")
def llama_draft(llama_and_reference):
    return llama_trained_draft(llama_and_reference[0])


def llama_trained_draft(model):
    """A P-EAGLE draft trained briefly on the Llama's own greedy continuations (its outputs repeat,
    so a few steps teach the draft something)."""
    from peagle_ext.draft.training import eagle_pairs, peagle_training_step

    draft = random_draft(True, layers=1, eagle_aux_hidden_state_layer_ids=[1, 2, 3]).train()
    optimizer = torch.optim.AdamW(draft.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        sequences = [torch.tensor(p + llama_greedy(model, p, 40)) for p in ([3], [9, 4], [20], [33, 1], [50])]
    for step in range(60):
        tokens = sequences[step % len(sequences)]
        with torch.no_grad():
            out = model(tokens.view(1, -1), output_hidden_states=True)
            aux = torch.cat([out.hidden_states[layer][0] for layer in (1, 2, 3)], -1)
        input_ids, aux, logits, _ = eagle_pairs(tokens, aux, out.logits[0])
        optimizer.zero_grad()
        peagle_training_step(draft, input_ids, aux, torch.ones(len(input_ids)), target_logits=logits,
                             generator=generator).loss.backward()
        optimizer.step()
    return draft.eval()


@pytest.mark.parametrize("pack", [None, False])
@pytest.mark.parametrize("K", [1, 3, 5])
@pytest.mark.parametrize("kind", ["peagle-trained", "eagle3-trained", "peagle-random", "eagle3-random"])
def test_greedy_equals_a_transformers_llamas_greedy_decode(llama_and_reference, llama_draft, kind, K, pack):
    """The reference recomputes every sequence with the model's own F.linear; the loop runs with
    oneDNN-packed weights (None: the default where the build has it) and without (False)."""
    model, reference = llama_and_reference
    if "trained" in kind:
        draft = llama_draft if kind.startswith("peagle") else as_eagle3(llama_draft)
    else:
        draft = random_draft(kind.startswith("peagle"), eagle_aux_hidden_state_layer_ids=[1, 2, 3])
    target = TransformersTarget(model, [1, 2, 3], pack_weights=pack)
    result = speculative_generate(target, draft, PROMPTS, K, 16, pack_weights=pack)
    assert [row.generated_ids for row in result.rows] == reference
    if kind == "peagle-trained":
        assert result.acceptance_length > 1.0  # some proposals were accepted: the cache kept holes


@pytest.mark.parametrize("pack", [None, False])
@pytest.mark.parametrize("kind", ["peagle", "eagle3"])
def test_a_bfloat16_draft_beside_a_float32_target_is_lossless(llama_and_reference, llama_draft, kind, pack):
    """The loop hands the float32 target's states to the draft in the draft's dtype; the
    proposals change a little, the output not at all, and the trained draft still gets accepted."""
    model, reference = llama_and_reference
    draft = speculative.draft_for_decoding(llama_draft if kind == "peagle" else as_eagle3(llama_draft), "bfloat16")
    assert draft.model.fc.weight.dtype == torch.bfloat16 and llama_draft.model.fc.weight.dtype == torch.float32
    result = speculative_generate(TransformersTarget(model, [1, 2, 3], pack_weights=pack), draft, PROMPTS, 3, 16,
                                  pack_weights=pack)
    assert [row.generated_ids for row in result.rows] == reference
    if kind == "peagle":
        assert result.acceptance_length > 1.0


@pytest.mark.parametrize("alternatives", [0, 1, 3, VOCAB - 1])
@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("kind", ["peagle-trained", "peagle-random", "eagle3-random"])
def test_alternative_first_tokens_are_lossless_and_taken(llama_and_reference, llama_draft, kind, K, alternatives):
    """Verifying the draft's next-best first tokens as a tree beside its chain: the output stays the
    model's greedy decode, at batch 1 (the cache cropped and rearranged) and in a batch (holes).
    With every other token of the vocabulary as an alternative, the target's first token is always
    verified, so every step accepts at least one token, by an alternative wherever the first
    proposal was wrong."""
    model, reference = llama_and_reference
    if kind == "peagle-trained":
        draft = llama_draft
    else:
        draft = random_draft(kind.startswith("peagle"), eagle_aux_hidden_state_layer_ids=[1, 2, 3])
    taken = 0
    for prompts, expected in [(PROMPTS, reference)] + [([p], [r]) for p, r in zip(PROMPTS, reference)]:
        target = recording_target(model)
        result = speculative_generate(target, draft, prompts, K, 16, alternatives=alternatives)
        assert [row.generated_ids for row in result.rows] == expected
        assert all(1 <= row.target_forwards <= 16 for row in result.rows)
        taken += sum(row.alternatives_taken for row in result.rows)
        if len(prompts) == 1:  # batch 1: the cache holds exactly the committed tokens
            assert all(cached == lengths[0] and holes == 0 for cached, lengths, _, holes in target.record)
        if alternatives == VOCAB - 1:
            assert all(accepted >= 1 for row in result.rows for accepted in row.accepted)
    assert taken == 0 if alternatives == 0 else alternatives < VOCAB - 1 or taken > 0


@pytest.mark.parametrize("lookup", [1, 3, 8])
@pytest.mark.parametrize("alternatives", [0, 2])
@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("kind", ["peagle-trained", "peagle-random", "eagle3-random"])
def test_the_lookup_branch_is_lossless_and_taken(llama_and_reference, llama_draft, kind, K, alternatives, lookup):
    """Verifying a prompt-lookup branch beside the chain (and the alternatives): the output stays
    the model's greedy decode, at batch 1 (the cache cropped to exactly the committed tokens, the
    branch's slots moved after the first token) and in a batch (holes), also with a branch longer
    than the chain. The tiny model's greedy decodes repeat themselves, so the branch is taken, and
    a step that takes it accepts more tokens than the chain could hold where it is longer."""
    model, reference = llama_and_reference
    if kind == "peagle-trained":
        draft = llama_draft
    else:
        draft = random_draft(kind.startswith("peagle"), eagle_aux_hidden_state_layer_ids=[1, 2, 3])
    taken, longest = 0, 0
    for prompts, expected in [(PROMPTS, reference)] + [([p], [r]) for p, r in zip(PROMPTS, reference)]:
        target = recording_target(model)
        result = speculative_generate(target, draft, prompts, K, 16, alternatives=alternatives, lookup=lookup)
        assert [row.generated_ids for row in result.rows] == expected
        taken += sum(row.lookups_taken for row in result.rows)
        longest = max([longest] + [a for row in result.rows for a in row.accepted])
        assert all(max(row.lookups_taken, row.alternatives_taken) <= len(row.accepted) for row in result.rows)
        if len(prompts) == 1:
            assert all(cached == lengths[0] and holes == 0 for cached, lengths, _, holes in target.record)
    assert taken > 0
    assert longest <= max(K, lookup)
    if lookup > K == 1:
        assert longest > K  # only the branch reaches past the chain


@pytest.mark.parametrize("alternatives", [0, 2])
@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("kind", ["peagle-trained", "eagle3-random"])
def test_the_index_branch_is_lossless_and_taken(llama_and_reference, llama_draft, kind, K, alternatives):
    """Verifying a continuation index's branch beside the chain, the alternatives and the lookup
    branches: the output stays the model's greedy decode, at batch 1 (the cache holds exactly the
    committed tokens) and in a batch. An index of the model's own greedy decodes of other prompts
    holds what it says next often enough that the branch is taken."""
    from peagle_ext.draft.speculative.lookup import ContinuationIndex

    model, reference = llama_and_reference
    draft = llama_draft if kind == "peagle-trained" else random_draft(False, eagle_aux_hidden_state_layer_ids=[1, 2, 3])
    others = [[p, p + 1] for p in range(13, 40, 3)]
    index = ContinuationIndex.build([p + llama_greedy(model, p, 16) for p in others])
    index.min_share = 0.0
    taken = 0
    for prompts, expected in [(PROMPTS, reference)] + [([p], [r]) for p, r in zip(PROMPTS, reference)]:
        target = recording_target(model)
        result = speculative_generate(target, draft, prompts, K, 16, alternatives=alternatives, lookup=3, index=index)
        assert [row.generated_ids for row in result.rows] == expected
        taken += sum(row.indexed_taken for row in result.rows)
        assert all(max(a for a in row.accepted) <= max(K, 3) for row in result.rows)
        if len(prompts) == 1:
            assert all(cached == lengths[0] and holes == 0 for cached, lengths, _, holes in target.record)
    assert taken > 0


def test_prompt_lookup_takes_the_latest_occurrence_of_the_longest_suffix():
    from peagle_ext.draft.speculative import prompt_lookup

    context = [1, 2, 3, 9, 9, 2, 3, 7, 8, 5, 2, 3]
    assert prompt_lookup(context, 2) == [7, 8]  # [5, 2, 3] never occurred; [2, 3] latest at 5
    assert prompt_lookup(context, 9) == [7, 8, 5, 2, 3]  # up to the context's end
    assert prompt_lookup([4, 1, 2, 3, 6, 0, 2, 3, 5, 1, 2, 3], 1) == [6]  # [1, 2, 3] before [2, 3]
    assert prompt_lookup([1, 2, 3, 4], 3) == []  # the last token never occurred before
    assert prompt_lookup([5], 3) == [] and prompt_lookup([], 3) == []
    assert prompt_lookup([7, 7, 7], 4) == [7]  # the overlapping occurrence one back


def test_prompt_lookups_give_different_continuations_longer_keys_first():
    from peagle_ext.draft.speculative import prompt_lookups

    context = [7, 2, 3, 1, 8, 3, 9, 2, 3]
    # [2, 3] occurred at 1 (then 1, 8, 3); [3] at 5 (then 9, 2, 3) and at 2 (1, 8, 3 again: no repeat)
    assert prompt_lookups(context, 3, 3) == [[1, 8, 3], [9, 2, 3]]
    assert prompt_lookups(context, 3, 1) == [[1, 8, 3]]
    assert prompt_lookups(context, 2, 5, longest_key=1) == [[9, 2], [1, 8]]
    assert prompt_lookups([1, 2], 3, 2) == []


def test_tree_verify_keeps_the_deepest_accepted_path():
    from peagle_ext.draft.speculative import tree_verify, tree_visibility
    from peagle_ext.draft.speculative.targets import tree_positions

    # [b, x1, x2 | a | l1, l2 after b | m1 after x1]
    parents = [-1, 0, 1, 0, 0, 4, 1]
    assert tree_visibility(parents).int().tolist() == [[1, 0, 0, 0, 0, 0, 0],
                                                       [1, 1, 0, 0, 0, 0, 0],
                                                       [1, 1, 1, 0, 0, 0, 0],
                                                       [1, 0, 0, 1, 0, 0, 0],
                                                       [1, 0, 0, 0, 1, 0, 0],
                                                       [1, 0, 0, 0, 1, 1, 0],
                                                       [1, 1, 0, 0, 0, 0, 1]]
    assert tree_positions(torch.tensor([10]), 7, tree_visibility(parents)).tolist() == [[10, 11, 12, 11, 11, 12, 12]]
    # the target's argmax at each node, and the tokens
    argmax = torch.tensor([[4, 5, 6, 1, 7, 2, 8],   # x1, x2 right: the chain, 2 (l1, l2 tie at 2: the chain wins)
                           [9, 5, 6, 8, 3, 3, 8],   # x1 wrong, a right, l1 wrong: the alternative, 1
                           [8, 5, 6, 1, 9, 2, 8],   # x1 and a wrong, l1 and l2 right: the branch, 2
                           [4, 9, 6, 1, 7, 2, 8]])  # x1 right, x2 wrong, m1 right: 2 through x1
    tokens = torch.tensor([[0, 4, 5, 9, 4, 7, 3],
                           [0, 4, 5, 9, 8, 3, 3],
                           [0, 4, 5, 9, 8, 9, 3],
                           [0, 4, 5, 9, 8, 9, 9]])
    real = torch.ones_like(tokens, dtype=torch.bool)
    logits = torch.nn.functional.one_hot(argmax, 10).float()
    accepted, bonus, node, order = tree_verify(tokens, parents, real, logits)
    assert accepted.tolist() == [2, 1, 2, 2] and node.tolist() == [2, 3, 5, 6]
    assert bonus.tolist() == [6, 8, 2, 8]
    assert order[:, :3].tolist() == [[0, 1, 2], [0, 3, 1], [0, 4, 5], [0, 1, 6]]
    assert all(sorted(row) == list(range(7)) for row in order.tolist())
    # an empty slot (a row's branch shorter than the tree's) is never accepted
    real[2, 5] = False
    accepted, bonus, node, _ = tree_verify(tokens, parents, real, logits)
    assert accepted[2] == 1 and node[2] == 4 and bonus[2] == 9
    with pytest.raises(ValueError, match="parents: node 2 has parent 2"):
        tree_verify(tokens[:, :3], [-1, 0, 2], real[:, :3], logits[:, :3])


def test_the_verification_tree_shares_what_the_chain_holds():
    from peagle_ext.draft.speculative.loop import ALTERNATIVE, CHAIN, LOOKUP, verification_tree

    chain, alternative = torch.tensor([[5, 6, 7]]), torch.tensor([[9]])
    context = [1, 5, 6, 8, 2, 5]  # ends with the step's first token, 5
    # after the first token: [6, 8, 2] (what followed the earlier 5); 6 is the chain's x1, so the
    # branch goes on from it; after x1 ([..., 5, 6]): [8, 2], already there; after 9: nothing
    tokens, parents, real, kinds = verification_tree(chain, alternative, 3, [context])
    assert tokens.tolist() == [[5, 6, 7, 9, 8, 2]] and parents == [-1, 0, 1, 0, 1, 4]
    assert kinds == [CHAIN, CHAIN, CHAIN, ALTERNATIVE, LOOKUP, LOOKUP] and bool(real.all())
    # a second row whose branch starts elsewhere keeps the branch apart; a row that is done holds none
    tokens, parents, real, _ = verification_tree(chain.repeat(3, 1), None, 3, [context, [4, 5, 9, 5], None])
    assert parents == [-1, 0, 1, 0, 3, 4, 1, 6]
    assert tokens[:2, 3:].tolist() == [[6, 8, 2, 8, 2], [9, 5, 0, 0, 0]]
    assert real.tolist() == [[True] * 8, [True] * 5 + [False] * 3, [True] * 3 + [False] * 5]
    assert verification_tree(chain, None, 3, [[1, 2, 5]]) is None  # nothing found: the chain alone
    # two continuations after the first token (5 followed by 3, 4, 5 and earlier by 1, 2, 5)
    tokens, parents, _, kinds = verification_tree(chain, None, 3, [[5, 1, 2, 5, 3, 4, 5]])
    assert tokens.tolist() == [[5, 6, 7, 3, 4, 5, 1, 2, 5]] and parents == [-1, 0, 1, 0, 3, 4, 0, 6, 7]
    assert kinds == [CHAIN] * 3 + [LOOKUP] * 6


def test_the_index_branch_follows_the_first_token_and_shares_the_tree():
    from peagle_ext.draft.speculative.lookup import ContinuationIndex
    from peagle_ext.draft.speculative.loop import CHAIN, INDEXED, LOOKUP, verification_tree

    index = ContinuationIndex.build([[5, 6, 4, 3], [1, 5, 9, 9]], length=3)  # after 5: 6 (tie, the smaller), 4, 3
    index.min_share = 0.0
    chain = torch.tensor([[5, 6, 7]])
    # the context holds no earlier 5: the index's branch alone, through the chain's 6
    tokens, parents, real, kinds = verification_tree(chain, None, 3, [[2, 5]], index)
    assert tokens.tolist() == [[5, 6, 7, 4, 3]] and parents == [-1, 0, 1, 1, 3]
    assert kinds == [CHAIN] * 3 + [INDEXED] * 2 and bool(real.all())
    # the lookup branch (6, 4, 9) comes first; the index's goes through its 6 and 4
    tokens, parents, _, kinds = verification_tree(chain, None, 3, [[5, 6, 4, 9, 5]], index)
    assert tokens.tolist() == [[5, 6, 7, 4, 9, 3]] and parents == [-1, 0, 1, 1, 3, 3]
    assert kinds == [CHAIN] * 3 + [LOOKUP] * 2 + [INDEXED]
    # reach: the index's branch is cut at the lookup branches' reach; a row that is done holds none
    tokens, parents, real, _ = verification_tree(chain.repeat(2, 1), None, 2, [[2, 5], None], index)
    assert tokens[0].tolist() == [5, 6, 7, 4] and real.tolist() == [[True] * 4, [True] * 3 + [False]]


def test_a_tree_forward_equals_the_chains_it_holds(llama_and_reference):
    """One forward over [b, x1, x2, a] with ``a`` reading b alone gives, at each token, the logits
    and states of the chain that leads to it ([b, x1, x2] and [b, a]), a's position that of x1;
    kept as [b, a] (rearranged), the cache then reads on as if [b, a] had been the chain."""
    model, _ = llama_and_reference
    prompts = [[1, 2, 3], [7, 8, 9, 10, 11]]  # left padding in the mask too
    tree = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 1]], dtype=torch.bool)

    def chain(*steps):
        target = TransformersTarget(model, [1, 2, 3])
        target.start(prompts)
        for ids in steps[:-1]:
            target.extend(ids)
            target.commit(torch.ones_like(ids, dtype=torch.bool))
        return target.extend(steps[-1])

    target = TransformersTarget(model, [1, 2, 3])
    target.start(prompts)
    ids = torch.tensor([[4, 5, 6, 30], [12, 13, 14, 31]])
    positions, logits, aux = target.extend(ids, tree)
    assert positions.tolist() == [[3, 4, 5, 4], [5, 6, 7, 6]]
    chain_positions, chain_logits, chain_aux = chain(ids[:, :3])
    branch_positions, branch_logits, branch_aux = chain(ids[:, [0, 3]])
    torch.testing.assert_close(logits[:, :3], chain_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(aux[:, :3], chain_aux, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[:, 3], branch_logits[:, 1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(aux[:, 3], branch_aux[:, 1], atol=1e-5, rtol=1e-5)
    assert positions[:, 3].tolist() == branch_positions[:, 1].tolist()
    # keep [b, a] in row 0, [b] in row 1 (a hole after it)
    keep = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    order = torch.tensor([[0, 3, 1, 2], [0, 1, 2, 3]])
    target.commit(keep, order)
    after = torch.tensor([[20], [21]])
    _, next_logits, next_aux = target.extend(after)
    _, expected_logits, expected_aux = chain(torch.tensor([[4, 30, 20]]).expand(2, -1))
    torch.testing.assert_close(next_logits[0], expected_logits[0, 2:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(next_aux[0], expected_aux[0, 2:], atol=1e-5, rtol=1e-5)
    _, expected_logits, _ = chain(torch.tensor([[4, 21], [12, 21]]))
    torch.testing.assert_close(next_logits[1], expected_logits[1, 1:], atol=1e-5, rtol=1e-5)


def test_a_sliding_window_target_reads_chains_only():
    """A model that masks more than causally (a sliding window) takes no tree: by default its
    decode verifies no alternatives (and stays its greedy decode); asked for one, it is refused."""
    transformers = pytest.importorskip("transformers", reason="the transformers target needs transformers")
    torch.manual_seed(0)
    config = transformers.MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2, sliding_window=4,
                                        max_position_embeddings=256)
    model = transformers.MistralForCausalLM(config).eval()
    target = TransformersTarget(model, [1, 2, 3])
    assert not target.tree_attention
    draft = random_draft(True, eagle_aux_hidden_state_layer_ids=[1, 2, 3])
    result = speculative_generate(target, draft, [PROMPTS[2]], 3, 12)
    assert result.rows[0].generated_ids == llama_greedy(model, PROMPTS[2], 12)
    assert result.rows[0].alternatives_taken == 0 and result.rows[0].lookups_taken == 0
    with pytest.raises(ValueError, match="alternatives: this target reads chains only"):
        speculative_generate(target, draft, [PROMPTS[2]], 3, 12, alternatives=1)
    with pytest.raises(ValueError, match="lookup: this target reads chains only"):
        speculative_generate(target, draft, [PROMPTS[2]], 3, 12, lookup=2)
    with pytest.raises(ValueError, match="visible: this target reads chains only"):
        target.start([PROMPTS[2]])
        target.extend(torch.tensor([[1, 2]]), torch.ones(2, 2, dtype=torch.bool).tril())


def test_draft_for_decoding_picks_the_dtype(llama_draft, monkeypatch):
    assert speculative.draft_for_decoding(llama_draft, "float32") is llama_draft  # already float32: no copy
    half = speculative.draft_for_decoding(llama_draft, "bfloat16")
    assert half is not llama_draft and half.model.fc.weight.dtype == torch.bfloat16
    assert speculative.draft_for_decoding(half, "float32").lm_head.weight.dtype == torch.float32
    monkeypatch.setattr(speculative.draft, "native_bfloat16_cpu", lambda: False)
    assert speculative.draft_for_decoding(llama_draft, "auto") is llama_draft
    monkeypatch.setattr(speculative.draft, "native_bfloat16_cpu", lambda: True)
    assert speculative.draft_for_decoding(llama_draft, "auto").model.fc.weight.dtype == torch.bfloat16
    assert speculative.draft_for_decoding(half, "auto") is half  # auto converts float32 drafts only
    with pytest.raises(ValueError, match="dtype must be one of auto, bfloat16, float32, got 'float16'"):
        speculative.draft_for_decoding(llama_draft, "float16")


@pytest.mark.parametrize("pack", [None, False])
def test_plain_decoding_through_the_target_interface_is_the_greedy_decode(llama_and_reference, pack):
    model, reference = llama_and_reference
    generated, seconds = target_generate(TransformersTarget(model, [1, 2, 3], pack_weights=pack), PROMPTS, 16)
    assert generated == reference and seconds > 0


def test_eos_stops_a_row_and_max_new_tokens_cuts(trained):
    target = demo_target(VOCAB)
    reference = tokenwise_greedy(target, PROMPTS[0], 30)
    eos = reference[7]
    result = speculative_generate(TokenwiseTarget(target), trained, PROMPTS[:1], 4, 30, eos_token_id=eos)
    assert result.rows[0].generated_ids == reference[: reference.index(eos) + 1]
    result = speculative_generate(TokenwiseTarget(target), trained, PROMPTS[:1], 4, 5)
    assert result.rows[0].generated_ids == reference[:5]


class _NextLogits:
    """A target whose next-token logits are the same after any tokens (tokens 5 and 7 given)."""

    def __init__(self, logit_5: float, logit_7: float):
        self.logits = torch.full((1, 1, VOCAB), -10.0)
        self.logits[..., 5], self.logits[..., 7] = logit_5, logit_7
        self.read = []

    def start(self, prompts):
        self.read += prompts
        return None, None, None, self.logits, None


@pytest.mark.parametrize("logit_7, tie", [(20.0 + 2e-6, True), (20.0 + 1e-3, True), (20.0 + 3e-3, False),
                                          (20.5, False), (-10.0, False)])
def test_first_difference_tells_a_tie_of_the_targets_logits_from_a_real_difference(logit_7, tie):
    # within TIE_TOLERANCE (1e-4) of the larger logit's magnitude, 20: a gap of at most 2e-3
    target = _NextLogits(20.0, logit_7)
    found = speculative.first_difference(target, [1, 2], [3, 5, 9], [3, 7, 9])
    assert target.read == [[1, 2, 3]]  # the prompt and the tokens both decodes agree on
    assert found["position"] == 1 and found["speculative_token"] == 5 and found["target_token"] == 7
    assert found["logit_gap"] == pytest.approx(abs(logit_7 - 20.0), abs=1e-5) and found["tie"] is tie


def test_first_difference_where_one_decode_stops_early_is_no_tie():
    target = _NextLogits(20.0, 20.0)
    found = speculative.first_difference(target, [1], [3, 4], [3, 4, 6])
    assert found == {"position": 2, "speculative_token": None, "target_token": 6, "logit_gap": None, "tie": False}
    assert target.read == []


def test_measure_reports_where_outputs_differ_and_whether_at_a_tie(trained, monkeypatch):
    target = TokenwiseTarget(demo_target(VOCAB))
    report = speculative.measure(target, trained, PROMPTS, 3, 12, batch_size=2)
    assert all(p["matches_target"] and "first_difference" not in p for p in report["prompts"])
    assert speculative.output_agreement(report) == (len(PROMPTS), 0, 0)
    # a loop that changed one token of the second prompt's output: a difference, not a tie
    real = speculative.measure.__globals__["speculative_generate"]

    def changed(*args, **kwargs):
        result = real(*args, **kwargs)
        if args[2] == PROMPTS[:2]:
            ids = result.rows[1].generated_ids
            ids[4] = (ids[4] + 1) % VOCAB
        return result

    monkeypatch.setitem(speculative.measure.__globals__, "speculative_generate", changed)
    report = speculative.measure(target, trained, PROMPTS, 3, 12, batch_size=2)
    found = report["prompts"][1]["first_difference"]
    assert not report["prompts"][1]["matches_target"] and found["position"] == 4 and not found["tie"]
    assert speculative.output_agreement(report) == (len(PROMPTS) - 1, 0, 1)
    assert "3/4 equal; 1 differs otherwise" in agreement_text(report)


@pytest.mark.parametrize("bad, message", [
    (dict(num_speculative_tokens=0), "num_speculative_tokens"), (dict(max_new_tokens=True), "max_new_tokens"),
    (dict(temperature=-1.0), "temperature"), (dict(temperature=math.nan), "temperature"),
    (dict(prompts=[[1], []]), "prompts")])
def test_bad_arguments_are_named(trained, bad, message):
    arguments = dict(prompts=PROMPTS, num_speculative_tokens=3, max_new_tokens=4) | bad
    with pytest.raises(ValueError, match=message):
        speculative_generate(TokenwiseTarget(demo_target(VOCAB)), trained, **arguments)


# --- rejection sampling keeps the target's distribution ---------------------------------------


def _chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's test of counts against probabilities, cells expected below 5 pooled."""
    expected = probs * counts.sum()
    small = expected < 5
    observed = torch.cat([counts[~small], counts[small].sum().view(1)])
    expected = torch.cat([expected[~small], expected[small].sum().view(1)])
    statistic = ((observed - expected) ** 2 / expected.clamp(min=1e-12)).sum()
    dof = len(observed) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), statistic.double() / 2))


def _sequence_counts(draft, target, temperature, rows=4000, new=3, seed=0):
    """Counts of the first ``new`` generated tokens (as one index) over ``rows`` decodes of one prompt."""
    generator = torch.Generator().manual_seed(seed)
    result = speculative_generate(TokenwiseTarget(target), draft, [[2, 1]] * rows, 2, new, temperature=temperature,
                                  generator=generator)
    vocab = target.embed.num_embeddings
    index = torch.tensor([sum(t * vocab**i for i, t in enumerate(row.generated_ids)) for row in result.rows])
    return torch.bincount(index, minlength=vocab**new).double(), result


def _exact_sequence_probs(target, temperature, new=3):
    """P(x1..x_new | prompt [2, 1]) from the target's next-token table (it depends on the last token only)."""
    vocab = target.embed.num_embeddings
    with torch.no_grad():
        table = torch.softmax(target(torch.arange(vocab))[1].double() / temperature, -1)
    probs = table[1]
    for step in range(1, new):
        probs = (probs.unsqueeze(-1) * table.view(*(1,) * (step - 1), vocab, vocab)).reshape(*probs.shape, vocab)
    return probs.permute(*reversed(range(new))).reshape(-1)  # index x1 + V x2 + V^2 x3


@pytest.fixture(scope="module")
def sampling_setup():
    torch.manual_seed(5)
    target = type(demo_target(6))(6, 16, sharpness=2.0).eval()
    torch.manual_seed(6)
    config = Eagle3DraftConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                               num_hidden_layers=1, vocab_size=6, draft_vocab_size=5, target_hidden_size=16,
                               parallel_drafting=True, num_depths=2, max_position_embeddings=64)
    draft = LlamaEagle3DraftModel(config).eval()  # a draft vocabulary without token 0: q(0) = 0
    draft.set_draft_vocab(torch.tensor([1, 2, 3, 4, 5]))
    with torch.no_grad():
        draft.lm_head.weight.mul_(20)  # a peaked draft, far from the target
    return target, draft


@pytest.mark.parametrize("method", ["peagle", "eagle3"])
def test_rejection_sampling_keeps_the_target_distribution(sampling_setup, method):
    target, draft = sampling_setup
    draft = draft if method == "peagle" else as_eagle3(draft)
    counts, result = _sequence_counts(draft, target, temperature=0.8)
    accepted = [a for row in result.rows for a in row.accepted]
    assert 0 < sum(accepted) < 2 * len(accepted)  # both acceptances and rejections happened
    assert _chi_square_p_value(counts, _exact_sequence_probs(target, 0.8)) > 1e-3


def test_the_distribution_test_catches_a_wrong_acceptance_rule(sampling_setup, monkeypatch):
    """Accepting every proposal (and drawing the bonus token from p) samples from the draft: the same
    test must reject it."""
    target, draft = sampling_setup

    def accept_all(proposals, draft_probs, draft_vocab, logits, temperature, generator):
        batch, K = proposals.shape
        bonus = torch.multinomial(torch.softmax(logits[:, K] / temperature, -1), 1, generator=generator).view(-1)
        return torch.full((batch,), K), bonus

    monkeypatch.setattr(speculative.loop, "_rejection_verify", accept_all)
    counts, _ = _sequence_counts(draft, target, temperature=0.8)
    assert _chi_square_p_value(counts, _exact_sequence_probs(target, 0.8)) < 1e-6


# --- the target's cache: cropped at batch 1, holes only where a batch needs them ----------------


def test_captured_aux_states_and_logits_equal_output_hidden_states(llama_and_reference):
    """The hooks' auxiliary states (layer ids 0, inner and the last: the final normed output) and
    the logits kept for the new tokens equal a full forward with output_hidden_states."""
    model, _ = llama_and_reference
    layer_ids = [0, 2, model.config.num_hidden_layers]
    target = TransformersTarget(model, layer_ids)
    prompt = [3, 9, 4, 20, 7]
    _, _, _, logits, aux = target.start([prompt[:3]])
    positions, new_logits, new_aux = target.extend(torch.tensor([prompt[3:]]))
    with torch.no_grad():
        full = model(torch.tensor([prompt]), output_hidden_states=True)
    expected = torch.cat([full.hidden_states[layer] for layer in layer_ids], -1)
    torch.testing.assert_close(torch.cat([aux, new_aux], 1), expected, atol=1e-5, rtol=1e-5)
    assert logits.shape == (1, 1, VOCAB)  # the prefill's logits at its last token only
    torch.testing.assert_close(logits[:, 0], full.logits[:, 2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(new_logits, full.logits[:, 3:], atol=1e-5, rtol=1e-5)
    assert positions.tolist() == [[3, 4]]


class RecordingTarget(TransformersTarget):
    """Records, after each commit, the cache length, the committed lengths and whether holes remain."""

    def commit(self, keep, order=None):
        super().commit(keep, order)
        self.record.append((self.cache.get_seq_length(), self.length.tolist(), self.dense, int((~self.mask).sum())))


def recording_target(model):
    target = RecordingTarget(model, [1, 2, 3])
    target.record = []
    return target


@pytest.mark.parametrize("kind", ["peagle", "eagle3"])
def test_batch_1_crops_the_cache_to_the_accepted_tokens(llama_and_reference, llama_draft, kind):
    """At batch 1 the cache holds exactly the committed tokens after every step (no holes), proposals
    were accepted (the crop kept some), and the output is the model's greedy decode."""
    model, reference = llama_and_reference
    draft = llama_draft if kind == "peagle" else as_eagle3(llama_draft)
    accepted = 0
    for prompt, expected in zip(PROMPTS, reference):
        target = recording_target(model)
        result = speculative_generate(target, draft, [prompt], 5, 16)
        assert result.rows[0].generated_ids == expected
        assert all(cached == lengths[0] and dense and holes == 0 for cached, lengths, dense, holes in target.record)
        accepted += sum(result.rows[0].accepted)
    assert accepted > 0


@pytest.mark.parametrize("kind", ["peagle", "eagle3"])
def test_a_batch_keeps_holes_only_where_rows_differ(llama_and_reference, llama_draft, kind):
    """A batch whose rows accept different counts keeps holes (masked out) and still decodes each
    row as the model's greedy decode; the cache never holds more than the longest row needs."""
    model, reference = llama_and_reference
    draft = llama_draft if kind == "peagle" else as_eagle3(llama_draft)
    target = recording_target(model)
    result = speculative_generate(target, draft, PROMPTS, 5, 16)
    assert [row.generated_ids for row in result.rows] == reference
    width = max(len(p) for p in PROMPTS)
    padding = sum(width - len(p) for p in PROMPTS)
    assert any(holes > padding for *_, holes in target.record)
    for cached, lengths, _, _ in target.record:
        assert cached <= width + max(lengths) - min(len(p) for p in PROMPTS)


def test_the_draft_cache_grows_past_its_first_buffer():
    """A prompt longer than the first buffer (64 slots) and many steps: the preallocated cache
    grows, and its forward still equals the one-shot forward over the same slots."""
    torch.manual_seed(1)
    draft = random_draft(True, layers=2)
    width = 150
    ids = torch.randint(VOCAB, (1, width))
    projected = draft.project_hidden_states(torch.randn(1, width, 3 * 32))
    positions, valid = torch.arange(width).view(1, -1), torch.ones(1, width, dtype=torch.bool)
    with torch.no_grad():
        whole = draft_forward(draft, draft_slots(ids, positions, projected, valid, torch.tensor([width - 1]),
                                                 torch.tensor([5]), 0), DraftCache(2))
        cache, parts = DraftCache(2), []
        for begin in range(0, width, 10):
            end = begin + 10
            nxt = ids[:, end] if end < width else torch.tensor([5])
            parts.append(draft_forward(draft, draft_slots(ids[:, begin:end], positions[:, begin:end],
                                                          projected[:, begin:end], valid[:, begin:end],
                                                          torch.tensor([9]), nxt, 0), cache))
    assert cache.length == width and cache.keys[0].shape[2] == width
    torch.testing.assert_close(torch.cat(parts, 1), whole, atol=1e-5, rtol=1e-5)
