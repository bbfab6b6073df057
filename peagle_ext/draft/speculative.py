"""Speculative decoding with P-EAGLE and EAGLE-3 drafts, in plain PyTorch.

    target = TransformersTarget(hf_model, draft.config.eagle_aux_hidden_state_layer_ids)
    result = speculative_generate(target, draft, prompts, num_speculative_tokens=5, max_new_tokens=64)
    result.acceptance_length, result.rows[0].generated_ids

Each step, the draft proposes K tokens and the target checks them in one forward over
``[last token, K proposals]`` (with its KV cache); the accepted prefix and the target's own next
token are appended, and the auxiliary hidden states of that same forward feed the draft's next
step. A P-EAGLE draft (``parallel_drafting``) proposes the K tokens in one forward; an EAGLE-3
draft runs K forwards, one token each.

The draft's inputs are laid out as vLLM 0.33's proposer lays them out (its
``copy_and_expand_eagle_inputs_kernel`` with shifted input ids, then ``mask_hidden`` on the
masked slots): the slot of target position p holds the token at p + 1 (for the last accepted
position: the target's next token, the "bonus" token) with the target's states at p, projected
by ``fc`` (``combine_hidden_states``), at position p; the K - 1 slots after the bonus slot hold
``mask_token_id`` and the projected ``mask_hidden``, at the positions that follow. The proposals
are the draft's tokens at the bonus slot and at the masked slots, mapped to target ids through
``d2t``. Slots of rejected proposals are holes (kept out of every cache), as vLLM's padding slots
are. An EAGLE-3 draft's later steps read its own previous token and its own output state (the
pre-norm state; the post-norm one with ``norm_output``), one position further, as vLLM's loop.

Verification is greedy (``temperature == 0``: a proposal is accepted when it is the target's
argmax, so the output is the target's own greedy decode) or sampled with the standard rejection
rule (accept proposal x with probability min(1, p(x) / q(x)), else draw from the normalized
max(p - q, 0); a bonus draw from p when all are accepted), which keeps the target's distribution.

Targets: :class:`TransformersTarget` (any transformers causal LM; the auxiliary states are
``output_hidden_states[l]`` for the draft's layer ids l: the input of decoder layer l, which is
what vLLM captures) and :class:`TokenwiseTarget` (a module whose outputs at a position depend on
that position's token alone, such as the demo's tiny target). Several prompts decode as one batch:
each row keeps its own positions, and its holes are masked out of the attention.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# --- the draft: its inputs as vLLM builds them, and a forward with a KV cache -------------------


@dataclass
class DraftSlots:
    """One draft forward's inputs, batch-major: ``input_ids`` [B, Q] (target vocabulary),
    ``hidden`` [B, Q, H] (projected target states or ``mask_hidden``), ``positions`` [B, Q],
    ``valid`` [B, Q] (False: a hole, neither attended to nor kept), ``keep`` [B, Q] (a context slot
    that later forwards attend to; False for the masked and sequential-step slots), and
    ``sample_index`` [B, P]: the slots whose outputs are the P proposals."""

    input_ids: torch.Tensor
    hidden: torch.Tensor
    positions: torch.Tensor
    valid: torch.Tensor
    keep: torch.Tensor
    sample_index: torch.Tensor


def draft_slots(target_ids, target_positions, target_hidden, target_valid, last, next_ids, num_masked: int,
                mask_token_id: int = 0, mask_hidden: torch.Tensor | None = None) -> DraftSlots:
    """The slots of a draft's first forward after a target forward, as vLLM 0.33 lays them out.

    target_ids, target_positions: [B, M], the tokens the target just read and their positions;
    target_hidden: [B, M, H], their states already projected by the draft's ``fc``;
    target_valid: [B, M] (False for padding); last: [B], index of each row's last accepted slot;
    next_ids: [B], the target's next token there. Slot j < last reads ``target_ids[j + 1]``, slot
    ``last`` reads ``next_ids``, slots after it are holes (rejected); then ``num_masked`` slots read
    ``mask_token_id`` and ``mask_hidden`` [H] at positions ``target_positions[last] + 1, + 2, ...``.
    The proposals come from slot ``last`` and the masked slots.
    """
    batch, width = target_ids.shape
    column = torch.arange(width, device=target_ids.device).expand(batch, width)
    last = last.view(batch, 1)
    shifted = torch.cat([target_ids[:, 1:], target_ids[:, -1:]], dim=1)
    ids = torch.where(column == last, next_ids.view(batch, 1), shifted)
    valid = target_valid & (column <= last)
    ids = torch.where(valid, ids, torch.zeros_like(ids))
    hidden, positions, keep = target_hidden, target_positions, valid
    sample_index = last
    if num_masked:
        if mask_hidden is None:
            raise ValueError("num_masked > 0 needs mask_hidden (a P-EAGLE draft's projected mask_hidden)")
        start = target_positions.gather(1, last)
        offsets = torch.arange(1, num_masked + 1, device=target_ids.device)
        ids = torch.cat([ids, torch.full((batch, num_masked), mask_token_id, dtype=ids.dtype, device=ids.device)], 1)
        hidden = torch.cat([hidden, mask_hidden.view(1, 1, -1).to(hidden.dtype).expand(batch, num_masked, -1)], 1)
        positions = torch.cat([positions, start + offsets], 1)
        ones = torch.ones(batch, num_masked, dtype=torch.bool, device=ids.device)
        valid = torch.cat([valid, ones], 1)
        keep = torch.cat([keep, ~ones], 1)
        sample_index = torch.cat([last, width + offsets.view(1, -1).expand(batch, -1) - 1], 1)
    return DraftSlots(ids, hidden, positions, valid, keep, sample_index)


class DraftCache:
    """Per layer, the keys and values of the draft's context slots: [B, kv_heads, T, D] each, and
    which of the T slots are real (``valid`` [B, T])."""

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.valid: torch.Tensor | None = None


def _cached_attention(attn, states, positions, slot_mask, cache: DraftCache, layer: int):
    """One draft attention over [cache, new slots]: new slot i sees the cache's real slots and the
    new real slots j <= i (itself always, so that a hole's row is defined). Appends the new slots'
    keys and values to the cache (``_keep_slots`` then trims them)."""
    batch, width = states.shape[:2]
    q, k, v = attn._project_qkv(states)
    q, k = attn.rotary_emb(q, k, positions)
    causal = torch.ones(width, width, dtype=torch.bool, device=states.device).tril()
    visible = causal & slot_mask.view(batch, 1, width) | torch.eye(width, dtype=torch.bool, device=states.device)
    past_k, past_v = cache.keys[layer], cache.values[layer]
    if past_k is not None:
        visible = torch.cat([cache.valid.view(batch, 1, -1).expand(batch, width, -1), visible], dim=2)
        all_k, all_v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
    else:
        all_k, all_v = k, v
    out = F.scaled_dot_product_attention(q, attn._repeat_kv(all_k), attn._repeat_kv(all_v),
                                         attn_mask=visible.unsqueeze(1), scale=attn.scaling)
    cache.keys[layer], cache.values[layer] = all_k, all_v
    return attn.o_proj(out.transpose(1, 2).reshape(batch, width, -1))


@torch.no_grad()
def draft_forward(model, slots: DraftSlots, cache: DraftCache) -> torch.Tensor:
    """The draft's forward over ``slots`` after the slots in ``cache`` (the same math as
    ``forward_peagle`` over the elements of one chain: every slot sees the earlier real slots).
    Returns the states [B, Q, H] (post-norm with ``norm_output``, as ``forward_peagle``); the
    ``keep`` slots join the cache."""
    layers = model.model.layers
    embeds = model.embed_input_ids(slots.input_ids)
    hidden = slots.hidden
    for index, layer in enumerate(layers):
        if index == 0:
            normed = layer.hidden_norm(hidden)
            attn_input = torch.cat([layer.input_layernorm(embeds), normed], dim=-1)
            residual = normed if layer.norm_before_residual else hidden
        else:
            attn_input, residual = layer.input_layernorm(hidden), hidden
        hidden = residual + _cached_attention(layer.self_attn, attn_input, slots.positions, slots.valid, cache, index)
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    _keep_slots(cache, slots.keep)
    return model.model.norm(hidden) if model.config.norm_output else hidden


def _keep_slots(cache: DraftCache, keep: torch.Tensor) -> None:
    """Mark the forward's last ``keep.shape[1]`` cached slots real where ``keep``; drop the columns
    that no row keeps (the masked and sequential-step slots)."""
    kept_columns = keep.any(dim=0)
    width = keep.shape[1]
    new_valid = keep[:, kept_columns]
    for layer in range(len(cache.keys)):
        old_k, new_k = cache.keys[layer][:, :, :-width], cache.keys[layer][:, :, -width:][:, :, kept_columns]
        old_v, new_v = cache.values[layer][:, :, :-width], cache.values[layer][:, :, -width:][:, :, kept_columns]
        cache.keys[layer], cache.values[layer] = torch.cat([old_k, new_k], 2), torch.cat([old_v, new_v], 2)
    cache.valid = new_valid if cache.valid is None else torch.cat([cache.valid, new_valid], 1)


def propose(model, slots: DraftSlots, cache: DraftCache, num_speculative_tokens: int, choose):
    """The draft's K proposals after a target forward: (draft-vocabulary ids [B, K], the draft's
    logits [B, K, draft_vocab], the number of draft forwards run). ``choose(logits [B, P, Vd])``
    picks draft-vocabulary ids [B, P] (the argmax, or draws).

    A P-EAGLE draft reads ``slots`` with their K - 1 masked slots and proposes from them all in
    one forward; an EAGLE-3 draft (``slots`` without masked slots) proposes its first token, then
    runs K - 1 one-slot forwards, each reading its previous proposal (mapped to the target
    vocabulary) and its own output state, at the next position; those slots are not kept.
    """
    hidden = draft_forward(model, slots, cache)
    picked = hidden.gather(1, slots.sample_index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    logits = [model.compute_logits(picked)]
    chosen = [choose(logits[0])]
    if model.config.parallel_drafting:
        return chosen[0], logits[0], 1
    vocab = model.draft_to_target_ids()
    state = picked[:, -1:]
    positions = slots.positions.gather(1, slots.sample_index[:, -1:])
    batch = state.shape[0]
    ones = torch.ones(batch, 1, dtype=torch.bool, device=state.device)
    index = torch.zeros(batch, 1, dtype=torch.int64, device=state.device)
    for _ in range(num_speculative_tokens - 1):
        positions = positions + 1
        state = draft_forward(model, DraftSlots(vocab[chosen[-1]], state, positions, ones, ~ones, index), cache)
        logits.append(model.compute_logits(state))
        chosen.append(choose(logits[-1]))
    return torch.cat(chosen, dim=1), torch.cat(logits, dim=1), num_speculative_tokens


# --- targets ----------------------------------------------------------------------------------


class TransformersTarget:
    """A transformers causal LM as the target: left-padded prefill, then forwards over new tokens
    with its KV cache; the rejected slots stay in the cache as holes that the attention mask
    hides, and each row keeps its own positions.

    ``aux_layer_ids``: the draft's ``eagle_aux_hidden_state_layer_ids``; the auxiliary states are
    ``hidden_states[l]`` of ``output_hidden_states`` (the input of decoder layer l, vLLM's capture
    point), concatenated in that order.
    """

    def __init__(self, model, aux_layer_ids, pad_token_id: int = 0):
        layers = model.config.num_hidden_layers
        if not aux_layer_ids or any(not 0 <= layer_id <= layers for layer_id in aux_layer_ids):
            raise ValueError(f"aux_layer_ids must be layer ids in [0, {layers}], got {aux_layer_ids}")
        self.model, self.aux_layer_ids, self.pad_token_id = model, list(aux_layer_ids), pad_token_id

    @property
    def device(self):
        return self.model.device

    @torch.no_grad()
    def _forward(self, ids, positions):
        out = self.model(input_ids=ids, attention_mask=self.mask.long(), position_ids=positions,
                         past_key_values=self.cache, use_cache=True, output_hidden_states=True)
        aux = torch.cat([out.hidden_states[layer_id] for layer_id in self.aux_layer_ids], dim=-1)
        return out.logits.float(), aux

    def start(self, prompts: list[list[int]]):
        """Prefill the prompts, left-padded: (ids, positions, valid: [B, M]; logits [B, M, V];
        aux [B, M, A])."""
        from transformers import DynamicCache

        ids, positions, valid = _left_pad(prompts, self.pad_token_id, self.device)
        self.cache, self.mask = DynamicCache(), valid
        self.length = valid.sum(1)
        logits, aux = self._forward(ids, positions)
        return ids, positions, valid, logits, aux

    def extend(self, ids: torch.Tensor):
        """Read ids [B, Q] at each row's next positions: (positions [B, Q], logits [B, Q, V], aux)."""
        positions = self.length.view(-1, 1) + torch.arange(ids.shape[1], device=ids.device)
        self.mask = torch.cat([self.mask, torch.ones_like(ids, dtype=torch.bool)], 1)
        return (positions, *self._forward(ids, positions))

    def commit(self, keep: torch.Tensor) -> None:
        """Of the last ``extend``'s slots, keep [B, Q] (a prefix per row); the others become holes."""
        self.mask[:, -keep.shape[1]:] = keep
        self.length = self.length + keep.sum(1)


