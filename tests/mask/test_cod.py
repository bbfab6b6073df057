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
        filter_position_zero=draw(st.booleans()),
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
    seeds = int(loss_mask.sum())
    if args["max_anchors"] is not None:
        seeds = min(seeds, args["max_anchors"])
    reference = anchor_pos + depth
    for d in range(1, len(counts)):
        assert counts[d] <= cod_depth_count(seeds, d, args["down_sample_ratio"], args["down_sample_ratio_min"])
        chunk = reference[depth == d]
        assert chunk.unique().numel() == chunk.numel()
        if args["filter_position_zero"]:  # sorted; a chain wrapping to position 0 may come last
            assert torch.all(chunk[1:] > chunk[:-1])
    assert int(reference.min()) >= 0 and int(reference.max()) < seq_len
    deeper = depth > 0
    assert torch.all(loss_mask[reference[deeper]] == 1)
    if args["filter_position_zero"]:
        assert not torch.any(reference[deeper] == 0) and int(anchor_pos.min()) >= 0
    # Each deeper element continues a chain: the position before it (wrapping around from 0 to
    # seq_len - 1 without filter_position_zero) is present one depth shallower.
    present = set(zip(reference.tolist(), depth.tolist()))
    assert all(((p - 1) % seq_len, d - 1) in present for p, d in present if d > 0)


def test_full_pool_keeps_formula_count():
    seq_len = 1000
    anchor_pos, depth = generate_cod_sample_indices(seq_len, torch.ones(seq_len), num_depths=4,
                                                    generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(depth).tolist()
    assert counts == [1000, int(999 * 0.7), int(998 * 0.49), int(997 * max(0.343, 0.2))]


def test_one_row_mask_equals_flat_mask():
    mask = (torch.arange(200) % 3 != 0).to(torch.float32)
    flat = generate_cod_sample_indices(200, mask, generator=torch.Generator().manual_seed(3))
    row = generate_cod_sample_indices(200, mask[None].bool(), generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(flat, row))


def test_max_anchors_limits_the_seeds():
    """At most max_anchors depth-1 elements, and every deeper count follows from that many seeds."""
    anchor_pos, depth = generate_cod_sample_indices(1000, torch.ones(1000), num_depths=4, down_sample_ratio=1.0,
                                                    max_anchors=50, generator=torch.Generator().manual_seed(0))
    assert torch.bincount(depth).tolist() == [1000, 49, 48, 47]


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
        ({"loss_mask": torch.ones(2, 4)}, "loss_mask has 4 entries, expected seq_length=5"),  # a batch's rows
        ({"loss_mask": torch.ones(1, 1, 5)}, r"loss_mask must have shape .*got \(1, 1, 5\)"),
        ({"loss_mask": torch.tensor([0, 1, 2, 1, 0])}, "loss_mask must hold only 0 and 1"),
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


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"loss_mask": [1, 1, 1, 1, 1]}, "loss_mask must be a tensor"),
        ({"filter_position_zero": 1}, "filter_position_zero must be a bool"),
    ],
)
def test_bad_sampler_argument_types(kwargs, message):
    args = {"seq_length": 5, "loss_mask": torch.ones(5), **kwargs}
    with pytest.raises(TypeError, match=message):
        generate_cod_sample_indices(**args)
