"""Checkpoints in speculators' layout and NeMo Automodel's: round trip, on-disk layout, file modes,
older forms, the verifier and the interop warning, bad keys, atomic writes. (Loading by the peers
themselves: tests/interop.)"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from peagle_ext.draft import checkpoint
from peagle_ext.draft.llama import LlamaEagle3DraftModel
from peagle_ext.draft.training import build_peagle_inputs

from draft_helpers import cod_indices, random_sequence, single_thread, tiny_model  # noqa: F401 (autouse fixture)

# Most saves here have no verifier and a target hidden size unlike the draft's; the tests of the
# warning itself catch it with pytest.warns, which sees it regardless of this filter.
pytestmark = pytest.mark.filterwarnings("ignore::peagle_ext.draft.checkpoint.InteropWarning")
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}

LAYER_KEYS = {
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
}


def _outputs(model):
    anchor_pos, depth = cod_indices(20, 4)
    inputs = build_peagle_inputs(model, *random_sequence(model, 20), anchor_pos, depth)
    with torch.no_grad():
        block_mask = model.build_peagle_block_mask(anchor_pos, depth, torch.tensor([20]), 20)
        return model.compute_logits(model.forward_peagle(*inputs, block_mask))


def _saved(tmp_path, **overrides):
    model = tiny_model(**overrides)
    with torch.no_grad():
        for parameter in model.parameters():  # move norms off their all-ones init so the round trip shows
            parameter.add_(0.01 * torch.randn_like(parameter))
    model.save_pretrained(tmp_path / "draft")
    return model, tmp_path / "draft"


@pytest.mark.parametrize(
    "overrides",
    [
        dict(draft_vocab_size=40, fc_norm=True, norm_output=True, eagle_aux_hidden_state_layer_ids=[1, 5, 9, 11]),
        dict(draft_vocab_size=40, norm_before_fc=True, norm_before_residual=True, attention_bias=True, mlp_bias=True,
             num_hidden_layers=1, rope_scaling=LLAMA3_ROPE, num_aux_hidden_states=1),
    ],
    ids=["fc_norm", "norm_before_fc"],
)
def test_round_trip_gives_identical_outputs(tmp_path, overrides):
    model, directory = _saved(tmp_path, **overrides)
    model.set_draft_vocab(torch.arange(0, 80, 2))
    model.save_pretrained(directory)  # overwrite in place
    loaded = LlamaEagle3DraftModel.from_pretrained(directory)
    assert loaded.config == model.config
    assert torch.equal(_outputs(loaded), _outputs(model))
    state = loaded.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(state[name], tensor), name
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "model.safetensors"]  # no staging left


def test_on_disk_layout(tmp_path):
    model, directory = _saved(tmp_path, draft_vocab_size=50, num_hidden_layers=2, num_depths=5)
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "model.safetensors"]
    tensors = load_file(directory / "model.safetensors")
    expected = {"embed_tokens.weight", "fc.weight", "norm.weight", "lm_head.weight", "mask_hidden", "d2t", "t2d"}
    expected |= {f"layers.0.{key}" for key in LAYER_KEYS | {"hidden_norm.weight"}}
    expected |= {f"layers.1.{key}" for key in LAYER_KEYS}
    assert set(tensors) == expected
    assert tensors["mask_hidden"].shape == (1, 1, 3 * 16)
    assert tensors["layers.0.self_attn.q_proj.weight"].shape == (4 * 8, 2 * 32)
    assert tensors["fc.weight"].shape == (32, 3 * 16) and tensors["lm_head.weight"].shape == (50, 32)
    assert tensors["d2t"].dtype == torch.int64 and tensors["t2d"].dtype == torch.bool and tensors["t2d"].shape == (96,)

    config = json.loads((directory / "config.json").read_text())
    assert config["speculators_model_type"] == "peagle"
    assert config["architectures"] == ["PEagleDraftModel"]
    expected = {"mask_token_id": 95, "draft_vocab_size": 50, "target_hidden_size": 16, "norm_output": False,
                "fc_norm": False, "norm_before_fc": False, "norm_before_residual": False, "dtype": "float32"}
    for key, value in expected.items():
        assert config[key] == value, key
    assert "eagle_aux_hidden_state_layer_ids" in config
    layer = config["transformer_layer_config"]
    assert (layer["model_type"], layer["hidden_size"], layer["num_hidden_layers"], layer["vocab_size"]) == (
        "llama", 32, 2, 96)
    assert (layer["num_attention_heads"], layer["num_key_value_heads"], layer["head_dim"]) == (4, 2, 8)
    # transformers 5's rope form only; the keys vLLM's draft reads from the layer config.
    assert layer["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}
    assert "rope_theta" not in layer and "rope_scaling" not in layer
    assert (layer["num_aux_hidden_states"], layer["fc_norm"], layer["norm_output"]) == (3, False, False)
    spec = config["speculators_config"]
    assert spec["algorithm"] == "peagle" and spec["default_proposal_method"] == "greedy"
    assert spec["proposal_methods"][0]["proposal_type"] == "greedy"
    assert spec["proposal_methods"][0]["speculative_tokens"] == 5


def test_eagle3_checkpoint_without_parallel_drafting(tmp_path):
    model, directory = _saved(tmp_path, parallel_drafting=False)
    tensors = load_file(directory / "model.safetensors")
    assert "mask_hidden" not in tensors and "d2t" not in tensors
    assert json.loads((directory / "config.json").read_text())["speculators_model_type"] == "eagle3"
    loaded = LlamaEagle3DraftModel.from_pretrained(directory)
    assert not loaded.config.parallel_drafting and not hasattr(loaded, "mask_hidden")


def test_norm_keys_on_disk(tmp_path):
    """fc_norm: one weight per auxiliary state, fc_norm.{i}; norm_before_fc: one input_norm over all."""
    _, directory = _saved(tmp_path, fc_norm=True, eagle_aux_hidden_state_layer_ids=[2, 4, 6, 8])
    tensors = load_file(directory / "model.safetensors")
    assert {key: tuple(t.shape) for key, t in tensors.items() if "norm" in key and "layers" not in key} == {
        **{f"fc_norm.{i}.weight": (16,) for i in range(4)}, "norm.weight": (32,)}
    layer = json.loads((directory / "config.json").read_text())["transformer_layer_config"]
    assert (layer["num_aux_hidden_states"], layer["fc_norm"]) == (4, True)
    _, directory = _saved(tmp_path, norm_before_fc=True, draft_vocab_size=50, rope_scaling=LLAMA3_ROPE)
    tensors = load_file(directory / "model.safetensors")
    assert tensors["input_norm.weight"].shape == (3 * 16,) and not any(k.startswith("fc_norm") for k in tensors)
    layer = json.loads((directory / "config.json").read_text())["transformer_layer_config"]
    assert layer["rope_parameters"] == {"rope_theta": 10000.0, **LLAMA3_ROPE}


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_saved_files_have_the_mode_the_umask_gives(tmp_path, umask, mode):
    """Like any open(): a checkpoint copied to a shared folder reads where the user's umask allows."""
    previous = os.umask(umask)
    try:
        _, directory = _saved(tmp_path)
    finally:
        os.umask(previous)
    assert {p.name: p.stat().st_mode & 0o777 for p in directory.iterdir()} == {
        "config.json": mode, "model.safetensors": mode}


