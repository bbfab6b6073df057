"""Hostile and careless inputs on the data side: the DataLoader collator's samples, pad_rows' rows,
batched masks of the wrong rank, and pickled mask_mods that were damaged or made elsewhere. Each
ends in a TypeError or ValueError naming the argument (the sample and its key, the row, the
mask_mod's field), or in exactly the mask its valid inputs describe."""

from __future__ import annotations

import io
import pickle

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import create_mask

import peagle_ext
from peagle_ext.data import SAFE_GLOBALS, PeagleMaskCollator
from peagle_ext.mask_mod import PeagleMaskMod

SEQ_LEN = 16


def good_sample() -> dict:
    return {"input_ids": torch.arange(SEQ_LEN), "loss_mask": torch.ones(SEQ_LEN, dtype=torch.int64)}


def collate(*samples):
    return PeagleMaskCollator(num_depths=3, backend="python")(list(samples))


# --- batched build_block_mask: the ranks it takes ------------------------------------------------

@pytest.mark.parametrize("shape", [(), (1, 2, 3), (2, 1, 1, 4)])
def test_anchor_pos_of_another_rank_says_which_ranks_are_taken(shape):
    anchor_pos = torch.zeros(shape, dtype=torch.int64)
    for documents in ({"document_ids": torch.zeros(4, dtype=torch.int64)}, {"lengths": torch.tensor([4]),
                                                                           "total_seq_len": 4}):
        with pytest.raises(ValueError, match=r"anchor_pos must be 1-D \[N\], or 2-D \[B, N\] for a batch of rows, "
                                             rf"got shape {shape}".replace("(", r"\(").replace(")", r"\)")):
            peagle_ext.build_block_mask(anchor_pos, anchor_pos, **documents)


# --- the collator ----------------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["loss_mask", "anchor_pos", "depth", "lengths", "document_ids"])
def test_a_meta_tensor_in_a_sample_is_refused_by_name(key):
    sample = good_sample()
    values = {"loss_mask": torch.ones(SEQ_LEN), "anchor_pos": torch.arange(SEQ_LEN), "depth": torch.zeros(SEQ_LEN),
              "lengths": torch.tensor([SEQ_LEN]), "document_ids": torch.zeros(SEQ_LEN)}
    sample[key] = values[key].to("meta")
    if key in ("anchor_pos", "depth"):  # they come together
        partner = "depth" if key == "anchor_pos" else "anchor_pos"
        sample[partner] = values[partner].to(torch.int64)
    with pytest.raises(ValueError, match=rf"samples\[1\]\['{key}'\] is on the meta device"):
        collate(good_sample(), sample)


@pytest.mark.parametrize("value", [[1] * SEQ_LEN, (1,) * SEQ_LEN, None, 1, "1" * SEQ_LEN])
def test_a_loss_mask_that_is_not_a_tensor_is_refused_by_name(value):
    sample = {**good_sample(), "loss_mask": value}
    with pytest.raises(TypeError, match=r"samples\[0\]\['loss_mask'\] must be a torch.Tensor"):
        collate(sample)


@pytest.mark.parametrize("key", ["anchor_pos", "depth"])
def test_a_layout_of_two_rows_blames_the_sample_entry(key):
    """anchor_pos/depth [2, 3] are a sample's entries: the message names them, not the lengths
    tensor the collator makes."""
    sample = {**good_sample(), "anchor_pos": torch.zeros(3, dtype=torch.int64),
              "depth": torch.zeros(3, dtype=torch.int64)}
    sample[key] = torch.zeros(2, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match=rf"samples\[0\]\['{key}'\] must be 1-D \(one sample's\), got shape \(2, 3\)"):
        collate(sample)


@pytest.mark.parametrize(("given", "missing"), [("anchor_pos", "depth"), ("depth", "anchor_pos")])
def test_half_a_layout_is_refused_not_replaced(given, missing):
    sample = {**good_sample(), given: torch.arange(SEQ_LEN) if given == "anchor_pos" else torch.zeros(SEQ_LEN,
                                                                                                      dtype=torch.int64)}
    with pytest.raises(ValueError, match=rf"samples\[0\] has '{given}' without '{missing}'"):
        collate(sample)


