"""Targets: the model that verifies the draft's proposals, behind one small interface.

A target holds the state of one decode (its cache, each row's length); ``start`` begins a decode
(it resets whatever an earlier one left), ``extend`` reads new tokens after what is committed,
and ``commit`` says which of them stay:

- ``start(prompts) -> (ids, positions, valid, logits, aux)``: the prompts left-padded into
  ``ids``, ``positions``, ``valid`` [B, M]; ``logits`` [B, 1, V] at each row's last prompt token;
  ``aux`` [B, M, A] the auxiliary states the draft reads.
- ``extend(ids [B, Q], visible=None) -> (positions [B, Q], logits [B, Q, V], aux [B, Q, A])``:
  the tokens at each row's next positions, a chain; or a tree (``visible`` [Q, Q] bool: new token
  i reads new token j where True, its ancestors and itself; its position is its depth in the
  tree) where the target's ``tree_attention`` is True (a target without it reads chains only).
- ``commit(keep [B, Q], order=None)``: of the last ``extend``'s tokens, each row keeps a prefix;
  of its tokens rearranged by ``order`` [B, Q] (new slot j holds old slot ``order[b, j]``) where
  given.
- ``device``, ``vocab_size`` and ``max_positions`` (the longest sequence it can hold; None: no
  limit) describe it.
- optionally ``decoding()``: a context manager the decode loops hold for a whole decode (set-up
  that would otherwise run per forward).
"""

from __future__ import annotations

import contextlib
from typing import Protocol

import torch

from ..hf import grouped_decode_attention
from .packed import packed_linears, packing_available


class Target(Protocol):
    """What :func:`~peagle_ext.draft.speculative.speculative_generate` needs of a target."""

    device: torch.device
    vocab_size: int
    max_positions: int | None
    tree_attention: bool

    def start(self, prompts: list[list[int]]): ...

    def extend(self, ids: torch.Tensor, visible: torch.Tensor | None = None): ...

    def commit(self, keep: torch.Tensor, order: torch.Tensor | None = None) -> None: ...


def tree_positions(length: torch.Tensor, width: int, visible: torch.Tensor | None) -> torch.Tensor:
    """Positions [B, Q] of ``width`` new tokens after each row's ``length`` [B] real ones: a chain
    (``visible`` None), or each token at its depth in the tree ``visible`` [Q, Q]."""
    offsets = torch.arange(width, device=length.device) if visible is None else visible.sum(1) - 1
    return length.view(-1, 1) + offsets


def left_pad(prompts, pad_token_id: int, device):
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


# Causal LMs whose logits are exactly ``lm_head(last_hidden_state)`` (no scaling, no soft-capping):
# for these the target computes the logits itself from the decoder's last K + 1 states: through the
# packed lm_head when the linears are packed (about as fast for 1 to 8 rows), else as
# lm_head.weight @ states^T, which on CPU BLAS costs little more for K + 1 rows than for one
# (the unpacked states @ W^T does not).
PLAIN_HEAD_MODELS = frozenset({"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"})


def _plain_head(model):
    """The model's lm_head when its logits are lm_head(last_hidden_state) alone, else None."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(model).__name__ in PLAIN_HEAD_MODELS and isinstance(head, torch.nn.Linear) and head.bias is None:
        return head
    return None


def _preallocated_layer_class():
    """A transformers KV-cache layer that writes new keys and values into a buffer (doubled when
    full) instead of concatenating the whole cache each forward; its ``keys``/``values`` are views
    of the filled part, so cropping is the dynamic layer's own slicing."""
    from transformers.cache_utils import DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
                self.buffers = None
            length = self.get_seq_length()
            end = length + key_states.shape[-2]
            if self.buffers is None or self.buffers[0].shape[-2] < end:
                capacity = max(end, 2 * (0 if self.buffers is None else self.buffers[0].shape[-2]))
                shape = (*key_states.shape[:-2], capacity, key_states.shape[-1])
                buffers = (key_states.new_empty(shape), value_states.new_empty(shape))
                if length:
                    buffers[0][..., :length, :] = self.keys
                    buffers[1][..., :length, :] = self.values
                self.buffers = buffers
            self.buffers[0][..., length:end, :] = key_states
            self.buffers[1][..., length:end, :] = value_states
            self.keys, self.values = self.buffers[0][..., :end, :], self.buffers[1][..., :end, :]
            return self.keys, self.values

    return PreallocatedLayer


