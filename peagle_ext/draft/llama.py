"""Llama EAGLE-3 draft model with the P-EAGLE single-pass forward (no transformers dependency).

Classes and attribute names follow NeMo Automodel's ``draft_llama``; the P-EAGLE behaviour comes
from the mixins in :mod:`peagle_ext.peagle_draft` (imports go one way: this module -> that one).

    config = Eagle3DraftConfig(hidden_size=64, ..., parallel_drafting=True)
    model = LlamaEagle3DraftModel(config)
    hidden = model.forward_peagle(ids, projected, position_ids, block_mask)   # [1, N, H]
    logits = model.compute_logits(hidden)                                   # [1, N, draft_vocab]
    model.save_pretrained("out/")  # speculators P-EAGLE layout, see peagle_ext.draft.checkpoint
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from ..peagle_draft import (
    _PeagleAttentionMixin,
    _PeagleDecoderLayerMixin,
    _PeagleDraftMixin,
    _PeagleVanillaLayerMixin,
    _select_rows,
)
from . import checkpoint, rope
from .flat_inputs import supervised_draft_logits

# Every size field's upper bound: products of two sizes stay within int64, and no dimension of a
# real draft comes near it.
_MAX_SIZE = 2**31 - 1


@dataclass
class Eagle3DraftConfig:
    """Shape and options of a Llama EAGLE-3 / P-EAGLE draft model.

    Defaults describe a one-layer draft for a Llama-3.1-8B target. ``head_dim`` None means
    ``hidden_size // num_attention_heads``; ``target_hidden_size`` None means ``hidden_size``;
    ``mask_token_id`` None means ``vocab_size - 1``; ``num_aux_hidden_states`` None means
    ``len(eagle_aux_hidden_state_layer_ids)``, or 3 without them (they must agree when both are
    given). ``num_depths`` is the number of COD depths trained and the number of tokens proposed
    (``speculative_tokens`` on disk). ``draft_vocab_size < vocab_size`` gives the draft its own
    vocabulary with the ``d2t``/``t2d`` maps. The options mean what they mean in speculators,
    NeMo Automodel and vLLM, under the same names:

    * ``norm_before_fc``: one RMSNorm over the concatenated auxiliary states (``input_norm``);
    * ``fc_norm``: one RMSNorm per auxiliary state (``fc_norm.{i}``, over ``target_hidden_size``);
      exclusive with ``norm_before_fc``, as in speculators;
    * ``norm_before_residual``: the first layer's residual is ``hidden_norm(hidden)``, not ``hidden``;
    * ``norm_output``: ``forward_peagle`` returns post-``norm`` states (else ``compute_logits``
      applies the norm); the logits are the same;
    * ``attention_bias``, ``mlp_bias``: biases on the q/k/v/o and gate/up/down projections;
    * ``rope_theta`` and ``rope_scaling`` (transformers 4's form: ``{"rope_type": "llama3",
      "factor": 8.0, ...}``, None for plain rope): rope types default, linear, llama3 and yarn,
      see :mod:`peagle_ext.draft.rope`; ``rope_parameters`` is transformers 5's form of the two.

    ``verifier_name_or_path``: the target model, as speculators records it (a hub id or a path).
    """

    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int | None = None
    num_hidden_layers: int = 1
    vocab_size: int = 128256
    draft_vocab_size: int = 32000
    target_hidden_size: int | None = None
    num_aux_hidden_states: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 8192
    parallel_drafting: bool = False
    norm_output: bool = False
    norm_before_fc: bool = False
    fc_norm: bool = False
    norm_before_residual: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    mask_token_id: int | None = None
    num_depths: int = 8
    eagle_aux_hidden_state_layer_ids: list[int] | None = None
    verifier_name_or_path: str | None = None

    def __post_init__(self) -> None:
        _check_field_types(self)
        # Ranges first: the defaults below divide by some of these.
        for name in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                     "num_hidden_layers", "vocab_size", "target_hidden_size", "num_aux_hidden_states", "num_depths",
                     "max_position_embeddings", "head_dim"):
            if getattr(self, name) is not None and not 1 <= getattr(self, name) <= _MAX_SIZE:
                raise ValueError(f"field {name!r} must be in [1, 2**31 - 1], got {getattr(self, name)}")
        for name in ("rms_norm_eps", "rope_theta"):
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"field {name!r} must be a finite number > 0, got {getattr(self, name)}")
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.target_hidden_size is None:
            self.target_hidden_size = self.hidden_size
        if self.mask_token_id is None:
            self.mask_token_id = self.vocab_size - 1
        layer_ids = self.eagle_aux_hidden_state_layer_ids
        if layer_ids is not None:
            self.eagle_aux_hidden_state_layer_ids = layer_ids = list(layer_ids)
        if self.num_aux_hidden_states is None:
            self.num_aux_hidden_states = len(layer_ids) if layer_ids else 3
        elif layer_ids and len(layer_ids) != self.num_aux_hidden_states:
            raise ValueError(f"num_aux_hidden_states ({self.num_aux_hidden_states}) must equal the number of "
                             f"eagle_aux_hidden_state_layer_ids ({layer_ids})")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if not 1 <= self.draft_vocab_size <= self.vocab_size:
            raise ValueError(f"draft_vocab_size must be in [1, vocab_size={self.vocab_size}], "
                             f"got {self.draft_vocab_size}")
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(f"mask_token_id must be in [0, vocab_size={self.vocab_size}), got {self.mask_token_id}")
        if self.norm_before_fc and self.fc_norm:
            raise ValueError("norm_before_fc and fc_norm are mutually exclusive (one norm over the concatenated "
                             "auxiliary states, or one per state): set one of them")
        if self.head_dim < 1:
            raise ValueError(f"head_dim must be >= 1, got {self.head_dim}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        self.rope_scaling = rope.check_rope_scaling(self.rope_scaling, self.max_position_embeddings)
        if self.rope_scaling is not None and self.rope_scaling["rope_type"] == "yarn" and self.rope_theta == 1:
            raise ValueError("field 'rope_theta' must not be 1 with rope_type 'yarn' (its correction range "
                             "divides by log(rope_theta))")

    @property
    def rope_parameters(self) -> dict:
        """transformers 5's ``rope_parameters``: ``{"rope_type", "rope_theta", **options}``."""
        return rope.rope_parameters(self.rope_theta, self.rope_scaling)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_config(cls, config) -> Eagle3DraftConfig:
        """The draft ``config`` describes: an ``Eagle3DraftConfig`` as it is; any other object with
        the Llama fields (a transformers ``LlamaConfig`` with attributes set on it, as NeMo
        Automodel builds its drafts) read as NeMo Automodel 0.7.0's ``LlamaEagle3DraftModel``
        reads it:

        * required: ``hidden_size``, ``intermediate_size``, ``num_attention_heads``,
          ``vocab_size``, ``rms_norm_eps``; ``num_key_value_heads`` and ``head_dim`` default to
          ``num_attention_heads`` and ``hidden_size // num_attention_heads``;
        * rotary: ``rope_parameters`` when set, else ``rope_theta`` (default 10000) and
          ``rope_scaling``;
        * ``draft_vocab_size`` defaults to ``vocab_size``, ``target_hidden_size`` to
          ``hidden_size``, ``num_aux_hidden_states`` to ``len(eagle_aux_hidden_state_layer_ids)``
          or 3, ``num_depths`` to 8, every boolean option (``parallel_drafting``, ``fc_norm``,
          ``norm_output``, ``norm_before_fc``, ``norm_before_residual``, ``attention_bias``,
          ``mlp_bias``) to False, the rest to this class's defaults;
        * layers: ``num_hidden_layers`` (at least 1) with ``parallel_drafting``, else one.

        What the draft cannot be is refused by name: a ``hidden_act`` other than ``silu``, a
        ``partial_rotary_factor`` other than 1, and every value this class refuses.
        """
        if isinstance(config, cls):
            return config
        return cls(**_foreign_config_fields(config))


