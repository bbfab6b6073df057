"""Command line: ``python -m peagle_ext {demo,info,bench,train-demo} [options]``."""

from __future__ import annotations

import argparse
import sys
import time

import torch

COMMANDS = {
    "demo": "build a P-EAGLE BlockMask, check it against create_block_mask, print the figures",
    "info": "torch version, CUDA, compiled kernels and available backends",
    "bench": "benchmark every backend against create_block_mask (see --help)",
    "train-demo": "train a tiny P-EAGLE draft on synthetic data and save a checkpoint",
}


def info() -> int:
    from . import __version__, _native
    from .block_mask import available_backends

    print(f"peagle_ext {__version__}")
    print(f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})")
    print(f"CUDA available: {torch.cuda.is_available()}"
          + (f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else ""))
    kernels = _native.compiled_kernels()
    print(f"compiled kernels: {', '.join(kernels) or 'none'}"
          + (f" (CUDA archs {_native.cuda_archs()})" if "cuda" in kernels else ""))
    for backend, reason in _native.native_status().items():
        print(f"  {backend}: {'runs here' if reason is None else 'unavailable: ' + reason}")
    print(f"available backends: {', '.join(available_backends())}")
    return 0


def split_lengths(seq_len: int, docs: int, generator: torch.Generator) -> torch.Tensor:
    """seq_len positions cut into `docs` non-empty documents at random points."""
    docs = max(1, min(docs, seq_len))
    cuts = torch.randperm(seq_len - 1, generator=generator)[: docs - 1] + 1
    bounds = torch.cat([torch.tensor([0]), cuts.sort().values, torch.tensor([seq_len])])
    return bounds.diff()


def tile_states(mask) -> torch.Tensor:
    """[nQ, nKV] grid of 0 empty / 1 partial / 2 full, from the BlockMask's kv lists."""
    num_q, num_kv = mask.kv_indices.shape[-2:]
    grid = torch.zeros(num_q, num_kv, dtype=torch.int8)
    for value, (counts, indices) in ((1, (mask.kv_num_blocks, mask.kv_indices)),
                                     (2, (mask.full_kv_num_blocks, mask.full_kv_indices))):
        counts, indices = counts.reshape(-1).cpu(), indices.reshape(num_q, num_kv).cpu()
        present = torch.arange(num_kv)[None, :] < counts[:, None]
        rows = torch.arange(num_q)[:, None].expand(num_q, num_kv)
        grid[rows[present], indices[present].long()] = value
    return grid