class TransformersTarget:
    """A transformers causal LM as the target: left-padded prefill, then forwards over new tokens
    with its KV cache.

    After each verification the cache is cropped to the longest prefix some row accepted; at batch
    1 (or when every row accepted as many) nothing else stays. Slots a row rejected but another row
    kept stay in the cache as holes that the attention mask hides; each row keeps its own
    positions. The logits are computed only where the loop reads them (the last prompt token, then
    every new token), and the auxiliary states are captured by hooks on the decoder layers that
    the draft reads, not by ``output_hidden_states`` of every layer.

    ``aux_layer_ids``: the draft's ``eagle_aux_hidden_state_layer_ids``; the auxiliary state of id
    l is ``hidden_states[l]`` of ``output_hidden_states`` (the input of decoder layer l, vLLM's
    capture point; l = num_hidden_layers: the final, normed output), concatenated in that order.

    ``pack_weights``: on the CPU, the model's linear layers compute with oneDNN-packed weights
    during its forwards (:mod:`.packed`; about 1.7x faster one-token forwards and 1.25x, not
    1.65x, for six tokens against one, at the cost of a packed copy of the weights); None = where
    this torch build can, False = never.

    ``grouped_attention``: a model on SDPA attention reads its grouped keys and values without
    copying them per query head, in one-token forwards and, on the CPU, in the masked
    verification forward (:func:`~peagle_ext.draft.hf.grouped_decode_attention`); False =
    transformers' own SDPA attention.
    """

    def __init__(self, model, aux_layer_ids, pad_token_id: int = 0, pack_weights: bool | None = None,
                 grouped_attention: bool = True):
        config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") \
            else model.config
        layers = config.num_hidden_layers
        if not aux_layer_ids or any(isinstance(layer_id, bool) or not isinstance(layer_id, int)
                                    or not 0 <= layer_id <= layers for layer_id in aux_layer_ids):
            raise ValueError(f"aux_layer_ids must be layer ids in [0, {layers}], got {aux_layer_ids}")
        self.model, self.aux_layer_ids, self.pad_token_id = model, list(aux_layer_ids), pad_token_id
        self.vocab_size = int(config.vocab_size)
        self.max_positions = getattr(config, "max_position_embeddings", None)
        decoder = getattr(model, "base_model", None)
        decoder_layers = getattr(decoder, "layers", None)
        # hooks need the decoder's layer list; other models fall back to output_hidden_states
        self._layers = decoder_layers if decoder_layers is not None and len(decoder_layers) == layers else None
        self._decoder = decoder
        self._config = config
        self._head = _plain_head(model) if self._layers is not None else None
        self._num_layers = layers
        self.pack_weights = packing_available() if pack_weights is None else bool(pack_weights)
        self.grouped_attention = bool(grouped_attention)
        layer_types = getattr(config, "layer_types", None) or []
        # layers other than attention (recurrent, linear attention) keep transformers' own cache;
        # sliding-window layers keep every slot in the preallocated cache (the mask applies the
        # window), since transformers' sliding layer cannot crop once its window is full
        self._plain_cache = any(kind not in ("full_attention", "sliding_attention") for kind in layer_types)
        sliding = bool(getattr(config, "sliding_window", None)) or "sliding_attention" in layer_types
        # a tree goes in as a custom 4-D mask, which replaces the model's own masking: models with
        # sliding-window or other layer kinds mask more than causally, so they read chains only
        self.tree_attention = not (sliding or self._plain_cache)
        # the state of one decode, set by start()
        self.cache = None
        self.mask: torch.Tensor | None = None  # [B, T]: which cached slots are real
        self.length: torch.Tensor | None = None  # [B]: real tokens per row
        self.dense = True  # no padding and no holes: the mask is all True
        self._decoding = False  # within decoding(): packing and attention are set up

    @property
    def device(self):
        return self.model.device

    def memory_estimate(self, batch: int, prompt_length: int, total_length: int) -> int:
        """Bytes of the decode's largest allocations: the KV cache (buffers up to twice the
        sequence), the prefill's attention mask and scores, and the logits of a step."""
        config = self._config
        element = next(self.model.parameters()).element_size()
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        cache = 2 * 2 * self._num_layers * kv_heads * head_dim * element * batch * total_length
        prefill = batch * prompt_length * prompt_length * (1 + element * heads)
        return cache + prefill + batch * (total_length - prompt_length) * self.vocab_size * 4

    def _new_cache(self):
        from transformers import DynamicCache
        from transformers.cache_utils import Cache

        if self._plain_cache:
            return DynamicCache(config=self.model.config)
        return Cache(layer_class_to_replicate=_preallocated_layer_class())

    @contextlib.contextmanager
    def decoding(self):
        """Within the block, the model's forwards run with packed linears and grouped attention set
        up once, not per forward: entering them checks every linear layer's packed copy (~0.9 ms
        per forward for SmolLM2's 211 layers, about 3% of a one-token forward on a CPU). The decode
        loops hold it for a whole decode; a forward outside the block sets them up itself."""
        if self._decoding:
            yield self
            return
        packing = packed_linears(self.model) if self.pack_weights else contextlib.nullcontext()
        with packing, grouped_decode_attention(self.model, self.grouped_attention):
            self._decoding = True
            try:
                yield self
            finally:
                self._decoding = False

    @torch.no_grad()
    def _forward(self, ids, positions, logits_to_keep: int, visible: torch.Tensor | None = None):
        """(logits [B, logits_to_keep, V] of the last positions, aux [B, Q, A])."""
        with self.decoding():
            return self._forward_model(ids, positions, logits_to_keep, visible)

    def _forward_model(self, ids, positions, logits_to_keep: int, visible: torch.Tensor | None = None):
        if visible is None:
            mask = None if self.dense else self.mask.long()
        else:  # [B, 1, Q, cached + Q]: the real cached slots, then the tree among the new ones
            batch, width = ids.shape
            cached = self.mask[:, :-width].view(batch, 1, 1, -1).expand(-1, -1, width, -1)
            mask = torch.cat([cached, visible.view(1, 1, width, width).expand(batch, -1, -1, -1)], dim=3)
        arguments = dict(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=self.cache,
                         use_cache=True, logits_to_keep=logits_to_keep)
        if self._layers is None:
            out = self.model(**arguments, output_hidden_states=True)
            aux = torch.cat([out.hidden_states[layer_id] for layer_id in self.aux_layer_ids], dim=-1)
            return out.logits.float(), aux
        captured, hooks = {}, []

        def layer_input(layer_id):
            def hook(module, args, kwargs):
                captured[layer_id] = args[0] if args else kwargs["hidden_states"]
            return hook

        def final_output(module, args, output):
            captured[self._num_layers] = output[0] if isinstance(output, tuple) else output.last_hidden_state

        try:
            for layer_id in set(self.aux_layer_ids):
                if layer_id < self._num_layers:
                    hooks.append(self._layers[layer_id].register_forward_pre_hook(layer_input(layer_id),
                                                                                  with_kwargs=True))
                else:
                    hooks.append(self._decoder.register_forward_hook(final_output))
            if self._head is None:
                logits = self.model(**arguments).logits
            else:
                del arguments["logits_to_keep"]
                states = self._decoder(**arguments).last_hidden_state[:, -logits_to_keep:]
                if self.pack_weights:
                    logits = self._head(states)
                else:
                    batch, width, hidden = states.shape
                    logits = torch.mm(self._head.weight, states.reshape(-1, hidden).T).T.view(batch, width, -1)
        finally:
            for hook in hooks:
                hook.remove()
        aux = torch.cat([captured[layer_id] for layer_id in self.aux_layer_ids], dim=-1)
        return logits.float(), aux

    def start(self, prompts: list[list[int]]):
        """Begin a decode (dropping any earlier one's state): prefill the prompts, left-padded:
        (ids, positions, valid: [B, M]; logits [B, 1, V] at the last prompt token; aux [B, M, A])."""
        ids, positions, valid = left_pad(prompts, self.pad_token_id, self.device)
        self.cache, self.mask = self._new_cache(), valid
        self.length = valid.sum(1)
        self.dense = bool(valid.all())
        logits, aux = self._forward(ids, positions, 1)
        return ids, positions, valid, logits, aux

    def extend(self, ids: torch.Tensor, visible: torch.Tensor | None = None):
        """Read ids [B, Q] at each row's next positions, as a chain or the tree ``visible`` [Q, Q]:
        (positions [B, Q], logits [B, Q, V], aux)."""
        if visible is not None and not self.tree_attention:
            raise ValueError("visible: this target reads chains only (its model masks more than causally)")
        positions = tree_positions(self.length, ids.shape[1], visible)
        self.mask = torch.cat([self.mask, torch.ones_like(ids, dtype=torch.bool)], 1)
        return (positions, *self._forward(ids, positions, ids.shape[1], visible))

    def commit(self, keep: torch.Tensor, order: torch.Tensor | None = None) -> None:
        """Of the last ``extend``'s slots, rearranged by ``order`` [B, Q] where given, keep [B, Q]
        (a prefix per row): the slots after the longest kept prefix leave the cache, the others a
        row did not keep become holes."""
        if order is not None:
            width = order.shape[1]
            for layer in self.cache.layers:
                for states in (layer.keys, layer.values):
                    new = states[:, :, -width:]
                    new.copy_(new.gather(2, order.view(order.shape[0], 1, width, 1).expand_as(new)))
        kept = keep.sum(1)
        drop = keep.shape[1] - int(kept.max())
        if drop:
            self.cache.crop(-drop)
            self.mask = self.mask[:, :self.mask.shape[1] - drop]
        if drop < keep.shape[1]:
            self.mask[:, -(keep.shape[1] - drop):] = keep[:, :keep.shape[1] - drop]
        self.length = self.length + kept
        self.dense = self.dense and bool((kept == kept[0]).all())