class TokenwiseTarget:
    """A target whose outputs at a position depend on that position's token alone (the demo's
    tiny target): ``module(tokens [S]) -> (aux [S, A], logits [S, V])``. No cache is needed."""

    def __init__(self, module):
        self.module = module

    @property
    def device(self):
        return next(self.module.parameters()).device

    @torch.no_grad()
    def _forward(self, ids):
        aux, logits = self.module(ids.reshape(-1))
        return logits.float().view(*ids.shape, -1), aux.view(*ids.shape, -1)

    def start(self, prompts: list[list[int]]):
        ids, positions, valid = _left_pad(prompts, 0, self.device)
        self.length = valid.sum(1)
        return (ids, positions, valid, *self._forward(ids))

    def extend(self, ids: torch.Tensor):
        positions = self.length.view(-1, 1) + torch.arange(ids.shape[1], device=ids.device)
        return (positions, *self._forward(ids))

    def commit(self, keep: torch.Tensor) -> None:
        self.length = self.length + keep.sum(1)


def _left_pad(prompts, pad_token_id: int, device):
    """(ids, positions, valid) [B, M] for token lists, padded on the left (positions from 0)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token id lists")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.int64)
    valid = torch.zeros(len(prompts), width, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.as_tensor(prompt, dtype=torch.int64)
        valid[row, width - len(prompt):] = True
    positions = (valid.cumsum(1) - 1).clamp(min=0)
    return ids.to(device), positions.to(device), valid.to(device)


# --- the loop ---------------------------------------------------------------------------------


@dataclass
class RowResult:
    """One prompt's outcome: ``generated_ids`` (the new tokens), ``accepted`` (per verification
    step, the proposals accepted before the cut at max_new_tokens), forward counts."""

    generated_ids: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    target_forwards: int = 1
    draft_forwards: int = 0

    @property
    def acceptance_length(self) -> float:
        """Tokens per verification forward: 1 + the mean number of proposals accepted."""
        return 1 + sum(self.accepted) / len(self.accepted) if self.accepted else math.nan


@dataclass
class SpeculativeResult:
    rows: list[RowResult]
    num_speculative_tokens: int
    seconds: float

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


def _check_generation_args(num_speculative_tokens, max_new_tokens, temperature):
    for name, value in (("num_speculative_tokens", num_speculative_tokens), ("max_new_tokens", max_new_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")


def _draw(probs: torch.Tensor, generator) -> torch.Tensor:
    """One draw per row of probs [..., V]."""
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])


def _next_tokens(logits, temperature, generator):
    """The target's token from logits [..., V]: argmax, or a draw at ``temperature``."""
    if temperature == 0:
        return logits.argmax(-1)
    return _draw(torch.softmax(logits / temperature, -1), generator)


