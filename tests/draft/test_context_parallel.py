"""Context parallelism in peagle_training_step: real processes (torch.multiprocessing, gloo, CPU)
against the single-process step, and its pieces (the work estimate, the shares) in this process."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
import torch.multiprocessing as mp
from hypothesis import given
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import create_mask

import peagle_ext
from peagle_ext.draft.context_parallel import attention_work, split_shares

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import context_parallel_check as check  # noqa: E402

from strategies import WINDOWS, documents  # noqa: E402

TWO_RANK_CASES = list(check.CASES)
TRAINING_CASES = ["one_layer", "two_layers_documents_window", "one_layer_window", "batch_of_two_rows",
                  "gradient_checkpointing", "target_last_hidden", "drawn_layout", "ddp", "fsdp2"]


def run_ranks(tmp_path, target, world: int, *args) -> None:
    store = tmp_path / "store"
    mp.start_processes(target, args=(world, str(store), str(tmp_path), *args), nprocs=world, start_method="spawn")


def results(directory, name: str, world: int) -> list[dict]:
    found = []
    for rank in range(world):
        with open(os.path.join(directory, f"{name}.{rank}.json")) as handle:
            result = json.load(handle)
        assert "crash" not in result, f"rank {rank}:\n{result['crash']}"
        found.append(result)
    return found


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Every two-rank case, run once by two processes."""
    directory = tmp_path_factory.mktemp("context_parallel")
    run_ranks(directory, check.worker, 2, TWO_RANK_CASES)
    return directory


@pytest.mark.parametrize("case", TRAINING_CASES)
def test_two_ranks_give_the_single_process_loss_and_gradients(two_ranks, case):
    ranks = results(two_ranks, case, 2)
    for rank, result in enumerate(ranks):
        assert abs(result["loss"] - result["reference_loss"]) <= 1e-5 * max(1.0, abs(result["reference_loss"])), rank
        assert result["mismatched"] == [], (rank, result["max_gradient_difference"])
        assert result["count"] == result["reference_count"]
        assert result["accuracy"] == pytest.approx(result["reference_accuracy"])
    assert ranks[0]["loss"] == ranks[1]["loss"]  # the same number on every rank, not merely close
    assert ranks[0]["reference_count"] and sum(ranks[0]["count"]) > 0


def test_under_no_grad_the_eager_flex_path_gives_the_single_process_loss(two_ranks):
    ranks = results(two_ranks, "eager_flex_no_grad", 2)
    for result in ranks:
        assert result["loss"] == pytest.approx(result["reference_loss"], abs=1e-5, rel=1e-5)
        assert result["count"] == result["reference_count"]
        assert result["accuracy"] == pytest.approx(result["reference_accuracy"])
    assert ranks[0]["loss"] == ranks[1]["loss"]


@pytest.mark.parametrize("case", [c for c in TRAINING_CASES if c in ("one_layer", "two_layers_documents_window",
                                                                       "batch_of_two_rows")])
def test_each_rank_builds_one_mask_of_its_share_against_all_keys(two_ranks, case):
    ranks = results(two_ranks, case, 2)
    n = ranks[0]["num_elements"]
    shares = []
    for result in ranks:
        (q_len, kv_len), = result["mask_shapes"]  # one mask per step, for every layer
        assert kv_len == n and 0 < q_len < n
        shares.append(q_len)
    assert sum(shares) == n


def test_sequence_partitions_are_refused_by_name_on_every_rank(two_ranks):
    for result in results(two_ranks, "sequence_partitions", 2):
        assert result["error"] == "ValueError" and "sequence_partitions" in result["message"]


def test_layouts_that_differ_between_ranks_are_refused_on_every_rank(two_ranks):
    for result in results(two_ranks, "mismatched_layout", 2):
        assert result["error"] == "ValueError" and "anchor_pos and depth differ" in result["message"]


@pytest.mark.parametrize(("case", "error", "words"), [
    ("ddp_outside", "ValueError", "DistributedDataParallel"),
    ("non_member", "TypeError", "context_parallel_group"),
    ("too_few_elements", "ValueError", "more than the step's 1 elements"),
])
def test_what_cannot_be_shared_is_refused_by_name(two_ranks, case, error, words):
    for result in results(two_ranks, case, 2):
        assert result["error"] == error and words in result["message"], result