@pytest.mark.parametrize("parallel_drafting", [True, False])
def test_automodel_layout_round_trip(tmp_path, parallel_drafting):
    """NeMo Automodel's layout: a flat Llama config.json with parallel_drafting and mask_token_id at top
    level, weights under the module's own names; from_pretrained tells the layouts apart."""
    model = tiny_model(draft_vocab_size=40, fc_norm=True, norm_output=True, parallel_drafting=parallel_drafting,
                       num_hidden_layers=2 if parallel_drafting else 1, rope_scaling=LLAMA3_ROPE)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    model.save_pretrained(tmp_path / "draft", layout="automodel")
    config = json.loads((tmp_path / "draft" / "config.json").read_text())
    assert (config["model_type"], config["parallel_drafting"], config["mask_token_id"]) == (
        "llama", parallel_drafting, 95)
    assert "speculators_model_type" not in config and "transformer_layer_config" not in config
    assert (config["num_depths"], config["draft_vocab_size"], config["target_hidden_size"]) == (
        model.config.num_depths, 40, 16)
    assert config["rope_parameters"] == {"rope_theta": 10000.0, **LLAMA3_ROPE}
    tensors = load_file(tmp_path / "draft" / "model.safetensors")
    assert set(tensors) == set(model.state_dict())  # model.layers.0..., lm_head.weight, mask_hidden
    assert ("mask_hidden" in tensors) == parallel_drafting

    loaded = LlamaEagle3DraftModel.from_pretrained(tmp_path / "draft")
    assert loaded.config == model.config
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    if parallel_drafting:
        assert torch.equal(_outputs(loaded), _outputs(model))


