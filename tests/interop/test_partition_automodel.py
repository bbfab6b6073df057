"""assign_cod_segments gives NeMo Automodel 0.7.0's own assignment, for any arrays."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import peagle_ext

automodel_data = pytest.importorskip(
    "nemo_automodel.components.speculative.eagle.peagle_data",
    reason="needs nemo-automodel 0.7.0 (pip install --no-deps nemo-automodel==0.7.0 beside the 'interop' extra)",
)


@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(0, 300),
    seq_length=st.integers(1, 500),
    num_segments=st.integers(1, 12),
    spread=st.sampled_from([1, 10, 500, 2**20]),
    dtype=st.sampled_from([torch.int32, torch.int64]),
)
def test_assignment_equals_automodels(seed, n, seq_length, num_segments, spread, dtype):
    generator = torch.Generator().manual_seed(seed)
    anchor_pos = torch.randint(-spread // 10, spread + 1, (n,), generator=generator).to(dtype)
    depth = torch.randint(0, 9, (n,), generator=generator).to(dtype)
    ours = peagle_ext.assign_cod_segments(anchor_pos, depth, seq_length, num_segments)
    theirs = automodel_data.assign_cod_segments(anchor_pos, depth, seq_length, num_segments)
    assert torch.equal(ours, theirs.to(torch.int64))


def test_assignment_equals_automodels_on_cod_layouts():
    for seq_length, num_segments in ((4096, 4), (1000, 3), (17, 8)):
        anchor_pos, depth = peagle_ext.generate_cod_sample_indices(seq_length, torch.ones(seq_length))
        assert torch.equal(peagle_ext.assign_cod_segments(anchor_pos, depth, seq_length, num_segments),
                           automodel_data.assign_cod_segments(anchor_pos, depth, seq_length, num_segments))


def test_assignment_is_elementwise_as_automodels():
    anchor_pos, depth = peagle_ext.generate_cod_sample_indices(64, torch.ones(64))
    ours = peagle_ext.assign_cod_segments(anchor_pos[None], depth[None], 64, 3)
    assert ours.shape == (1, anchor_pos.numel())
    assert torch.equal(ours, automodel_data.assign_cod_segments(anchor_pos[None], depth[None], 64, 3))