def save_picture(grid: torch.Tensor, depth: torch.Tensor, block_size: tuple[int, int], path: str, title: str) -> str:
    """Write the tile layout with depth boundaries marked; return a sentence saying what happened."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import ListedColormap
    except ImportError:
        return "picture skipped: matplotlib is not installed (pip install 'peagle_ext[plot]')"
    fig, ax = plt.subplots(figsize=(7, 7))
    ax.imshow(grid.numpy(), cmap=ListedColormap(["white", "tab:orange", "tab:blue"]), vmin=0, vmax=2,
              interpolation="nearest")
    starts = torch.nonzero(depth.cpu().diff() != 0).flatten() + 1
    for start in starts.tolist():
        ax.axhline(start / block_size[0] - 0.5, color="black", linewidth=0.6)
        ax.axvline(start / block_size[1] - 0.5, color="black", linewidth=0.6)
    ax.set_xlabel("kv block")
    ax.set_ylabel("q block")
    ax.set_title(f"{title}\nwhite empty, orange partial, blue full; lines: depth boundaries", fontsize=9)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return f"picture of the tile layout written to {path}"


def demo(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m peagle_ext demo", description=COMMANDS["demo"])
    parser.add_argument("--seq-len", type=int, default=4096, help="original sequence length")
    parser.add_argument("--depths", type=int, default=8, help="COD depths, depth 0 included")
    parser.add_argument("--docs", type=int, default=1, help="documents packed into the sequence")
    parser.add_argument("--window", type=int, default=None, help="sliding window W (default: none)")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--backend", default="auto", choices=["auto", "python", "cpu", "cuda"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="peagle_mask.png", help="where to write the picture (needs matplotlib)")
    args = parser.parse_args(argv)

    from .benchmark import EAGER_BYTES_PER_PAIR, eager_fits, time_call
    from .block_mask import _choose_backend, build_block_mask
    from .cod import generate_cod_sample_indices
    from .mask_mod import create_peagle_mask_mod
    from .testing import assert_block_masks_equal
    from torch.nn.attention.flex_attention import create_block_mask

    generator = torch.Generator().manual_seed(args.seed)
    lengths = split_lengths(args.seq_len, args.docs, generator)
    anchor_pos, depth = generate_cod_sample_indices(args.seq_len, torch.ones(args.seq_len), num_depths=args.depths,
                                                    generator=generator)
    anchor_pos, depth, lengths = (t.to(args.device) for t in (anchor_pos, depth, lengths))
    n = anchor_pos.numel()
    mask_args = dict(lengths=lengths, total_seq_len=args.seq_len, sliding_window=args.window, BLOCK_SIZE=args.block_size)
    backend = _choose_backend(args.backend, anchor_pos.device)

    def build():
        return build_block_mask(anchor_pos, depth, backend=backend, **mask_args)

    ours_s, runs = time_call(build, args.device, repeats=7, budget_s=5.0)
    mask = build()
    grid = tile_states(mask)
    tiles = grid.numel()
    partial, full = int((grid == 1).sum()), int((grid == 2).sum())
    print(f"original length {args.seq_len}, {args.depths} depths, {len(lengths)} document(s), window {args.window}")
    print(f"N = {n} elements, BLOCK_SIZE {args.block_size}: {grid.shape[0]} x {grid.shape[1]} = {tiles} tiles")
    print(f"partial {partial}, full {full}, empty {tiles - partial - full}; "
          f"sparsity {100.0 * (tiles - partial - full) / tiles:.1f}% of tiles skipped")
    print(f"peagle_ext ({backend} backend, {args.device}): {ours_s * 1e3:.3f} ms (median of {runs})")

    status = 0
    if eager_fits(n, args.device):
        mask_mod = create_peagle_mask_mod(anchor_pos, depth, lengths, args.seq_len, sliding_window=args.window)
        start = time.perf_counter()
        expected = create_block_mask(mask_mod, None, None, n, n, device=anchor_pos.device, BLOCK_SIZE=args.block_size)
        if args.device == "cuda":
            torch.cuda.synchronize()
        eager_s = time.perf_counter() - start
        print(f"create_block_mask (eager, dense grid): {eager_s * 1e3:.1f} ms; speedup {eager_s / ours_s:.0f}x")
        try:
            assert_block_masks_equal(mask, expected)
            print("check: identical partial and full blocks (kv lists and q-side transposes) to create_block_mask")
        except AssertionError as error:
            print(f"check FAILED: {error}")
            status = 1
    else:
        need = EAGER_BYTES_PER_PAIR * n * n / 2**30
        print(f"check skipped: create_block_mask would need ~{need:.0f} GiB for the dense {n} x {n} mask")
    print(save_picture(grid, depth, (args.block_size, args.block_size), args.out,
                       f"P-EAGLE BlockMask, N={n}, {args.depths} depths, {len(lengths)} doc(s)"))
    return status


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print("usage: python -m peagle_ext {" + ",".join(COMMANDS) + "} [options]\n")
        for name, text in COMMANDS.items():
            print(f"  {name:<11} {text}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    command, rest = argv[0], argv[1:]
    if command == "info":
        return info()
    if command == "demo":
        return demo(rest)
    if command == "bench":
        from .benchmark import main as bench_main

        return bench_main(rest)
    from .training import train_demo_main

    return train_demo_main(rest)


if __name__ == "__main__":
    sys.exit(main())