def test_default_layout_follows_the_config_the_draft_was_built_from(tmp_path):
    """An Eagle3DraftConfig saves speculators' layout; another config object (a LlamaConfig with the
    P-EAGLE attributes, as NeMo Automodel builds drafts) saves Automodel's; layout= overrides."""
    from types import SimpleNamespace

    ours = tiny_model()
    foreign = LlamaEagle3DraftModel(SimpleNamespace(**{
        key: value for key, value in ours.config.to_dict().items() if value is not None}))
    for model, name, expected in [(ours, "ours", "speculators"), (foreign, "foreign", "automodel")]:
        model.save_pretrained(tmp_path / name)
        assert checkpoint.layout_of(json.loads((tmp_path / name / "config.json").read_text())) == expected
    foreign.save_pretrained(tmp_path / "forced", layout="speculators")
    assert "speculators_model_type" in json.loads((tmp_path / "forced" / "config.json").read_text())
    with pytest.raises(ValueError, match="layout must be one of 'speculators', 'automodel', got 'hf'"):
        ours.save_pretrained(tmp_path / "bad", layout="hf")
    assert not (tmp_path / "bad").exists()


def test_a_config_in_neither_layout_is_named(tmp_path):
    _, directory = _saved(tmp_path)
    config = json.loads((directory / "config.json").read_text())
    del config["speculators_model_type"]
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(KeyError, match="missing key 'speculators_model_type'.*model_type is None"):
        LlamaEagle3DraftModel.from_pretrained(directory)
    (directory / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32}))
    with pytest.raises(ValueError, match="config.json: config .* lacks the Llama field"):
        LlamaEagle3DraftModel.from_pretrained(directory)


def _verifier_dir(tmp_path):
    directory = tmp_path / "verifier"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    return directory


def test_verifier_is_recorded_and_only_missing_needs_are_warned(tmp_path):
    verifier = _verifier_dir(tmp_path)
    model = tiny_model(target_hidden_size=32)
    with pytest.warns(checkpoint.InteropWarning) as caught:
        model.save_pretrained(tmp_path / "bare")
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "No verifier recorded" in message and "verifier=" in message and "embed_tokens, lm_head" in message
    assert (tmp_path / "bare" / "model.safetensors").is_file()
    spec = json.loads((tmp_path / "bare" / "config.json").read_text())["speculators_config"]
    assert spec["verifier"] == {"name_or_path": None, "architectures": []}

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", checkpoint.InteropWarning)
        model.save_pretrained(tmp_path / "recorded", verifier=verifier)
    spec = json.loads((tmp_path / "recorded" / "config.json").read_text())["speculators_config"]
    assert spec["verifier"] == {"name_or_path": str(verifier), "architectures": ["LlamaForCausalLM"]}
    loaded = LlamaEagle3DraftModel.from_pretrained(tmp_path / "recorded")
    assert loaded.config.verifier_name_or_path == str(verifier)
    with warnings.catch_warnings():  # the loaded config remembers it; a hub id has no local architectures
        warnings.simplefilter("error", checkpoint.InteropWarning)
        loaded.save_pretrained(tmp_path / "again")
        loaded.save_pretrained(tmp_path / "hub", verifier="meta-llama/Llama-3.1-8B")
    spec = json.loads((tmp_path / "hub" / "config.json").read_text())["speculators_config"]
    assert spec["verifier"] == {"name_or_path": "meta-llama/Llama-3.1-8B", "architectures": []}


def test_warning_names_what_each_peer_lacks(tmp_path):
    with pytest.warns(checkpoint.InteropWarning) as caught:
        tiny_model(num_aux_hidden_states=2).save_pretrained(tmp_path / "draft", verifier="org/model")
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "verifier" not in message.split(":", 1)[1].split("(")[0]
    assert "target_hidden_size (16) differs from hidden_size (32)" in message
    assert "num_aux_hidden_states is 2 but eagle_aux_hidden_state_layer_ids is not set" in message


