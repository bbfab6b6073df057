"""Rotary position embeddings of Llama drafts: the rope types Llama and Qwen verifiers carry
(default, linear, llama3, yarn), computed the way transformers computes them.

A draft config holds ``rope_theta`` and ``rope_scaling`` (the type and its options, without the
theta: transformers 4's form). On disk, transformers 5 writes one dict, ``rope_parameters``
(``{"rope_type": ..., "rope_theta": ..., **options}``); :func:`rope_parameters` and
:func:`rope_fields` convert between the two.

    inv_freq, attention_scaling = inverse_frequencies(head_dim, theta, scaling, max_positions)
"""

from __future__ import annotations

import math

import torch

# Options each rope type accepts: (required, optional). ``original_max_position_embeddings``
# defaults to ``max_position_embeddings`` where it is required, as transformers does.
_OPTIONS = {
    "default": ((), ()),
    "linear": (("factor",), ()),
    "llama3": (("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"), ()),
    "yarn": (
        ("factor", "original_max_position_embeddings"),
        ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"),
    ),
}
# Accepted by every type, with the one value a Llama draft implements (it rotates whole heads).
_PARTIAL_ROTARY = "partial_rotary_factor"
# What transformers uses when a config names no theta (PreTrainedConfig.default_theta).
DEFAULT_THETA = 10_000.0


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_option(rope_type: str, name: str, value) -> None:
    where = f"rope option {name!r} of rope_type {rope_type!r}"
    if name == "truncate":
        if not isinstance(value, bool):
            raise TypeError(f"{where} must be a bool, got {value!r}")
    elif name == "original_max_position_embeddings":
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{where} must be an int >= 1, got {value!r}")
    elif name == "factor" and rope_type == "yarn" and value is None:
        pass  # transformers: max_position_embeddings / original_max_position_embeddings
    elif name == _PARTIAL_ROTARY:
        if value != 1:
            raise ValueError(f"{where} must be 1.0: a Llama draft rotates whole heads, got {value!r}")
    elif not _number(value):
        raise TypeError(f"{where} must be a number, got {value!r}")
    elif not math.isfinite(value):
        raise ValueError(f"{where} must be finite, got {value!r}")
    elif name in ("factor", "high_freq_factor", "low_freq_factor", "attention_factor") and not value > 0:
        raise ValueError(f"{where} must be > 0, got {value!r}")
    elif name in ("beta_fast", "beta_slow") and value < 0:  # 0 means the default, as in transformers
        raise ValueError(f"{where} must be >= 0, got {value!r}")


def check_rope_scaling(rope_scaling: dict | None, max_position_embeddings: int) -> dict | None:
    """The canonical form of a ``rope_scaling`` dict: None for default rope, else a new dict with
    ``rope_type`` (the legacy key ``type`` accepted) and its options, a missing
    ``original_max_position_embeddings`` filled in. An unknown rope type, an unknown option, a
    missing one or a bad value raises, naming it."""
    if rope_scaling is None:
        return None
    options = dict(rope_scaling)
    legacy = options.pop("type", None)
    rope_type = options.pop("rope_type", legacy if legacy is not None else "default")
    if legacy is not None and legacy != rope_type:
        raise ValueError(f"the rope names two types: rope_type {rope_type!r} and type {legacy!r}")
    if rope_type not in _OPTIONS:
        raise ValueError(f"unsupported rope_type {rope_type!r}; supported: {', '.join(_OPTIONS)}")
    if "rope_theta" in options:
        raise ValueError("rope_scaling must not hold rope_theta: it is the config field rope_theta")
    required, optional = _OPTIONS[rope_type]
    if "original_max_position_embeddings" in required:
        options.setdefault("original_max_position_embeddings", max_position_embeddings)
    unknown = sorted(set(options) - set(required) - set(optional) - {_PARTIAL_ROTARY})
    if unknown:
        raise ValueError(f"unknown rope option {unknown[0]!r} for rope_type {rope_type!r}; "
                         f"known: {', '.join(required + optional + (_PARTIAL_ROTARY,))}")
    missing = [name for name in required if name not in options]
    if missing:
        raise ValueError(f"rope_type {rope_type!r} needs the rope option {missing[0]!r}")
    for name, value in options.items():
        _check_option(rope_type, name, value)
    if rope_type == "llama3" and not options["low_freq_factor"] < options["high_freq_factor"]:
        raise ValueError(f"rope option 'low_freq_factor' ({options['low_freq_factor']}) must be below "
                         f"'high_freq_factor' ({options['high_freq_factor']}): llama3 blends between them")
    if rope_type == "default" and not options:
        return None
    return {"rope_type": rope_type, **options}


