"""Masks built in DataLoader worker processes arrive equal to the ones built here; pinning and
moving a batch take the masks along, mask_mod tensors included."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from torch.nn.attention.flex_attention import create_mask, flex_attention
from torch.utils.data import DataLoader, Dataset, default_collate

import peagle_ext
from peagle_ext.data import PeagleBatch, PeagleMaskCollator, block_mask_to, pin_block_mask

SEQ_LENS = (100, 257, 64)  # samples 2i and 2i + 1 share a length, so batches of 2 collate
WINDOW, BLOCK_SIZE, DEPTHS = 48, 32, 4


class Sequences(Dataset):
    """Six samples: documents as lengths, as document_ids or none; the even ones carry their layout."""

    def __len__(self):
        return 2 * len(SEQ_LENS)

    def __getitem__(self, index):
        seq_len = SEQ_LENS[index // 2]
        generator = torch.Generator().manual_seed(index)
        loss_mask = (torch.rand(seq_len, generator=generator) < 0.8).to(torch.int64)
        sample = {"input_ids": torch.randint(1000, (seq_len,), generator=generator), "loss_mask": loss_mask}
        if index % 3 == 0:
            sample["lengths"] = torch.tensor([seq_len // 3, seq_len // 2])  # a padding tail
        elif index % 3 == 1:
            sample["document_ids"] = torch.randint(-1, 3, (seq_len,), generator=generator)
        if index % 2 == 0:
            sample["anchor_pos"], sample["depth"] = peagle_ext.generate_cod_sample_indices(
                seq_len, loss_mask, DEPTHS, generator=generator)
        return sample


class RecordingCollator(PeagleMaskCollator):
    """Also says which process collated the batch."""

    def __call__(self, samples):
        batch = super().__call__(samples)
        batch["collated_in"] = os.getpid()
        return batch


def collator():
    return RecordingCollator(num_depths=DEPTHS, sliding_window=WINDOW, BLOCK_SIZE=BLOCK_SIZE)


def expected_mask(sample, anchor_pos, depth):
    """The mask built here, straight from build_block_mask."""
    seq_len = sample["loss_mask"].numel()
    if "document_ids" in sample:
        documents = {"document_ids": sample["document_ids"]}
    else:
        documents = {"lengths": sample.get("lengths", torch.tensor([seq_len])), "total_seq_len": seq_len}
    return peagle_ext.build_block_mask(anchor_pos, depth, sliding_window=WINDOW, BLOCK_SIZE=BLOCK_SIZE, **documents)


def assert_same_masks(actual, expected):
    peagle_ext.assert_block_masks_equal(actual, expected)
    q_len, kv_len = expected.seq_lengths
    assert torch.equal(create_mask(actual.mask_mod, None, None, q_len, kv_len, device="cpu"),
                       create_mask(expected.mask_mod, None, None, q_len, kv_len, device="cpu"))


def check_batches(batches, dataset):
    assert len(batches) == len(SEQ_LENS)
    for index, batch in enumerate(batches):
        assert isinstance(batch, PeagleBatch)
        assert batch["collated_in"] != os.getpid()  # built in a worker process
        samples = [dataset[2 * index], dataset[2 * index + 1]]
        assert torch.equal(batch["input_ids"], default_collate([s["input_ids"] for s in samples]))
        here = collator()(samples)
        for row, sample in enumerate(samples):
            anchor_pos, depth = batch["anchor_pos"][row], batch["depth"][row]
            if "anchor_pos" in sample:  # the sample's own layout, kept; the same mask as collated here
                assert torch.equal(anchor_pos, sample["anchor_pos"]) and torch.equal(depth, sample["depth"])
                assert_same_masks(batch["block_mask"][row], here["block_mask"][row])
            else:  # sampled in the worker from the sample's loss mask
                assert anchor_pos.numel() > sample["loss_mask"].numel() > 0
                assert torch.equal(anchor_pos[: sample["loss_mask"].numel()], torch.arange(sample["loss_mask"].numel()))
            assert_same_masks(batch["block_mask"][row], expected_mask(sample, anchor_pos, depth))


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_masks_built_in_workers_equal_those_built_here(start_method):
    dataset = Sequences()
    loader = DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=collator(),
                        multiprocessing_context=start_method)
    check_batches(list(loader), dataset)


def test_sampled_layouts_follow_the_dataloader_generator():
    def layouts(seed):
        loader = DataLoader(Sequences(), batch_size=2, num_workers=2, collate_fn=collator(),
                            multiprocessing_context="fork", generator=torch.Generator().manual_seed(seed))
        return [anchor_pos for batch in loader for anchor_pos in batch["anchor_pos"]]

    first, again, other = layouts(1), layouts(1), layouts(2)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def test_pin_memory_true_without_an_accelerator_delivers_the_masks():
    if torch.accelerator.is_available():
        pytest.skip("an accelerator is present: test_pin_memory_pins_every_tensor covers pinning")
    dataset = Sequences()
    loader = DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=collator(), pin_memory=True,
                        multiprocessing_context="fork")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*pin_memory.*no accelerator")
        check_batches(list(loader), dataset)


def mask_tensors(block_mask):
    """Every tensor of a BlockMask: its block lists and its mask_mod's."""
    mask_mod = block_mask.mask_mod
    return [value for value in vars(block_mask).values() if isinstance(value, torch.Tensor)] + [
        mask_mod.anchor_pos, mask_mod.depth, mask_mod.kv_anchor_pos, mask_mod.kv_depth, mask_mod.doc_of_position]


