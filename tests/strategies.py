"""Hypothesis strategies for P-EAGLE mask inputs: COD layouts and arbitrary adversarial arrays."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from hypothesis import strategies as st

import peagle_ext

BLOCK_SIZES = st.sampled_from([1, 2, 3, 5, 8, 16, 64, 128, (128, 64), (64, 128), (16, 4), (3, 7)])
WINDOWS = st.one_of(st.none(), st.integers(1, 12), st.integers(1, 400))


@dataclass
class Case:
    """One set of arguments for build_block_mask / create_peagle_mask_mod."""

    anchor_pos: torch.Tensor
    depth: torch.Tensor
    kwargs: dict = field(default_factory=dict)  # lengths/total_seq_len or document_ids, sliding_window

    def to(self, device) -> Case:
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.kwargs.items()}
        return Case(self.anchor_pos.to(device), self.depth.to(device), moved)

    def __repr__(self) -> str:
        shown = {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in self.kwargs.items()}
        return f"Case(anchor_pos={self.anchor_pos.tolist()}, depth={self.depth.tolist()}, **{shown})"


@st.composite
def documents(draw, total_seq_len: int):
    """Either (lengths, total_seq_len) packed from 0 with a padding tail, or document_ids, which
    may be non-contiguous, unordered and hold -1 anywhere."""
    if draw(st.booleans()):
        cuts = sorted(draw(st.lists(st.integers(0, total_seq_len), min_size=0, max_size=5)))
        end = draw(st.integers(cuts[-1] if cuts else 0, total_seq_len))
        bounds = [0] + cuts + [end]
        lengths = [b - a for a, b in zip(bounds, bounds[1:])]
        return {"lengths": torch.tensor(lengths, dtype=torch.int64), "total_seq_len": total_seq_len}
    num_docs = draw(st.integers(1, 4))
    ids = draw(st.lists(st.integers(-1, num_docs - 1), min_size=total_seq_len, max_size=total_seq_len))
    return {"document_ids": torch.tensor(ids, dtype=draw(st.sampled_from([torch.int32, torch.int64])))}


@st.composite
def cod_cases(draw, max_seq_len: int = 300):
    """The layout the trainers produce: generate_cod_sample_indices over a random loss mask."""
    seq_len = draw(st.integers(1, max_seq_len))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    loss_mask = (torch.rand(seq_len, generator=generator) < draw(st.floats(0.2, 1.0))).to(torch.int64)
    anchor_pos, depth = peagle_ext.generate_cod_sample_indices(
        seq_len,
        loss_mask,
        num_depths=draw(st.integers(1, 8)),
        down_sample_ratio=draw(st.floats(0.3, 1.0)),
        down_sample_ratio_min=draw(st.floats(0.0, 0.5)),
        generator=generator,
    )
    kwargs = draw(documents(seq_len))
    kwargs["sliding_window"] = draw(WINDOWS)
    return Case(anchor_pos, depth, kwargs)


@st.composite
def arbitrary_cases(draw, max_elements: int = 300):
    """Any arrays the rule accepts: any order, duplicates, few anchors, deep chains, padding."""
    total_seq_len = draw(st.integers(1, 40))
    n = draw(st.integers(1, max_elements))
    max_depth = draw(st.integers(0, 6))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    anchor_range = draw(st.integers(1, total_seq_len))  # few distinct anchors: heavy duplicates
    anchor_pos = torch.randint(0, anchor_range, (n,), generator=generator)
    depth = torch.randint(0, max_depth + 1, (n,), generator=generator)
    if draw(st.booleans()):  # sorted depth-major, like COD but with arbitrary chains
        order = torch.argsort(depth * total_seq_len + anchor_pos, stable=True)
        anchor_pos, depth = anchor_pos[order], depth[order]
    dtype = draw(st.sampled_from([torch.int32, torch.int64]))
    kwargs = draw(documents(total_seq_len))
    kwargs["sliding_window"] = draw(WINDOWS)
    return Case(anchor_pos.to(dtype), depth.to(dtype), kwargs)


@st.composite
def separate_key_cases(draw):
    """Queries and keys as element sets of their own: the queries a subset of the keys (a
    segment's own elements among its keys), or the keys a subset of the queries, in any order."""
    base = draw(st.one_of(cod_cases(max_seq_len=150), arbitrary_cases(max_elements=200)))
    n = base.anchor_pos.numel()
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    subset = torch.randperm(n, generator=generator)[: draw(st.integers(1, n))]
    if draw(st.booleans()):
        subset = subset.sort().values  # the COD order kept
    picked = (base.anchor_pos[subset], base.depth[subset])
    if draw(st.booleans()):  # queries among the keys
        return Case(*picked, {**base.kwargs, "kv_anchor_pos": base.anchor_pos, "kv_depth": base.depth})
    return Case(base.anchor_pos, base.depth, {**base.kwargs, "kv_anchor_pos": picked[0], "kv_depth": picked[1]})
