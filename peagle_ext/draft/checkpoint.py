"""Draft checkpoints, in two layouts: speculators' (what speculators and vLLM load) and NeMo
Automodel's (what Automodel's recipe writes and its tests read).

A checkpoint is a directory with two files. In speculators' layout:

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

In NeMo Automodel's layout (what transformers' ``save_pretrained`` writes for its draft): a flat
``config.json``, a ``LlamaConfig`` (``model_type`` "llama") with the draft's attributes at top level
(``parallel_drafting``, ``mask_token_id``, ``num_depths``, ``draft_vocab_size``,
``target_hidden_size``, ``num_aux_hidden_states``, the norm options), and ``model.safetensors``
keyed by the module's own state-dict names (``model.layers.{i}.*``, ``lm_head.weight``,
``mask_hidden``).

Reading accepts both layouts, what speculators 0.9.0 writes, what older transformers wrote
(``rope_theta`` + ``rope_scaling``) and what earlier peagle_ext wrote. This module maps between
the layouts and plain dicts; :mod:`peagle_ext.draft.llama` owns the model.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import os
import shutil
import uuid
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import rope

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_MODULE_PREFIX = "model."

# The checkpoint layouts save_pretrained writes, and from_pretrained tells apart by config.json.
LAYOUTS = ("speculators", "automodel")
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
# Config fields that size tensors: named when a key's shape differs from what they give.
_SIZE_FIELDS = ("hidden_size", "intermediate_size", "vocab_size", "draft_vocab_size", "target_hidden_size",
                "head_dim", "num_attention_heads", "num_key_value_heads", "num_aux_hidden_states")


class InteropWarning(UserWarning):
    """A checkpoint was saved that a peer (speculators, vLLM) cannot load or serve as it is."""


def disk_key(name: str, layout: str = "speculators") -> str:
    """Module state-dict name -> checkpoint key: speculators' drops the ``model.`` prefix
    (``model.layers.0.x`` -> ``layers.0.x``); Automodel's keeps the module's names."""
    return name.removeprefix(_MODULE_PREFIX) if layout == "speculators" else name


def check_layout(layout) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(map(repr, LAYOUTS))}, got {layout!r}")
    return layout


def layout_of(config_json: dict) -> str:
    """The layout a config.json dict is in: speculators' has ``speculators_model_type``, Automodel's
    is a flat Llama config (``model_type`` "llama")."""
    if "speculators_model_type" in config_json:
        return "speculators"
    if config_json.get("model_type") == "llama":
        return "automodel"
    raise KeyError("missing key 'speculators_model_type' (speculators' layout) and model_type is "
                   f"{config_json.get('model_type')!r}, not 'llama' (NeMo Automodel's layout)")


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


def automodel_config(fields: dict, dtype: torch.dtype) -> dict:
    """The config.json dict NeMo Automodel's recipe writes for a draft with these
    ``Eagle3DraftConfig`` field values: a flat ``LlamaConfig`` with the draft's attributes at top
    level (``parallel_drafting`` and ``mask_token_id`` among them: the keys Automodel hands to vLLM)."""
    optional = ("eagle_aux_hidden_state_layer_ids", "verifier_name_or_path")
    return {
        "architectures": ["LlamaEagle3DraftModel"],
        "model_type": "llama",
        **{name: fields[name] for name in _LAYER_FIELDS + _OPTIONAL_LAYER_FIELDS},
        "rope_parameters": rope.rope_parameters(fields["rope_theta"], fields["rope_scaling"]),
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "dtype": str(dtype).removeprefix("torch."),
        **{name: fields[name] for name in ("parallel_drafting", "num_depths", "num_aux_hidden_states")},
        **{name: fields[name] for name in _TOP_FIELDS + _OPTION_FIELDS if name not in optional},
        **{name: fields[name] for name in optional if fields[name] is not None},
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


def size_fields(fields: dict) -> dict:
    """{field: value} of the ``Eagle3DraftConfig`` fields that size tensors."""
    return {name: fields[name] for name in _SIZE_FIELDS}


def _required(mapping: dict, key: str, where: str, kind: type | None = None):
    """mapping[key], which must exist (and be a ``kind`` when given); errors name ``where + key``."""
    if key not in mapping:
        raise KeyError(f"missing key {where}{key!r}")
    value = mapping[key]
    if kind is not None and not isinstance(value, kind):
        raise TypeError(f"{where}{key} must be a JSON {'object' if kind is dict else 'array'}, got {value!r}")
    return value


def check_llama_layer(layer: dict, where: str = "transformer_layer_config.") -> None:
    """Refuse a layer config whose math a Llama draft does not implement, naming the key."""
    if layer.get("model_type") != "llama":
        raise ValueError(f"{where}model_type is {layer.get('model_type')!r}; peagle_ext loads Llama drafts "
                         "(speculators reads a missing model_type as qwen3)")
    if layer.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where}hidden_act is {layer['hidden_act']!r}; a Llama draft's MLP is SwiGLU ('silu')")
    layer_types = layer.get("layer_types") or []
    if not isinstance(layer_types, list):
        raise TypeError(f"{where}layer_types must be a JSON array, got {layer_types!r}")
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
    check_llama_layer(layer)
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


# A save stages its files in a hidden subdirectory of the checkpoint directory, named
# ``.peagle-save-{pid}-{random}``, and commits by renaming it to the same name + ``.ready``.
_STAGING_PREFIX = ".peagle-save-"
_COMMITTED_SUFFIX = ".ready"
# The files a save writes (and the only ones it replaces), in the order they are moved in.
CHECKPOINT_FILES = (WEIGHTS_NAME, CONFIG_NAME)


def _umask() -> int:
    """The process's umask (Linux reports it in /proc; elsewhere it is read by setting it back)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _locked(directory: Path, exclusive: bool):
    """Hold a lock on ``directory`` itself (flock; released by the kernel when the process dies, so
    a killed save leaves no lock behind): exclusive for a save, shared for a load, so a load never
    sees a save half done and two saves never interleave. Where the file system has no flock,
    nothing is locked."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        except OSError as error:
            if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                raise
        yield
    finally:
        os.close(fd)


def _committed_staging(directory: Path) -> Path | None:
    """The committed staging directory a killed save left in ``directory``, if any (at most one:
    every save finishes a committed one before it stages its own)."""
    for entry in directory.glob(glob.escape(_STAGING_PREFIX) + "*" + _COMMITTED_SUFFIX):
        if entry.is_dir():
            return entry
    return None


def _move_in(staging: Path, directory: Path) -> None:
    """Move a committed save's files into ``directory`` (replacing the old ones, each with one
    atomic rename), then remove the empty staging directory."""
    for name in CHECKPOINT_FILES:
        if (staging / name).exists():
            (staging / name).rename(directory / name)
    _fsync(directory)
    staging.rmdir()
    _fsync(directory)


def _finish_killed_saves(directory: Path) -> None:
    """Under the save lock: complete a committed save that was killed while moving its files in,
    and delete the staging directories of saves killed before they committed."""
    committed = _committed_staging(directory)
    if committed is not None:
        _move_in(committed, directory)
    for entry in directory.glob(glob.escape(_STAGING_PREFIX) + "*"):
        shutil.rmtree(entry, ignore_errors=True)


def save_checkpoint(directory, config_json: dict, tensors: dict) -> None:
    """Write config.json and model.safetensors into ``directory`` (created if needed), replacing
    only those two files: everything else in the directory is left as it is.

    Crash-safe: a process killed at any moment (SIGKILL included) leaves ``directory`` holding
    either the previous checkpoint or the new one, complete, for :func:`load_checkpoint`. Both
    files are written and synced into a hidden staging subdirectory; renaming it to its
    committed name is the commit; then each file replaces its old version with one atomic rename.
    A kill between those renames leaves the committed staging directory, whose files
    :func:`load_checkpoint` reads in place of the ones not moved yet, and which the next save
    moves in before anything else. Staging directories of saves killed before the commit are
    deleted by the next save. Saves and loads of one directory lock it (flock), so concurrent
    saves take turns and a load never sees a half-moved save.
    """
    if isinstance(directory, str) and not directory.strip():
        # Path("") is the current directory: a save there would replace files no one named.
        raise ValueError(f"directory must name a directory, got {directory!r}")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory} exists and is not a directory")
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    with _locked(directory, exclusive=True):
        _finish_killed_saves(directory)
        staging = directory / f"{_STAGING_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}"
        try:
            staging.mkdir()
            save_file({key: t.detach().contiguous().cpu() for key, t in tensors.items()}, staging / WEIGHTS_NAME)
            # safetensors writes a private temporary file (0600) and renames it: give the weights the
            # mode any open() gives under the user's umask, as config.json has, so a shared copy reads.
            os.chmod(staging / WEIGHTS_NAME, 0o666 & ~_umask())
            (staging / CONFIG_NAME).write_text(json.dumps(config_json, indent=2, sort_keys=True) + "\n")
            for written in (*(staging / name for name in CHECKPOINT_FILES), staging):
                _fsync(written)
            committed = staging.with_name(staging.name + _COMMITTED_SUFFIX)
            staging.rename(committed)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            if created:  # a failed first save leaves no empty directory behind
                with contextlib.suppress(OSError):
                    directory.rmdir()
            raise
        _fsync(directory)
        _move_in(committed, directory)


def _checkpoint_files(directory: Path) -> dict[str, Path]:
    """{file name: the path it is read from}: the directory's own file, or a killed committed save's
    staged one that was not moved in yet. Call under the load lock."""
    committed = _committed_staging(directory)
    return {name: committed / name if committed is not None and (committed / name).exists() else directory / name
            for name in CHECKPOINT_FILES}


def config_path(directory) -> Path:
    """Where the config.json of a checkpoint directory is read from (see :func:`load_checkpoint`)."""
    directory = Path(directory)
    if not directory.is_dir():
        return directory / CONFIG_NAME
    with _locked(directory, exclusive=False):
        return _checkpoint_files(directory)[CONFIG_NAME]


# A config.json larger than this is not a draft's config (speculators' are a few KB).
_MAX_CONFIG_BYTES = 16 * 2**20
# safetensors' dtype names by kind: a key's stored kind must be its parameter's.
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


def _dtype_kind(dtype) -> str:
    """'float', 'bool' or the exact integer dtype name, for a torch dtype or a safetensors name."""
    name = dtype if isinstance(dtype, str) else _TORCH_TO_SAFETENSORS.get(dtype, str(dtype))
    return "float" if name in _FLOAT_DTYPES else name


_TORCH_TO_SAFETENSORS = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                         torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                         torch.uint8: "U8", torch.bool: "BOOL"}


# Random in-place fills: a no-op for a skeleton.
_RANDOM_FILLS = {"normal_", "uniform_", "random_", "bernoulli_", "exponential_", "log_normal_", "cauchy_",
                 "geometric_"}


class _Skeleton(torch.overrides.TorchFunctionMode):
    """Inside torch.device("meta"): skip random fills, and make floating aranges (the rotary tables,
    head_dim / 2 entries, not in the state dict) on the CPU. On meta both run torch's Python
    references, whose first use imports the compiler stack: seconds, for a check meant to take
    milliseconds."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", None) in _RANDOM_FILLS:  # Tensor.normal_(t, ...) or init.normal_(tensor=t)
            return args[0] if args else kwargs["tensor"]
        if func is torch.arange and kwargs.get("dtype") is not None and kwargs["dtype"].is_floating_point:
            with torch.device("cpu"):
                return func(*args, **kwargs)
        return func(*args, **kwargs)


