"""The draft's inputs in speculative decoding equal those vLLM 0.33.0's parallel-drafting proposer
builds: its own ``copy_and_expand_eagle_inputs_kernel`` (vllm/v1/spec_decode/utils.py, a Triton
kernel) runs here on the CPU under Triton's interpreter, on a batch of requests with accepted and
rejected proposals and prefills of different lengths. The two lines of
``SpecDecodeBaseProposer.set_inputs_first_pass`` that place the target's states and ``mask_hidden``
after the kernel are restated below, as are the kernel's launch sizes; the rest is vLLM's code."""

from __future__ import annotations

import os

import pytest
import torch

from peagle_ext.draft.speculative import draft_slots

from draft_helpers import single_thread, tiny_model  # noqa: F401 (autouse fixture)
from vllm_source import _definitions, read_sources


@pytest.fixture(scope="module")
def vllm_kernel():
    triton = pytest.importorskip("triton", reason="vLLM's proposer kernel is a Triton kernel")
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernel is decorated: run it on the CPU
    try:
        source = _definitions(read_sources()["spec_decode_utils"], {"copy_and_expand_eagle_inputs_kernel"})
        namespace = {"triton": triton, "tl": triton.language}
        exec(compile(source, "vllm/v1/spec_decode/utils.py", "exec"), namespace)
    finally:
        del os.environ["TRITON_INTERPRET"]
    kernel = namespace["copy_and_expand_eagle_inputs_kernel"]
    if type(kernel).__name__ != "InterpretedFunction":
        pytest.skip(f"this Triton ({triton.__version__}) did not give an interpreted kernel")
    return kernel


def vllm_first_pass(kernel, requests, K, mask_token_id, target_hidden, mask_hidden):
    """vLLM's drafting buffers for ``requests`` [(token ids, positions, number rejected, next id)],
    flattened request after request as its model runner passes them, and K speculative tokens:
    per request (input_ids, positions, hidden, sampled slot indices), its rejected slots dropped."""
    ids = torch.cat([torch.tensor(r[0], dtype=torch.int32) for r in requests])
    positions = torch.cat([torch.tensor(r[1]) for r in requests])
    starts = [0]
    for r in requests:
        starts.append(starts[-1] + len(r[0]))
    query_start = torch.tensor(starts, dtype=torch.int32)
    query_end = query_start[1:] - 1 - torch.tensor([r[2] for r in requests], dtype=torch.int32)
    total_in, batch = len(ids), len(requests)
    total_out = total_in + (K - 1) * batch
    out_ids = torch.full((total_out,), -1, dtype=torch.int32)
    out_positions = torch.full((total_out,), -1)
    rejected = torch.zeros(total_out, dtype=torch.bool)
    masked = torch.zeros(total_out, dtype=torch.bool)
    sample = torch.empty(batch * K, dtype=torch.int32)
    hidden_map = torch.empty(total_in, dtype=torch.int32)
    widest = max(len(r[0]) for r in requests) + K - 1
    block = 1 << (min(256, widest) - 1).bit_length()
    kernel[(batch, (widest + block - 1) // block)](
        ids, positions, torch.tensor([r[3] for r in requests], dtype=torch.int32), out_ids, out_positions, rejected,
        masked, sample, hidden_map, query_start, query_end, 0, mask_token_id, total_in, K, True,
        BLOCK_SIZE_TOKENS=block)
    # set_inputs_first_pass: the target's states by the kernel's mapping, mask_hidden on masked slots
    hidden = torch.zeros(total_out, target_hidden.shape[-1])
    hidden[hidden_map.long()] = target_hidden
    hidden = torch.where(masked.unsqueeze(1), mask_hidden, hidden)
    out, begin = [], 0
    for index, r in enumerate(requests):
        end = begin + len(r[0]) + K - 1
        keep = ~rejected[begin:end]
        slots = torch.arange(begin, end)[keep]
        local = {int(s): i for i, s in enumerate(slots)}
        picked = [local[int(s)] for s in sample[index * K:(index + 1) * K]]
        out.append((out_ids[slots].long(), out_positions[slots], hidden[slots], picked))
        begin = end
    return out


@pytest.mark.parametrize("K", [1, 2, 5])
@pytest.mark.parametrize("case", ["verify", "prefill"])
def test_draft_slots_equal_vllms_proposer_inputs(vllm_kernel, K, case):
    torch.manual_seed(K)
    draft = tiny_model(0)
    hidden_size, mask_id = draft.config.hidden_size, draft.config.mask_token_id
    mask_hidden = draft.masked_projected_hidden()[0].detach()
    batch = 4
    if case == "verify":  # the target read [bonus, K proposals]; each row accepted some of them
        width = K + 1
        lengths = torch.tensor([width] * batch)
        accepted = torch.randint(0, K + 1, (batch,))
        accepted[0], accepted[-1] = 0, K
        start = torch.randint(3, 40, (batch, 1))
    else:  # a left-padded prefill of prompts of different lengths
        lengths = torch.tensor([7, 1, 4, 7])
        width = int(lengths.max())
        accepted = lengths - 1
        start = torch.zeros(batch, 1, dtype=torch.int64)
    valid = torch.arange(width).view(1, -1) >= (width - lengths).view(-1, 1)
    positions = start + (valid.cumsum(1) - 1).clamp(min=0)
    ids = torch.randint(mask_id, (batch, width))
    hidden = torch.randn(batch, width, hidden_size)
    next_ids = torch.randint(mask_id, (batch,))
    last = width - lengths + accepted  # the column of each row's last accepted token
    ours = draft_slots(ids, positions, hidden, valid, last, next_ids, K - 1, mask_id, mask_hidden)
    requests = [(ids[b][valid[b]].tolist(), positions[b][valid[b]].tolist(), int(lengths[b] - 1 - accepted[b]),
                 int(next_ids[b])) for b in range(batch)]
    theirs = vllm_first_pass(vllm_kernel, requests, K, mask_id, hidden[valid], mask_hidden)
    for b, (their_ids, their_positions, their_hidden, their_sample) in enumerate(theirs):
        real = ours.valid[b]
        assert torch.equal(ours.input_ids[b][real], their_ids)
        assert torch.equal(ours.positions[b][real], their_positions)
        assert torch.equal(ours.hidden[b][real], their_hidden)
        compact = torch.cumsum(real.long(), 0) - 1  # each slot's index among the real ones
        assert compact[ours.sample_index[b]].tolist() == their_sample
        assert not ours.keep[b][real][len(their_ids) - (K - 1):].any()  # masked slots never join the cache