@torch.no_grad()
def speculative_generate(target, draft, prompts: list[list[int]], num_speculative_tokens: int,
                         max_new_tokens: int, temperature: float = 0.0, generator: torch.Generator | None = None,
                         eos_token_id: int | None = None) -> SpeculativeResult:
    """Decode ``prompts`` (token id lists) with ``draft`` proposing K = ``num_speculative_tokens``
    tokens per step and ``target`` (a :class:`TransformersTarget` or :class:`TokenwiseTarget`)
    verifying them; up to ``max_new_tokens`` new tokens per prompt, stopping after
    ``eos_token_id``. Greedy at temperature 0 (the output is the target's greedy decode),
    rejection sampling otherwise (``generator`` for the draws). A row that is done stays in the
    batch until all are (its further tokens are dropped)."""
    _check_generation_args(num_speculative_tokens, max_new_tokens, temperature)
    K = num_speculative_tokens
    draft_vocab = draft.draft_to_target_ids()
    mask_hidden = draft.masked_projected_hidden()[0] if draft.config.parallel_drafting else None
    num_masked = K - 1 if draft.config.parallel_drafting else 0

    def choose(logits):  # the draft's picks: argmax, or draws at the same temperature
        return _next_tokens(logits.float(), temperature, generator)

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
        slots = draft_slots(ids, positions, draft.project_hidden_states(aux), valid, last, bonus, num_masked,
                            draft.config.mask_token_id, mask_hidden)
        chosen, draft_logits, forwards = propose(draft, slots, cache, K, choose)
        proposals = draft_vocab[chosen]
        ids = torch.cat([bonus.view(batch, 1), proposals], dim=1)
        positions, logits, aux = target.extend(ids)
        if temperature == 0:
            accepted, bonus = _greedy_verify(proposals, logits)
        else:
            draft_probs = torch.softmax(draft_logits.float() / temperature, -1)
            accepted, bonus = _rejection_verify(proposals, draft_probs, draft_vocab, logits, temperature, generator)
        keep = torch.arange(K + 1, device=ids.device).view(1, -1) <= accepted.view(-1, 1)
        target.commit(keep)
        valid, last = keep, accepted
        for row in (r for r, a in zip(rows, active.tolist()) if a):
            row.target_forwards += 1
            row.draft_forwards += forwards
        new_tokens = [proposals[b, : accepted[b]].tolist() + [int(bonus[b])] for b in range(batch)]
        _append(rows, active, new_tokens, max_new_tokens, eos_token_id, accepted.tolist())
    return SpeculativeResult(rows, K, time.perf_counter() - started)