def skeleton_state_dict(build) -> dict:
    """The state dict of the module ``build()`` returns, built on the meta device: shapes and dtypes,
    no storage, no initialization computed."""
    with torch.device("meta"), _Skeleton():
        return build().state_dict()


class OpenedCheckpoint:
    """A checkpoint opened for loading: its config.json dict and the safetensors header (each
    key's shape and dtype), read without reading any tensor data; :meth:`tensors` reads the data
    (from the file as it was when opened, even if a save replaces it since)."""

    def __init__(self, config_json: dict, config_path: Path, weights_path: Path, weights):
        self.config_json, self.config_path, self.weights_path = config_json, config_path, weights_path
        self._weights = weights
        self.header = {}  # key -> (shape tuple, safetensors dtype name)
        for key in weights.keys():
            info = weights.get_slice(key)
            self.header[key] = (tuple(info.get_shape()), info.get_dtype())

    def check_header(self, expected: dict, sizes: dict | None = None) -> None:
        """Compare the header with ``expected`` ({key: tensor}, meta tensors will do): KeyError for
        a missing or unexpected key, ValueError for a misshapen key or one of another dtype kind.
        Errors name the file, the key, the expected and found shape; for a shape, also the
        ``sizes`` fields ({config field: value}) that give the expected size that differs."""
        missing = sorted(set(expected) - set(self.header))
        unexpected = sorted(set(self.header) - set(expected))
        if missing:
            raise KeyError(f"{self.weights_path}: missing key(s) {missing}")
        if unexpected:
            raise KeyError(f"{self.weights_path}: unexpected key(s) {unexpected}")
        for key, tensor in expected.items():
            shape, dtype = self.header[key]
            if shape != tuple(tensor.shape):
                raise ValueError(f"{self.weights_path}: key {key!r} has shape {shape}, expected {tuple(tensor.shape)}"
                                 + _fields_giving(tuple(tensor.shape), shape, sizes or {}))
            if _dtype_kind(dtype) != _dtype_kind(tensor.dtype):
                raise ValueError(f"{self.weights_path}: key {key!r} has dtype {dtype}, expected "
                                 f"{_TORCH_TO_SAFETENSORS.get(tensor.dtype, tensor.dtype)}"
                                 + (" (any floating dtype)" if tensor.dtype.is_floating_point else ""))

    def tensors(self) -> dict:
        """{key: tensor} on CPU."""
        try:
            return {key: self._weights.get_tensor(key) for key in self.header}
        except Exception as error:  # safetensors' own error type, without the path
            raise ValueError(f"{self.weights_path}: not a readable safetensors file ({error})") from None


