"""P-EAGLE (parallel-drafting) draft-model behaviour, at the module path NeMo Automodel's code
imports (``...speculative.eagle.peagle_draft`` -> ``peagle_ext.peagle_draft``).

The P-EAGLE forward path is provided as mixins so the EAGLE-3 draft classes in
:mod:`peagle_ext.draft.llama` opt into it by inheritance:

* :class:`_PeagleAttentionMixin` -> ``Eagle3LlamaAttention``
* :class:`_PeagleDecoderLayerMixin` -> ``Eagle3LlamaDecoderLayer``
* :class:`_PeagleVanillaLayerMixin` -> ``Eagle3LlamaPeagleLayer``
* :class:`_PeagleDraftMixin` -> ``LlamaEagle3DraftModel``

The mixins use only attributes the host classes define (``self``) plus the helpers in this
module, so the dependency stays one-way (``draft.llama`` -> ``peagle_draft``).

Attention runs through :func:`_peagle_flex_attention`, which picks one of three paths:

* compiled ``flex_attention`` where Inductor's lowering handles the tensors
  (:func:`_peagle_compile_supported`);
* eager ``flex_attention`` elsewhere, and for good once a compiled call has failed;
* ``scaled_dot_product_attention`` with the mask materialized from ``block_mask.mask_mod``
  where autograd needs a backward that flex_attention lacks (CPU and MPS).

``_peagle_flex_attention_compiled`` is module data made at import, ``torch.compile(flex_attention,
mode="max-autotune-no-cudagraphs", dynamic=True)``: ``torch.compile`` only wraps, nothing is traced
or compiled before the first call (importing it costs the import of torch._dynamo). Replacing the
attribute, or reloading the module under a patched ``torch.compile``, changes what the next call uses.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.nn.attention.flex_attention import create_mask, flex_attention

from .block_mask import build_block_mask

logger = logging.getLogger(__name__)

# Compiled flex_attention for the CUDA path (see _peagle_compile_supported). dynamic=True: COD
# sampling gives every step a different N, and a static first compile would be re-specialized
# for each new length.
_peagle_flex_attention_compiled = torch.compile(flex_attention, mode="max-autotune-no-cudagraphs", dynamic=True)
_peagle_flex_attention_compile_failed = False

# Dtypes Inductor's flex templates accept (q, k and v must share one).
_COMPILE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Inductor's CUDA (Triton) flex kernel needs q/k/v head dims of at least 16 (tl.dot).
_MIN_CUDA_HEAD_DIM = 16
# Devices whose flex_attention has no backward in torch 2.14.1 (it raises on requires_grad).
_NO_FLEX_BACKWARD_DEVICES = ("cpu", "mps")
# Above this many query x key pairs, the dense SDPA fallback logs a one-time warning.
_DENSE_FALLBACK_WARN_PAIRS = 4096 * 4096
_dense_fallback_warned = False


def _peagle_compile_supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Return whether Inductor's flex-attention lowering supports these tensors.

    True exactly when q, k and v are CUDA tensors of one dtype among float32, float16 and
    bfloat16, and every head dim (``size(-1)``) is at least 16, the Triton kernel's minimum.

    CPU is never supported, for inference too: the compiled callable uses ``dynamic=True``,
    and Inductor's C++ flex template in torch 2.14.1 fails to build dynamic shapes (a C++
    compile error on an undeclared ``cur_kvSplitSize`` symbol; measured). A static compile
    works for CPU inference but recompiles whenever N changes, i.e. every COD step. CPU
    training has no flex backward at all. Other devices (MPS, XPU) are not claimed.
    """
    tensors = (q, k, v)
    if any(t.device.type != "cuda" for t in tensors):
        return False
    if q.dtype not in _COMPILE_DTYPES or any(t.dtype != q.dtype for t in tensors):
        return False
    return min(t.size(-1) for t in tensors) >= _MIN_CUDA_HEAD_DIM


def _needs_dense_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """True when autograd will need a backward that flex_attention lacks on q's device."""
    return q.device.type in _NO_FLEX_BACKWARD_DEVICES and any(t.requires_grad for t in (q, k, v))


