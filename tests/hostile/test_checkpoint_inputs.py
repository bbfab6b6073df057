"""Forged and careless checkpoints: config.json values of every wrong type and range, nesting,
size; safetensors headers whose shapes, dtypes, offsets or lengths lie. Loading either gives the
model or raises KeyError/TypeError/ValueError naming the file, before any parameter is built."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from peagle_ext.draft.llama import LlamaEagle3DraftModel

from draft_helpers import single_thread, tiny_model  # noqa: F401 (autouse fixture)

pytestmark = pytest.mark.filterwarnings("ignore::peagle_ext.draft.checkpoint.InteropWarning")
ROOT = Path(__file__).resolve().parents[2]


class Saved(tuple):
    """(config.json dict, model.safetensors bytes) of a tiny draft; shown short in failure reports."""

    def __repr__(self) -> str:
        return "Saved(tiny draft)"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    directory = tmp_path_factory.mktemp("saved") / "draft"
    tiny_model(eagle_aux_hidden_state_layer_ids=[1, 2, 3]).save_pretrained(directory)
    return Saved((json.loads((directory / "config.json").read_text()), (directory / "model.safetensors").read_bytes()))


def _write(directory: Path, config, weights: bytes) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    (directory / "model.safetensors").write_bytes(weights)
    return directory


# Where a value can sit in config.json (a path of keys), and values of every kind and extreme.
CONFIG_PATHS = [
    ("transformer_layer_config", name) for name in (
        "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers",
        "vocab_size", "rms_norm_eps", "max_position_embeddings", "head_dim", "attention_bias", "layer_types",
        "num_aux_hidden_states", "rope_parameters", "model_type", "hidden_act")
] + [
    ("transformer_layer_config", "rope_parameters", name) for name in (
        "rope_theta", "rope_type", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings",
        "beta_fast", "attention_factor", "truncate")
] + [
    (name,) for name in ("draft_vocab_size", "target_hidden_size", "eagle_aux_hidden_state_layer_ids", "mask_token_id",
                         "norm_before_fc", "speculators_model_type", "transformer_layer_config", "speculators_config")
] + [("speculators_config", "proposal_methods"), ("speculators_config", "proposal_methods", 0, "speculative_tokens"),
     ("speculators_config", "verifier")]

VALUES = st.one_of(
    st.integers(-2**70, 2**70),
    st.sampled_from([0, -1, 1, 2, 3, 2**31 - 1, 2**31, 2**63, 8192, 65536, 10**12]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([float("inf"), float("-inf"), float("nan"), -0.0, 1e-320, 1.0]),
    st.text(max_size=8), st.none(), st.booleans(),
    st.sampled_from(["llama3", "yarn", "linear", "default", "dynamic", "llama", "peagle", "eagle3"]),
    st.lists(st.integers(-3, 10), max_size=4),
    st.dictionaries(st.sampled_from(["rope_type", "factor", "x"]), st.integers(-2, 3), max_size=2),
)


def _set(config: dict, path: tuple, value) -> bool:
    node = config
    for key in path[:-1]:
        in_dict = isinstance(node, dict) and key in node
        if in_dict or isinstance(node, list) and isinstance(key, int) and key < len(node):
            node = node[key]
        else:
            return False
    if isinstance(node, dict):
        node[path[-1]] = value
        return True
    return False


@settings(max_examples=150)
@given(st.lists(st.tuples(st.sampled_from(CONFIG_PATHS), VALUES), min_size=1, max_size=3))
def test_forged_config_values_load_or_are_refused_by_name(tmp_path_factory, saved, edits):
    config, weights = json.loads(json.dumps(saved[0])), saved[1]
    for path, value in edits:
        _set(config, path, value)
    directory = _write(tmp_path_factory.mktemp("forged"), config, weights)
    try:
        model = LlamaEagle3DraftModel.from_pretrained(directory)
    except (KeyError, TypeError, ValueError) as error:
        assert str(directory) in str(error), error
        return
    assert sum(p.numel() for p in model.parameters()) < 10**6  # it matched the small file, so it is small


def _safetensors(header: dict, data: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


@pytest.mark.parametrize(
    ("weights", "pattern"),
    [
        (b"", "not a readable safetensors file"),
        (struct.pack("<Q", 2**63), "not a readable safetensors file"),  # a header "longer" than the file
        (struct.pack("<Q", 4) + b"\xff\xfe{}", "not a readable safetensors file"),
        (_safetensors({"fc.weight": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 4]}}, b"\0" * 4),
         "not a readable safetensors file"),
        (_safetensors({"fc.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 2**60]}}, b"\0" * 4),
         "not a readable safetensors file"),
        (_safetensors({"fc.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
         "num_hidden_layers is 2 but .* holds only 1 tensors"),
    ],
    ids=["empty", "header-past-end", "not-json", "shape-overflow", "offsets-past-end", "keys-missing"],
)
def test_forged_safetensors_headers_are_refused_naming_the_file(tmp_path, saved, weights, pattern):
    directory = _write(tmp_path / "draft", saved[0], weights)
    with pytest.raises((KeyError, ValueError), match=pattern) as raised:
        LlamaEagle3DraftModel.from_pretrained(directory)
    assert str(directory / "model.safetensors") in str(raised.value)


def test_a_key_of_the_wrong_dtype_kind_is_refused(tmp_path):
    model = tiny_model(draft_vocab_size=40)
    model.save_pretrained(tmp_path / "draft")
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "draft" / "model.safetensors")
    tensors["fc.weight"] = tensors["fc.weight"].to(torch.int32)
    save_file(tensors, tmp_path / "draft" / "model.safetensors")
    with pytest.raises(ValueError, match=r"key 'fc.weight' has dtype I32, expected F32 \(any floating dtype\)"):
        LlamaEagle3DraftModel.from_pretrained(tmp_path / "draft")
    tensors["fc.weight"] = tensors["fc.weight"].to(torch.bfloat16)  # another float: cast on load
    tensors["d2t"] = tensors["d2t"].to(torch.float32)
    save_file(tensors, tmp_path / "draft" / "model.safetensors")
    with pytest.raises(ValueError, match="key 'd2t' has dtype F32, expected I64"):
        LlamaEagle3DraftModel.from_pretrained(tmp_path / "draft")


def test_config_json_nested_too_deeply_or_too_large_is_refused(tmp_path, saved):
    directory = _write(tmp_path / "deep", "[" * 100000 + "]" * 100000, saved[1])
    with pytest.raises(ValueError, match="config.json: nested too deeply"):
        LlamaEagle3DraftModel.from_pretrained(directory)
    directory = _write(tmp_path / "large", '{"x": "' + "a" * (17 << 20) + '"}', saved[1])
    with pytest.raises(ValueError, match="config.json: larger than 16 MiB"):
        LlamaEagle3DraftModel.from_pretrained(directory)


FORGED_LOAD = """
import json, resource, sys, time
from peagle_ext.draft.llama import LlamaEagle3DraftModel
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
started = time.perf_counter()
try:
    LlamaEagle3DraftModel.from_pretrained(sys.argv[1])
    outcome = "loaded"