def one_mask(**kwargs):
    generator = torch.Generator().manual_seed(0)
    anchor_pos, depth = peagle_ext.generate_cod_sample_indices(90, torch.ones(90), generator=generator)
    return peagle_ext.build_block_mask(anchor_pos, depth, torch.tensor([90]), 90, BLOCK_SIZE=16, **kwargs)


def test_block_mask_to_moves_the_mask_mod_too():
    block_mask = one_mask()
    assert block_mask.to("meta").mask_mod.anchor_pos.device.type == "cpu"  # what BlockMask.to leaves behind
    moved = block_mask_to(block_mask, "meta")
    assert all(tensor.device.type == "meta" for tensor in mask_tensors(moved))
    assert moved.mask_mod.keys_are_queries and moved.seq_lengths == block_mask.seq_lengths
    assert all(tensor.device.type == "cpu" for tensor in mask_tensors(block_mask))  # the original stays

    batch = PeagleBatch(input_ids=torch.arange(4), block_mask=[block_mask], lengths=[torch.tensor([90])], step=3)
    moved_batch = batch.to("meta", non_blocking=True)
    assert isinstance(moved_batch, PeagleBatch) and moved_batch["step"] == 3
    assert moved_batch["input_ids"].is_meta and moved_batch["lengths"][0].is_meta
    assert all(tensor.is_meta for tensor in mask_tensors(moved_batch["block_mask"][0]))


def test_collator_names_what_is_wrong():
    with pytest.raises(ValueError, match="backend must be one of"):
        PeagleMaskCollator(backend="gpu")
    with pytest.raises(TypeError, match="collate_fn must be callable"):
        PeagleMaskCollator(collate_fn=3)
    with pytest.raises(TypeError, match="sample 1 must be a mapping with a 'loss_mask' entry"):
        PeagleMaskCollator()([{"loss_mask": torch.ones(4)}, {"input_ids": torch.ones(4)}])


def needs_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (none visible)")


def test_pin_memory_pins_every_tensor():
    needs_cuda()
    dataset = Sequences()
    loader = DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=collator(), pin_memory=True,
                        multiprocessing_context="fork")
    batches = list(loader)
    for batch in batches:
        assert batch["input_ids"].is_pinned()
        assert all(tensor.is_pinned() for mask in batch["block_mask"] for tensor in mask_tensors(mask))
    check_batches(batches, dataset)
    assert all(tensor.is_pinned() for tensor in mask_tensors(pin_block_mask(one_mask())))


def test_non_blocking_move_to_cuda_gives_the_same_attention():
    needs_cuda()
    block_mask = one_mask(sliding_window=20)
    batch = PeagleBatch(block_mask=[block_mask]).pin_memory().to("cuda", non_blocking=True)
    moved = batch["block_mask"][0]
    assert all(tensor.is_cuda for tensor in mask_tensors(moved))
    assert_same_masks(block_mask_to(moved, "cpu"), block_mask)
    n = block_mask.seq_lengths[0]
    q, k, v = (torch.randn(1, 2, n, 16) for _ in range(3))
    expected = flex_attention(q, k, v, block_mask=block_mask)
    got = torch.compile(flex_attention)(q.cuda(), k.cuda(), v.cuda(), block_mask=moved)
    torch.testing.assert_close(got.cpu(), expected, atol=2e-5, rtol=1e-4)