def test_a_data_by_context_mesh_under_ddp_gives_the_global_batch_gradient(tmp_path):
    run_ranks(tmp_path, check.mesh_worker, 4)
    ranks = results(tmp_path, "mesh", 4)
    for rank, result in enumerate(ranks):
        assert result["mismatched"] == [], (rank, result["max_gradient_difference"])
        assert result["mean_loss"] == pytest.approx(result["global_loss"], abs=1e-5, rel=1e-5)
    assert ranks[0]["loss"] == ranks[1]["loss"] and ranks[2]["loss"] == ranks[3]["loss"]


@given(st.data())
def test_attention_work_counts_the_keys_each_element_sees(data):
    """Against the dense mask's row sums, for COD layouts with documents (packed from 0) and windows."""
    seq_len = data.draw(st.integers(1, 50))
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    loss_mask = (torch.rand(seq_len, generator=generator) < data.draw(st.floats(0.2, 1.0))).long()
    anchor_pos, depth = peagle_ext.generate_cod_sample_indices(seq_len, loss_mask, data.draw(st.integers(1, 6)),
                                                               data.draw(st.floats(0.3, 1.0)), generator=generator)
    docs = data.draw(documents(seq_len).filter(lambda kwargs: "lengths" in kwargs))
    window = data.draw(WINDOWS)
    rule = peagle_ext.create_peagle_mask_mod(anchor_pos, depth, docs["lengths"], seq_len, sliding_window=window)
    n = anchor_pos.numel()
    expected = create_mask(rule, None, None, n, n, device="cpu")[0, 0].sum(-1)
    assert torch.equal(attention_work(anchor_pos, depth, docs["lengths"], seq_len, window), expected)


def test_attention_work_of_a_batch_is_each_rows_own():
    rows = [peagle_ext.generate_cod_sample_indices(30 - 7 * r, torch.ones(30 - 7 * r), 4,
                                                   generator=torch.Generator().manual_seed(r)) for r in range(2)]
    lengths = [torch.tensor([12, 18]), torch.tensor([23])]
    anchor_pos, depth = peagle_ext.pad_rows(rows, 30)
    work = attention_work(anchor_pos, depth, torch.nn.utils.rnn.pad_sequence(lengths, batch_first=True), 30)
    for r, (anchors, depths) in enumerate(rows):
        assert torch.equal(work[r, : anchors.numel()], attention_work(anchors, depths, lengths[r], 30))
        assert not work[r, anchors.numel():].any()  # padding elements see nothing


@given(st.lists(st.integers(0, 1000), min_size=1, max_size=200), st.integers(1, 8))
def test_shares_are_contiguous_nonempty_and_balanced(work, parts):
    work = torch.tensor(work)
    if work.numel() < parts:
        with pytest.raises(ValueError, match="context_parallel_group has"):
            split_shares(work, parts)
        return
    bounds = split_shares(work, parts)
    assert bounds[0] == 0 and bounds[-1] == work.numel() and len(bounds) == parts + 1
    assert all(low < high for low, high in zip(bounds, bounds[1:]))
    if work.sum() and parts <= work.numel():
        loads = [int(work[low:high].sum()) for low, high in zip(bounds, bounds[1:])]
        # each share within one element's work of an even split, unless forced non-empty
        assert max(loads) <= work.sum() / parts + 2 * int(work.max()) or work.numel() < 2 * parts


def test_a_cod_layouts_shares_balance_work_not_element_counts():
    """Supervision on the second half only (a chat's answer): the deep elements all lie late and see
    many keys, so halving the element count would give one rank far more work than the other."""
    seq_len = 512
    loss_mask = (torch.arange(seq_len) >= seq_len // 2).long()
    anchor_pos, depth = peagle_ext.generate_cod_sample_indices(seq_len, loss_mask, 8,
                                                               generator=torch.Generator().manual_seed(0))
    work = attention_work(anchor_pos, depth, torch.tensor([seq_len]), seq_len)

    def loads(bounds):
        return [int(work[low:high].sum()) for low, high in zip(bounds, bounds[1:])]

    by_work = loads(split_shares(work, 2))
    assert abs(by_work[0] - by_work[1]) <= int(work.max())
    by_count = loads([0, anchor_pos.numel() // 2, anchor_pos.numel()])
    assert max(by_count) > 1.2 * min(by_count)  # what a split by element count would have done