except ValueError as error:
    outcome = str(error)
print(json.dumps(dict(seconds=time.perf_counter() - started,
                      rise_mib=(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024, outcome=outcome)))
"""


def test_a_small_checkpoint_claiming_a_huge_model_is_refused_fast_without_allocating(tmp_path):
    """A small file whose config claims hidden_size 8192 and vocab_size 65536 (a 2.6 GB model): refused
    from the header in well under a second, peak RSS hardly rising, the message naming the key, both
    shapes, the file and the config fields."""
    model = tiny_model(vocab_size=96, draft_vocab_size=96)
    model.save_pretrained(tmp_path / "draft")
    config = json.loads((tmp_path / "draft" / "config.json").read_text())
    config["transformer_layer_config"].update(hidden_size=8192, vocab_size=65536, intermediate_size=28672,
                                              head_dim=2048)
    config.update(draft_vocab_size=65536, mask_token_id=0)
    (tmp_path / "draft" / "config.json").write_text(json.dumps(config))
    assert (tmp_path / "draft" / "model.safetensors").stat().st_size < 1 << 20
    result = subprocess.run([sys.executable, "-c", FORGED_LOAD, str(tmp_path / "draft")], capture_output=True,
                            text=True, cwd=ROOT, timeout=120)
    row = json.loads(result.stdout.strip().splitlines()[-1])
    assert "model.safetensors: key 'embed_tokens.weight' has shape (96, 32), expected (65536, 8192)" in row["outcome"]
    assert "vocab_size=65536" in row["outcome"] and "hidden_size=8192" in row["outcome"]
    assert row["seconds"] < 1.0 and row["rise_mib"] < 64, row