class TokenwiseTarget:
    """A target whose outputs at a position depend on that position's token alone (the demo's
    tiny target): ``module(tokens [S]) -> (aux [S, A], logits [S, V])``. No cache is needed."""

    def __init__(self, module):
        self.module = module
        self.vocab_size = _tokenwise_vocab_size(module)
        self.max_positions = None
        self.tree_attention = True  # each output depends on its own token alone
        self.length: torch.Tensor | None = None  # [B]: real tokens per row, set by start()

    @property
    def device(self):
        return next(self.module.parameters()).device

    def memory_estimate(self, batch: int, prompt_length: int, total_length: int) -> int:
        """Bytes of the largest allocation: the prefill's logits (the module has no cache)."""
        return batch * prompt_length * (self.vocab_size or 0) * 4

    @torch.no_grad()
    def _forward(self, ids):
        aux, logits = self.module(ids.reshape(-1))
        return logits.float().view(*ids.shape, -1), aux.view(*ids.shape, -1)

    def start(self, prompts: list[list[int]]):
        """Begin a decode: (ids, positions, valid [B, M]; logits [B, 1, V]; aux [B, M, A])."""
        ids, positions, valid = left_pad(prompts, 0, self.device)
        self.length = valid.sum(1)
        logits, aux = self._forward(ids)
        return ids, positions, valid, logits[:, -1:], aux

    def extend(self, ids: torch.Tensor, visible: torch.Tensor | None = None):
        return (tree_positions(self.length, ids.shape[1], visible), *self._forward(ids))

    def commit(self, keep: torch.Tensor, order: torch.Tensor | None = None) -> None:
        self.length = self.length + keep.sum(1)


def _tokenwise_vocab_size(module) -> int | None:
    """The vocabulary of a tokenwise module: its ``vocab_size``, or its first embedding's rows."""
    size = getattr(module, "vocab_size", None)
    if isinstance(size, int):
        return size
    embedding = next((m for m in module.modules() if isinstance(m, torch.nn.Embedding)), None)
    return None if embedding is None else embedding.num_embeddings
