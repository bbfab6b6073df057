"""What the checkpoint tests against speculators, NeMo Automodel and vLLM share: the draft variants,
random weights, COD inputs, our logits, and the peers' imports (skipping, with the reason, where a
peer is missing or another version)."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import peagle_ext
from peagle_ext.draft.llama import Eagle3DraftConfig, LlamaEagle3DraftModel
from peagle_ext.draft.training import build_peagle_inputs

SPECULATORS_VERSION = "0.9.0"
AUTOMODEL_VERSION = "0.7.0"
# Logits are compared in float32 on the CPU, under no_grad, to this absolute tolerance.
LOGITS_ATOL = 1e-5

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 16}
LINEAR = {"rope_type": "linear", "factor": 2.0}

# A tiny Llama layer; the draft's hidden size equals the target's, as speculators requires.
BASE = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
            vocab_size=96, draft_vocab_size=96, rms_norm_eps=1e-5, max_position_embeddings=64,
            rope_theta=10000.0, num_depths=3, mask_token_id=95)

# The options of the issue, spread over few variants: norms before fc (one, or one per state),
# before the residual, on the output; draft vocabulary; 1 to 3 layers; 1, 3 or 4 auxiliary states;
# every rope type; biases. P-EAGLE and EAGLE-3.
VARIANTS = {
    "peagle": dict(parallel_drafting=True, num_hidden_layers=2),
    "peagle-fc_norm-aux4-vocab-llama3-norm_output": dict(
        parallel_drafting=True, num_hidden_layers=1, fc_norm=True, eagle_aux_hidden_state_layer_ids=[1, 3, 5, 7],
        draft_vocab_size=40, rope_scaling=LLAMA3, norm_output=True),
    "peagle-norm_before_fc-residual-yarn-bias": dict(
        parallel_drafting=True, num_hidden_layers=2, norm_before_fc=True, norm_before_residual=True,
        rope_scaling=YARN, attention_bias=True, mlp_bias=True),
    "peagle-aux1-linear-3layers": dict(
        parallel_drafting=True, num_hidden_layers=3, eagle_aux_hidden_state_layer_ids=[4], rope_scaling=LINEAR,
        rope_theta=500000.0),
    "eagle3": dict(parallel_drafting=False, num_hidden_layers=1),
    "eagle3-norm_before_fc-residual-vocab-norm_output-2layers": dict(
        parallel_drafting=False, num_hidden_layers=2, norm_before_fc=True, norm_before_residual=True,
        draft_vocab_size=40, eagle_aux_hidden_state_layer_ids=[2, 4, 6], norm_output=True),
    "eagle3-fc_norm-aux2-llama3": dict(
        parallel_drafting=False, num_hidden_layers=1, fc_norm=True, eagle_aux_hidden_state_layer_ids=[3, 6],
        rope_scaling=LLAMA3),
}


def variant_config(name: str, **overrides) -> Eagle3DraftConfig:
    return Eagle3DraftConfig(**{**BASE, **VARIANTS[name], **overrides})


def require(distribution: str, version: str, module: str):
    """Import ``module`` of the installed ``distribution``, or skip saying why (absent, another version)."""
    try:
        installed = importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{distribution} is not installed (pip install '.[interop]')")
    if installed.split("+")[0] != version:
        pytest.skip(f"{distribution} {installed} is installed; these tests are for {version}")
    try:
        return importlib.import_module(module)
    except ImportError as error:  # a dependency of the peer is missing
        pytest.skip(f"{module} does not import here: {error}")


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Random values in every floating tensor of the state dict, so that every weight and every norm
    shows in the logits: norm weights around 1, matrices scaled by 1/sqrt(fan-in) (logits of order
    1, where float32 rounding stays well below the tolerance), biases small."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict(keep_vars=True).items():
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=generator)
            if "norm" in name:
                tensor.copy_(1 + 0.3 * noise)
            elif tensor.dim() == 2 and "embed" not in name:
                tensor.copy_(noise / tensor.shape[-1] ** 0.5)
            else:  # embeddings, mask_hidden: like hidden states; biases
                tensor.copy_(noise if tensor.dim() > 1 else 0.1 * noise)


def draft_vocab(config: Eagle3DraftConfig, seed: int = 0) -> torch.Tensor:
    """Sorted distinct target ids making a draft vocabulary of config.draft_vocab_size."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(config.vocab_size, generator=generator)[: config.draft_vocab_size].sort().values


