"""Context parallelism: per-rank peak activation memory and step time of one P-EAGLE training step,
R = 1 (the plain step) against R ranks (``context_parallel_group``), and the per-rank mask build
against the N x N one.

    python benchmarks/bench_context_parallel.py [--lengths 2048 4096] [--ranks 1 2] [--json FILE]
    python benchmarks/bench_context_parallel.py --device cuda   # NCCL, one GPU per rank (R GPUs)

A small draft (hidden 128, 4 heads of 32 over 2 KV heads, intermediate 256, vocabulary 1024,
target hidden 128, one layer; ``--layers`` for more) trains on one random sequence of S positions,
fully supervised, with 8 COD depths; every R is a fresh set of R processes (gloo on the CPU, each
on one thread), and R = 1 is the step without a group. Each process warms up with a step at
S = 256, then measures one step at each S (forward and backward):

* peak activation memory: on the CPU the rise of peak RSS (VmHWM, reset through
  /proc/self/clear_refs) during the step above the RSS before it, with glibc's mmap threshold
  fixed at 1 MiB so that freed large blocks leave the process; on CUDA ``max_memory_allocated``
  above what was allocated before;
* saved: the bytes autograd keeps for the backward (distinct storages saved by the step's graph);
* step time: wall time of forward + backward (R processes share the machine's cores);
* mask build: this rank's BlockMask (its share's queries against all N keys) against the N x N
  one, ``build_block_mask`` on the native backend, median of 5.

On the CPU the draft's attention runs the dense fallback (flex_attention has no CPU backward in
torch 2.14.1), whose Q x N mask and attention buffers dominate: a rank holding half the queries
holds about half of them. The ratio lines compare the largest rank's figure at R with R = 1's.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time

WARM_UP_LEN = 256


def draft_config(layers: int, seq_len: int):
    from peagle_ext.draft_llama import Eagle3DraftConfig

    return Eagle3DraftConfig(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                             num_hidden_layers=layers, vocab_size=1024, draft_vocab_size=1024, target_hidden_size=128,
                             parallel_drafting=True, num_depths=8, max_position_embeddings=seq_len)


def sample(seq_len: int, config, device):
    import torch

    generator = torch.Generator().manual_seed(seq_len)
    input_ids = torch.randint(config.vocab_size, (seq_len,), generator=generator)
    aux = torch.randn(seq_len, config.num_aux_hidden_states * config.target_hidden_size, generator=generator)
    target = torch.randn(seq_len, config.vocab_size, generator=generator)
    return [t.to(device) for t in (input_ids, aux, torch.ones(seq_len), target)]


def saved_bytes_hooks(storages: dict):
    """saved_tensors_hooks that note each saved tensor's storage (once per storage)."""
    import torch

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    return torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)


