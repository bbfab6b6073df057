"""The draft side: its KV cache (preallocated, grown by doubling), its cached forward over a step's
slots, and its K proposals (one forward for P-EAGLE, K for EAGLE-3)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from .slots import DraftSlots

DRAFT_DTYPES = ("auto", "bfloat16", "float32")


def native_bfloat16_cpu() -> bool:
    """Whether this CPU computes bfloat16 products natively (AVX-512 BF16), not by emulation."""
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(probe()) if probe is not None else False


def draft_for_decoding(draft, dtype: str = "auto"):
    """The draft to decode with: ``draft`` itself, or a copy in ``dtype`` ("bfloat16", "float32").
    "auto": a bfloat16 copy of a float32 draft on a CPU with native bfloat16 products, else the
    draft as it is. At batch 1 the draft's forward costs about the time to read its weights once
    (a one-layer SmolLM2 draft: ~40 MB in float32, ~2 ms of a ~28 ms step), so bfloat16 halves
    it; the recipe trains under bfloat16 autocast anyway. The output does not depend on it: the
    target verifies every proposal."""
    if dtype not in DRAFT_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DRAFT_DTYPES)}, got {dtype!r}")
    current = draft.model.fc.weight
    if dtype == "auto":
        cpu = current.device.type == "cpu"
        dtype = "bfloat16" if cpu and current.dtype == torch.float32 and native_bfloat16_cpu() else None
    if dtype is None or getattr(torch, dtype) == current.dtype:
        return draft
    return copy.deepcopy(draft).to(getattr(torch, dtype)).eval()


class DraftCache:
    """Per layer, the keys and values of the draft's context slots, in buffers [B, kv_heads, C, D]
    of which the first ``length`` slots are filled, and which of them are real (``valid`` [B, C];
    False: a hole of a batch row that rejected what another row accepted). ``keys[l]`` and
    ``values[l]`` are the filled parts. The buffers are made by the first forward and doubled when
    full, so a step writes its slots in place instead of concatenating the whole cache."""

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.length = 0
        self._keys: list[torch.Tensor | None] = [None] * num_layers
        self._values: list[torch.Tensor | None] = [None] * num_layers
        self._valid: torch.Tensor | None = None

    @property
    def keys(self) -> list[torch.Tensor | None]:
        return [None if k is None else k[:, :, :self.length] for k in self._keys]

    @property
    def values(self) -> list[torch.Tensor | None]:
        return [None if v is None else v[:, :, :self.length] for v in self._values]

    @property
    def valid(self) -> torch.Tensor | None:
        return None if self._valid is None else self._valid[:, :self.length]

    def _reserve(self, layer: int, k: torch.Tensor, needed: int) -> None:
        """Make room for ``needed`` slots in ``layer``'s buffers (shaped like ``k`` [B, kv_heads, *, D])."""
        buffer = self._keys[layer]
        if buffer is not None and buffer.shape[2] >= needed:
            return
        capacity = max(needed, 64, 2 * (0 if buffer is None else buffer.shape[2]))
        batch, heads, _, dim = k.shape
        keys, values = (k.new_empty(batch, heads, capacity, dim) for _ in range(2))
        if buffer is not None:
            keys[:, :, :self.length] = buffer[:, :, :self.length]
            values[:, :, :self.length] = self._values[layer][:, :, :self.length]
        self._keys[layer], self._values[layer] = keys, values

    def _reserve_valid(self, batch: int, needed: int, device) -> None:
        if self._valid is not None and self._valid.shape[1] >= needed:
            return
        capacity = max(needed, 64, 2 * (0 if self._valid is None else self._valid.shape[1]))
        valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        if self._valid is not None:
            valid[:, :self.length] = self._valid[:, :self.length]
        self._valid = valid


def _visibility(slot_mask: torch.Tensor, cache: DraftCache) -> torch.Tensor:
    """[B, 1, Q, cached + Q] bool: new slot i sees the cache's real slots and the new real slots
    j <= i (itself always, so that a hole's row is defined)."""
    batch, width = slot_mask.shape
    device = slot_mask.device
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    visible = causal & slot_mask.view(batch, 1, width) | torch.eye(width, dtype=torch.bool, device=device)
    if cache.length:
        visible = torch.cat([cache.valid.view(batch, 1, -1).expand(batch, width, -1), visible], dim=2)
    return visible.unsqueeze(1)


def _cached_attention(attn, states, positions, visible, cache: DraftCache, layer: int):
    """One draft attention over [cache, new slots] (``visible``: see :func:`_visibility`); the new
    slots' keys and values are written after the cache's ``length`` slots (``_keep_slots`` then
    decides which of them stay)."""
    batch, width = states.shape[:2]
    q, k, v = attn._project_qkv(states)
    q, k = attn.rotary_emb(q, k, positions)
    start, end = cache.length, cache.length + width
    cache._reserve(layer, k, end)
    cache._keys[layer][:, :, start:end] = k
    cache._values[layer][:, :, start:end] = v
    all_k, all_v = cache._keys[layer][:, :, :end], cache._values[layer][:, :, :end]
    # enable_gqa: each key/value head serves its query group without copying the cache per head
    out = F.scaled_dot_product_attention(q, all_k, all_v, attn_mask=visible, scale=attn.scaling, enable_gqa=True)
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
    visible = _visibility(slots.valid, cache)
    for index, layer in enumerate(layers):
        if index == 0:
            normed = layer.hidden_norm(hidden)
            attn_input = torch.cat([layer.input_layernorm(embeds), normed], dim=-1)
            residual = normed if layer.norm_before_residual else hidden
        else:
            attn_input, residual = layer.input_layernorm(hidden), hidden
        hidden = residual + _cached_attention(layer.self_attn, attn_input, slots.positions, visible, cache, index)
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    _keep_slots(cache, slots.keep)
    return model.model.norm(hidden) if model.config.norm_output else hidden


def _keep_slots(cache: DraftCache, keep: torch.Tensor) -> None:
    """Of the slots the last forward wrote after the cache's ``length``, keep the columns that some
    row keeps (marked real where that row keeps them); the others (the masked and sequential-step
    slots) are overwritten by the next forward. Kept columns that form a prefix, as a step's
    context slots do, stay where they are."""
    batch, width = keep.shape
    kept_columns = keep.any(dim=0)
    count = int(kept_columns.sum())
    if count == 0:
        return
    start = cache.length
    cache._reserve_valid(batch, start + count, keep.device)
    if bool(kept_columns[:count].all()):
        cache._valid[:, start:start + count] = keep[:, :count]
    else:
        columns = start + kept_columns.nonzero().view(-1)
        for layer in range(cache.num_layers):
            cache._keys[layer][:, :, start:start + count] = cache._keys[layer][:, :, columns]
            cache._values[layer][:, :, start:start + count] = cache._values[layer][:, :, columns]
        cache._valid[:, start:start + count] = keep[:, kept_columns]
    cache.length = start + count


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