def rope_parameters(rope_theta: float, rope_scaling: dict | None) -> dict:
    """transformers 5's ``rope_parameters`` dict for a checked (theta, scaling) pair."""
    scaling = dict(rope_scaling or {"rope_type": "default"})
    return {"rope_type": scaling.pop("rope_type"), "rope_theta": rope_theta, **scaling}


def rope_fields(layer_config: dict, where: str = "transformer_layer_config.") -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from a Llama config dict in either form: ``rope_parameters``
    (transformers 5), or ``rope_theta`` with ``rope_scaling`` (older). As transformers reads them:
    ``rope_scaling`` wins over ``rope_parameters``, a theta inside the dict wins over the
    top-level one, and no theta at all means 10000."""
    for key in ("rope_scaling", "rope_parameters"):
        value = layer_config.get(key)
        if value is not None and not isinstance(value, dict):
            raise TypeError(f"{where}{key} must be a JSON object or null, got {value!r}")
    params = dict(layer_config.get("rope_scaling") or layer_config.get("rope_parameters") or {})
    nested = [key for key, value in params.items() if isinstance(value, dict)]
    if nested:
        raise ValueError(f"{where}rope_parameters holds per-layer-type parameters ({', '.join(nested)}); "
                         "a Llama draft has one rope for all layers")
    theta = params.pop("rope_theta", layer_config.get("rope_theta", DEFAULT_THETA))
    return theta, params or None


def inverse_frequencies(
    head_dim: int, rope_theta: float, rope_scaling: dict | None, max_position_embeddings: int
) -> tuple[torch.Tensor, float]:
    """(inv_freq float32 [head_dim // 2], attention_scaling), as transformers' rope init functions
    return them for this rope (``compute_default_rope_parameters`` and ``ROPE_INIT_FUNCTIONS``).
    ``rope_scaling`` must be checked (:func:`check_rope_scaling`)."""
    options = dict(rope_scaling or {"rope_type": "default"})
    rope_type = options.pop("rope_type")
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
    inv_freq = 1.0 / (rope_theta**exponents)
    if rope_type == "default":
        return inv_freq, 1.0
    if rope_type == "linear":
        return inv_freq / options["factor"], 1.0
    if rope_type == "llama3":
        return _llama3(inv_freq, options), 1.0
    return _yarn(head_dim, rope_theta, options, max_position_embeddings)


def _llama3(inv_freq: torch.Tensor, options: dict) -> torch.Tensor:
    """Llama 3.1: long wavelengths divided by ``factor``, short ones kept, a smooth blend between."""
    factor, low, high = options["factor"], options["low_freq_factor"], options["high_freq_factor"]
    old_context = options["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inv_freq
    scaled = torch.where(wavelength > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelength - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelength < old_context / high) * ~(wavelength > old_context / low)
    return torch.where(medium, smoothed, scaled)


def _mscale(scale: float, mscale: float = 1) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(head_dim: int, theta: float, options: dict, max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    """YaRN: interpolated frequencies below a correction range of dims, extrapolated above it,
    a linear ramp across it; cos and sin scaled by the attention factor."""
    old_context = options["original_max_position_embeddings"]
    factor = options["factor"]
    if factor is None:
        factor = max_position_embeddings / old_context
    attention_factor = options.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = options.get("mscale"), options.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = float(_mscale(factor, mscale) / _mscale(factor, mscale_all_dim))
        else:
            attention_factor = _mscale(factor)
    beta_fast = options.get("beta_fast") or 32
    beta_slow = options.get("beta_slow") or 1

    def correction_dim(rotations):
        return head_dim * math.log(old_context / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if options.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # as transformers: no zero-width ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    extrapolation_share = 1 - ramp
    inv_freq = 1.0 / (factor * pos_freqs) * (1 - extrapolation_share) + 1.0 / pos_freqs * extrapolation_share
    return inv_freq, attention_factor
