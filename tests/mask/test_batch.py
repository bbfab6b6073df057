"""Batches of rows: B masks in one build, each equal to create_block_mask's for that row."""

from __future__ import annotations

import pickle

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import create_block_mask

import peagle_ext
from peagle_ext._inputs import doc_of_position_from_lengths

from helpers import BACKEND_DEVICE, backends_here, dense_rule
from strategies import BLOCK_SIZES, Case, arbitrary_cases, cod_cases, separate_key_cases


def as_document_ids(case: Case) -> torch.Tensor:
    if "document_ids" in case.kwargs:
        return case.kwargs["document_ids"].to(torch.int64)
    return doc_of_position_from_lengths(case.kwargs["lengths"], case.kwargs["total_seq_len"])


@st.composite
def batches(draw):
    """(anchor_pos [B, N], depth [B, N], keyword arguments, the rows' own cases): rows drawn on their
    own, padded to one N with pad_rows and to one number of positions; documents as a list of lengths
    when every row has lengths, else as document_ids [B, S]; keys apart in every row or none."""
    apart = draw(st.booleans())
    strategy = separate_key_cases() if apart else st.one_of(cod_cases(max_seq_len=120),
                                                            arbitrary_cases(max_elements=150))
    rows = draw(st.lists(strategy, min_size=1, max_size=3))
    if apart:
        rows = [r for r in rows if "kv_anchor_pos" in r.kwargs] or rows[:1]
        apart = "kv_anchor_pos" in rows[0].kwargs
        rows = [r for r in rows if ("kv_anchor_pos" in r.kwargs) == apart]
    positions = max(as_document_ids(r).numel() for r in rows)
    kwargs = {"sliding_window": rows[0].kwargs["sliding_window"]}
    if all("lengths" in r.kwargs for r in rows):
        kwargs.update(lengths=[r.kwargs["lengths"] for r in rows], total_seq_len=positions)
    else:
        pad = torch.nn.functional.pad
        kwargs["document_ids"] = torch.stack([pad(as_document_ids(r), (0, positions - as_document_ids(r).numel()),
                                                  value=-1) for r in rows])
    anchor_pos, depth = peagle_ext.pad_rows([(r.anchor_pos, r.depth) for r in rows], positions)
    if apart:
        kwargs["kv_anchor_pos"], kwargs["kv_depth"] = peagle_ext.pad_rows(
            [(r.kwargs["kv_anchor_pos"], r.kwargs["kv_depth"]) for r in rows], positions)
    return anchor_pos, depth, kwargs, rows


def batch_oracle(anchor_pos, kwargs, rows, block_size):
    """create_block_mask with B rows over the rule evaluated pair by pair on each row's own real
    elements (tests/helpers.py), the padding elements seeing nothing and seen by none."""
    q_len = anchor_pos.shape[-1]
    kv_len = kwargs["kv_anchor_pos"].shape[-1] if "kv_anchor_pos" in kwargs else q_len
    allowed = torch.zeros(len(rows), q_len, kv_len, dtype=torch.bool)
    for index, row in enumerate(rows):
        own = {k: v for k, v in row.kwargs.items() if k != "sliding_window"}
        grid = dense_rule(row.anchor_pos, row.depth, sliding_window=kwargs["sliding_window"], **own)
        allowed[index, : grid.shape[0], : grid.shape[1]] = grid

    def rule(b, h, q_idx, kv_idx):
        return allowed[b, q_idx, kv_idx]

    return create_block_mask(rule, len(rows), None, q_len, kv_len, device="cpu", BLOCK_SIZE=block_size), allowed


@given(batch=batches(), block_size=BLOCK_SIZES)
def test_a_batch_matches_create_block_mask_with_b_rows(batch, block_size):
    anchor_pos, depth, kwargs, rows = batch
    expected, allowed = batch_oracle(anchor_pos, kwargs, rows, block_size)
    b = torch.arange(len(rows))[:, None, None]
    q = torch.arange(allowed.shape[1])[None, :, None]
    kv = torch.arange(allowed.shape[2])[None, None, :]
    for backend in backends_here():
        device = BACKEND_DEVICE[backend]
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else [t.to(device) for t in v]
                     if isinstance(v, list) else v) for k, v in kwargs.items()}
        built = peagle_ext.build_block_mask(anchor_pos.to(device), depth.to(device), BLOCK_SIZE=block_size,
                                            backend=backend, **moved)
        try:
            peagle_ext.assert_block_masks_equal(built, expected)
        except AssertionError as error:
            raise AssertionError(f"backend {backend!r}: {error}") from None
        # Its mask_mod reads row b: the rule itself on every pair of every row.
        got = built.mask_mod(b.to(device), torch.zeros((), dtype=torch.int64, device=device), q.to(device),
                             kv.to(device))
        assert torch.equal(got.cpu(), allowed), backend