def median_ms(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def mask_build_times(seq_len: int, world: int, rank: int, device) -> tuple[int, int, float, float]:
    """(this rank's share, N, ms to build its share's mask against all N keys, ms for the N x N one)
    for the step's COD layout."""
    import torch

    import peagle_ext
    from peagle_ext.draft.context_parallel import attention_work, split_shares

    anchor_pos, depth = peagle_ext.generate_cod_sample_indices(seq_len, torch.ones(seq_len), 8,
                                                               generator=torch.Generator().manual_seed(1))
    anchor_pos, depth = anchor_pos.to(device), depth.to(device)
    lengths = torch.tensor([seq_len], device=device)
    bounds = split_shares(attention_work(anchor_pos, depth, lengths, seq_len), world)
    mine = slice(bounds[rank], bounds[rank + 1])

    def build(*args, **kwargs):
        peagle_ext.build_block_mask(*args, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize()

    share = (anchor_pos[mine], depth[mine], lengths, seq_len)
    build(*share, kv_anchor_pos=anchor_pos, kv_depth=depth)  # warm
    build(anchor_pos, depth, lengths, seq_len)
    share_ms = median_ms(lambda: build(*share, kv_anchor_pos=anchor_pos, kv_depth=depth))
    full_ms = median_ms(lambda: build(anchor_pos, depth, lengths, seq_len))
    return mine.stop - mine.start, anchor_pos.numel(), share_ms, full_ms


def rank_main(rank: int, world: int, store_path: str, directory: str, lengths: list[int], layers: int,
              device_type: str) -> None:
    import torch
    import torch.distributed as dist

    from peagle_ext._measure import peak_rss_bytes, reset_peak_rss
    from peagle_ext.draft_llama import LlamaEagle3DraftModel
    from peagle_ext.training import peagle_training_step

    torch.set_num_threads(1)
    cuda = device_type == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    group = None
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{store_path}", rank=rank,
                                world_size=world)
        group = dist.group.WORLD
    torch.manual_seed(0)
    model = LlamaEagle3DraftModel(draft_config(layers, max(lengths))).to(device).train()

    def step(inputs, storages: dict) -> None:
        input_ids, aux, loss_mask, target = inputs
        with saved_bytes_hooks(storages):
            out = peagle_training_step(model, input_ids, aux, loss_mask, target_logits=target,
                                       generator=torch.Generator().manual_seed(1), context_parallel_group=group)
        out.loss.backward()

    step(sample(WARM_UP_LEN, model.draft_config, device), {})
    rows = []
    for seq_len in lengths:
        inputs = sample(seq_len, model.draft_config, device)  # the sample is no activation: made before
        model.zero_grad(set_to_none=True)
        gc.collect()
        storages: dict = {}
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = reset_peak_rss()
        start = time.perf_counter()
        step(inputs, storages)
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        peak = (torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes()) - base

        share, num_elements, share_ms, full_ms = mask_build_times(seq_len, world, rank, device)
        rows.append(dict(seq_len=seq_len, num_elements=num_elements, share=share, step_s=elapsed, peak_bytes=peak,
                         saved_bytes=sum(storages.values()), share_mask_ms=share_ms, full_mask_ms=full_ms))
        if world > 1:
            dist.barrier()
    with open(os.path.join(directory, f"ranks{world}.{rank}.json"), "w") as handle:
        json.dump(rows, handle)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def run_ranks(world: int, lengths: list[int], layers: int, device_type: str) -> list[list[dict]]:
    import torch.multiprocessing as mp

    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(2**20))  # read by each child's glibc at start
    with tempfile.TemporaryDirectory() as directory:
        mp.start_processes(rank_main, args=(world, os.path.join(directory, "store"), directory, lengths, layers,
                                            device_type), nprocs=world, start_method="spawn")
        per_rank = []
        for rank in range(world):
            with open(os.path.join(directory, f"ranks{world}.{rank}.json")) as handle:
                per_rank.append(json.load(handle))
    return per_rank


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if any(r < 1 for r in args.ranks) or any(s < WARM_UP_LEN for s in args.lengths) or args.layers < 1:
        parser.error(f"--ranks and --layers must be >= 1 and --lengths >= {WARM_UP_LEN}")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    results = {}
    print(f"{'S':>5} {'N':>6} {'R':>2} {'rank':>4} {'share':>6} {'step s':>7} {'peak MiB':>9} {'saved MiB':>9} "
          f"{'mask share ms':>13} {'mask NxN ms':>11}")
    for world in args.ranks:
        print(f"  measuring R = {world} ...", file=sys.stderr, flush=True)
        results[world] = run_ranks(world, args.lengths, args.layers, args.device)
        for index, seq_len in enumerate(args.lengths):
            for rank, rows in enumerate(results[world]):
                row = rows[index]
                print(f"{seq_len:>5} {row['num_elements']:>6} {world:>2} {rank:>4} {row['share']:>6} "
                      f"{row['step_s']:>7.2f} {row['peak_bytes'] / 2**20:>9.0f} {row['saved_bytes'] / 2**20:>9.0f} "
                      f"{row['share_mask_ms']:>13.2f} {row['full_mask_ms']:>11.2f}", flush=True)
    if 1 in results:
        for world in (r for r in args.ranks if r > 1):
            for index, seq_len in enumerate(args.lengths):
                single = results[1][0][index]
                largest = {key: max(rows[index][key] for rows in results[world])
                           for key in ("peak_bytes", "saved_bytes", "step_s")}
                ratio = largest["peak_bytes"] / single["peak_bytes"]
                print(f"S {seq_len}, R {world} against R 1: peak activation {ratio:.2f}x, "
                      f"saved {largest['saved_bytes'] / single['saved_bytes']:.2f}x, "
                      f"step time {largest['step_s'] / single['step_s']:.2f}x (the largest rank's)")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"cpus": os.cpu_count(), "device": args.device, "layers": args.layers,
                       "results": {str(k): v for k, v in results.items()}}, out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
