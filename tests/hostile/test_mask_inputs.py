"""Hostile and careless arguments to the mask API: extreme integers, windows and block sizes past
every sequence, sums that would wrap, sizes that would not fit. Each ends in a named refusal or
in exactly create_block_mask's blocks; peak memory per input family is bounded (a subprocess each)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import create_mask

import peagle_ext
from peagle_ext import _python_builder
from peagle_ext._inputs import FIELD_MAX

from helpers import backends_here, oracle_block_mask
from strategies import arbitrary_cases, separate_key_cases

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_hostile  # noqa: E402

HUGE_INTS = st.one_of(st.integers(2**31, 2**70), st.sampled_from([2**31 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1]))


def _all_backends_equal(case_or_args, oracle, **kwargs):
    anchor_pos, depth, extra = case_or_args
    for backend in backends_here():
        if backend == "cuda":
            continue
        built = peagle_ext.build_block_mask(anchor_pos, depth, backend=backend, **extra, **kwargs)
        peagle_ext.assert_block_masks_equal(built, oracle)


@given(arbitrary_cases(max_elements=60), HUGE_INTS)
def test_a_window_past_every_sequence_is_no_window_everywhere(case, window):
    """A window wider than any a_q + d_q describes the unwindowed mask: the same blocks on every
    backend, and a mask_mod that agrees with them (no integer wrapped anywhere)."""
    extra = {k: v for k, v in case.kwargs.items() if k != "sliding_window"}
    oracle = oracle_block_mask(case.anchor_pos, case.depth, **extra)
    _all_backends_equal((case.anchor_pos, case.depth, extra), oracle, sliding_window=window)
    n = case.anchor_pos.numel()
    dense = [create_mask(peagle_ext.create_peagle_mask_mod(case.anchor_pos, case.depth, **extra, sliding_window=w),
                         None, None, n, n, device="cpu") for w in (window, None)]
    assert torch.equal(*dense)


@given(separate_key_cases(), st.integers(1, FIELD_MAX), st.integers(1, FIELD_MAX))
def test_block_sizes_up_to_the_bound_are_exact(case, q_block, kv_block):
    """Any pair of block sizes up to 2^31 - 1, queries apart from the keys or not: the blocks
    create_block_mask gives. Its own dense grid is padded to whole blocks, so past a side's length
    it is asked with that length + 1, the same single tail block; the lists must then be equal and
    the mask must carry the sizes asked for."""
    q_len = case.anchor_pos.numel()
    kv_len = case.kwargs["kv_anchor_pos"].numel() if "kv_anchor_pos" in case.kwargs else q_len
    oracle = oracle_block_mask(case.anchor_pos, case.depth, **case.kwargs,
                               BLOCK_SIZE=(min(q_block, q_len + 1), min(kv_block, kv_len + 1)))
    for backend in [b for b in backends_here() if b != "cuda"]:
        built = peagle_ext.build_block_mask(case.anchor_pos, case.depth, backend=backend, **case.kwargs,
                                            BLOCK_SIZE=(q_block, kv_block))
        assert tuple(built.BLOCK_SIZE) == (q_block, kv_block)
        built.BLOCK_SIZE = oracle.BLOCK_SIZE
        peagle_ext.assert_block_masks_equal(built, oracle)


@given(arbitrary_cases(max_elements=80))
def test_the_python_walk_in_tiny_chunks_is_exact(case):
    """The python builder's walk split into chunks of 3 runs gives the same blocks as in one go."""
    previous, _python_builder._WALK_CHUNK = _python_builder._WALK_CHUNK, 3
    try:
        built = peagle_ext.build_block_mask(case.anchor_pos, case.depth, backend="python", BLOCK_SIZE=4, **case.kwargs)
    finally:
        _python_builder._WALK_CHUNK = previous
    expected = oracle_block_mask(case.anchor_pos, case.depth, BLOCK_SIZE=4, **case.kwargs)
    peagle_ext.assert_block_masks_equal(built, expected)