def test_lengths_and_document_ids_together_are_refused():
    sample = {**good_sample(), "lengths": torch.tensor([SEQ_LEN]), "document_ids": torch.zeros(SEQ_LEN,
                                                                                             dtype=torch.int64)}
    with pytest.raises(ValueError, match=r"samples\[0\] has both 'lengths' and 'document_ids'"):
        collate(sample)


@pytest.mark.parametrize("entries", [SEQ_LEN + 4, SEQ_LEN - 1, 1])
def test_document_ids_not_one_per_position_are_refused(entries):
    sample = {**good_sample(), "document_ids": torch.zeros(entries, dtype=torch.int64)}
    with pytest.raises(ValueError, match=rf"samples\[0\]\['document_ids'\] has {entries} entries, loss_mask "
                                         rf"{SEQ_LEN}: one document id per position"):
        collate(sample)


@pytest.mark.parametrize(("change", "error", "says"), [
    (lambda s: s.update(anchor_pos=s["anchor_pos"].float()), TypeError, "anchor_pos must have an integer dtype"),
    (lambda s: s.update(lengths=torch.tensor([SEQ_LEN + 1])), ValueError, "lengths must each be <= total_seq_len"),
    (lambda s: s.update(loss_mask=torch.full((SEQ_LEN,), 2)), ValueError, "loss_mask must hold only 0 and 1"),
])
def test_the_mask_apis_refusals_name_the_sample(change, error, says):
    sample = {**good_sample(), "anchor_pos": torch.arange(SEQ_LEN), "depth": torch.zeros(SEQ_LEN, dtype=torch.int64)}
    if "loss_mask must" in says:
        del sample["anchor_pos"], sample["depth"]  # sampled from the loss mask
    change(sample)
    with pytest.raises(error, match=rf"samples\[1\]: .*{says}"):
        collate(good_sample(), sample)


HOSTILE_ENTRIES = st.one_of(
    st.none(), st.integers(), st.floats(), st.lists(st.integers(-2, 2), max_size=4),
    st.sampled_from([torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.int64), torch.zeros(0, dtype=torch.int64),
                     torch.ones(SEQ_LEN, device="meta"), torch.full((SEQ_LEN,), float("nan")),
                     torch.arange(SEQ_LEN) + 2**40, -torch.arange(SEQ_LEN), torch.ones(SEQ_LEN, dtype=torch.bool),
                     torch.ones(1, SEQ_LEN), torch.ones(3, SEQ_LEN), torch.tensor(5)]),
)


@given(st.dictionaries(st.sampled_from(["loss_mask", "anchor_pos", "depth", "lengths", "document_ids"]),
                       HOSTILE_ENTRIES, min_size=1))
def test_any_hostile_sample_ends_in_a_named_refusal_or_a_mask(entries):
    """Whatever a sample's entries hold, the collator refuses it with a TypeError or ValueError that
    names the sample (and never another exception), or builds the mask its entries describe. (One
    sample: fields collated across samples are the collate_fn's, torch's default_collate's.)"""
    sample = {**good_sample(), **entries}
    try:
        batch = collate(sample)
    except (TypeError, ValueError) as error:
        assert "sample 0" in str(error) or "samples[0]" in str(error), error
        return
    anchor_pos, depth = batch["anchor_pos"][0], batch["depth"][0]
    documents = ({"document_ids": sample["document_ids"]} if "document_ids" in sample else
                 {"lengths": sample.get("lengths", torch.tensor([sample["loss_mask"].numel()])),
                  "total_seq_len": sample["loss_mask"].numel()})
    expected = peagle_ext.build_block_mask(anchor_pos, depth, backend="python", **documents)
    peagle_ext.assert_block_masks_equal(batch["block_mask"][0], expected)


# --- pad_rows --------------------------------------------------------------------------------------

@given(st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool, torch.complex64]),
       st.sampled_from(["anchor_pos", "depth"]), st.integers(0, 2),
       st.sampled_from([1.5, float("nan"), float("inf"), -0.5, 3.0]))
