"""A CPU training loop with the P-EAGLE mask built in the step against masks built in DataLoader workers.

    python benchmarks/bench_dataloader_masks.py [--lengths 1024 2048] [--steps 5] [--workers 2] [--backends cpu python]

A tiny draft (hidden 32, one layer of 2 heads of 16, vocabulary 256, target hidden 32, 8 COD depths)
trains with SGD on random sequences of S positions in 4 documents. Each step gets a sample from a
DataLoader, then runs one forward, KL loss, backward and optimizer step over the sample's COD elements.

- "in step": the loader hands over raw samples (num_workers=0); the step samples the COD layout and
  builds the BlockMask itself.
- "in workers": the loader's collate_fn is ``PeagleMaskCollator`` with ``--workers`` worker
  processes; the step receives layout and mask ready (pickled back from a worker).

The two modes alternate step by step. Reported per mode (medians): the whole step (fetching the
sample, mask work in the main process, forward, backward, optimizer step), the wait in
``next(loader)`` (in workers it includes unpickling the mask), COD sampling and the build in the
step, the share of the step the main process spends before the forward (wait + mask), and in
workers the build time there (off the main process). On the CPU the draft's attention is the dense
fallback (scaled_dot_product_attention with the mask materialized from the mask_mod; flex_attention
has no CPU backward), which dominates the step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

import peagle_ext
from peagle_ext.data import PeagleMaskCollator
from peagle_ext.draft.llama import Eagle3DraftConfig, LlamaEagle3DraftModel
from peagle_ext.draft.training import supervised_draft_logits

DEPTHS, VOCAB, TARGET_HIDDEN, NUM_DOCS = 8, 256, 32, 4
MODES = ("in step", "in workers")


class RandomSequences(Dataset):
    """Sample i: random input_ids [S], a loss mask with 10% holes, 4 documents of random lengths."""

    def __init__(self, seq_len: int, size: int):
        self.seq_len, self.size = seq_len, size

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        generator = torch.Generator().manual_seed(index)
        cuts = torch.sort(torch.randint(1, self.seq_len, (NUM_DOCS - 1,), generator=generator)).values
        bounds = torch.cat([torch.tensor([0]), cuts, torch.tensor([self.seq_len])])
        return {"input_ids": torch.randint(VOCAB, (self.seq_len,), generator=generator),
                "loss_mask": (torch.rand(self.seq_len, generator=generator) > 0.1).to(torch.int64),
                "lengths": bounds[1:] - bounds[:-1]}


class TimedCollator(PeagleMaskCollator):
    """Also records how long the worker spent on the layouts and masks."""

    def __call__(self, samples):
        start = time.perf_counter()
        batch = super().__call__(samples)
        batch["build_s"] = time.perf_counter() - start
        return batch


def build_here(sample, backend):
    seq_len = sample["loss_mask"].numel()
    anchor_pos, depth = peagle_ext.generate_cod_sample_indices(seq_len, sample["loss_mask"], DEPTHS)
    return anchor_pos, depth, peagle_ext.build_block_mask(anchor_pos, depth, sample["lengths"], seq_len,
                                                          backend=backend)


class Run:
    """One mode's training loop: its own draft, optimizer and loader; :meth:`step` times one step."""

    def __init__(self, seq_len: int, mode: str, backend: str, steps: int, workers: int):
        torch.manual_seed(0)
        config = Eagle3DraftConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
                                   num_hidden_layers=1, vocab_size=VOCAB, draft_vocab_size=VOCAB,
                                   target_hidden_size=TARGET_HIDDEN, parallel_drafting=True, num_depths=DEPTHS,
                                   max_position_embeddings=seq_len)
        self.model = LlamaEagle3DraftModel(config).train()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-3)
        self.aux = torch.randn(seq_len, 3 * TARGET_HIDDEN)
        self.target_log_probs = F.log_softmax(torch.randn(seq_len, VOCAB), dim=-1)
        self.mode, self.backend = mode, backend
        dataset = RandomSequences(seq_len, steps + 1)
        if mode == "in step":
            loader = DataLoader(dataset, batch_size=None)
        else:
            loader = DataLoader(dataset, batch_size=1, num_workers=workers,
                                collate_fn=TimedCollator(num_depths=DEPTHS, backend=backend))
        self.iterator = iter(loader)
        self.times = {"step": [], "wait": [], "mask": [], "worker": []}

    def step(self) -> None:
        start = time.perf_counter()
        batch = next(self.iterator)
        fetched = time.perf_counter()
        if self.mode == "in step":
            anchor_pos, depth, block_mask = build_here(batch, self.backend)
            sample = batch
        else:
            anchor_pos, depth, block_mask = batch["anchor_pos"][0], batch["depth"][0], batch["block_mask"][0]
            sample = {"input_ids": batch["input_ids"][0], "loss_mask": batch["loss_mask"][0]}
            self.times["worker"].append(batch["build_s"])
        ready = time.perf_counter()
        reference = anchor_pos + depth
        rows = torch.nonzero(sample["loss_mask"][reference] != 0).flatten()
        logits = supervised_draft_logits(self.model, sample["input_ids"], self.aux, anchor_pos, depth, block_mask, rows)
        loss = F.kl_div(F.log_softmax(logits, -1), self.target_log_probs[reference[rows]], reduction="sum",
                        log_target=True) / max(rows.numel(), 1)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.times["step"].append(time.perf_counter() - start)
        self.times["wait"].append(fetched - start)
        self.times["mask"].append(ready - fetched)
        self.elements = anchor_pos.numel()

    def summary(self) -> dict:
        """Medians in ms over the steps after the first (the warm-up)."""
        ms = {name: statistics.median(times[1:]) * 1e3 if times else None for name, times in self.times.items()}
        return {"N": self.elements, **ms, "share": (ms["wait"] + ms["mask"]) / ms["step"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per mode (after one warm-up)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--backends", nargs="+", default=["cpu", "python"],
                        help="mask builders (build_block_mask backends)")
    args = parser.parse_args()
    backends = [backend for backend in args.backends if backend in peagle_ext.available_backends()]
    for missing in sorted(set(args.backends) - set(backends)):
        print(f"note: backend {missing!r} is not available here; skipped", file=sys.stderr)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads in the main process, {os.cpu_count()} CPUs; "
          f"draft: 1 layer, hidden 32, 2 heads; {DEPTHS} depths; {NUM_DOCS} documents; "
          f"median of {args.steps} steps after a warm-up, modes alternating; {args.workers} workers")
    print("step: the whole step; wait: in next(loader) (in workers: unpickling the mask too); mask: COD sampling "
          "and build in the step; share: (wait + mask) / step, the main process's time before the forward; "
          "worker: COD sampling and build in a worker, off the main process")
    print(f"{'S':>6} {'N':>7} {'builder':<8} {'mask built':<11} {'step ms':>9} {'wait ms':>8} {'mask ms':>8} "
          f"{'share':>7} {'worker ms':>10}")
    for seq_len in args.lengths:
        for backend in backends:
            print(f"  measuring S {seq_len} {backend} ...", file=sys.stderr, flush=True)
            runs = [Run(seq_len, mode, backend, args.steps, args.workers) for mode in MODES]
            for _ in range(args.steps + 1):
                for run in runs:  # the modes alternate step by step, so both see the same machine
                    run.step()
            for run in runs:
                row = run.summary()
                worker = "" if row["worker"] is None else f"{row['worker']:10.2f}"
                print(f"{seq_len:>6} {row['N']:>7} {backend:<8} {run.mode:<11} {row['step']:9.1f} "
                      f"{row['wait']:8.2f} {row['mask']:8.2f} {row['share']:7.1%} {worker:>10}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
