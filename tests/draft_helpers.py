"""Tiny draft models and COD inputs shared by the draft-model tests (CPU-sized)."""

from __future__ import annotations

import pytest
import torch

import peagle_ext
from peagle_ext.draft.llama import Eagle3DraftConfig, LlamaEagle3DraftModel
from peagle_ext.draft.training import build_peagle_inputs


@pytest.fixture(autouse=True)
def single_thread():
    """Run each test on one intra-op thread: these models are tiny, and on a small shared CPU the
    thread pool's contention costs more than it gains (about 3x here). Import it to use it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(**overrides) -> Eagle3DraftConfig:
    """hidden 32, 4 heads of 8 over 2 KV heads, 2 layers, vocab 96, target hidden 16, P-EAGLE on."""
    fields = dict(
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        vocab_size=96,
        draft_vocab_size=96,
        target_hidden_size=16,
        rope_theta=10000.0,
        parallel_drafting=True,
        num_depths=4,
        max_position_embeddings=64,
    )
    fields.update(overrides)
    return Eagle3DraftConfig(**fields)


def tiny_model(seed: int = 0, **overrides) -> LlamaEagle3DraftModel:
    torch.manual_seed(seed)
    return LlamaEagle3DraftModel(tiny_config(**overrides))


def cod_indices(seq_len: int = 24, depths: int = 4, seed: int = 0):
    """(anchor_pos, depth) int64 [N] for one fully supervised sequence."""
    generator = torch.Generator().manual_seed(seed)
    return peagle_ext.generate_cod_sample_indices(seq_len, torch.ones(seq_len), depths, generator=generator)


def random_sequence(model, seq_len: int = 24, seed: int = 1):
    """(input_ids [S], aux_hidden_states [S, num_aux * target_hidden]) drawn at random."""
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    ids = torch.randint(config.vocab_size, (seq_len,), generator=generator)
    aux = torch.randn(seq_len, config.num_aux_hidden_states * config.target_hidden_size, generator=generator)
    return ids, aux


def flat_inputs(model, seq_len: int = 24, depths: int = 4, seed: int = 0):
    """(anchor_pos, depth, ids [1, N], projected [1, N, H], position_ids [1, N]) for a random sequence."""
    anchor_pos, depth = cod_indices(seq_len, depths, seed)
    ids, aux = random_sequence(model, seq_len, seed + 1)
    return (anchor_pos, depth, *build_peagle_inputs(model, ids, aux, anchor_pos, depth))