def test_pad_rows_refuses_rows_that_are_not_integers(dtype, name, row, value):
    """A float row would be truncated and NaN turned into -2^63 by the cast to int64: refused by
    name instead, as build_block_mask refuses them."""
    rows = [(torch.arange(3), torch.zeros(3, dtype=torch.int64)) for _ in range(3)]
    bad = torch.full((3,), value).to(dtype)
    rows[row] = (bad, rows[row][1]) if name == "anchor_pos" else (rows[row][0], bad)
    with pytest.raises(TypeError, match=rf"rows\[{row}\]'s {name} must have an integer dtype, got {dtype}"):
        peagle_ext.pad_rows(rows, 8)


def test_pad_rows_refuses_rows_on_different_devices():
    rows = [(torch.arange(3), torch.zeros(3, dtype=torch.int64)),
            (torch.arange(3, device="meta"), torch.zeros(3, dtype=torch.int64, device="meta"))]
    with pytest.raises(ValueError, match=r"rows\[1\] is on meta and meta, rows\[0\] on cpu"):
        peagle_ext.pad_rows(rows, 8)


@given(st.lists(st.lists(st.integers(0, 7), min_size=1, max_size=6), min_size=1, max_size=4),
       st.sampled_from([torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8]))
def test_pad_rows_takes_every_integer_dtype(rows, dtype):
    padded = peagle_ext.pad_rows([(torch.tensor(r, dtype=dtype), torch.zeros(len(r), dtype=dtype)) for r in rows], 8)
    for index, row in enumerate(rows):
        assert padded[0][index, : len(row)].tolist() == row
        assert set(padded[0][index, len(row):].tolist()) <= {8}


# --- pickled mask_mods -----------------------------------------------------------------------------

def good_mask_mod(batched: bool = False) -> PeagleMaskMod:
    anchor_pos, depth = peagle_ext.generate_cod_sample_indices(
        SEQ_LEN, torch.ones(2 if batched else 1, SEQ_LEN), num_depths=3, generator=torch.Generator().manual_seed(0))
    if not batched:
        anchor_pos, depth = anchor_pos.view(-1), depth.view(-1)
    lengths = [torch.tensor([SEQ_LEN]), torch.tensor([5, 11])] if batched else torch.tensor([SEQ_LEN])
    return peagle_ext.build_block_mask(anchor_pos, depth, lengths, SEQ_LEN, sliding_window=4).mask_mod


def damaged(mask_mod: PeagleMaskMod, **fields) -> PeagleMaskMod:
    """A copy with ``fields`` replaced without the constructor's checks (as a foreign pickle can)."""
    copy = object.__new__(PeagleMaskMod)
    copy.__dict__.update({**vars(mask_mod), **fields})
    for name, value in fields.items():
        if value is _DROP:
            del copy.__dict__[name]
    return copy


_DROP = object()