def _greedy_verify(proposals, logits):
    """(accepted [B]: leading proposals equal to the target's argmax, bonus [B]: the target's
    argmax after them)."""
    choice = logits.argmax(-1)  # [B, K + 1]
    matches = (proposals == choice[:, :-1]).long()
    accepted = matches.cumprod(1).sum(1)
    return accepted, choice.gather(1, accepted.view(-1, 1)).view(-1)


def _rejection_verify(proposals, draft_probs, draft_vocab, logits, temperature, generator):
    """Standard speculative sampling: proposal i (drawn from q_i) is accepted with probability
    min(1, p_i(x) / q_i(x)); at the first rejection the token is drawn from normalized
    max(p_i - q_i, 0), after K acceptances from p_{K+1}. Returns (accepted [B], token [B])."""
    batch, K = proposals.shape
    p = torch.softmax(logits / temperature, -1)  # [B, K + 1, V]
    q = torch.zeros_like(p[:, :K]).index_copy_(-1, draft_vocab, draft_probs)  # q over the target vocabulary
    p_x = p[:, :K].gather(-1, proposals.unsqueeze(-1)).squeeze(-1)
    q_x = q.gather(-1, proposals.unsqueeze(-1)).squeeze(-1)
    u = torch.rand(batch, K, generator=generator, device=p.device)
    ok = (u * q_x <= p_x).long()  # u < p/q, without dividing by a zero q
    accepted = ok.cumprod(1).sum(1)
    residual = torch.cat([(p[:, :K] - q).clamp(min=0), p[:, K:]], dim=1)
    at = residual[torch.arange(batch), accepted]
    at = torch.where(at.sum(-1, keepdim=True) > 0, at, p[torch.arange(batch), accepted])
    return accepted, _draw(at / at.sum(-1, keepdim=True), generator)


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
    _check_generation_args(1, max_new_tokens, 0.0)
    started = time.perf_counter()
    ids, _, _, logits, _ = target.start(prompts)
    token = logits[:, -1].argmax(-1)
    rows = [RowResult() for _ in prompts]
    active = torch.ones(len(prompts), dtype=torch.bool)
    _append(rows, active, [[t] for t in token.tolist()], max_new_tokens, eos_token_id)
    while bool(active.any()):
        _, logits, _ = target.extend(token.view(-1, 1))
        target.commit(torch.ones_like(token.view(-1, 1), dtype=torch.bool))
        token = logits[:, -1].argmax(-1)
        _append(rows, active, [[t] for t in token.tolist()], max_new_tokens, eos_token_id)
    return [row.generated_ids for row in rows], time.perf_counter() - started


def measure(target, draft, prompts: list[list[int]], num_speculative_tokens: int, max_new_tokens: int, *,
            batch_size: int = 8, temperature: float = 0.0, seed: int = 0, eos_token_id: int | None = None,
            baseline: bool = True, progress=None) -> dict:
    """Speculative decoding of ``prompts`` in batches of ``batch_size``, and (``baseline``) the
    target's plain greedy decoding of the same batches, as a JSON-ready dict: ``acceptance_length``
    (tokens per verification forward), ``conditional_acceptance`` (per draft position, the rate of
    acceptance given the positions before it accepted), forward counts, ``tokens_per_second`` of
    both and their ratio ``speedup``, and per prompt ``generated_ids``, ``acceptance_length``,
    ``conditional_acceptance``, forward counts and (greedy, with the baseline)
    ``matches_target``: whether the tokens equal the plain decode's. ``progress(done)`` is called
    after each batch."""
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
