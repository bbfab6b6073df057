"""The decoding loop: the draft proposes, the target verifies, the accepted tokens are appended;
and the target's own greedy decode through the same interface, the plain-decoding baseline."""

from __future__ import annotations

import contextlib
import math
import numbers
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from ..._inputs import available_memory_bytes
from .draft import DraftCache, propose
from .lookup import ContinuationIndex, prompt_lookups
from .packed import packed_linears
from .slots import draft_slots
from .verify import greedy_verify as _greedy_verify
from .verify import next_tokens as _next_tokens
from .verify import rejection_verify as _rejection_verify
from .verify import tree_verify, tree_visibility

# A temperature below this decodes greedily: logits divided by it overflow float32 long before 0
# (1e-40 turns softmax into NaN), and the distribution at it is already one token unless the top
# logits tie within ~1e-4.
GREEDY_BELOW_TEMPERATURE = 1e-5


@dataclass
class RowResult:
    """One prompt's outcome: ``generated_ids`` (the new tokens), ``accepted`` (per verification
    step, the tokens accepted before the cut at max_new_tokens, along the chain, an alternative
    first token or a lookup branch), forward counts, and the steps that took an alternative first
    token, ended in a prompt-lookup branch or in the index's branch."""

    generated_ids: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    target_forwards: int = 1
    draft_forwards: int = 0
    alternatives_taken: int = 0
    lookups_taken: int = 0
    indexed_taken: int = 0

    @property
    def acceptance_length(self) -> float:
        """Tokens per verification forward: 1 + the mean number of proposals accepted."""
        return 1 + sum(self.accepted) / len(self.accepted) if self.accepted else math.nan


@dataclass
class SpeculativeResult:
    """The rows, K, the seconds the decode took, and what it verified beside the chain: the
    alternative first tokens and the lookup branches' reach (a step accepts up to the larger of K
    and that reach)."""

    rows: list[RowResult]
    num_speculative_tokens: int
    seconds: float
    alternatives: int = 0
    lookup: int = 0

    @property
    def acceptance_length(self) -> float:
        steps = [a for row in self.rows for a in row.accepted]
        return 1 + sum(steps) / len(steps) if steps else math.nan

    def conditional_acceptance(self, rows: list[RowResult] | None = None) -> list[float]:
        """Per draft position i (1..K): the share of steps that accepted proposal i among those that
        accepted proposals 1..i-1 (NaN where none reached it)."""
        steps = [a for row in (self.rows if rows is None else rows) for a in row.accepted]
        rates = []
        for i in range(1, self.num_speculative_tokens + 1):
            reached = sum(a >= i - 1 for a in steps)
            rates.append(sum(a >= i for a in steps) / reached if reached else math.nan)
        return rates


# Alternative first tokens a greedy decode verifies by default. On SmolLM2-135M's held-out prompts
# (a 60-minute draft; 0 to 3 alternatives in one process, benchmarks/alternatives.py): 2 took the
# target's token in ~18% of the steps and was the fastest at K = 3 and within 0.01x of it at
# K = 1; a third took it in ~3% more and, one more token per forward, lost at K = 3.
DEFAULT_ALTERNATIVES = 2

# How far past a step's first token the prompt-lookup branches reach by default, and how many
# continuations the tree takes after the first token (one more follows the first proposal). On
# SmolLM2-135M's held-out prompts (a 60-minute draft, K = 3 and 5, two alternatives, each variant
# interleaved per prompt with plain decoding): 4, 5 and 6 tokens (with branches after the
# alternatives too) gave 1.94, 1.98 and 1.98 tokens per forward against 1.65 without; the branch
# after the first proposal added 0.06 for ~1 ms a step, a second continuation after the first
# token 0.02, a third 0.005, and branches after the alternatives 0.03 for ~3 ms (slower at every K).
DEFAULT_LOOKUP = 5
LOOKUPS_AFTER_FIRST = 2