DAMAGE = [
    ({"depth": "cut"}, ValueError, r"PeagleMaskMod.anchor_pos and depth must have one shape"),
    ({"kv_depth": "cut"}, ValueError, r"PeagleMaskMod.kv_anchor_pos and kv_depth must have one shape"),
    ({"anchor_pos": "float"}, TypeError, r"PeagleMaskMod.anchor_pos must have an integer dtype, got torch.float32"),
    ({"doc_of_position": "float"}, TypeError, r"PeagleMaskMod.doc_of_position must have an integer dtype"),
    ({"doc_of_position": "empty"}, ValueError, r"PeagleMaskMod.doc_of_position must hold at least one position"),
    ({"depth": "list"}, TypeError, r"PeagleMaskMod.depth must be a torch.Tensor, got list"),
    ({"anchor_pos": "3-D", "depth": "3-D", "kv_anchor_pos": "3-D", "kv_depth": "3-D"}, ValueError,
     r"PeagleMaskMod.anchor_pos must be 1-D \[Q_LEN\] or 2-D \[B, Q_LEN\]"),
    ({"doc_of_position": "2-D"}, ValueError, r"PeagleMaskMod.doc_of_position has shape \(1, 16\)"),
    ({"sliding_window": torch.tensor([2, 3])}, TypeError, r"PeagleMaskMod.sliding_window must be None or an int >= 1"),
    ({"sliding_window": torch.tensor(2)}, TypeError, r"PeagleMaskMod.sliding_window must be None or an int >= 1"),
    ({"sliding_window": 0}, TypeError, r"PeagleMaskMod.sliding_window must be None or an int >= 1, got 0"),
    ({"sliding_window": 2.5}, TypeError, r"PeagleMaskMod.sliding_window must be None or an int >= 1, got 2.5"),
    ({"sliding_window": True}, TypeError, r"PeagleMaskMod.sliding_window must be None or an int >= 1, got True"),
    ({"sliding_window": _DROP}, TypeError, r"a pickled PeagleMaskMod must hold exactly the fields"),
    ({"extra": 1}, TypeError, r"a pickled PeagleMaskMod must hold exactly the fields"),
    ({"doc_of_position": "meta"}, ValueError, r"PeagleMaskMod.doc_of_position is on meta, anchor_pos on cpu"),
]


def apply_damage(mask_mod: PeagleMaskMod, damage: dict) -> PeagleMaskMod:
    def change(name, how):
        tensor = getattr(mask_mod, name, None)
        return {"cut": lambda: tensor[..., 1:], "float": lambda: tensor.float(), "empty": lambda: tensor[..., :0],
                "list": lambda: tensor.tolist(), "3-D": lambda: tensor.view(1, 1, -1),
                "2-D": lambda: tensor.view(1, -1), "meta": lambda: tensor.to("meta")}[how]()

    return damaged(mask_mod, **{name: change(name, how) if isinstance(how, str) else how
                                for name, how in damage.items()})


@pytest.mark.parametrize(("damage", "error", "says"), DAMAGE)
def test_a_damaged_pickle_is_refused_when_loaded(damage, error, says):
    data = pickle.dumps(apply_damage(good_mask_mod(), damage))
    with pytest.raises(error, match=says):
        pickle.loads(data)


@pytest.mark.parametrize(("damage", "error", "says"), [d for d in DAMAGE if "meta" not in d[0].values()])
def test_a_damaged_block_mask_is_refused_by_torch_load(damage, error, says):
    """torch.load with weights_only (the default) and SAFE_GLOBALS runs the same checks on the
    BlockMask's mask_mod."""
    block_mask = peagle_ext.build_block_mask(torch.arange(4), torch.zeros(4, dtype=torch.int64), torch.tensor([4]), 4)
    block_mask.mask_mod = apply_damage(good_mask_mod(), damage)
    buffer = io.BytesIO()
    torch.save(block_mask, buffer)
    buffer.seek(0)
    with torch.serialization.safe_globals(SAFE_GLOBALS), pytest.raises(error, match=says):
        torch.load(buffer)


@pytest.mark.parametrize("batched", [False, True])
def test_a_sound_pickle_loads_and_describes_the_same_mask(batched):
    mask_mod = good_mask_mod(batched)
    loaded = pickle.loads(pickle.dumps(mask_mod))
    assert loaded.keys_are_queries and loaded.batched == batched
    n = mask_mod.anchor_pos.shape[-1]
    rows = 2 if batched else None
    assert torch.equal(create_mask(loaded, rows, None, n, n, device="cpu"),
                       create_mask(mask_mod, rows, None, n, n, device="cpu"))


def test_the_constructor_checks_what_unpickling_checks():
    good = good_mask_mod()
    with pytest.raises(TypeError, match="PeagleMaskMod.sliding_window must be None or an int >= 1"):
        PeagleMaskMod(good.anchor_pos, good.depth, good.doc_of_position, sliding_window=torch.tensor([2, 3]))
    with pytest.raises(ValueError, match="PeagleMaskMod.anchor_pos and depth must have one shape"):
        PeagleMaskMod(good.anchor_pos, good.depth[1:], good.doc_of_position)