def _dense_masked_attention(q, k, v, block_mask, scale) -> torch.Tensor:
    """Attention through ``scaled_dot_product_attention`` with ``block_mask.mask_mod`` materialized.

    q: [B, H, Q, D]; k, v: [B, H, KV, D] (grouped heads already repeated). Materializes a
    [1 or B, 1, Q, KV] bool mask: fine for the small N of CPU training and tests. A query row that
    sees no key gives zeros (as flex_attention does), not NaN, with zero gradient.
    """
    global _dense_fallback_warned
    q_len, kv_len = q.size(-2), k.size(-2)
    if q_len * kv_len > _DENSE_FALLBACK_WARN_PAIRS and not _dense_fallback_warned:
        _dense_fallback_warned = True
        logger.warning(
            "P-EAGLE attention on %s with autograd falls back to a dense %d x %d mask "
            "(flex_attention has no backward there); this is slow and memory-hungry at this size.",
            q.device.type,
            q_len,
            kv_len,
        )
    rows = block_mask.kv_num_blocks.shape[0]  # a batch's mask has a row per sequence; one row broadcasts
    mask = create_mask(block_mask.mask_mod, rows if rows > 1 else None, None, q_len, kv_len, device=q.device)
    visible = mask.any(dim=-1, keepdim=True)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask | ~visible, scale=scale)
    return out * visible


def _peagle_flex_attention(q, k, v, block_mask, scale):
    """Run the P-EAGLE flex attention, compiling only when Inductor supports it.

    q: [B, H, N, D]; k, v: [B, H, N, D] (grouped KV heads already repeated); block_mask: the
    COD BlockMask (its tensors may have B = H = 1, which broadcasts); scale: the softmax scale.
    Returns [B, H, N, D].

    If the compiled call raises, logs one warning with the reason, sets
    ``_peagle_flex_attention_compile_failed``, returns the eager result, and never tries the
    compiled path again in this process. Where autograd needs a backward flex_attention lacks
    (CPU), uses :func:`_dense_masked_attention` instead.
    """
    global _peagle_flex_attention_compile_failed
    if _needs_dense_backward(q, k, v):
        return _dense_masked_attention(q, k, v, block_mask, scale)
    if not _peagle_flex_attention_compile_failed and _peagle_compile_supported(q, k, v):
        try:
            return _peagle_flex_attention_compiled(q, k, v, block_mask=block_mask, scale=scale)
        except Exception as exc:  # noqa: BLE001 - any compile/lowering failure falls back
            _peagle_flex_attention_compile_failed = True
            logger.warning(
                "compiled flex_attention failed (%s: %s); using eager flex_attention from now on",
                type(exc).__name__,
                exc,
            )
    return flex_attention(q, k, v, block_mask=block_mask, scale=scale)