# --- input checks -------------------------------------------------------------------------------


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_generation_args(num_speculative_tokens, max_new_tokens, temperature):
    for name, value in (("num_speculative_tokens", num_speculative_tokens), ("max_new_tokens", max_new_tokens)):
        if not _is_int(value) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if isinstance(temperature, bool) or not (isinstance(temperature, numbers.Real) and math.isfinite(temperature)
                                             and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")


def _check_token_id(name: str, value, vocab_size: int | None) -> None:
    if not _is_int(value) or value < 0 or (vocab_size is not None and value >= vocab_size):
        bound = f"[0, {vocab_size})" if vocab_size is not None else ">= 0"
        raise ValueError(f"{name} must be None or an int in {bound} (a token the target can produce), got {value!r}")


def _check_prompts(prompts, vocab_size: int | None) -> list[list[int]]:
    """The prompts as lists of ints, each a non-empty list of token ids in [0, vocab_size)."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be a non-empty list of non-empty token id lists")
    checked = []
    for row, prompt in enumerate(prompts):
        if isinstance(prompt, torch.Tensor):
            if prompt.dim() != 1 or prompt.dtype == torch.bool or prompt.is_floating_point() or prompt.is_complex():
                raise ValueError(f"prompts[{row}] must be a 1-D integer tensor or a list of ints, got a "
                                 f"{prompt.dim()}-D {prompt.dtype} tensor")
            prompt = prompt.tolist()
        elif isinstance(prompt, (str, bytes)) or not isinstance(prompt, (list, tuple)):
            raise ValueError(f"prompts[{row}] must be a list of token ids, got {type(prompt).__name__}")
        if not prompt:
            raise ValueError("prompts must be a non-empty list of non-empty token id lists")
        limit = vocab_size if vocab_size is not None else math.inf
        bad = next((token for token in prompt if not _is_int(token) or not 0 <= token < limit), None)
        if bad is not None:
            raise ValueError(f"prompts[{row}] holds {bad!r}: token ids must be ints in [0, {vocab_size}) "
                             f"(the target's vocabulary)")
        checked.append([int(token) for token in prompt])
    return checked



def _draft_memory(draft, batch: int, prompt_length: int, total_length: int) -> int:
    """Bytes of the draft's largest allocations: its cache (buffers up to twice the sequence) and
    the prefill's attention (the visibility mask and the scores)."""
    config = draft.config
    layers = len(draft.model.layers)
    element = next(draft.parameters()).element_size()
    cache = 2 * 2 * layers * config.num_key_value_heads * config.head_dim * element * batch * total_length
    prefill = batch * prompt_length * prompt_length * (1 + element * config.num_attention_heads)
    return cache + prefill


def positions_needed(prompt_length: int, max_new_tokens: int, num_speculative_tokens: int) -> int:
    """Positions a decode of ``max_new_tokens`` after a prompt of ``prompt_length`` tokens reaches,
    counted from 0, plus one: a step runs while fewer than ``max_new_tokens`` are kept, so the last
    one starts at position ``prompt_length + max_new_tokens - 2`` at the latest and reads K
    positions past it."""
    return prompt_length + max_new_tokens + num_speculative_tokens - 1


def _tree_tokens(name: str, value, default: int, target, temperature) -> int:
    """``value`` of a tree-verification option checked (an int >= 0; > 0 only in greedy decoding
    and with a target that reads a tree), or for None, ``default`` where both allow it, else 0."""
    greedy = temperature < GREEDY_BELOW_TEMPERATURE
    tree = bool(getattr(target, "tree_attention", False))
    if value is None:
        return default if greedy and tree else 0
    if not _is_int(value) or value < 0:
        raise ValueError(f"{name} must be None or an int >= 0, got {value!r}")
    if value and not greedy:
        raise ValueError(f"{name}: the tree beside the chain is verified by greedy decoding's rule; at temperature "
                         f"{temperature} it must be 0 or None")
    if value and not tree:
        raise ValueError(f"{name}: this target reads chains only (no tree_attention); it must be 0 or None")
    return value


def _check_index(index, lookup: int, vocab_size: int | None, target, temperature) -> None:
    if not isinstance(index, ContinuationIndex):
        raise ValueError(f"index must be None or a ContinuationIndex, got {type(index).__name__}")
    _tree_tokens("index", 1, 0, target, temperature)  # greedy decoding and a target that reads trees
    if not lookup:
        raise ValueError("index: its branch reaches as far as the lookup branches, and lookup is 0; give lookup > 0 "
                         "or no index")
    if vocab_size is not None and index.base > vocab_size:
        raise ValueError(f"index: it holds token ids up to {index.base - 1}, past the vocabulary ({vocab_size} "
                         f"tokens): it was built from another tokenizer's sequences")


def first_alternatives(target, draft, temperature, alternatives) -> int:
    """The number of alternative first tokens a decode verifies: ``alternatives`` checked (an int
    >= 0 below the draft's vocabulary; > 0 only in greedy decoding and with a target that reads a
    tree), or for None, ``DEFAULT_ALTERNATIVES`` where both allow it (fewer for a smaller draft
    vocabulary), else 0."""
    if alternatives is None and draft is None:
        return 0
    default = DEFAULT_ALTERNATIVES if draft is None else min(DEFAULT_ALTERNATIVES, draft.config.draft_vocab_size - 1)
    alternatives = _tree_tokens("alternatives", alternatives, default, target, temperature)
    if draft is not None and alternatives >= draft.config.draft_vocab_size:
        raise ValueError(f"alternatives must be below the draft's vocabulary ({draft.config.draft_vocab_size} "
                         f"tokens), got {alternatives}")
    return alternatives


def lookup_tokens(target, temperature, lookup) -> int:
    """How far past a step's first token a decode's prompt-lookup branches reach: ``lookup``
    checked (an int >= 0; > 0 only in greedy decoding and with a target that reads a tree), or for
    None, ``DEFAULT_LOOKUP`` where both allow it, else 0."""
    return _tree_tokens("lookup", lookup, DEFAULT_LOOKUP, target, temperature)


class DecodePlan(NamedTuple):
    """A decode's checked arguments: the prompts as lists of ints, the alternative first tokens
    and the reach of the lookup branches it verifies."""

    prompts: list[list[int]]
    alternatives: int
    lookup: int


def check_decode(target, draft, prompts, num_speculative_tokens, max_new_tokens, temperature,
                 eos_token_id, alternatives=0, lookup=0, index=None) -> list[list[int]]:
    """Every argument of :func:`speculative_generate` checked before any work (a ValueError naming
    it); the prompts as lists of ints."""
    return decode_plan(target, draft, prompts, num_speculative_tokens, max_new_tokens, temperature, eos_token_id,
                       alternatives, lookup, index).prompts


def decode_plan(target, draft, prompts, num_speculative_tokens, max_new_tokens, temperature, eos_token_id,
                alternatives=None, lookup=None, index=None) -> DecodePlan:
    """:func:`check_decode`, with the alternatives and the lookup branches' reach resolved: a
    default reach (``lookup`` None) is shortened to the positions the target and the draft have
    left past the chain's, so that it never refuses a decode that fits without it."""
    _check_generation_args(num_speculative_tokens, max_new_tokens, temperature)
    alternatives = first_alternatives(target, draft, temperature, alternatives)
    default_lookup = lookup is None
    lookup = lookup_tokens(target, temperature, lookup)
    vocab_size = getattr(target, "vocab_size", None)
    draft_vocab = None if draft is None else draft.config.vocab_size
    if vocab_size is None or (draft_vocab is not None and draft_vocab < vocab_size):
        vocab_size = draft_vocab if vocab_size is None else draft_vocab
    prompts = _check_prompts(prompts, vocab_size)
    if index is not None:
        _check_index(index, lookup, vocab_size, target, temperature)
    if eos_token_id is not None:
        _check_token_id("eos_token_id", eos_token_id, vocab_size)
    longest = max(len(p) for p in prompts)
    limits = [("target", getattr(target, "max_positions", None))]
    if draft is not None:
        limits.append(("draft", draft.config.max_position_embeddings))
    if default_lookup and lookup:
        room = min((limit for _, limit in limits if limit is not None), default=None)
        if room is not None:  # the deepest reach that fits: positions_needed(longest, max_new_tokens, reach) <= room
            lookup = max(0, min(lookup, room - longest - max_new_tokens + 1))
    reach = max(num_speculative_tokens, lookup)  # the tree's deepest token past the step's first
    needed = positions_needed(longest, max_new_tokens, reach)
    for who, limit in limits:
        if limit is not None and needed > limit:
            deepest = (f"num_speculative_tokens ({num_speculative_tokens})" if reach == num_speculative_tokens
                       else f"lookup ({lookup})")
            raise ValueError(f"prompts and max_new_tokens: the longest prompt ({longest} tokens) + max_new_tokens "
                             f"({max_new_tokens}) + {deepest} - 1 = {needed} positions, more than the {who}'s "
                             f"max_position_embeddings ({limit})")
    estimate = getattr(target, "memory_estimate", lambda *_: 0)(len(prompts), longest, needed)
    if draft is not None:
        estimate += _draft_memory(draft, len(prompts), longest, needed)
    available = available_memory_bytes(torch.device(getattr(target, "device", "cpu")))
    if estimate > available:
        raise ValueError(f"prompts and max_new_tokens: decoding {len(prompts)} prompts of up to {longest} tokens "
                         f"to {needed} positions needs about {estimate / 2**30:.1f} GiB, more than the "
                         f"{available / 2**30:.1f} GiB available; use fewer or shorter prompts or fewer new tokens")
    return DecodePlan(prompts, alternatives, lookup)


# --- the loop -----------------------------------------------------------------------------------


@torch.no_grad()
def speculative_generate(target, draft, prompts: list[list[int]], num_speculative_tokens: int,
                         max_new_tokens: int, temperature: float = 0.0, generator: torch.Generator | None = None,
                         eos_token_id: int | None = None, pack_weights: bool | None = None,
                         alternatives: int | None = None, lookup: int | None = None,
                         index: ContinuationIndex | None = None) -> SpeculativeResult:
    """Decode ``prompts`` (token id lists) with ``draft`` proposing K = ``num_speculative_tokens``
    tokens per step and ``target`` (a :class:`TransformersTarget` or :class:`TokenwiseTarget`)
    verifying them; up to ``max_new_tokens`` new tokens per prompt, stopping after
    ``eos_token_id`` (None, or a token id of the target's vocabulary). Greedy at temperature 0
    and below ``GREEDY_BELOW_TEMPERATURE`` (1e-5; the output is the target's greedy decode),
    rejection sampling otherwise (``generator`` for the draws). A row that is done stays in the
    batch until all are (its further tokens are dropped). Prompt ids must lie in the target's
    vocabulary, and the longest prompt + max_new_tokens + K - 1 within the target's and the draft's
    position limits and the memory available; a ValueError names what is wrong before any work.
    ``pack_weights``: the draft's linear layers compute with oneDNN-packed weights on the CPU
    (:func:`~peagle_ext.draft.speculative.packed.packed_linears`; None = where this build can).

    ``alternatives``: greedy decoding also verifies the draft's next-best first tokens (after its
    first proposal), as a tree in the same target forward: each alternative reads the step's
    first token only, at the first proposal's position. A row that rejects the first proposal but
    finds the target's token among the alternatives keeps it and the target's token after it.
    None = ``DEFAULT_ALTERNATIVES`` (2) where decoding is greedy and the target reads trees
    (``tree_attention``), else 0.

    ``lookup``: greedy decoding also verifies, in the same forward, prompt-lookup branches reaching
    up to ``lookup`` tokens past the step's first token: what followed earlier occurrences of the
    context's last tokens (:func:`~peagle_ext.draft.speculative.lookup.prompt_lookups`), two
    continuations after the first token and one after the first proposal
    (:func:`verification_tree`). Each row keeps its deepest accepted path through the tree
    (:func:`~peagle_ext.draft.speculative.verify.tree_verify`), so a step may keep up to
    max(K, ``lookup``) tokens. None = ``DEFAULT_LOOKUP`` (5) where decoding is greedy and the
    target reads trees (shorter where the position limits leave less room), else 0.

    ``index``: a :class:`~peagle_ext.draft.speculative.lookup.ContinuationIndex` (greedy decoding,
    ``lookup`` > 0): one more branch after the step's first token, the index's continuation of
    the context's last tokens, as far as the lookup branches reach."""
    prompts, alternatives, lookup = decode_plan(target, draft, prompts, num_speculative_tokens, max_new_tokens,
                                                temperature, eos_token_id, alternatives, lookup, index)
    if temperature < GREEDY_BELOW_TEMPERATURE:
        temperature = 0.0
    K = num_speculative_tokens
    draft_vocab = draft.draft_to_target_ids()
    mask_hidden = draft.masked_projected_hidden()[0] if draft.config.parallel_drafting else None
    # the target's states enter the draft in the draft's dtype (a bfloat16 draft beside a float32 target)
    draft_dtype = draft.model.fc.weight.dtype
    num_masked = K - 1 if draft.config.parallel_drafting else 0

    def choose(logits):  # the draft's picks: argmax, or draws at the same temperature
        return _next_tokens(logits.float(), temperature, generator)

    with packed_linears(draft, pack_weights), _decoding(target):
        started = time.perf_counter()
        ids, positions, valid, logits, aux = target.start(prompts)
        batch, width = ids.shape
        rows = [RowResult() for _ in range(batch)]
        active = torch.ones(batch, dtype=torch.bool)
        last = torch.full((batch,), width - 1, dtype=torch.int64, device=ids.device)
        bonus = _next_tokens(logits[:, -1], temperature, generator)
        _append(rows, active, [[t] for t in bonus.tolist()], max_new_tokens, eos_token_id)
        cache = DraftCache(len(draft.model.layers))
        while bool(active.any()):
            hidden = draft.project_hidden_states(aux.to(draft_dtype))
            slots = draft_slots(ids, positions, hidden, valid, last, bonus, num_masked, draft.config.mask_token_id,
                                mask_hidden)
            chosen, draft_logits, forwards = propose(draft, slots, cache, K, choose)
            proposals = draft_vocab[chosen]
            ids = torch.cat([bonus.view(batch, 1), proposals], dim=1)
            others = order = None
            took_alternative = took_lookup = took_indexed = torch.zeros(batch, dtype=torch.bool, device=ids.device)
            if alternatives:
                first = draft_logits[:, 0].float().scatter(-1, chosen[:, :1], -math.inf)
                others = draft_vocab[first.topk(alternatives, dim=-1).indices]
            tree = None
            if others is not None or lookup:
                # the contexts are copied only where a lookup reads them
                contexts = [prompt + row.generated_ids if a else None
                            for prompt, row, a in zip(prompts, rows, active.tolist())] if lookup else None
                tree = verification_tree(ids, others, lookup, contexts, index)
            if tree is None:
                positions, logits, aux = target.extend(ids)
                if temperature == 0:
                    accepted, bonus = _greedy_verify(proposals, logits)
                else:
                    draft_probs = torch.softmax(draft_logits.float() / temperature, -1)
                    accepted, bonus = _rejection_verify(proposals, draft_probs, draft_vocab, logits, temperature,
                                                        generator)
            else:
                ids, parents, real, kinds = tree
                positions, logits, aux = target.extend(ids, tree_visibility(parents, ids.device))
                accepted, bonus, node, order = tree_verify(ids, parents, real, logits)
                kinds = torch.tensor(kinds, device=ids.device)
                took_alternative = (accepted >= 1) & (kinds[order[:, 1]] == ALTERNATIVE)
                took_lookup, took_indexed = kinds[node] == LOOKUP, kinds[node] == INDEXED
                slot = torch.arange(ids.shape[1], device=ids.device)
                if not bool(((order != slot) & (slot <= accepted.view(-1, 1))).any()):
                    order = None  # every row kept a prefix of the chain
                else:  # each row's kept path in its first slots
                    ids = ids.gather(1, order)
                    positions = positions.gather(1, order)
                    aux = aux.gather(1, order.unsqueeze(-1).expand(-1, -1, aux.shape[-1]))
                # the draft reads the chain's slots, or as many as a row kept from a branch
                reach = max(K + 1, 1 + int(accepted.max()))
                ids, positions, aux = ids[:, :reach], positions[:, :reach], aux[:, :reach]
            keep = torch.arange(logits.shape[1], device=ids.device).view(1, -1) <= accepted.view(-1, 1)
            if order is None:  # nothing rearranged: a target written for chains takes keep alone
                target.commit(keep)
            else:
                target.commit(keep, order)
            valid, last = keep[:, :ids.shape[1]], accepted
            counts = zip(rows, active.tolist(), took_alternative.tolist(), took_lookup.tolist(), took_indexed.tolist())
            for row, is_active, took_one, took_branch, took_indexed_branch in counts:
                if is_active:
                    row.target_forwards += 1
                    row.draft_forwards += forwards
                    row.alternatives_taken += took_one
                    row.lookups_taken += took_branch
                    row.indexed_taken += took_indexed_branch
            accepted_list, id_rows, bonus_list = accepted.tolist(), ids.tolist(), bonus.tolist()
            new_tokens = [id_rows[b][1:1 + accepted_list[b]] + [bonus_list[b]] for b in range(batch)]
            _append(rows, active, new_tokens, max_new_tokens, eos_token_id, accepted_list)
    return SpeculativeResult(rows, K, time.perf_counter() - started, alternatives, lookup)


# the kinds of a verification tree's nodes
CHAIN, ALTERNATIVE, LOOKUP, INDEXED = 0, 1, 2, 3


def verification_tree(chain, alternatives, lookup: int, contexts, index: ContinuationIndex | None = None):
    """A greedy step's tree beside the chain [B, K + 1] (the step's first token, then the K
    proposals): the alternatives [B, N] (or None), each after the first token; then prompt-lookup
    branches (:func:`~.lookup.prompt_lookups` over each row's context, None for a row that is
    done; ``contexts`` may be None where ``lookup`` is 0) reaching ``lookup`` tokens past the
    first token: ``LOOKUPS_AFTER_FIRST`` after the first token and one after the first proposal,
    where some row finds them; with an ``index``, its continuation of each context after the
    first token. A branch's leading tokens
    that a node already holds after the same node (in every row the branch reaches) go through
    that node instead of taking slots of their own. Returns (tokens [B, Q], parents, real [B, Q]:
    False where a row's branch is shorter or missing, kinds: CHAIN, ALTERNATIVE, LOOKUP or INDEXED
    per node), or None where the tree is the chain alone."""
    batch, width = chain.shape
    everywhere = [True] * batch
    # per node: (parent, kind, each row's token, whether each row holds one)
    nodes = [(parent, CHAIN, list(tokens), everywhere) for parent, tokens in enumerate(zip(*chain.tolist()), -1)]
    if alternatives is not None:
        nodes += [(0, ALTERNATIVE, list(tokens), everywhere) for tokens in zip(*alternatives.tolist())]
    if lookup:
        # each context ends with the first token; the first proposal follows it in the second lookup
        after_first = [[] if context is None else prompt_lookups(context, lookup, LOOKUPS_AFTER_FIRST)
                       for context in contexts]
        after_proposal = [[] if context is None else prompt_lookups(context + [nodes[1][2][b]], lookup - 1, 1)
                          for b, context in enumerate(contexts)]
        branches = [(0, LOOKUP, [found[i] if i < len(found) else [] for found in after_first])
                    for i in range(LOOKUPS_AFTER_FIRST)]
        branches.append((1, LOOKUP, [found[0] if found else [] for found in after_proposal]))
        if index is not None:
            branches.append((0, INDEXED, [[] if context is None else index.lookup(context, lookup)
                                          for context in contexts]))
        for anchor, kind, found in branches:
            at = anchor
            for depth in range(max(len(tokens) for tokens in found)):
                real = [depth < len(tokens) for tokens in found]
                tokens = [found[b][depth] if real[b] else 0 for b in range(batch)]
                same = next((node for node, (parent, _, held, holds) in enumerate(nodes) if parent == at and
                             all(not r or (h and t == u) for r, h, t, u in zip(real, holds, tokens, held))), None)
                if same is None:
                    nodes.append((at, kind, tokens, real))
                    same = len(nodes) - 1
                at = same
    if len(nodes) == width:
        return None
    device = chain.device
    tokens = torch.tensor([node[2] for node in nodes], dtype=torch.int64, device=device).T
    real = torch.tensor([node[3] for node in nodes], dtype=torch.bool, device=device).T
    return tokens, [node[0] for node in nodes], real, [node[1] for node in nodes]


def _decoding(target):
    """The target's ``decoding()`` block (set up once for a whole decode) where it has one."""
    decoding = getattr(target, "decoding", None)
    return contextlib.nullcontext() if decoding is None else decoding()


def _append(rows, active, new_tokens, max_new_tokens, eos_token_id, accepted=None):
    """Add each active row's new tokens (new_tokens[b], cut at max_new_tokens and after EOS) and,
    for a verification step, its accepted count; deactivate the rows that are done."""
    for b, row in enumerate(rows):
        if not active[b]:
            continue
        if accepted is not None:
            row.accepted.append(int(accepted[b]))
        for token in new_tokens[b]:
            row.generated_ids.append(int(token))
            if len(row.generated_ids) >= max_new_tokens or token == eos_token_id:
                active[b] = False
                break


@torch.no_grad()
def target_generate(target, prompts: list[list[int]], max_new_tokens: int, eos_token_id: int | None = None):
    """The target's own greedy decode through the same target interface, one token per forward
    (the plain-decoding baseline): (generated ids per prompt, seconds)."""
    prompts = check_decode(target, None, prompts, 1, max_new_tokens, 0.0, eos_token_id)
    with _decoding(target):
        started = time.perf_counter()
        ids, _, _, logits, _ = target.start(prompts)
        token = logits[:, -1].argmax(-1)
        rows = [RowResult() for _ in prompts]
        active = torch.ones(len(prompts), dtype=torch.bool)
        keep = torch.ones_like(token.view(-1, 1), dtype=torch.bool)
        _append(rows, active, [[t] for t in token.tolist()], max_new_tokens, eos_token_id)
        while bool(active.any()):
            _, logits, _ = target.extend(token.view(-1, 1))
            target.commit(keep)
            token = logits[:, -1].argmax(-1)
            _append(rows, active, [[t] for t in token.tolist()], max_new_tokens, eos_token_id)
    return [row.generated_ids for row in rows], time.perf_counter() - started