def our_model(config: Eagle3DraftConfig, seed: int = 0) -> LlamaEagle3DraftModel:
    model = LlamaEagle3DraftModel(config).eval()
    randomize_(model, seed)
    if config.draft_vocab_size < config.vocab_size:
        model.set_draft_vocab(draft_vocab(config, seed))
    return model


def cod_inputs(config: Eagle3DraftConfig, seq_len: int = 16, lengths=(10, 6), seed: int = 0) -> dict:
    """One packed sequence of two documents and its flat elements: COD-sampled (anchor, depth) for
    P-EAGLE; every position at depth 0 (plain causal attention) for EAGLE-3."""
    generator = torch.Generator().manual_seed(seed)
    if config.parallel_drafting:
        anchor_pos, depth = peagle_ext.generate_cod_sample_indices(
            seq_len, torch.ones(seq_len), config.num_depths, generator=generator)
    else:
        anchor_pos, depth = torch.arange(seq_len), torch.zeros(seq_len, dtype=torch.int64)
    width = config.num_aux_hidden_states * config.target_hidden_size
    return {
        "input_ids": torch.randint(config.vocab_size, (seq_len,), generator=generator),
        "aux": torch.randn(seq_len, width, generator=generator),
        "lengths": torch.tensor(lengths),
        "document_ids": torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)),
        "anchor_pos": anchor_pos,
        "depth": depth,
    }


@torch.no_grad()
def our_logits(model: LlamaEagle3DraftModel, inputs: dict) -> torch.Tensor:
    """[N, draft_vocab] logits of the flat elements, from our forward_peagle and compute_logits."""
    anchor_pos, depth = inputs["anchor_pos"], inputs["depth"]
    flat = build_peagle_inputs(model, inputs["input_ids"], inputs["aux"], anchor_pos, depth)
    seq_len = inputs["input_ids"].numel()
    block_mask = model.build_peagle_block_mask(anchor_pos, depth, inputs["lengths"], seq_len)
    return model.compute_logits(model.forward_peagle(*flat, block_mask))[0]


def assert_logits_close(ours: torch.Tensor, theirs: torch.Tensor, record: dict | None = None, key=None) -> float:
    """Max |difference| of two logits tensors, asserted <= LOGITS_ATOL (and noted in ``record``)."""
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype == torch.float32
    difference = (ours - theirs).abs().max().item()
    if record is not None:
        record[key] = difference
    assert difference <= LOGITS_ATOL, f"max |logits difference| {difference:.3g} > {LOGITS_ATOL}"
    return difference


def transformers_llama_config(config: Eagle3DraftConfig):
    """A transformers LlamaConfig with our draft's layer shape and rope (how peers describe the layer)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim, num_hidden_layers=config.num_hidden_layers, vocab_size=config.vocab_size,
        rms_norm_eps=config.rms_norm_eps, max_position_embeddings=config.max_position_embeddings,
        rope_parameters=dict(config.rope_parameters), attention_bias=config.attention_bias, mlp_bias=config.mlp_bias,
    )


def print_measured(peer: str, measured: dict) -> None:
    """The max |logits difference| per (direction, variant), one line each (pytest -s shows them)."""
    for (direction, name), difference in sorted(measured.items()):
        print(f"{peer} {direction:<26} {name:<58} max|logits diff| {difference:.2e}")


def write_verifier(directory: Path, hidden_size: int, vocab_size: int, num_layers: int = 8, seed: int = 1) -> Path:
    """A tiny local verifier as speculators resolves one: config.json (a Llama of this hidden size)
    and model.safetensors holding the three weights speculators reads (embeddings, lm_head, final norm)."""
    directory.mkdir(parents=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden_size,
              "intermediate_size": 2 * hidden_size, "num_attention_heads": 4, "num_key_value_heads": 2,
              "num_hidden_layers": num_layers, "vocab_size": vocab_size, "rms_norm_eps": 1e-5}
    (directory / "config.json").write_text(json.dumps(config))
    generator = torch.Generator().manual_seed(seed)
    save_file({
        "model.embed_tokens.weight": torch.randn(vocab_size, hidden_size, generator=generator),
        "lm_head.weight": torch.randn(vocab_size, hidden_size, generator=generator),
        "model.norm.weight": 1 + 0.1 * torch.randn(hidden_size, generator=generator),
    }, directory / "model.safetensors")
    return directory
