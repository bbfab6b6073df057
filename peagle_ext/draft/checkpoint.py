"""Draft checkpoints in the layout speculators saves (what speculators and vLLM load).

A checkpoint is a directory with two files:

* ``config.json``: ``speculators_model_type`` ("peagle", or "eagle3" without parallel drafting),
  the draft's options at top level under speculators' names (``draft_vocab_size``,
  ``target_hidden_size``, ``eagle_aux_hidden_state_layer_ids``, ``norm_before_fc``, ``fc_norm``,
  ``norm_before_residual``, ``norm_output``, ``mask_token_id``), the Llama layer config under
  ``transformer_layer_config`` (rope as transformers 5's ``rope_parameters``; it also carries
  ``num_aux_hidden_states``, ``fc_norm`` and ``norm_output``, the keys vLLM's draft reads from
  there), and ``speculators_config`` (algorithm, greedy proposal with ``speculative_tokens`` =
  the COD depths, verifier);
* ``model.safetensors``: weights at top level, ``embed_tokens.weight``, ``fc.weight``,
  ``input_norm.weight`` / ``fc_norm.{i}.weight`` when set, ``layers.{i}.*``, ``norm.weight``,
  ``lm_head.weight``, ``mask_hidden`` [1, 1, num_aux * target_hidden] (P-EAGLE), and
  ``d2t``/``t2d`` when the draft vocabulary is smaller.

Reading accepts what speculators 0.9.0 writes, what older transformers wrote (``rope_theta`` +
``rope_scaling``) and what earlier peagle_ext wrote. This module maps between that layout and
plain dicts; :mod:`peagle_ext.draft.llama` owns the model.
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
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import rope

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_MODULE_PREFIX = "model."

# Options stored at the top level of config.json under speculators' names (absent: False).
_OPTION_FIELDS = ("norm_before_fc", "fc_norm", "norm_before_residual", "norm_output")
# Other config fields at the top level (absent: the config's default).
_TOP_FIELDS = ("draft_vocab_size", "target_hidden_size", "eagle_aux_hidden_state_layer_ids", "mask_token_id")
# Under transformer_layer_config, required; then optional ones (absent: LlamaConfig's default).
_LAYER_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "num_hidden_layers",
    "vocab_size",
    "rms_norm_eps",
    "max_position_embeddings",
)
_OPTIONAL_LAYER_FIELDS = ("head_dim", "attention_bias", "mlp_bias")
# Layer-config keys vLLM's Llama EAGLE-3 draft reads from there (its speculators converter drops
# them at top level for P-EAGLE).
_VLLM_LAYER_FIELDS = ("num_aux_hidden_states", "fc_norm", "norm_output")
# What speculators names the model classes (HF writes them into ``architectures``).
_ARCHITECTURES = {"peagle": "PEagleDraftModel", "eagle3": "Eagle3DraftModel"}
# The number of auxiliary states speculators and vLLM assume when no layer ids are given.
_DEFAULT_NUM_AUX = 3


class InteropWarning(UserWarning):
    """A checkpoint was saved that a peer (speculators, vLLM) cannot load or serve as it is."""


def disk_key(name: str) -> str:
    """Module state-dict name -> checkpoint key (``model.layers.0.x`` -> ``layers.0.x``)."""
    return name.removeprefix(_MODULE_PREFIX)


def verifier_record(name_or_path: str | None) -> dict:
    """speculators' ``verifier`` entry: the name or path as given, and the ``architectures`` of
    its config.json when it is a local directory that has one (else [])."""
    architectures = []
    if name_or_path is not None:
        config = Path(name_or_path) / CONFIG_NAME
        try:
            found = json.loads(config.read_text()).get("architectures") if config.is_file() else None
        except (OSError, ValueError, AttributeError):
            found = None
        if isinstance(found, list) and all(isinstance(name, str) for name in found):
            architectures = found
    return {"name_or_path": name_or_path, "architectures": architectures}


def speculators_config(fields: dict, dtype: torch.dtype, verifier: dict) -> dict:
    """The config.json dict for a draft with these ``Eagle3DraftConfig`` field values and this
    ``verifier`` entry (see :func:`verifier_record`)."""
    kind = "peagle" if fields["parallel_drafting"] else "eagle3"
    return {
        "architectures": [_ARCHITECTURES[kind]],
        "speculators_model_type": kind,
        **{name: fields[name] for name in _TOP_FIELDS + _OPTION_FIELDS},
        # speculators' training defaults: P-EAGLE trains its embeddings, EAGLE-3 does not.
        "embed_requires_grad": kind == "peagle",
        "tie_word_embeddings": False,
        "dtype": str(dtype).removeprefix("torch."),
        "transformer_layer_config": {
            "model_type": "llama",
            **{name: fields[name] for name in _LAYER_FIELDS + _OPTIONAL_LAYER_FIELDS},
            "rope_parameters": rope.rope_parameters(fields["rope_theta"], fields["rope_scaling"]),
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            **{name: fields[name] for name in _VLLM_LAYER_FIELDS},
        },
        "speculators_config": {
            "algorithm": kind,
            "default_proposal_method": "greedy",
            "proposal_methods": [
                {
                    "proposal_type": "greedy",
                    "speculative_tokens": fields["num_depths"],
                    "accept_tolerance": 0.0,
                    "verifier_accept_k": 1,
                }
            ],
            "verifier": verifier,
        },
    }


def interop_notes(fields: dict) -> list[str]:
    """What speculators 0.9.0 or vLLM 0.33 will lack to load or serve a draft saved with these
    ``Eagle3DraftConfig`` field values (and ``verifier_name_or_path`` as recorded); [] if nothing."""
    notes = []
    if fields["verifier_name_or_path"] is None:
        notes.append(
            "No verifier recorded: speculators' from_pretrained needs speculators_config.verifier.name_or_path, "
            f"the target model's hub id or local directory (config.json with hidden_size {fields['hidden_size']} "
            "and layers up to the largest auxiliary layer id; weights holding embed_tokens, lm_head and "
            "model.norm). Pass save_pretrained(..., verifier=...) or train-demo --verifier."
        )
    if fields["target_hidden_size"] != fields["hidden_size"]:
        notes.append(
            f"speculators cannot load it: target_hidden_size ({fields['target_hidden_size']}) differs from "
            f"hidden_size ({fields['hidden_size']}), and speculators sizes fc and mask_hidden by hidden_size "
            "(vLLM reads target_hidden_size)."
        )
    if fields["eagle_aux_hidden_state_layer_ids"] is None and fields["num_aux_hidden_states"] != _DEFAULT_NUM_AUX:
        notes.append(
            f"num_aux_hidden_states is {fields['num_aux_hidden_states']} but eagle_aux_hidden_state_layer_ids is "
            f"not set: speculators' draft and vLLM's target capture assume {_DEFAULT_NUM_AUX} auxiliary states "
            "without them."
        )
    return notes


def warn_interop(directory, notes: list[str]) -> None:
    """One :class:`InteropWarning` for a saved checkpoint, saying all of ``notes``."""
    if notes:
        warnings.warn(f"checkpoint {directory}: " + " ".join(notes), InteropWarning, stacklevel=3)


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


def _check_llama_layer(layer: dict) -> None:
    """Refuse a layer config whose math a Llama draft does not implement, naming the key."""
    where = "transformer_layer_config."
    if layer.get("model_type") != "llama":
        raise ValueError(f"{where}model_type is {layer.get('model_type')!r}; peagle_ext loads Llama drafts "
                         "(speculators reads a missing model_type as qwen3)")
    if layer.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where}hidden_act is {layer['hidden_act']!r}; a Llama draft's MLP is SwiGLU ('silu')")
    layer_types = layer.get("layer_types") or []
    if "sliding_attention" in layer_types:
        raise ValueError(f"{where}layer_types has sliding_attention layers; peagle_ext drafts attend fully")


def config_fields(config_json: dict) -> dict:
    """``Eagle3DraftConfig`` field values from a config.json dict; a missing key raises KeyError, a
    mis-typed structure TypeError and an unsupported value ValueError, naming it (the field values
    are type-checked by the config)."""
    model_type = _required(config_json, "speculators_model_type", "")
    if model_type not in ("peagle", "eagle3"):
        raise ValueError(f"speculators_model_type is {model_type!r}, expected 'peagle' or 'eagle3'")
    layer = _required(config_json, "transformer_layer_config", "", dict)
    spec = _required(config_json, "speculators_config", "", dict)
    proposals = _required(spec, "proposal_methods", "speculators_config.", list)
    if not proposals or not isinstance(proposals[0], dict):
        raise TypeError(f"speculators_config.proposal_methods must hold an object, got {proposals!r}")
    _check_llama_layer(layer)
    fields = {name: _required(layer, name, "transformer_layer_config.") for name in _LAYER_FIELDS}
    fields.update({name: layer[name] for name in _OPTIONAL_LAYER_FIELDS if name in layer})
    fields["rope_theta"], fields["rope_scaling"] = rope.rope_fields(layer)
    fields.update({name: config_json[name] for name in _TOP_FIELDS if name in config_json})
    fields.update({name: config_json.get(name, False) for name in _OPTION_FIELDS})
    # N: vLLM's key in the layer config, or earlier peagle_ext's at top level, else from the layer ids.
    num_aux = layer.get("num_aux_hidden_states", config_json.get("num_aux_hidden_states"))
    if num_aux is not None:
        fields["num_aux_hidden_states"] = num_aux
    peagle = model_type == "peagle"
    parallel = config_json.get("parallel_drafting", peagle)  # earlier peagle_ext wrote it
    if isinstance(parallel, bool) and parallel != peagle:
        raise ValueError(f"parallel_drafting is {parallel} but speculators_model_type is {model_type!r}")
    fields["parallel_drafting"] = parallel
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
    (a concurrent save) are left alone. If a killed save left ``directory`` renamed aside (the
    fallback of :func:`save_checkpoint`), that copy is renamed back first, so it is not deleted.
    """
    readable = _readable_directory(directory)
    if readable != directory:
        readable.rename(directory)
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