def _fields_giving(expected: tuple, found: tuple, sizes: dict) -> str:
    """'' or ' (from config.json: hidden_size=8192, ...)': the fields whose value is an expected
    size where the found shape differs."""
    differing = {e for i, e in enumerate(expected) if i >= len(found) or found[i] != e}
    named = [f"{name}={value}" for name, value in sizes.items() if value in differing]
    return f" (config.json: {', '.join(named)})" if named else ""


def _read_config(path: Path) -> dict:
    with open(path, "rb") as file:
        text = file.read(_MAX_CONFIG_BYTES + 1)
    if len(text) > _MAX_CONFIG_BYTES:
        raise ValueError(f"{path}: larger than {_MAX_CONFIG_BYTES >> 20} MiB, not a draft's config")
    try:
        config_json = json.loads(text)
    except (ValueError, UnicodeDecodeError) as error:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    except RecursionError:
        raise ValueError(f"{path}: nested too deeply to be a draft's config") from None
    if not isinstance(config_json, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(config_json).__name__}")
    return config_json


def open_checkpoint(directory) -> OpenedCheckpoint:
    """Open a checkpoint directory: config.json parsed, the safetensors header read, no tensor data.

    Raises FileNotFoundError for a missing file and ValueError naming the file for one that cannot
    be parsed (not JSON, too large or too deeply nested, not a JSON object; not a safetensors file).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} {'is not a directory' if directory.exists() else 'does not exist'}")
    with _locked(directory, exclusive=False):
        paths = _checkpoint_files(directory)
        config_path, weights_path = paths[CONFIG_NAME], paths[WEIGHTS_NAME]
        for path in (config_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"{directory} has no {path.name}")
        config_json = _read_config(config_path)
        try:
            weights = safe_open(weights_path, framework="pt")  # a mapping of the file: data read later
        except Exception as error:  # safetensors raises its own SafetensorError (and OSError) without the path
            raise ValueError(f"{weights_path}: not a readable safetensors file ({error})") from None
    return OpenedCheckpoint(config_json, config_path, weights_path, weights)


def load_checkpoint(directory) -> tuple[dict, dict]:
    """(config.json dict, {key: tensor}) from a checkpoint directory, tensors on CPU (errors as
    :func:`open_checkpoint`)."""
    opened = open_checkpoint(directory)
    return opened.config_json, opened.tensors()