def _select_rows(values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``values`` [B, N, ...] at the elements ``rows`` along dim 1: [Q] (the same for every row of
    the batch) or [B, Q] (each row its own) -> [B, Q, ...]."""
    if rows.dim() == 1:
        return values[:, rows]
    index = rows.reshape(*rows.shape, *([1] * (values.dim() - 2))).expand(*rows.shape, *values.shape[2:])
    return values.gather(1, index)


def _attention_then_mlp(layer, attn_input, residual, position_ids, block_mask, query_rows=None,
                        key_value_gather=None) -> torch.Tensor:
    """``residual + attn(attn_input)``, then the post-attention-norm MLP with its residual.

    The shared tail of both P-EAGLE layer kinds; ``layer`` provides ``self_attn``,
    ``post_attention_layernorm`` and ``mlp``. Returns [B, N, H], or [B, Q, H] for the elements
    ``query_rows`` only (keys and values still come from all N).
    """
    if query_rows is not None:
        residual = _select_rows(residual, query_rows)
    hidden = residual + layer.self_attn.forward_peagle(attn_input, position_ids, block_mask, query_rows=query_rows,
                                                       key_value_gather=key_value_gather)
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


class _PeagleAttentionMixin:
    """P-EAGLE single parallel-group attention for ``Eagle3LlamaAttention``."""

    def forward_peagle(self, combined_states: torch.Tensor, position_ids: torch.Tensor, block_mask,
                       query_rows: torch.Tensor | None = None, key_value_gather=None) -> torch.Tensor:
        """P-EAGLE single parallel-group attention.

        All COD depths are flattened into one sequence and attend in a single pass: the depth
        is baked into ``position_ids = anchor_pos + depth`` (no per-step rotary offset, no
        cache), and cross-depth visibility is enforced entirely by ``block_mask``.

        combined_states: [B, N, in_features] (2H for the fused first layer, H otherwise);
        position_ids: [B, N] or [N] reference positions; returns [B, N, hidden_size].
        ``query_rows`` (int [Q], or [B, Q] for each row its own; beyond NeMo Automodel's signature):
        only these elements are queries (``block_mask`` is then Q x N); returns [B, Q, hidden_size].
        ``key_value_gather`` (context parallelism, see :mod:`peagle_ext.draft.context_parallel`): a
        callable taking this rank's rotated keys and values [B, kv_heads, N, D] and returning those of
        every rank's elements [B, kv_heads, KV, D], which ``block_mask`` (N x KV) then indexes.
        """
        batch = combined_states.shape[0]
        q, k, v = self._project_qkv(combined_states, query_rows)
        query_positions = None if query_rows is None else _select_rows(
            position_ids.expand(combined_states.shape[0], -1), query_rows)
        q, k = self.rotary_emb(q, k, position_ids, query_positions)
        if key_value_gather is not None:  # rotated first: each element keeps its own position
            k, v = key_value_gather(k, v)
        out = _peagle_flex_attention(q, self._repeat_kv(k), self._repeat_kv(v), block_mask, self.scaling)
        return self.o_proj(out.transpose(1, 2).reshape(batch, q.shape[-2], -1))


class _PeagleDecoderLayerMixin:
    """P-EAGLE forward for the fused first layer ``Eagle3LlamaDecoderLayer``."""

    def forward_peagle(
        self,
        input_embeds: torch.Tensor,
        hidden_states: torch.Tensor,
        position_ids: torch.Tensor,
        block_mask,
        query_rows: torch.Tensor | None = None,
        key_value_gather=None,
    ) -> torch.Tensor:
        """Fused first layer: attention over ``[input_layernorm(embeds), hidden_norm(hidden)]``.

        input_embeds: [B, N, H] token embeddings; hidden_states: [B, N, H] projected target
        hidden states (the residual stream; its ``hidden_norm`` when the host sets
        ``norm_before_residual``); returns [B, N, H] ([B, Q, H] with ``query_rows``, see
        :meth:`_PeagleAttentionMixin.forward_peagle`).
        """
        normed_hidden = self.hidden_norm(hidden_states)
        combined = torch.cat([self.input_layernorm(input_embeds), normed_hidden], dim=-1)
        residual = normed_hidden if getattr(self, "norm_before_residual", False) else hidden_states
        return _attention_then_mlp(self, combined, residual, position_ids, block_mask, query_rows, key_value_gather)


class _PeagleVanillaLayerMixin:
    """P-EAGLE forward for the vanilla deep layer ``Eagle3LlamaPeagleLayer``."""

    def forward_peagle(self, hidden_states: torch.Tensor, position_ids: torch.Tensor, block_mask,
                       query_rows: torch.Tensor | None = None, key_value_gather=None) -> torch.Tensor:
        """Standard pre-norm Llama block over [B, N, H] hidden states with the COD mask ([B, Q, H]
        out with ``query_rows``)."""
        return _attention_then_mlp(self, self.input_layernorm(hidden_states), hidden_states, position_ids, block_mask,
                                   query_rows, key_value_gather)


class _PeagleDraftMixin:
    """P-EAGLE draft-model methods for ``LlamaEagle3DraftModel``."""

    def _init_peagle_parameters(self, config) -> None:
        """Register the learnable ``mask_hidden`` placeholder, std-1 normal, [1, 1, num_aux * target_hidden]
        (``model.fc.in_features``).

        It substitutes for the target's concatenated auxiliary hidden states at every masked
        COD position (depth >= 1), at the pre-``fc`` width, so it flows through
        ``project_hidden_states`` (``input_norm``/``fc_norm`` when set, then ``fc``) like a real vector.
        Shape and on-disk key ``mask_hidden`` follow speculators. Call it only when
        ``parallel_drafting`` is set, so EAGLE-3 checkpoints carry no extra key.
        """
        self.mask_hidden = torch.nn.Parameter(torch.randn(1, 1, self.model.fc.in_features))

    def masked_projected_hidden(self) -> torch.Tensor:
        """The projected ``mask_hidden``: [1, hidden_size], what every masked COD depth receives."""
        return self.project_hidden_states(self.mask_hidden).reshape(1, -1)

    def _run_draft_layer(self, layer_fn, *args, **kwargs):
        """``layer_fn(*args, **kwargs)``, under ``torch.utils.checkpoint(use_reentrant=False)`` when
        the model's ``gradient_checkpointing`` is set and it is training; directly otherwise.

        Checkpointing frees the layer's activations after the forward and recomputes them in
        the backward; the numbers are the same either way.
        """
        if self.gradient_checkpointing and self.training:
            return torch.utils.checkpoint.checkpoint(layer_fn, *args, use_reentrant=False, **kwargs)
        return layer_fn(*args, **kwargs)

    def build_peagle_block_mask(self, anchor_pos, depth, lengths, total_seq_len, *, sliding_window=None,
                                kv_anchor_pos=None, kv_depth=None):
        """The COD flex_attention BlockMask for one packed sequence, from ``peagle_ext.build_block_mask``
        with the fastest available backend (anchor_pos, depth: int [N]; lengths: document lengths
        packed from position 0; total_seq_len: the original sequence length). Keywords beyond NeMo
        Automodel's signature: ``sliding_window``, the window W of the depth-0 context; ``kv_anchor_pos``
        and ``kv_depth``, the key elements when only some elements are queries (a Q x KV mask)."""
        return build_block_mask(anchor_pos, depth, lengths, total_seq_len, sliding_window=sliding_window,
                                kv_anchor_pos=kv_anchor_pos, kv_depth=kv_depth)

    def forward_peagle(
        self,
        sampled_input_ids: torch.Tensor,
        sampled_projected_hidden: torch.Tensor,
        position_ids: torch.Tensor,
        block_mask,
        *,
        query_rows: torch.Tensor | None = None,
        query_block_mask=None,
        key_value_gather=None,
    ) -> torch.Tensor:
        """Run the P-EAGLE single parallel-group forward over N flattened COD elements.

        sampled_input_ids: [1, N], real token ids at depth-0 slots, ``mask_token_id`` elsewhere;
        sampled_projected_hidden: [1, N, H], ``fc``-projected target states at depth 0, the
        projected ``mask_hidden`` elsewhere; position_ids: [1, N], ``anchor_pos + depth``;
        block_mask: the COD visibility mask.

        Returns [1, N, H] pre-logits hidden states, post-``norm`` when ``config.norm_output``.

        Keywords beyond NeMo Automodel's signature: with ``query_rows`` (int [Q]) only those elements'
        states are wanted, the others serving as keys only (a segment's completion): every layer
        but the last runs over all N with ``block_mask`` (unused with one layer), the last one
        runs queries ``query_rows`` against keys N with ``query_block_mask`` (Q x N), and the
        result is [1, Q, H]. ``key_value_gather`` (context parallelism): every layer attends with
        its N elements' queries to the keys and values this callable returns for its own (see
        :meth:`_PeagleAttentionMixin.forward_peagle`), ``block_mask`` being N x KV.
        """
        layers = self.model.layers
        last = len(layers) - 1
        embeds = self.embed_input_ids(sampled_input_ids)

        def layer_masks(index):
            gather = {} if key_value_gather is None else {"key_value_gather": key_value_gather}
            if query_rows is None or index < last:
                return {"block_mask": block_mask, **gather}
            return {"block_mask": query_block_mask, "query_rows": query_rows, **gather}

        hidden = self._run_draft_layer(layers[0].forward_peagle, input_embeds=embeds,
                                       hidden_states=sampled_projected_hidden, position_ids=position_ids,
                                       **layer_masks(0))
        for index, layer in enumerate(layers[1:], start=1):
            hidden = self._run_draft_layer(layer.forward_peagle, hidden, position_ids, **layer_masks(index))
        return self.model.norm(hidden) if self.draft_config.norm_output else hidden