def test_cod_sampling_of_a_batch_gives_each_row_its_own_layout():
    loss_mask = torch.ones(3, 50)
    loss_mask[1, 30:] = 0
    anchor_pos, depth = peagle_ext.generate_cod_sample_indices(50, loss_mask,
                                                               generator=torch.Generator().manual_seed(0))
    assert anchor_pos.shape == depth.shape and anchor_pos.shape[0] == 3
    generator = torch.Generator().manual_seed(0)
    for row in range(3):
        alone = peagle_ext.generate_cod_sample_indices(50, loss_mask[row], generator=generator)
        n = alone[0].numel()
        assert torch.equal(anchor_pos[row, :n], alone[0]) and torch.equal(depth[row, :n], alone[1])
        assert bool((anchor_pos[row, n:] == 50).all()) and bool((depth[row, n:] == 0).all())


def test_padding_elements_change_nothing_of_a_row():
    """A row padded with pad_rows inside a batch gives its own mask on its real elements."""
    generator = torch.Generator().manual_seed(4)
    a1, d1 = peagle_ext.generate_cod_sample_indices(300, torch.ones(300), generator=generator)
    a2, d2 = peagle_ext.generate_cod_sample_indices(300, (torch.rand(300, generator=generator) < 0.5).long(),
                                                    generator=generator)
    anchor_pos, depth = peagle_ext.pad_rows([(a1, d1), (a2, d2)], 300)
    lengths = [torch.tensor([120, 180]), torch.tensor([300])]
    batched = peagle_ext.build_block_mask(anchor_pos, depth, lengths, 300, BLOCK_SIZE=64)
    for row, (a, d) in enumerate([(a1, d1), (a2, d2)]):
        alone = peagle_ext.build_block_mask(a, d, lengths[row], 300, BLOCK_SIZE=64)
        n = a.numel()
        q, kv = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
        zero = torch.zeros((), dtype=torch.int64)
        assert torch.equal(batched.mask_mod(torch.tensor(row), zero, q, kv), alone.mask_mod(zero, zero, q, kv))
        rows = alone.kv_num_blocks.shape[-1]
        assert torch.equal(batched.kv_num_blocks[row, 0, :rows] + batched.full_kv_num_blocks[row, 0, :rows],
                           alone.kv_num_blocks[0, 0] + alone.full_kv_num_blocks[0, 0])


def test_a_batched_mask_pickles():
    anchor_pos, depth = peagle_ext.generate_cod_sample_indices(64, torch.ones(2, 64))
    mask = peagle_ext.build_block_mask(anchor_pos, depth, torch.tensor([[40, 24], [64, 0]]), 64, BLOCK_SIZE=16)
    loaded = pickle.loads(pickle.dumps(mask))
    peagle_ext.assert_block_masks_equal(loaded, mask)
    assert loaded.mask_mod.batched and loaded.kv_num_blocks.shape[0] == 2


@pytest.mark.parametrize(
    "change, error, message",
    [
        (lambda a, d, k: (a, d[:, :-1], k), ValueError, "anchor_pos and depth must have the same shape"),
        (lambda a, d, k: (a, d, {**k, "lengths": k["lengths"][:1]}), ValueError, "lengths must have one row per row"),
        (lambda a, d, k: (a, d, {**k, "lengths": torch.tensor([10, 20])}), ValueError, "lengths must be 2-D"),
        (lambda a, d, k: (a + 2, d, k), ValueError, r"anchor_pos must be <= total_seq_len=64 \(total_seq_len marks"),
        (lambda a, d, k: (a, d, {**k, "lengths": [torch.tensor([70]), torch.tensor([64])]}), ValueError,
         "lengths must each be <= total_seq_len=64, got a maximum of 70"),
        (lambda a, d, k: (a, d, {**k, "lengths": [torch.tensor([40, 30]), torch.tensor([64])]}), ValueError,
         "lengths sum to 70 in a row, past total_seq_len=64"),
        (lambda a, d, k: (a, d, {"document_ids": torch.zeros(64, dtype=torch.long)}), ValueError,
         "document_ids must be 2-D"),
        (lambda a, d, k: (a, d, {**k, "kv_anchor_pos": a[:1], "kv_depth": d[:1]}), ValueError,
         "kv_anchor_pos must have anchor_pos's 2 rows"),
    ],
)
def test_batch_arguments_are_checked_by_name(change, error, message):
    anchor_pos, depth = peagle_ext.generate_cod_sample_indices(64, torch.ones(2, 64))
    a, d, kwargs = change(anchor_pos, depth, {"lengths": [torch.tensor([64]), torch.tensor([30, 34])],
                                              "total_seq_len": 64})
    with pytest.raises(error, match=message):
        peagle_ext.build_block_mask(a, d, **kwargs)


def test_pad_rows_refuses_what_is_not_a_row():
    with pytest.raises(ValueError, match=r"rows\[1\] must be an \(anchor_pos, depth\) pair"):
        peagle_ext.pad_rows([(torch.zeros(3), torch.zeros(3)), (torch.zeros(3), torch.zeros(2))], 5)
    with pytest.raises(ValueError, match="num_positions must be a positive int"):
        peagle_ext.pad_rows([(torch.zeros(3), torch.zeros(3))], 0)
