"""The compiled ops: registration, opcheck, their own checks, and agreement between the backends at
sizes create_block_mask cannot reach. Each op-level test runs on both CPU ops: the CPU kernel
(build_block_index) and the CUDA pipeline's code run by the sequential launcher
(build_block_index_emulated)."""

from __future__ import annotations

import pytest
import torch

import peagle_ext
from peagle_ext import _native
from peagle_ext._block_index import BlockIndex
from peagle_ext._inputs import normalize_mask_inputs

from helpers import assert_same_bytes, shuffled_noncontiguous_case, skip_unless_backend


@pytest.fixture(autouse=True)
def needs_native_cpu():
    skip_unless_backend("cpu")


OPS = pytest.mark.parametrize("op", ["build_block_index", "build_block_index_emulated"])


def run_op(op, *args, **kwargs):
    return getattr(torch.ops.peagle_ext, op)(*args, **kwargs)


def op_args(seq_len=300, window=None, block=(64, 32), seed=0):
    generator = torch.Generator().manual_seed(seed)
    anchor_pos, depth = peagle_ext.generate_cod_sample_indices(seq_len, torch.ones(seq_len), generator=generator)
    inputs = normalize_mask_inputs(anchor_pos, depth, torch.tensor([seq_len // 2, seq_len // 3]), seq_len)
    return (inputs.anchor_pos, inputs.depth, inputs.doc_of_position, window, *block)


def test_build_info_names_compiled_kernels():
    kernels = _native.compiled_kernels()
    assert kernels[0] == "cpu"
    assert set(kernels) <= {"cpu", "cuda"}
    if "cuda" in kernels:
        assert _native.cuda_archs()


@OPS
@pytest.mark.parametrize("window", [None, 7])
def test_opcheck(op, window):
    torch.library.opcheck(getattr(torch.ops.peagle_ext, op).default, op_args(window=window))


def keys_apart_args(seq_len=300, seed=1):
    """op_args with the queries a slice of the elements and the keys all of them (a segment)."""
    anchor_pos, depth, doc_of_position, window, *block = op_args(seq_len=seq_len, seed=seed)
    n = anchor_pos.numel()
    return (anchor_pos[n // 3: n // 2], depth[n // 3: n // 2], doc_of_position, window, *block, anchor_pos, depth)


def batch_args(rows=3, seq_len=200, keys_apart=False):
    """B rows of their own COD samples and documents, brought to one N with padding elements
    (anchor -1), in the op's [B, N] layout; and each row's own arguments."""
    singles = []
    for row in range(rows):
        args = keys_apart_args(seq_len, seed=row) if keys_apart else op_args(seq_len=seq_len, seed=row)
        singles.append(args)
    def stacked(position):
        width = max(args[position].numel() for args in singles)
        return torch.stack([torch.nn.functional.pad(args[position], (0, width - args[position].numel()), value=-1)
                            for args in singles])
    tensors = [stacked(i) for i in (0, 1, 2)]
    keys = [stacked(i) for i in (6, 7)] if keys_apart else []
    return (*tensors, *singles[0][3:6], *keys), singles


@OPS
@pytest.mark.parametrize("shape", ["keys apart", "batch", "batch with keys apart"])
def test_opcheck_keys_apart_and_batches(op, shape):
    args = keys_apart_args() if shape == "keys apart" else batch_args(keys_apart=shape.endswith("apart"))[0]
    torch.library.opcheck(getattr(torch.ops.peagle_ext, op).default, args)


@OPS
@pytest.mark.parametrize("keys_apart", [False, True])
def test_a_batch_gives_each_row_the_index_of_that_row_alone(op, keys_apart):
    """Row r of a batched build equals the row built alone (its padding elements, anchor -1, see
    nothing and are seen by none: they only add empty tail entries), and rows never meet."""
    args, singles = batch_args(keys_apart=keys_apart)
    batched = run_op(op, *args)
    for row, single_args in enumerate(singles):
        n_q = single_args[0].numel()
        n_kv = single_args[6].numel() if keys_apart else n_q
        alone = peagle_ext.build_block_mask(single_args[0], single_args[1], document_ids=single_args[2],
                                            BLOCK_SIZE=tuple(single_args[4:6]), backend="python",
                                            **({"kv_anchor_pos": single_args[6], "kv_depth": single_args[7]}
                                               if keys_apart else {}))
        rows = peagle_ext.build_block_mask(args[0][row], args[1][row], document_ids=args[2][row], validate=False,
                                           BLOCK_SIZE=tuple(single_args[4:6]), backend="python",
                                           **({"kv_anchor_pos": args[6][row], "kv_depth": args[7][row]}
                                              if keys_apart else {}))
        for got, expected in zip(batched, BlockIndex(rows.kv_num_blocks, rows.kv_indices, rows.full_kv_num_blocks,
                                                     rows.full_kv_indices, rows.q_num_blocks, rows.q_indices,
                                                     rows.full_q_num_blocks, rows.full_q_indices)):
            assert torch.equal(got[row: row + 1], expected)
        # The padded row holds the row alone's blocks; its extra tail tiles are empty.
        nq, nkv = alone.kv_num_blocks.shape[-1], alone.q_num_blocks.shape[-1]
        assert n_q and n_kv
        assert torch.equal(batched[0][row, 0, :nq], alone.kv_num_blocks[0, 0])
        assert torch.equal(batched[2][row, 0, :nq], alone.full_kv_num_blocks[0, 0])
        assert int(batched[0][row, 0, nq:].sum()) == 0 and int(batched[4][row, 0, nkv:].sum()) == 0


@pytest.mark.parametrize("seq_len", [4096, 16384])
def test_keys_apart_agree_across_backends_at_scale(seq_len):
    """A segment of N/8 queries against all N keys: cpu == cuda_emulated == python, byte for byte."""
    generator = torch.Generator().manual_seed(seq_len)
    anchor_pos, depth = peagle_ext.generate_cod_sample_indices(seq_len, torch.ones(seq_len), generator=generator)
    n = anchor_pos.numel()
    queries = slice(3 * n // 8, n // 2)
    lengths = torch.tensor([seq_len // 3, seq_len // 3, seq_len // 4])
    assert_all_same_bytes({backend: peagle_ext.build_block_mask(
        anchor_pos[queries], depth[queries], lengths, seq_len, kv_anchor_pos=anchor_pos, kv_depth=depth,
        sliding_window=700, backend=backend) for backend in ("cpu", "cuda_emulated", "python")})


@OPS
def test_op_traces_under_torch_compile(op):
    args = op_args()
    compiled = torch.compile(lambda *a: run_op(op, *a), fullgraph=True, dynamic=True)
    for got, expected in zip(compiled(*args), run_op(op, *args)):
        assert torch.equal(got, expected)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: (a[0].to(torch.int32), *a[1:]), "must be int64"),
        (lambda a: (a[0][None], *a[1:]), "every tensor must have anchor_pos's number of dims"),
        (lambda a: (a[0][None, None], a[1][None, None], a[2][None, None], *a[3:]),
         r"must be 1-D \[N\] or 2-D \[B, N\]"),
        (lambda a: (a[0][None], a[1][None], a[2][None].expand(2, -1), *a[3:]), "anchor_pos's number of rows"),
        (lambda a: (*a, a[0]), "kv_anchor_pos and kv_depth go together"),
        (lambda a: (*a, a[0], a[1][:-1]), "kv_anchor_pos and kv_depth differ in length"),
        (lambda a: (*a, a[0][:0], a[1][:0]), "N must be positive"),
        (lambda a: (*a, a[0], a[1].to(torch.int32)), "every tensor must be int64"),
        (lambda a: (a[0], a[1][:-1], *a[2:]), "differ in length"),
        (lambda a: (a[0][:0], a[1][:0], *a[2:]), "N must be positive"),
        (lambda a: (*a[:4], 0, a[5]), "block sizes must be positive"),
        (lambda a: (*a[:5], 2**63 - 1), "block sizes must be <= 2"),  # ceil(N / size) would overflow
        (lambda a: (*a[:3], 0, *a[4:]), "sliding_window must be >= 1"),
        (lambda a: (a[0], a[1], a[2][:0], *a[3:]), "doc_of_position must not be empty"),
    ],
)
@OPS
def test_op_checks_its_preconditions(op, change, message):
    with pytest.raises(RuntimeError, match=message):
        run_op(op, *change(op_args()))


def assert_well_formed(index, num_q_blocks: int, num_kv_blocks: int) -> None:
    """Every list a BlockMask holds: counts within range, each row a permutation of its blocks."""
    for counts, indices, rows, cols in (
        (index[0], index[1], num_q_blocks, num_kv_blocks), (index[2], index[3], num_q_blocks, num_kv_blocks),
        (index[4], index[5], num_kv_blocks, num_q_blocks), (index[6], index[7], num_kv_blocks, num_q_blocks),
    ):
        assert counts.shape == (1, 1, rows) and indices.shape == (1, 1, rows, cols)
        assert ((counts >= 0) & (counts <= cols)).all()
        assert torch.equal(indices.sort(dim=-1).values, torch.arange(cols, dtype=torch.int32).expand(1, 1, rows, cols))


@OPS
def test_garbage_values_give_a_well_formed_index(op):
    """Unvalidated garbage (validate=False, or a direct op call) gives some mask, never a crash;
    both ops give the same one."""
    anchor_pos = torch.tensor([0, 5, -3, 2**40, 1, 2, -(2**62)], dtype=torch.int64)
    depth = torch.tensor([0, 0, 1, 2, -1, 2**40, 3], dtype=torch.int64)
    doc = torch.tensor([0, 0, -7, 2**40], dtype=torch.int64)
    for window in (None, 1, 2**62):
        index = run_op(op, anchor_pos, depth, doc, window, 2, 3)
        assert_well_formed(index, 4, 3)
        for got, expected in zip(index, run_op("build_block_index", anchor_pos, depth, doc, window, 2, 3)):
            assert torch.equal(got, expected)


@pytest.mark.parametrize("backend", ["cpu", "cuda_emulated"])
@pytest.mark.parametrize("bad_anchor", [-1, -(2**40), "P", 2**40])
def test_out_of_range_anchors_are_read_as_padding(backend, bad_anchor):
    """With validate=False an anchor outside the sequence is padding: the mask equals the checked
    one in which those elements sit on an extra padding position."""
    seq_len = 120
    generator = torch.Generator().manual_seed(7)
    anchor_pos, depth = peagle_ext.generate_cod_sample_indices(seq_len, torch.ones(seq_len), generator=generator)
    document_ids = torch.randint(0, 3, (seq_len,), generator=generator)
    bad = torch.randperm(anchor_pos.numel(), generator=generator)[:40]
    garbage = anchor_pos.clone()
    garbage[bad] = seq_len if bad_anchor == "P" else bad_anchor
    got = peagle_ext.build_block_mask(garbage, depth, document_ids=document_ids, sliding_window=9, BLOCK_SIZE=16,
                                      validate=False, backend=backend)
    on_padding = anchor_pos.clone()
    on_padding[bad] = seq_len
    with_padding_position = torch.cat([document_ids, torch.tensor([-1])])
    expected = peagle_ext.build_block_mask(on_padding, depth, document_ids=with_padding_position,
                                           sliding_window=9, BLOCK_SIZE=16, backend="python")
    peagle_ext.assert_block_masks_equal(got, expected)


@pytest.mark.parametrize(
    "seq_len, kwargs",
    [
        (16384, {}),  # N ~ 55K: create_block_mask would need ~31 GiB here
        (8192, {"sliding_window": 512, "BLOCK_SIZE": (128, 64)}),
        (60000, {"BLOCK_SIZE": 256}),  # N ~ 200K
    ],
)
def test_backends_agree_beyond_create_block_mask(seq_len, kwargs):
    """cpu == cuda_emulated == python, byte for byte: all lay rows out as create_block_mask does,
    so even the unread tails agree."""
    generator = torch.Generator().manual_seed(seq_len)
    anchor_pos, depth = peagle_ext.generate_cod_sample_indices(seq_len, torch.ones(seq_len), generator=generator)
    lengths = torch.tensor([seq_len // 3, seq_len // 3, seq_len // 4])
    masks = {backend: peagle_ext.build_block_mask(anchor_pos, depth, lengths, seq_len, backend=backend, **kwargs)
             for backend in ("cpu", "cuda_emulated", "python")}
    assert_all_same_bytes(masks)


def assert_all_same_bytes(masks: dict) -> None:
    """Every mask's eight index tensors equal the first's."""
    (first_name, first), *others = masks.items()
    for name, mask in others:
        assert_same_bytes(mask, first, f"{name} vs {first_name}:")


@pytest.mark.parametrize("case", ["cod", "shuffled documents"])
def test_emulated_pipeline_gives_the_same_bytes_under_any_schedule(case):
    """The GPU runs blocks and threads in no set order and its atomics hand out bucket slots in any
    order; the launcher draws such orders from schedule_seed (0: index order). Every one must give
    the CPU kernel's bytes. (A count kernel that took the block of the highest index for the last
    one to finish counting passed under index order and fails under these.)"""
    if case == "cod":
        args = op_args(seq_len=2000, window=300, block=(128, 64))
    else:
        anchor_pos, depth, document_ids = shuffled_noncontiguous_case(seq_len=3000)
        args = (anchor_pos, depth, document_ids.to(torch.int64), 300, 128, 128)
    assert (args[0].numel() + 255) // 256 > 4, "more count blocks than the launcher keeps in flight"
    expected = run_op("build_block_index", *args)
    for seed in range(12):
        got = run_op("build_block_index_emulated", *args, schedule_seed=seed)
        assert all(torch.equal(g, e) for g, e in zip(got, expected)), f"schedule_seed {seed}"
    assert _native.schedule_seed(*args) != 0  # backend="cuda_emulated" runs a shuffled schedule


def test_emulated_pipeline_keeps_marks_in_global_memory_past_32k_kv_blocks():
    """Past 32K kv-blocks the row kernel's marks leave shared memory for its row of the states."""
    generator = torch.Generator().manual_seed(9)
    anchor_pos, depth = peagle_ext.generate_cod_sample_indices(12000, torch.ones(12000), generator=generator)
    assert anchor_pos.numel() > 32 * 1024
    args = (anchor_pos, depth, torch.tensor([5000, 6000]), 12000)
    assert_all_same_bytes({backend: peagle_ext.build_block_mask(*args, BLOCK_SIZE=(512, 1), backend=backend)
                       for backend in ("cpu", "cuda_emulated")})


def test_backends_agree_on_shuffled_noncontiguous_documents():
    """The general paths (documents out of position order, chains out of depth order, unsorted
    q-blocks) at a size the oracle cannot reach."""
    anchor_pos, depth, document_ids = shuffled_noncontiguous_case()
    assert_all_same_bytes({backend: peagle_ext.build_block_mask(anchor_pos, depth, document_ids=document_ids,
                                                            sliding_window=300, backend=backend)
                       for backend in ("cpu", "cuda_emulated", "python")})