def _edit_layer(directory, edit):
    config = json.loads((directory / "config.json").read_text())
    edit(config["transformer_layer_config"])
    (directory / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "older",
    [
        # transformers 4 wrote rope_theta and rope_scaling (the legacy "type" key too).
        lambda layer: layer.update(rope_theta=layer["rope_parameters"].pop("rope_theta"),
                                   rope_scaling={"type": "llama3",
                                                 **{k: v for k, v in LLAMA3_ROPE.items() if k != "rope_type"}},
                                   rope_parameters=None),
        # earlier peagle_ext: top-level num_aux_hidden_states and parallel_drafting, no layer-level copies.
        "earlier-peagle_ext",
    ],
    ids=["rope_theta+rope_scaling", "earlier-peagle_ext"],
)
def test_older_config_forms_load(tmp_path, older):
    model, directory = _saved(tmp_path, rope_scaling=LLAMA3_ROPE, eagle_aux_hidden_state_layer_ids=[1, 2])
    config = json.loads((directory / "config.json").read_text())
    if older == "earlier-peagle_ext":
        layer = config["transformer_layer_config"]
        config.update(num_aux_hidden_states=layer.pop("num_aux_hidden_states"), parallel_drafting=True)
        del layer["fc_norm"], layer["norm_output"], config["norm_before_fc"], config["norm_before_residual"]
        layer["rope_theta"] = layer.pop("rope_parameters")["rope_theta"]
        layer["rope_scaling"] = LLAMA3_ROPE
    else:
        older(config["transformer_layer_config"])
    (directory / "config.json").write_text(json.dumps(config))
    loaded = LlamaEagle3DraftModel.from_pretrained(directory)
    assert loaded.config == model.config
    assert torch.equal(_outputs(loaded), _outputs(model))


def _rewrite(directory, edit):
    tensors = load_file(directory / "model.safetensors")
    edit(tensors)
    save_file(tensors, directory / "model.safetensors")


@pytest.mark.parametrize(
    ("edit", "error", "pattern"),
    [
        (lambda t: t.pop("fc.weight"), KeyError, "missing.*'fc.weight'"),
        (lambda t: t.pop("mask_hidden"), KeyError, "missing.*'mask_hidden'"),
        (lambda t: t.update(extra=torch.zeros(2)), KeyError, "unexpected.*'extra'"),
        (lambda t: t.update(mask_hidden=torch.zeros(1, 1, 32)), ValueError, "'mask_hidden'.*\\(1, 1, 32\\)"),
        (lambda t: t.update({"layers.1.mlp.up_proj.weight": torch.zeros(64, 33)}), ValueError,
         "'layers.1.mlp.up_proj.weight'"),
    ],
)
def test_bad_keys_raise_naming_the_key(tmp_path, edit, error, pattern):
    _, directory = _saved(tmp_path)
    _rewrite(directory, edit)
    with pytest.raises(error, match=pattern):
        LlamaEagle3DraftModel.from_pretrained(directory)


def test_missing_config_key_and_files_raise(tmp_path):
    _, directory = _saved(tmp_path)
    config = json.loads((directory / "config.json").read_text())
    del config["transformer_layer_config"]["hidden_size"]
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(KeyError, match="hidden_size"):
        LlamaEagle3DraftModel.from_pretrained(directory)
    (directory / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        LlamaEagle3DraftModel.from_pretrained(directory)


def test_failed_save_leaves_no_half_checkpoint(tmp_path, monkeypatch):
    model = tiny_model()

    def failing_save(tensors, path):
        path.write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path / "fresh")
    assert list(tmp_path.iterdir()) == []

    monkeypatch.undo()
    model.save_pretrained(tmp_path / "kept")
    before = (tmp_path / "kept" / "model.safetensors").read_bytes()
    monkeypatch.setattr(checkpoint, "save_file", failing_save)
    with pytest.raises(OSError):
        tiny_model(seed=1).save_pretrained(tmp_path / "kept")
    assert (tmp_path / "kept" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]