_REQUIRED_LLAMA_FIELDS = ("hidden_size", "intermediate_size", "num_attention_heads", "vocab_size", "rms_norm_eps")
# Fields read as they are when present (None counts as absent: the class's default applies).
_OPTIONAL_FIELDS = ("num_key_value_heads", "head_dim", "draft_vocab_size", "target_hidden_size",
                    "num_aux_hidden_states", "max_position_embeddings", "mask_token_id", "num_depths",
                    "eagle_aux_hidden_state_layer_ids", "verifier_name_or_path", "parallel_drafting", "norm_output",
                    "norm_before_fc", "fc_norm", "norm_before_residual", "attention_bias", "mlp_bias")


def _foreign_config_fields(config) -> dict:
    """``Eagle3DraftConfig`` keyword arguments for a config object of another type (see
    :meth:`Eagle3DraftConfig.from_config`)."""
    missing = [name for name in _REQUIRED_LLAMA_FIELDS if getattr(config, name, None) is None]
    if missing:
        raise ValueError(f"config ({type(config).__name__}) lacks the Llama field(s) {', '.join(missing)}")
    fields = {name: getattr(config, name) for name in _REQUIRED_LLAMA_FIELDS}
    fields.update({name: getattr(config, name) for name in _OPTIONAL_FIELDS if getattr(config, name, None) is not None})
    fields.setdefault("num_key_value_heads", fields["num_attention_heads"])
    fields.setdefault("draft_vocab_size", fields["vocab_size"])
    layers = getattr(config, "num_hidden_layers", 1)
    fields["num_hidden_layers"] = (max(1, layers) if isinstance(layers, int) else layers) if fields.get(
        "parallel_drafting") else 1
    hidden_act = getattr(config, "hidden_act", "silu")
    if hidden_act != "silu":
        raise ValueError(f"hidden_act {hidden_act!r} is not supported: the draft's MLP is SwiGLU with silu")
    partial = getattr(config, "partial_rotary_factor", 1.0)
    if partial != 1:
        raise ValueError(f"partial_rotary_factor {partial!r} is not supported: the draft rotates the whole head")
    rope_params = getattr(config, "rope_parameters", None)
    layer = {"rope_parameters": rope_params} if rope_params else {
        "rope_theta": getattr(config, "rope_theta", rope.DEFAULT_THETA),
        "rope_scaling": getattr(config, "rope_scaling", None)}
    fields["rope_theta"], fields["rope_scaling"] = rope.rope_fields(layer, where="config.")
    return fields


