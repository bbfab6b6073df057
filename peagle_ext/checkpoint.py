"""Draft checkpoints in the speculators P-EAGLE layout (what speculators and vLLM load).

A checkpoint is a directory with two files:

* ``config.json``: ``speculators_model_type`` ("peagle", or "eagle3" without parallel drafting),
  the draft's own fields at top level (``mask_token_id``, ``draft_vocab_size``,
  ``target_hidden_size``, ``eagle_aux_hidden_state_layer_ids``, ``norm_output``, ``fc_norm``...),
  the Llama layer shape under ``transformer_layer_config``, and ``speculators_config``
  (algorithm, greedy proposal with ``speculative_tokens`` = the COD depths, verifier);
* ``model.safetensors``: weights at top level, ``embed_tokens.weight``, ``fc.weight``,
  ``layers.{i}.*``, ``norm.weight``, ``lm_head.weight``, ``mask_hidden`` [1, 1, num_aux *
  target_hidden], and ``d2t``/``t2d`` when the draft vocabulary is smaller.

This module maps between that layout and plain dicts; ``draft_llama`` owns the model.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_MODULE_PREFIX = "model."

# Config fields stored at the top level of config.json, and under transformer_layer_config.
_TOP_FIELDS = (
    "draft_vocab_size",
    "target_hidden_size",
    "num_aux_hidden_states",
    "eagle_aux_hidden_state_layer_ids",
    "norm_output",
    "fc_norm",
    "mask_token_id",
    "parallel_drafting",
)
_LAYER_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "num_hidden_layers",
    "vocab_size",
    "rms_norm_eps",
    "rope_theta",
    "max_position_embeddings",
)


def disk_key(name: str) -> str:
    """Module state-dict name -> checkpoint key (``model.layers.0.x`` -> ``layers.0.x``)."""
    return name.removeprefix(_MODULE_PREFIX)


def speculators_config(fields: dict, dtype: torch.dtype) -> dict:
    """The config.json dict for a draft with these ``Eagle3DraftConfig`` field values."""
    peagle = fields["parallel_drafting"]
    return {
        "architectures": ["PEagleSpeculator" if peagle else "Eagle3Speculator"],
        "speculators_model_type": "peagle" if peagle else "eagle3",
        **{name: fields[name] for name in _TOP_FIELDS},
        "norm_before_residual": False,
        "embed_requires_grad": True,
        "tie_word_embeddings": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "transformer_layer_config": {
            "model_type": "llama",
            **{name: fields[name] for name in _LAYER_FIELDS},
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": False,
        },
        "speculators_config": {
            "algorithm": "peagle" if peagle else "eagle3",
            "default_proposal_method": "greedy",
            "proposal_methods": [
                {
                    "proposal_type": "greedy",
                    "speculative_tokens": fields["num_depths"],
                    "accept_tolerance": 0.0,
                    "verifier_accept_k": 1,
                }
            ],
            "verifier": {"name_or_path": fields["verifier_name_or_path"], "architectures": []},
        },
    }


def _required(mapping: dict, key: str, where: str):
    if key not in mapping:
        raise KeyError(f"{CONFIG_NAME}: missing key {where}{key!r}")
    return mapping[key]


def config_fields(config_json: dict) -> dict:
    """``Eagle3DraftConfig`` field values from a config.json dict; a missing key raises KeyError naming it."""
    model_type = _required(config_json, "speculators_model_type", "")
    if model_type not in ("peagle", "eagle3"):
        raise ValueError(f"{CONFIG_NAME}: speculators_model_type is {model_type!r}, expected 'peagle' or 'eagle3'")
    layer = _required(config_json, "transformer_layer_config", "")
    spec = _required(config_json, "speculators_config", "")
    proposals = _required(spec, "proposal_methods", "speculators_config.")
    fields = {name: _required(layer, name, "transformer_layer_config.") for name in _LAYER_FIELDS}
    top = {name: config_json[name] for name in _TOP_FIELDS if name in config_json}
    top.setdefault("parallel_drafting", model_type == "peagle")
    layer_ids = top.get("eagle_aux_hidden_state_layer_ids")
    if "num_aux_hidden_states" not in top and layer_ids:
        top["num_aux_hidden_states"] = len(layer_ids)
    fields.update(top)
    fields["num_depths"] = _required(proposals[0], "speculative_tokens", "speculators_config.proposal_methods[0].")
    fields["verifier_name_or_path"] = spec.get("verifier", {}).get("name_or_path")
    return fields


def check_tensors(expected_shapes: dict, tensors: dict) -> None:
    """Raise KeyError for a missing or unexpected key, ValueError for a misshapen one, naming it."""
    missing = sorted(set(expected_shapes) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected_shapes))
    if missing:
        raise KeyError(f"{WEIGHTS_NAME}: missing key(s) {missing}")
    if unexpected:
        raise KeyError(f"{WEIGHTS_NAME}: unexpected key(s) {unexpected}")
    for key, shape in expected_shapes.items():
        if tuple(tensors[key].shape) != tuple(shape):
            raise ValueError(
                f"{WEIGHTS_NAME}: key {key!r} has shape {tuple(tensors[key].shape)}, expected {tuple(shape)}"
            )


def save_checkpoint(directory, config_json: dict, tensors: dict) -> None:
    """Write config.json and model.safetensors into ``directory``, replacing it as a whole.

    Everything is written to a temporary sibling first and renamed into place, so a failure
    never leaves a half-written checkpoint at ``directory`` (an existing one stays intact).
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.with_name(f".{directory.name}.tmp-{uuid.uuid4().hex}")
    staging.mkdir()
    old = None
    try:
        save_file({key: t.detach().contiguous().cpu() for key, t in tensors.items()}, staging / WEIGHTS_NAME)
        (staging / CONFIG_NAME).write_text(json.dumps(config_json, indent=2, sort_keys=True) + "\n")
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{uuid.uuid4().hex}")
            directory.rename(old)
        staging.rename(directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if old is not None and not directory.exists():
            old.rename(directory)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(directory) -> tuple[dict, dict]:
    """(config.json dict, {key: tensor}) from a checkpoint directory, tensors on CPU."""
    directory = Path(directory)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory} has no {name}")
    return json.loads((directory / CONFIG_NAME).read_text()), load_file(directory / WEIGHTS_NAME)