def test_load_casts_to_requested_dtype(tmp_path):
    _, directory = _saved(tmp_path, draft_vocab_size=50)
    loaded = LlamaEagle3DraftModel.from_pretrained(directory, dtype=torch.bfloat16)
    assert loaded.lm_head.weight.dtype == torch.bfloat16 and loaded.d2t.dtype == torch.int64


def _edit_config(directory, edit):
    config = json.loads((directory / "config.json").read_text())
    edit(config)
    (directory / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("edit", "error", "pattern"),
    [
        (lambda c: c.update(parallel_drafting="false"), TypeError, "'parallel_drafting' must be bool, got str 'false'"),
        (lambda c: c["transformer_layer_config"].update(hidden_size="32"), TypeError,
         "'hidden_size' must be int, got str"),
        (lambda c: c["transformer_layer_config"].update(num_hidden_layers=None), TypeError,
         "'num_hidden_layers' must be int, got NoneType"),
        (lambda c: c["transformer_layer_config"].update(rms_norm_eps=True), TypeError, "'rms_norm_eps' must be float"),
        (lambda c: c.update(eagle_aux_hidden_state_layer_ids=[1, "5"]), TypeError,
         "'eagle_aux_hidden_state_layer_ids'"),
        (lambda c: c["transformer_layer_config"].update(num_attention_heads=0), ValueError,
         "'num_attention_heads' must be in \\[1, 2\\*\\*31 - 1\\], got 0"),
        (lambda c: c.update(transformer_layer_config=[]), TypeError, "transformer_layer_config must be a JSON object"),
        (lambda c: c["speculators_config"].update(proposal_methods=[]), TypeError,
         "proposal_methods must hold an object"),
        (lambda c: c.update(speculators_model_type="medusa"), ValueError, "speculators_model_type is 'medusa'"),
        (lambda c: c.update(norm_before_fc=1), TypeError, "'norm_before_fc' must be bool, got int"),
        (lambda c: c.update(fc_norm=True, norm_before_fc=True), ValueError, "mutually exclusive"),
        (lambda c: c.update(speculators_model_type="eagle3", parallel_drafting=True), ValueError,
         "parallel_drafting is True but speculators_model_type is 'eagle3'"),
        (lambda c: c["transformer_layer_config"].update(model_type="qwen3"), ValueError, "model_type is 'qwen3'"),
        (lambda c: c["transformer_layer_config"].pop("model_type"), ValueError, "model_type is None"),
        (lambda c: c["transformer_layer_config"].update(hidden_act="gelu"), ValueError, "hidden_act is 'gelu'"),
        (lambda c: c["transformer_layer_config"].update(layer_types=["sliding_attention", "full_attention"]),
         ValueError, "sliding_attention"),
        (lambda c: c["transformer_layer_config"].update(num_aux_hidden_states=2), ValueError,
         "num_aux_hidden_states \\(2\\)"),
        (lambda c: c["transformer_layer_config"]["rope_parameters"].update(rope_type="dynamic", factor=2.0),
         ValueError, "unsupported rope_type 'dynamic'"),
        (lambda c: c["transformer_layer_config"]["rope_parameters"].update(rope_type="linear", factor=2.0,
                                                                           low_freq_factor=1.0),
         ValueError, "unknown rope option 'low_freq_factor'"),
        (lambda c: c["transformer_layer_config"]["rope_parameters"].update(rope_theta="1e4"), TypeError,
         "'rope_theta' must be float"),
        (lambda c: c["transformer_layer_config"].update(rope_parameters={"full_attention": {"rope_type": "default"}}),
         ValueError, "per-layer-type"),
    ],
)
def test_config_values_are_type_checked_naming_field_and_file(tmp_path, edit, error, pattern):
    _, directory = _saved(tmp_path, eagle_aux_hidden_state_layer_ids=[1, 2, 3])
    _edit_config(directory, edit)
    with pytest.raises(error, match=pattern) as raised:
        LlamaEagle3DraftModel.from_pretrained(directory)
    assert str(directory / "config.json") in str(raised.value)


