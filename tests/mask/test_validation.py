"""Bad input is refused with a TypeError/ValueError naming the argument, before any kernel runs."""

from __future__ import annotations

import pytest
import torch

import peagle_ext

A = torch.tensor([0, 1, 2, 0, 1])
D = torch.tensor([0, 0, 0, 1, 1])
L = torch.tensor([3])


def call(anchor_pos=A, depth=D, lengths=L, total_seq_len=3, **kwargs):
    return peagle_ext.build_block_mask(anchor_pos, depth, lengths, total_seq_len, **kwargs)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"anchor_pos": A[None]}, ValueError, "depth must be 2-D"),  # [1, N] is a batch of one row
        ({"depth": D[None]}, ValueError, "depth must be 1-D"),
        ({"depth": D[:4]}, ValueError, "same shape"),
        ({"anchor_pos": A[:0], "depth": D[:0]}, ValueError, "N == 0"),
        ({"anchor_pos": A.float()}, TypeError, "anchor_pos must have an integer dtype"),
        ({"depth": D.to(torch.bool)}, TypeError, "depth must have an integer dtype"),
        ({"anchor_pos": [0, 1]}, TypeError, "anchor_pos must be a torch.Tensor"),
        ({"anchor_pos": torch.tensor([0, -1, 2, 0, 1])}, ValueError, "anchor_pos must be non-negative"),
        ({"depth": torch.tensor([0, 0, -1, 1, 1])}, ValueError, "depth must be non-negative"),
        ({"depth": torch.tensor([0, 0, 0, 1, 2**31])}, ValueError, "depth must be <="),
        ({"anchor_pos": torch.tensor([0, 1, 3, 0, 1])}, ValueError, "anchor_pos must be < total_seq_len=3"),
        ({"lengths": torch.tensor([2, -1])}, ValueError, "lengths must be non-negative"),
        ({"lengths": torch.tensor([2, 2])}, ValueError, "past total_seq_len=3"),
        ({"lengths": L.float()}, TypeError, "lengths must have an integer dtype"),
        ({"total_seq_len": None}, ValueError, "total_seq_len is required"),
        ({"total_seq_len": 0}, ValueError, "total_seq_len must be >= 1"),
        ({"total_seq_len": 3.0}, TypeError, "total_seq_len must be an int"),
        ({"lengths": None, "total_seq_len": None}, ValueError, "exactly one of lengths"),
        ({"document_ids": torch.zeros(3, dtype=torch.int64)}, ValueError, "exactly one of lengths"),
        ({"sliding_window": 0}, ValueError, "sliding_window must be >= 1"),
        ({"sliding_window": 2.5}, TypeError, "sliding_window must be an int"),
        ({"BLOCK_SIZE": 0}, ValueError, "BLOCK_SIZE must be >= 1"),
        ({"BLOCK_SIZE": (128, -64)}, ValueError, r"BLOCK_SIZE\[1\] must be >= 1"),
        ({"BLOCK_SIZE": (128, 64, 32)}, ValueError, "BLOCK_SIZE must be an int or a"),
        ({"BLOCK_SIZE": 2**31}, ValueError, "BLOCK_SIZE must be <= 2147483647, got 2147483648"),
        ({"BLOCK_SIZE": (128, 2**63 - 1)}, ValueError, r"BLOCK_SIZE\[1\] must be <= 2147483647"),
        ({"backend": "tpu"}, ValueError, "backend must be one of"),
        ({"kv_anchor_pos": A}, ValueError, "give kv_anchor_pos and kv_depth together"),
        ({"kv_depth": D}, ValueError, "give kv_anchor_pos and kv_depth together"),
        ({"kv_anchor_pos": A, "kv_depth": D[:3]}, ValueError, "kv_anchor_pos and kv_depth must have the same shape"),
        ({"kv_anchor_pos": A[:0], "kv_depth": D[:0]}, ValueError, "kv_anchor_pos and kv_depth must not be empty"),
        ({"kv_anchor_pos": A.float(), "kv_depth": D}, TypeError, "kv_anchor_pos must have an integer dtype"),
        ({"kv_anchor_pos": A, "kv_depth": D - 1}, ValueError, "kv_depth must be non-negative"),
        ({"kv_anchor_pos": A + 1, "kv_depth": D}, ValueError, "kv_anchor_pos must be < total_seq_len=3"),
        ({"kv_anchor_pos": A - 1, "kv_depth": D}, ValueError, "kv_anchor_pos must be non-negative"),
    ],
)
def test_bad_argument_is_named(kwargs, error, message):
    with pytest.raises(error, match=message):
        call(**kwargs)


@pytest.mark.parametrize(
    "document_ids, message",
    [
        (torch.tensor([0, -2, 0]), "document_ids values must be >= -1"),
        (torch.tensor([0, 2**31, 0]), "document_ids values must be <="),
        (torch.tensor([[0, 0, 0]]), "document_ids must be 1-D"),
        (torch.tensor([0.0, 0.0, 0.0]), "document_ids must have an integer dtype"),
        (torch.zeros(0, dtype=torch.int64), "document_ids must not be empty"),
        (torch.zeros(2, dtype=torch.int64), r"anchor_pos must be < len\(document_ids\)=2"),
    ],
)
def test_bad_document_ids_are_named(document_ids, message):
    with pytest.raises((ValueError, TypeError), match=message):
        peagle_ext.build_block_mask(A, D, document_ids=document_ids)


def test_total_seq_len_with_document_ids_is_refused():
    with pytest.raises(ValueError, match="total_seq_len goes with lengths"):
        peagle_ext.build_block_mask(A, D, total_seq_len=3, document_ids=torch.zeros(3, dtype=torch.int64))


def test_mask_mod_validates_too():
    with pytest.raises(ValueError, match="anchor_pos must be non-negative"):
        peagle_ext.create_peagle_mask_mod(torch.tensor([-1, 0]), torch.tensor([0, 0]), L, 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to hold tensors on two devices")
def test_tensors_on_different_devices_are_refused():
    with pytest.raises(ValueError, match="depth is on"):
        call(depth=D.cuda())


def test_unavailable_backend_says_what_is_available():
    missing = [b for b in ("cpu", "cuda") if b not in peagle_ext.available_backends()]
    if not missing:
        pytest.skip("every backend is available here, none to refuse")
    with pytest.raises(RuntimeError, match=r"not available: .*; available: \["):
        call(backend=missing[-1])


def test_backend_for_another_device_is_refused():
    if "cuda" not in peagle_ext.available_backends():
        pytest.skip("needs the cuda backend to be runnable")
    with pytest.raises(ValueError, match="backend 'cuda' needs cuda tensors"):
        call(backend="cuda")


def test_cuda_emulated_is_a_test_aid_on_cpu_tensors_never_picked_by_auto():
    from helpers import skip_unless_backend

    skip_unless_backend("cuda_emulated")
    assert "cuda_emulated" not in peagle_ext.available_backends()
    peagle_ext.assert_block_masks_equal(call(backend="cuda_emulated"), call(backend="python"))
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="backend 'cuda_emulated' needs cpu tensors"):
            call(anchor_pos=A.cuda(), depth=D.cuda(), lengths=L.cuda(), backend="cuda_emulated")
