"""Properties of the COD sampler."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from peagle_ext import generate_cod_sample_indices
from peagle_ext.cod import cod_depth_count


@st.composite
def sampler_args(draw):
    seq_len = draw(st.integers(1, 400))
    seed = draw(st.integers(0, 2**31 - 1))
    density = draw(st.floats(0.0, 1.0))
    loss_mask = (torch.rand(seq_len, generator=torch.Generator().manual_seed(seed)) < density).to(torch.int64)
    return dict(
        seq_length=seq_len,
        loss_mask=loss_mask,
        num_depths=draw(st.integers(1, 10)),
        down_sample_ratio=draw(st.floats(0.05, 1.0)),
        down_sample_ratio_min=draw(st.floats(0.0, 1.0)),
        max_anchors=draw(st.one_of(st.none(), st.integers(0, 50))),
    ), seed


@given(sampler_args())
def test_cod_sampler_properties(drawn):
    args, seed = drawn
    anchor_pos, depth = generate_cod_sample_indices(**args, generator=torch.Generator().manual_seed(seed))
    seq_len, loss_mask = args["seq_length"], args["loss_mask"]
    assert anchor_pos.dtype == depth.dtype == torch.int64
    # Depth 0 is every position, in order, first.
    assert torch.equal(anchor_pos[:seq_len], torch.arange(seq_len)) and not depth[:seq_len].any()
    # Depth-major, each depth sorted, counts non-increasing and as the formula says.
    assert torch.all(depth[1:] >= depth[:-1])
    counts = torch.bincount(depth, minlength=args["num_depths"]).tolist()
    assert all(a >= b for a, b in zip(counts, counts[1:]))
    assert len(counts) <= args["num_depths"]
    valid = int(loss_mask.sum())
    for d in range(1, len(counts)):
        expected = cod_depth_count(valid, d, args["down_sample_ratio"], args["down_sample_ratio_min"])
        if args["max_anchors"] is not None:
            expected = min(expected, args["max_anchors"])
        assert counts[d] <= expected
        chunk = anchor_pos[depth == d]
        assert torch.all(chunk[1:] > chunk[:-1])  # sorted, no repeats
    reference = anchor_pos + depth
    assert int(anchor_pos.min()) >= 0
    assert int(reference.max()) < seq_len
    deeper = depth > 0
    assert torch.all(loss_mask[reference[deeper]] == 1)
    # Each deeper element continues a chain: its predecessor (same anchor, depth - 1) exists.
    present = set(zip(anchor_pos.tolist(), depth.tolist()))
    assert all((a, d - 1) in present for a, d in present if d > 0)


def test_full_pool_keeps_formula_count():
    seq_len = 1000
    anchor_pos, depth = generate_cod_sample_indices(seq_len, torch.ones(seq_len), num_depths=4,
                                                    generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(depth).tolist()
    assert counts == [1000, int(999 * 0.7), int(998 * 0.49), int(997 * max(0.343, 0.2))]


def test_reproducible_with_generator():
    mask = torch.ones(300)
    first = generate_cod_sample_indices(300, mask, generator=torch.Generator().manual_seed(7))
    again = generate_cod_sample_indices(300, mask, generator=torch.Generator().manual_seed(7))
    other = generate_cod_sample_indices(300, mask, generator=torch.Generator().manual_seed(8))
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    assert not torch.equal(first[0], other[0])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"seq_length": 0}, "seq_length must be an int in \\[1, 2147483647\\]"),
        ({"loss_mask": torch.ones(4)}, "expected seq_length=5"),
        ({"loss_mask": torch.ones(1, 5)}, "loss_mask must be a 1-D tensor"),
        ({"num_depths": 0}, "num_depths must be an int in \\[1, 2147483647\\]"),
        ({"down_sample_ratio": 0.0}, "down_sample_ratio must be in"),
        ({"down_sample_ratio_min": 1.5}, "down_sample_ratio_min must be in"),
        ({"max_anchors": -1}, "max_anchors must be None or an int >= 0"),
    ],
)
def test_bad_sampler_arguments(kwargs, message):
    args = {"seq_length": 5, "loss_mask": torch.ones(5), **kwargs}
    with pytest.raises(ValueError, match=message):
        generate_cod_sample_indices(**args)