def test_unreadable_files_are_named(tmp_path):
    _, directory = _saved(tmp_path)
    weights = (directory / "model.safetensors").read_bytes()
    (directory / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(ValueError, match=f"{directory / 'model.safetensors'}: not a readable safetensors file"):
        LlamaEagle3DraftModel.from_pretrained(directory)
    (directory / "config.json").write_text("{ not json")
    with pytest.raises(ValueError, match=f"{directory / 'config.json'}: not valid JSON"):
        LlamaEagle3DraftModel.from_pretrained(directory)


# --- crash safety: real processes killed with SIGKILL in the middle of saves ---------------------

VERSIONS = ("A", "B")


def _version_tensors(version: str) -> dict:
    """Several MB of weights whose every value says which version they are."""
    value = float(VERSIONS.index(version) + 1)
    return {f"w{i}": torch.full((512, 1024), value) for i in range(4)}


def _assert_loads_as_one_version(directory) -> str:
    config, tensors = checkpoint.load_checkpoint(directory)
    version = config["version"]
    expected = _version_tensors(version)
    assert set(tensors) == set(expected)
    for key, tensor in expected.items():
        assert torch.equal(tensors[key], tensor), f"{key} does not belong to version {version}"
    return version


# What a user keeps beside a checkpoint: each must survive every save, killed or not.
NEIGHBOURS = {
    "tokenizer.json": b'{"model": {}}',
    ".hidden": b"dotfile",
    "logs/run.txt": b"step 1 loss 3.2",
    "sub/config.json": b"not the checkpoint's",
    "sub/deep/model.safetensors": b"nor this",
}


def _add_neighbours(directory) -> None:
    for name, data in NEIGHBOURS.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(data)


def _assert_neighbours_intact(directory) -> None:
    for name, data in NEIGHBOURS.items():
        assert (directory / name).read_bytes() == data, f"{name} was changed or deleted"


def _listing(directory) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


def _file_system_steps(step):
    """``step`` wrapped so that each call counts as one file-system step of a save (see _save_in_child)."""

    def run(*args, **kwargs):
        _STEP_HOOK()
        result = step(*args, **kwargs)
        _STEP_HOOK()
        return result

    return run


def _STEP_HOOK():  # replaced in the child
    pass


def _instrument(hook) -> None:
    """In a forked child: call ``hook`` before and after every file-system step a save takes."""
    import pathlib

    global _STEP_HOOK
    _STEP_HOOK = hook
    checkpoint.save_file = _file_system_steps(checkpoint.save_file)
    checkpoint._fsync = _file_system_steps(checkpoint._fsync)
    checkpoint.shutil.rmtree = _file_system_steps(checkpoint.shutil.rmtree)
    for name in ("rename", "rmdir", "mkdir", "write_text"):
        setattr(pathlib.Path, name, _file_system_steps(getattr(pathlib.Path, name)))


def _save_forever(directory: str, started) -> None:
    """The child (forked, so its patches stay in it): alternate saving versions B and A, each file
    system step of a save preceded and followed by a 5 ms pause, until killed."""
    _instrument(lambda: time.sleep(0.005))
    started.set()
    for step in range(10**9):
        version = VERSIONS[(step + 1) % 2]
        checkpoint.save_checkpoint(directory, {"version": version}, _version_tensors(version))


def _save_killed_at_step(directory: str, kill_at: int) -> None:
    """The child: save version B, killing itself with SIGKILL at its ``kill_at``-th file-system step
    (exits normally if the save takes fewer steps)."""
    count = [0]

    def hook():
        count[0] += 1
        if count[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    _instrument(hook)
    checkpoint.save_checkpoint(directory, {"version": "B"}, _version_tensors("B"))


def _fork(target, *args):
    import multiprocessing

    child = multiprocessing.get_context("fork").Process(target=target, args=args)
    child.start()
    child.join()
    return child.exitcode


@pytest.mark.parametrize("fresh", [False, True], ids=["replacing-a-checkpoint", "first-save"])
def test_save_killed_at_every_step_leaves_one_version_and_the_neighbours(tmp_path, fresh):
    """A save of B over A (or into a directory of other files only), killed at each of its file
    system steps in turn: the directory loads as A or B, complete (or, before a first save commits,
    has no checkpoint), and every neighbour is untouched; the next save leaves nothing stray."""
    directory = tmp_path / "draft"
    kill_at, seen = 1, set()
    while True:
        if directory.exists():
            checkpoint.shutil.rmtree(directory)
        directory.mkdir()
        _add_neighbours(directory)
        if not fresh:
            checkpoint.save_checkpoint(directory, {"version": "A"}, _version_tensors("A"))
        exitcode = _fork(_save_killed_at_step, str(directory), kill_at)
        _assert_neighbours_intact(directory)
        if fresh and not (directory / "config.json").exists() and checkpoint._committed_staging(directory) is None:
            with pytest.raises(FileNotFoundError):
                checkpoint.load_checkpoint(directory)
            seen.add(None)
        else:
            seen.add(_assert_loads_as_one_version(directory))
        checkpoint.save_checkpoint(directory, {"version": "A"}, _version_tensors("A"))
        assert _listing(directory) == sorted([*NEIGHBOURS, "config.json", "model.safetensors"])
        assert _assert_loads_as_one_version(directory) == "A"
        if exitcode == 0:  # the save finished before its kill_at-th step: every step was tried
            break
        assert exitcode == -signal.SIGKILL
        kill_at += 1
    assert kill_at > 10, "the save took too few steps for the test to mean anything"
    assert seen == ({None, "B"} if fresh else {"A", "B"})


def test_save_survives_sigkill_at_random_moments(tmp_path):
    import multiprocessing
    import random

    directory = tmp_path / "draft"
    directory.mkdir()
    _add_neighbours(directory)
    checkpoint.save_checkpoint(directory, {"version": "A"}, _version_tensors("A"))
    context = multiprocessing.get_context("fork")
    rng = random.Random(0)
    seen = set()
    for _ in range(16):
        started = context.Event()
        child = context.Process(target=_save_forever, args=(str(directory), started))
        child.start()
        assert started.wait(30)
        time.sleep(rng.uniform(0.0, 1.0))  # a save takes about 0.2 s with its pauses
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        assert child.exitcode == -signal.SIGKILL
        seen.add(_assert_loads_as_one_version(directory))
        _assert_neighbours_intact(directory)
    assert seen == set(VERSIONS), "every kill landed on the same version: the test did not exercise the swap"
    # The next save cleans up what the killed saves left behind, and only that.
    checkpoint.save_checkpoint(directory, {"version": "A"}, _version_tensors("A"))
    assert _listing(directory) == sorted([*NEIGHBOURS, "config.json", "model.safetensors"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["draft"]
    assert _assert_loads_as_one_version(directory) == "A"


def test_save_keeps_the_directory_s_other_files(tmp_path):
    """save_pretrained into a directory of other things (a tokenizer, logs, a subfolder) writes its
    two files and leaves the rest alone, as transformers' save_pretrained does."""
    directory = tmp_path / "model"
    directory.mkdir()
    _add_neighbours(directory)
    model = tiny_model()
    model.save_pretrained(directory)
    model.save_pretrained(directory)
    assert _listing(directory) == sorted([*NEIGHBOURS, "config.json", "model.safetensors"])
    _assert_neighbours_intact(directory)
    assert torch.equal(_outputs(LlamaEagle3DraftModel.from_pretrained(directory)), _outputs(model))


def test_save_refuses_a_file_in_place_of_the_directory(tmp_path):
    (tmp_path / "draft").write_text("mine")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        tiny_model().save_pretrained(tmp_path / "draft")
    assert (tmp_path / "draft").read_text() == "mine"


def _save_version_repeatedly(directory: str, version: str, times: int) -> None:
    for _ in range(times):
        checkpoint.save_checkpoint(directory, {"version": version}, _version_tensors(version))


def test_concurrent_saves_and_loads_take_turns(tmp_path):
    """Two processes saving A and B into one directory of other files while this one loads it:
    every load sees one whole version, the neighbours survive, and nothing is left over."""
    import multiprocessing

    directory = tmp_path / "draft"
    directory.mkdir()
    _add_neighbours(directory)
    checkpoint.save_checkpoint(directory, {"version": "A"}, _version_tensors("A"))
    context = multiprocessing.get_context("fork")
    savers = [context.Process(target=_save_version_repeatedly, args=(str(directory), version, 8))
              for version in VERSIONS]
    for saver in savers:
        saver.start()
    while any(saver.is_alive() for saver in savers):
        _assert_loads_as_one_version(directory)
    for saver in savers:
        saver.join()
        assert saver.exitcode == 0
    _assert_loads_as_one_version(directory)
    _assert_neighbours_intact(directory)
    assert _listing(directory) == sorted([*NEIGHBOURS, "config.json", "model.safetensors"])