ANCHORS, DEPTHS = torch.arange(4), torch.zeros(4, dtype=torch.long)
FOUR = dict(lengths=torch.tensor([4]), total_seq_len=4)


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        (dict(lengths=torch.tensor([4]), total_seq_len=2**31), ValueError, "total_seq_len must be <= 2147483647"),
        (dict(lengths=torch.tensor([4]), total_seq_len=2**64 - 1), ValueError, "total_seq_len must be <="),
        (dict(**FOUR, BLOCK_SIZE=2**31), ValueError, "BLOCK_SIZE must be <="),
        (dict(**FOUR, BLOCK_SIZE=(1, 2**64)), ValueError, r"BLOCK_SIZE\[1\] must be <="),
        (dict(**FOUR, BLOCK_SIZE=0), ValueError, "BLOCK_SIZE must be >= 1"),
        (dict(**FOUR, BLOCK_SIZE=4.0), TypeError, "BLOCK_SIZE must be an int"),
        (dict(**FOUR, sliding_window=-2**63), ValueError, "sliding_window must be >= 1"),
        (dict(**FOUR, sliding_window=True), TypeError, "sliding_window must be an int"),
        # Four lengths of 2^62 sum to 0 in int64: the maximum is checked first.
        (dict(lengths=torch.full((4,), 2**62), total_seq_len=4), ValueError, "lengths must each be <= total_seq_len=4"),
        (dict(lengths=torch.tensor([2**63 - 1, 2]), total_seq_len=4), ValueError, "lengths must each be <="),
        (dict(lengths=torch.tensor([-2**63, 4]), total_seq_len=4), ValueError, "lengths must be non-negative"),
        (dict(document_ids=torch.tensor([0, 0, 2**40, 0])), ValueError, "document_ids values must be <= 2147483647"),
        (dict(document_ids=torch.tensor([0, 0, -2**63, 0])), ValueError, "document_ids values must be >= -1"),
    ],
)
def test_integers_out_of_range_are_refused_by_name(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        peagle_ext.build_block_mask(ANCHORS, DEPTHS, **kwargs)


def test_extreme_element_values_are_refused_by_name():
    lengths = dict(lengths=torch.tensor([4]), total_seq_len=4)
    with pytest.raises(ValueError, match="anchor_pos must be non-negative"):
        peagle_ext.build_block_mask(torch.tensor([0, 1, -2**63, 3]), DEPTHS, **lengths)
    with pytest.raises(ValueError, match="anchor_pos must be < total_seq_len=4, got a maximum of 9223372036854775807"):
        peagle_ext.build_block_mask(torch.tensor([0, 1, 2**63 - 1, 3]), DEPTHS, **lengths)
    with pytest.raises(ValueError, match="depth must be <= 2147483647"):
        peagle_ext.build_block_mask(ANCHORS, torch.tensor([0, 0, 2**62, 0]), **lengths)


def test_a_mask_too_large_for_the_machine_is_refused_up_front_with_the_estimate(backend):
    n = 1 << 20  # a trillion tiles at BLOCK_SIZE 1: terabytes of index
    anchor_pos, depth = torch.arange(n), torch.zeros(n, dtype=torch.long)
    with pytest.raises(MemoryError, match=r"1 x a 1048576 x 1048576-tile block mask .* would need about \d+\.\d GiB"):
        peagle_ext.build_block_mask(anchor_pos, depth, torch.tensor([n]), n, BLOCK_SIZE=1, backend=backend)


def test_a_document_table_too_large_is_refused_up_front():
    with pytest.raises(MemoryError, match="document table of total_seq_len=2147483647 positions would need about 34"):
        if peagle_ext._inputs.available_memory_bytes(torch.device("cpu")) > 40 << 30:
            pytest.skip("this machine has the 34 GiB that table needs")
        peagle_ext.build_block_mask(ANCHORS, DEPTHS, torch.tensor([4]), FIELD_MAX)


# (family, backend, bound on the rise of peak RSS in MiB): each family used to make some builder
# allocate far more than its index (bench_hostile.py prints before/after figures).
MEMORY_BOUNDS = [
    ("one_query_million_keys", "cpu", 400),
    ("one_query_million_keys", "python", 400),
    ("huge_block_sizes_apart", "cpu", 64),
    ("huge_block_sizes_apart", "cuda_emulated", 64),
    ("huge_block_size", "cpu", 64),
    ("shuffled_context_walk", "python", 400),
]


@pytest.mark.parametrize(("family", "backend", "bound_mib"), MEMORY_BOUNDS)
def test_peak_memory_per_input_family_is_bounded(family, backend, bound_mib):
    if backend not in backends_here():
        pytest.skip(f"backend {backend!r} unavailable here")
    row = bench_hostile.measure(family, backend, timeout=300)
    assert row["outcome"].startswith("built"), row
    assert row["rise_mib"] < bound_mib, row


INT64 = st.integers(-2**63, 2**63 - 1)
EXTREME_INT64 = st.one_of(INT64, st.sampled_from([-2**63, -1, 0, 1, 2**31 - 1, 2**31, 2**62, 2**63 - 1]))


@given(st.lists(st.tuples(EXTREME_INT64, EXTREME_INT64), min_size=1, max_size=12), st.integers(1, 16),
       st.one_of(st.none(), EXTREME_INT64.filter(lambda w: w >= 1)), st.sampled_from([1, 2, 3, (2, 5)]),
       st.booleans())
def test_any_int64_values_are_refused_by_name_or_built_without_validation(elements, positions, window, block,
                                                                         apart):
    """Any int64 anchors and depths: validated, a named ValueError or create_block_mask's blocks;
    with validate=False every backend still returns a mask of the right shape (never a crash or
    an out-of-bounds read, which the kernels' sanitizers would also report)."""
    anchor_pos = torch.tensor([a for a, _ in elements])
    depth = torch.tensor([d for _, d in elements])
    kwargs = dict(lengths=torch.tensor([positions]), total_seq_len=positions, sliding_window=window, BLOCK_SIZE=block)
    if apart:
        kwargs.update(kv_anchor_pos=anchor_pos.flip(0)[: max(1, len(elements) // 2)],
                      kv_depth=depth.flip(0)[: max(1, len(elements) // 2)])
    try:  # the validation, then the oracle (which evaluates the rule as stated, unchecked)
        peagle_ext.create_peagle_mask_mod(anchor_pos, depth, **{k: v for k, v in kwargs.items() if k != "BLOCK_SIZE"})
        oracle = oracle_block_mask(anchor_pos, depth, **kwargs)
    except ValueError as error:
        assert any(name in str(error) for name in ("anchor_pos", "depth")), error
        oracle = None
    for backend in [b for b in backends_here() if b != "cuda"]:
        if oracle is not None:
            peagle_ext.assert_block_masks_equal(peagle_ext.build_block_mask(anchor_pos, depth, backend=backend,
                                                                            **kwargs), oracle)
        unchecked = peagle_ext.build_block_mask(anchor_pos, depth, backend=backend, validate=False, **kwargs)
        keys = kwargs["kv_anchor_pos"].numel() if apart else len(elements)
        assert tuple(unchecked.seq_lengths) == (len(elements), keys)


def test_cod_sampler_and_segments_refuse_or_stay_in_range():
    with pytest.raises(ValueError, match=r"seq_length must be an int in \[1, 2147483647\]"):
        peagle_ext.generate_cod_sample_indices(2**31, torch.ones(1))
    with pytest.raises(ValueError, match="num_depths must be an int in"):
        peagle_ext.generate_cod_sample_indices(4, torch.ones(4), num_depths=2**64)
    with pytest.raises(TypeError, match="down_sample_ratio must be a number, got str"):
        peagle_ext.generate_cod_sample_indices(4, torch.ones(4), down_sample_ratio="0.7")
    with pytest.raises(ValueError, match="down_sample_ratio must be in"):
        peagle_ext.generate_cod_sample_indices(4, torch.ones(4), down_sample_ratio=float("nan"))
    with pytest.raises(ValueError, match="num_segments must be an int in"):
        peagle_ext.assign_cod_segments(ANCHORS, DEPTHS, 4, 2**31)
    # Anchors at the ends of int64 land in the first and last segments, with no product wrapping.
    anchors = torch.tensor([-2**63, 2**63 - 2, 2**62, 0])
    segments = peagle_ext.assign_cod_segments(anchors, torch.tensor([0, 0, 1, 0]), FIELD_MAX, FIELD_MAX)
    assert segments.tolist() == [0, FIELD_MAX - 1, FIELD_MAX - 1, 0]
