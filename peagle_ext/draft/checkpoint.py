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

import ctypes
import errno
import functools
import glob
import json
import os
import re
import shutil
import sys
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


def _required(mapping: dict, key: str, where: str, kind: type | None = None):
    """mapping[key], which must exist (and be a ``kind`` when given); errors name ``where + key``."""
    if key not in mapping:
        raise KeyError(f"missing key {where}{key!r}")
    value = mapping[key]
    if kind is not None and not isinstance(value, kind):
        raise TypeError(f"{where}{key} must be a JSON {'object' if kind is dict else 'array'}, got {value!r}")
    return value


def config_path(directory) -> Path:
    """Where the config.json of a checkpoint directory is read from (see :func:`load_checkpoint`)."""
    return _readable_directory(Path(directory)) / CONFIG_NAME


def config_fields(config_json: dict) -> dict:
    """``Eagle3DraftConfig`` field values from a config.json dict; a missing key raises KeyError and
    a mis-typed structure TypeError, naming it (the field values are type-checked by the config)."""
    model_type = _required(config_json, "speculators_model_type", "")
    if model_type not in ("peagle", "eagle3"):
        raise ValueError(f"speculators_model_type is {model_type!r}, expected 'peagle' or 'eagle3'")
    layer = _required(config_json, "transformer_layer_config", "", dict)
    spec = _required(config_json, "speculators_config", "", dict)
    proposals = _required(spec, "proposal_methods", "speculators_config.", list)
    if not proposals or not isinstance(proposals[0], dict):
        raise TypeError(f"speculators_config.proposal_methods must hold an object, got {proposals!r}")
    fields = {name: _required(layer, name, "transformer_layer_config.") for name in _LAYER_FIELDS}
    top = {name: config_json[name] for name in _TOP_FIELDS if name in config_json}
    top.setdefault("parallel_drafting", model_type == "peagle")
    layer_ids = top.get("eagle_aux_hidden_state_layer_ids")
    if "num_aux_hidden_states" not in top and isinstance(layer_ids, list) and layer_ids:
        top["num_aux_hidden_states"] = len(layer_ids)
    fields.update(top)
    fields["num_depths"] = _required(proposals[0], "speculative_tokens", "speculators_config.proposal_methods[0].")
    verifier = spec.get("verifier") or {}
    if not isinstance(verifier, dict):
        raise TypeError(f"speculators_config.verifier must be a JSON object, got {verifier!r}")
    fields["verifier_name_or_path"] = verifier.get("name_or_path")
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


def _sibling(directory: Path, kind: str) -> Path:
    """A hidden sibling of ``directory`` owned by this process: ``.{name}.{kind}-{pid}-{random}``."""
    return directory.with_name(f".{directory.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:12]}")


def _remove_stale_siblings(directory: Path) -> None:
    """Delete temporaries that earlier saves of ``directory`` left behind when they were killed.

    A sibling is stale when the process named in it no longer runs; those of running processes
    (a concurrent save) are left alone.
    """
    for sibling in directory.parent.glob(f".{glob.escape(directory.name)}.*-*-*"):
        match = re.fullmatch(rf"\.{re.escape(directory.name)}\.(?:tmp|old)-(\d+)-[0-9a-f]+", sibling.name)
        if match and not _process_alive(int(match.group(1))):
            shutil.rmtree(sibling, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing directories (Linux renameat2 RENAME_EXCHANGE); False where the
    system or file system cannot."""
    renameat2 = getattr(_libc(), "renameat2", None) if sys.platform.startswith("linux") else None
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(error, os.strerror(error), str(b))


@functools.lru_cache(maxsize=None)
def _libc():
    return ctypes.CDLL(None, use_errno=True)


def save_checkpoint(directory, config_json: dict, tensors: dict) -> None:
    """Write config.json and model.safetensors into ``directory``, replacing it as a whole.

    Crash-safe: a process killed at any moment (SIGKILL included) leaves ``directory`` holding
    either the previous checkpoint or the new one, complete. Both files are written and synced
    into a hidden staging sibling first; an existing checkpoint is then swapped with it in one
    atomic rename (renameat2 RENAME_EXCHANGE) and the staging name, now holding the old version,
    is deleted. Where the file system cannot exchange, the old directory is renamed aside before
    the new one is renamed in, and :func:`load_checkpoint` reads the aside copy if a kill fell
    between the two renames. Temporaries of killed saves are deleted by the next save.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    readable = _readable_directory(directory)
    if readable != directory:  # a fallback save was killed between its renames: put the copy back first
        readable.rename(directory)
    _remove_stale_siblings(directory)
    staging = _sibling(directory, "tmp")
    staging.mkdir()
    try:
        save_file({key: t.detach().contiguous().cpu() for key, t in tensors.items()}, staging / WEIGHTS_NAME)
        (staging / CONFIG_NAME).write_text(json.dumps(config_json, indent=2, sort_keys=True) + "\n")
        for written in (staging / WEIGHTS_NAME, staging / CONFIG_NAME, staging):
            _fsync(written)
        if not directory.exists():
            staging.rename(directory)
        elif not _exchange(staging, directory):
            aside = _sibling(directory, "old")
            directory.rename(aside)
            staging.rename(directory)
            shutil.rmtree(aside)
        _fsync(directory.parent)
    finally:
        # After an exchange the staging name holds the previous version; after an error, the partial new one.
        shutil.rmtree(staging, ignore_errors=True)


def _readable_directory(directory: Path) -> Path:
    """``directory``, or, where a save on a file system without atomic exchange was killed between
    its two renames, the previous version it had renamed aside."""
    if directory.exists():
        return directory
    aside = sorted(directory.parent.glob(f".{glob.escape(directory.name)}.old-*"), key=lambda p: p.stat().st_mtime)
    complete = [p for p in aside if (p / CONFIG_NAME).is_file() and (p / WEIGHTS_NAME).is_file()]
    return complete[-1] if complete else directory


def load_checkpoint(directory) -> tuple[dict, dict]:
    """(config.json dict, {key: tensor}) from a checkpoint directory, tensors on CPU.

    Raises FileNotFoundError for a missing file and ValueError naming the file for one that
    cannot be parsed.
    """
    directory = _readable_directory(Path(directory))
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory} has no {name}")
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    try:
        config_json = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{config_path}: not valid JSON ({error})") from None
    if not isinstance(config_json, dict):
        raise ValueError(f"{config_path}: expected a JSON object, got {type(config_json).__name__}")
    try:
        tensors = load_file(weights_path)
    except Exception as error:  # safetensors raises its own SafetensorError (and OSError) without the path
        raise ValueError(f"{weights_path}: not a readable safetensors file ({error})") from None
    return config_json, tensors