def _value_has_type(value, hint) -> bool:
    """Whether ``value`` fits the annotation ``hint`` (int, float, bool, str, list[int], X | None).
    Strict about bool: True is not an int, "false" is not a bool; an int is a float."""
    if isinstance(hint, types.UnionType):
        return any(_value_has_type(value, option) for option in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_value_has_type(v, item) for v in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _check_field_types(config) -> None:
    """TypeError naming the first field whose value does not have its annotated type."""
    for name, hint in typing.get_type_hints(type(config)).items():
        value = getattr(config, name)
        if not _value_has_type(value, hint):
            shown = hint.__name__ if isinstance(hint, type) else str(hint)
            raise TypeError(f"field {name!r} must be {shown}, got {type(value).__name__} {value!r}")


class LlamaRotaryEmbedding(nn.Module):
    """Llama rotary position embedding (rotate-half form) at arbitrary position ids, for the rope
    types of :mod:`peagle_ext.draft.rope` (``rope_scaling`` None: plain rope)."""

    def __init__(self, head_dim: int, theta: float, rope_scaling: dict | None = None,
                 max_position_embeddings: int | None = None):
        super().__init__()
        rope_scaling = rope.check_rope_scaling(rope_scaling, max_position_embeddings)
        inv_freq, self.attention_scaling = rope.inverse_frequencies(head_dim, theta, rope_scaling,
                                                                    max_position_embeddings)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor,
                query_position_ids: torch.Tensor | None = None):
        """Rotate q: [B, Hq, Q, D] and k: [B, Hk, N, D] by position_ids: [B, N] or [N] (any order,
        gaps allowed); q by ``query_position_ids`` ([B, Q] or [Q]) when the queries are not the
        keys' elements. Computed in float32, returned in q's and k's dtypes."""
        query_position_ids = position_ids if query_position_ids is None else query_position_ids
        return self._rotate(q, query_position_ids), self._rotate(k, position_ids)

    def _rotate(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        freqs = position_ids.to(torch.float32)[..., None] * self.inv_freq  # [(B,) N, D/2]
        angles = torch.cat([freqs, freqs], dim=-1).unsqueeze(-3)  # [(B,) 1, N, D]
        cos, sin = angles.cos() * self.attention_scaling, angles.sin() * self.attention_scaling
        return (x.float() * cos + _rotate_half(x.float()) * sin).to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


class Eagle3LlamaAttention(_PeagleAttentionMixin, nn.Module):
    """Llama attention; its q/k/v projections read 2H features with ``fuse_input`` (the fused first
    layer's ``[embeds, hidden]``), H otherwise. ``config``: any config
    :meth:`Eagle3DraftConfig.from_config` reads, kept as ``self.config``."""

    def __init__(self, config, fuse_input: bool = True):
        super().__init__()
        if not isinstance(fuse_input, bool):
            raise TypeError(f"fuse_input must be a bool (True: 2 x hidden_size input features), got {fuse_input!r}")
        draft = Eagle3DraftConfig.from_config(config)
        self.config = config
        self.fuse_input = fuse_input
        self.num_heads = draft.num_attention_heads
        self.num_key_value_heads = draft.num_key_value_heads
        self.head_dim = draft.head_dim
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        input_size = draft.hidden_size * (2 if fuse_input else 1)
        bias = draft.attention_bias
        self.q_proj = nn.Linear(input_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(input_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(input_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, draft.hidden_size, bias=bias)
        self.rotary_emb = LlamaRotaryEmbedding(
            self.head_dim, draft.rope_theta, draft.rope_scaling, draft.max_position_embeddings
        )

    def _project_qkv(self, hidden_states: torch.Tensor, query_rows: torch.Tensor | None = None):
        """[B, N, input_size] -> q [B, heads, Q, D], k and v [B, kv_heads, N, D]; the queries are
        the elements ``query_rows`` (int [Q] or [B, Q]) when given, else all N."""
        queries = hidden_states if query_rows is None else _select_rows(hidden_states, query_rows)

        def heads(proj, states):
            return proj(states).view(states.shape[0], states.shape[1], -1, self.head_dim).transpose(1, 2)

        return heads(self.q_proj, queries), heads(self.k_proj, hidden_states), heads(self.v_proj, hidden_states)

    def _repeat_kv(self, k: torch.Tensor, v: torch.Tensor | None = None):
        """[B, kv_heads, N, D] -> [B, heads, N, D], each KV head repeated for its query group; given
        ``v`` too, the pair ``(k, v)`` so repeated (NeMo Automodel's form)."""
        if v is not None:
            return self._repeat_kv(k), self._repeat_kv(v)
        return k.repeat_interleave(self.num_key_value_groups, dim=1)


class Eagle3LlamaMLP(nn.Module):
    """SwiGLU MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, config):
        super().__init__()
        draft = Eagle3DraftConfig.from_config(config)
        bias = draft.mlp_bias
        self.gate_proj = nn.Linear(draft.hidden_size, draft.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(draft.hidden_size, draft.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(draft.intermediate_size, draft.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _LlamaBlock(nn.Module):
    """Pre-norm Llama block parts shared by both layer kinds (``fuse_input``: see
    :class:`Eagle3LlamaAttention`); ``layer_id`` is the layer's index in the draft."""

    def __init__(self, config, layer_id: int, fuse_input: bool):
        super().__init__()
        draft = Eagle3DraftConfig.from_config(config)
        self.layer_id = layer_id
        self.input_layernorm = nn.RMSNorm(draft.hidden_size, eps=draft.rms_norm_eps)
        self.self_attn = Eagle3LlamaAttention(config, fuse_input)
        self.post_attention_layernorm = nn.RMSNorm(draft.hidden_size, eps=draft.rms_norm_eps)
        self.mlp = Eagle3LlamaMLP(config)


class Eagle3LlamaDecoderLayer(_PeagleDecoderLayerMixin, _LlamaBlock):
    """The fused first layer: ``input_layernorm`` on embeddings, ``hidden_norm`` on the hidden
    state, concatenated to 2H features for attention; the residual is the hidden state, or its
    ``hidden_norm`` with ``norm_before_residual``."""

    def __init__(self, config, layer_id: int = 0):
        super().__init__(config, layer_id, fuse_input=True)
        draft = Eagle3DraftConfig.from_config(config)
        self.is_input_layer = layer_id == 0
        self.hidden_norm = nn.RMSNorm(draft.hidden_size, eps=draft.rms_norm_eps)
        self.norm_before_residual = draft.norm_before_residual


class Eagle3LlamaPeagleLayer(_PeagleVanillaLayerMixin, _LlamaBlock):
    """A plain pre-norm Llama layer over H features (the P-EAGLE deep layers, ``layer_id`` >= 1)."""

    def __init__(self, config, layer_id: int = 1):
        super().__init__(config, layer_id, fuse_input=False)


class Eagle3LlamaModel(nn.Module):
    """The draft's body: embeddings, the ``fc`` projection of the target's states (after
    ``input_norm`` and/or ``fc_norm`` when configured), layers, norm. The embeddings'
    ``padding_idx`` is the config's ``pad_token_id`` when it has one, as in NeMo Automodel."""

    def __init__(self, config):
        super().__init__()
        draft = Eagle3DraftConfig.from_config(config)
        self.config = config
        aux_width = draft.num_aux_hidden_states * draft.target_hidden_size
        eps = draft.rms_norm_eps
        self.embed_tokens = nn.Embedding(draft.vocab_size, draft.hidden_size, padding_idx=_padding_idx(config, draft))
        self.input_norm = nn.RMSNorm(aux_width, eps=eps) if draft.norm_before_fc else None
        self.fc_norm = None
        if draft.fc_norm:
            self.fc_norm = nn.ModuleList(
                nn.RMSNorm(draft.target_hidden_size, eps=eps) for _ in range(draft.num_aux_hidden_states)
            )
        self.fc = nn.Linear(aux_width, draft.hidden_size, bias=False)
        deep = [Eagle3LlamaPeagleLayer(config, layer_id) for layer_id in range(1, draft.num_hidden_layers)]
        self.layers = nn.ModuleList([Eagle3LlamaDecoderLayer(config), *deep])
        self.norm = nn.RMSNorm(draft.hidden_size, eps=draft.rms_norm_eps)


def _padding_idx(config, draft: Eagle3DraftConfig) -> int | None:
    """The config's ``pad_token_id`` (None when it has none), checked against the vocabulary."""
    pad = getattr(config, "pad_token_id", None)
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or not 0 <= pad < draft.vocab_size):
        raise ValueError(f"pad_token_id must be None or an int in [0, vocab_size={draft.vocab_size}), got {pad!r}")
    return pad


class LlamaEagle3DraftModel(_PeagleDraftMixin, nn.Module):
    """Llama EAGLE-3 draft model; with ``config.parallel_drafting`` a P-EAGLE draft.

    Parameters: ``model`` (:class:`Eagle3LlamaModel`), ``lm_head`` over the draft vocabulary,
    ``mask_hidden`` [1, 1, num_aux * target_hidden] only when ``parallel_drafting``. When
    ``draft_vocab_size < vocab_size`` it holds the vocabulary maps ``d2t`` (int64
    [draft_vocab], target id minus draft id) and ``t2d`` (bool [vocab], in the draft vocab),
    initially the first ``draft_vocab_size`` ids (see :meth:`set_draft_vocab`).

    ``config``: an :class:`Eagle3DraftConfig`, or any config with the Llama fields (a transformers
    ``LlamaConfig`` with the P-EAGLE attributes set on it, as NeMo Automodel builds its drafts),
    read by :meth:`Eagle3DraftConfig.from_config`. ``self.config`` is the object given;
    ``self.draft_config`` the ``Eagle3DraftConfig`` it describes, which the draft's own code reads.
    Attribute, module and parameter names are NeMo Automodel's (``target_hidden_size``,
    ``draft_vocab_size``, ``has_vocab_compression``, ``model.layers``, ``model.fc``,
    ``mask_hidden``, ...). Parameters are created in torch's default dtype; ``.to(dtype)`` casts,
    as Automodel's recipe does.
    """

    def __init__(self, config):
        super().__init__()
        draft = Eagle3DraftConfig.from_config(config)
        self.config = config
        self.draft_config = draft
        self.target_hidden_size = draft.target_hidden_size
        self.draft_vocab_size = draft.draft_vocab_size
        self.has_vocab_compression = draft.draft_vocab_size < draft.vocab_size
        self.gradient_checkpointing = False
        self.model = Eagle3LlamaModel(config)
        self.lm_head = nn.Linear(draft.hidden_size, draft.draft_vocab_size, bias=False)
        if self.has_vocab_compression:
            self.register_buffer("d2t", torch.zeros(draft.draft_vocab_size, dtype=torch.int64))
            self.register_buffer("t2d", torch.arange(draft.vocab_size) < draft.draft_vocab_size)
        if draft.parallel_drafting:
            self._init_peagle_parameters(config)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids [...] -> embeddings [..., H]."""
        return self.model.embed_tokens(input_ids)

    def project_hidden_states(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Concatenated target auxiliary states [..., num_aux * target_hidden] -> [..., H]:
        ``input_norm`` over the whole (``norm_before_fc``), ``fc_norm.{i}`` on the i-th state
        (``fc_norm``), then ``fc``."""
        body = self.model
        if body.input_norm is not None:
            hidden_states = body.input_norm(hidden_states)
        if body.fc_norm is not None:
            chunks = hidden_states.chunk(len(body.fc_norm), dim=-1)
            hidden_states = torch.cat([norm(chunk) for norm, chunk in zip(body.fc_norm, chunks)], dim=-1)
        return body.fc(hidden_states)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Draft hidden states [..., H] from :meth:`forward_peagle` -> logits [..., draft_vocab]."""
        if not self.draft_config.norm_output:
            hidden_states = self.model.norm(hidden_states)
        return self.lm_head(hidden_states)

    def draft_to_target_ids(self) -> torch.Tensor:
        """int64 [draft_vocab]: the target-vocabulary id of each draft-vocabulary id."""
        ids = torch.arange(self.draft_vocab_size, device=self.lm_head.weight.device)
        return ids + self.d2t if self.has_vocab_compression else ids

    def set_draft_vocab(self, target_ids: torch.Tensor) -> None:
        """Make the draft vocabulary the given distinct target ids (int [draft_vocab], sorted here)."""
        if not self.has_vocab_compression:
            raise ValueError("this draft's vocabulary is the whole target vocabulary (no d2t/t2d)")
        target_ids = torch.as_tensor(target_ids, dtype=torch.int64, device=self.d2t.device).sort().values
        self._write_vocab_maps(target_ids, "target_ids")

    def set_vocab_mapping(self, selected_token_ids: torch.Tensor) -> None:
        """NeMo Automodel's form of :meth:`set_draft_vocab`: draft id i is target id
        ``selected_token_ids[i]`` (any shape holding draft_vocab_size distinct ids; their order is
        kept); a no-op when the draft's vocabulary is the whole target vocabulary."""
        if self.has_vocab_compression:
            selected = torch.as_tensor(selected_token_ids).reshape(-1).to(dtype=torch.int64, device=self.d2t.device)
            self._write_vocab_maps(selected, "selected_token_ids")

    def _write_vocab_maps(self, target_ids: torch.Tensor, name: str) -> None:
        if target_ids.shape != self.d2t.shape or target_ids.unique().numel() != target_ids.numel():
            raise ValueError(f"{name} must be {self.d2t.numel()} distinct ids")
        vocab_size = self.draft_config.vocab_size
        if target_ids.min() < 0 or target_ids.max() >= vocab_size:
            raise ValueError(f"{name} must lie in [0, {vocab_size})")
        self.d2t.copy_(target_ids - torch.arange(target_ids.numel(), device=target_ids.device))
        self.t2d.zero_()
        self.t2d[target_ids] = True

    def copy_embeddings_from_target(self, target_embedding: nn.Embedding) -> None:
        """Copy the target's input embeddings into the draft's (a DTensor weight is gathered first)."""
        weight = target_embedding.weight
        if hasattr(weight, "full_tensor"):
            weight = weight.full_tensor()
        with torch.no_grad():
            self.model.embed_tokens.weight.copy_(weight)

    def freeze_embeddings(self) -> None:
        """Stop training the draft's input embeddings."""
        self.model.embed_tokens.weight.requires_grad_(False)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Recompute each draft layer in the backward (see ``_run_draft_layer``);
        ``gradient_checkpointing_kwargs`` is accepted for the transformers API and not used: the
        recompute is always non-reentrant."""
        self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.gradient_checkpointing = False

    def forward(self, *args, peagle_training_inputs: dict | None = None, **kwargs) -> torch.Tensor:
        """:meth:`forward_peagle` (same arguments). With ``peagle_training_inputs`` (the keyword
        arguments of :func:`peagle_ext.draft.flat_inputs.supervised_draft_logits`), the draft logits of one
        training step or segment: ``peagle_training_step`` calls it so, so that a
        DistributedDataParallel wrapper sees the whole forward of the step."""
        if peagle_training_inputs is not None:
            return supervised_draft_logits(self, **peagle_training_inputs)
        return self.forward_peagle(*args, **kwargs)

    def save_pretrained(self, directory, verifier: str | None = None, layout: str | None = None) -> None:
        """Write ``config.json`` and ``model.safetensors``, atomically, in ``layout``:

        * ``"speculators"``: speculators' layout, which speculators and vLLM load (see
          :mod:`peagle_ext.draft.checkpoint`);
        * ``"automodel"``: NeMo Automodel's, a flat Llama ``config.json`` with ``parallel_drafting``
          and ``mask_token_id`` at top level and the module's own weight names;
        * None (default): Automodel's for a draft built from another config object (a transformers
          ``LlamaConfig``, as Automodel builds its drafts), speculators' for an ``Eagle3DraftConfig``.

        ``verifier``: the target model's hub id or path, recorded as speculators'
        ``verifier.name_or_path`` (default: ``config.verifier_name_or_path``). When speculators or
        vLLM will lack something to load or serve a speculators-layout checkpoint (no verifier, for
        one), it is still written and one :class:`~peagle_ext.draft.checkpoint.InteropWarning` says what.
        """
        if layout is None:
            layout = "speculators" if isinstance(self.config, Eagle3DraftConfig) else "automodel"
        checkpoint.check_layout(layout)
        fields = self.draft_config.to_dict()
        if verifier is not None:
            fields["verifier_name_or_path"] = str(verifier)
        state = {checkpoint.disk_key(name, layout): tensor for name, tensor in self.state_dict().items()}
        dtype = self.lm_head.weight.dtype
        if layout == "automodel":
            checkpoint.save_checkpoint(directory, checkpoint.automodel_config(fields, dtype), state)
            return
        verifier_entry = checkpoint.verifier_record(fields["verifier_name_or_path"])
        checkpoint.save_checkpoint(directory, checkpoint.speculators_config(fields, dtype, verifier_entry), state)
        checkpoint.warn_interop(directory, checkpoint.interop_notes(fields))

    @classmethod
    def from_pretrained(cls, directory, device="cpu", dtype: torch.dtype | None = None) -> LlamaEagle3DraftModel:
        """Load a checkpoint that speculators (P-EAGLE or EAGLE-3, Llama), NeMo Automodel's recipe or
        :meth:`save_pretrained` wrote, in either layout, onto ``device`` (floating weights cast to
        ``dtype`` when given). An error names the config field or any missing, unexpected or
        misshapen key."""
        opened = checkpoint.open_checkpoint(directory)
        try:
            layout = checkpoint.layout_of(opened.config_json)
            if layout == "automodel":
                checkpoint.check_llama_layer(opened.config_json, where="")
                config = Eagle3DraftConfig(**_foreign_config_fields(SimpleNamespace(**opened.config_json)))
            else:
                config = Eagle3DraftConfig(**checkpoint.config_fields(opened.config_json))
        except (KeyError, TypeError, ValueError) as error:
            message = error.args[0] if error.args else str(error)
            raise type(error)(f"{opened.config_path}: {message}") from None
        # Shapes and dtypes are checked against the file's header before any parameter exists: a
        # skeleton on the meta device allocates nothing (its layer count is first bounded by the
        # header's, which a layer contributes several keys to).
        if config.num_hidden_layers > len(opened.header):
            raise ValueError(f"{opened.config_path}: num_hidden_layers is {config.num_hidden_layers} but "
                             f"{opened.weights_path} holds only {len(opened.header)} tensors")
        skeleton = checkpoint.skeleton_state_dict(lambda: cls(config))
        names = {checkpoint.disk_key(name, layout): name for name in skeleton}
        sizes = checkpoint.size_fields(config.to_dict())
        opened.check_header({key: skeleton[name] for key, name in names.items()}, sizes)
        model = cls(config)
        model.load_state_dict({names[key]: tensor for key, tensor in opened.tensors().items()})
        return model.to(device=device, dtype=dtype)
