"""``python -m peagle_ext demo``: build one P-EAGLE BlockMask, check it against create_block_mask,
print its figures and draw its tiles."""

from __future__ import annotations

import os

from . import (
    UsageError,
    add_device_option,
    check_memory,
    check_path,
    check_writable,
    int_at_least,
    parser_for,
    resolve_device,
)

# Picture formats matplotlib writes without extra packages; a path without a suffix gets PNG.
PICTURE_FORMATS = ("png", "svg", "pdf", "jpg", "jpeg")


def picture_format(path: str) -> str:
    suffix = os.path.splitext(path)[1].lower().lstrip(".")
    if not suffix:
        return "png"
    if suffix not in PICTURE_FORMATS:
        raise UsageError(f"argument --out: cannot draw a .{suffix} picture; use one of "
                         + ", ".join("." + name for name in PICTURE_FORMATS))
    return suffix


def split_lengths(seq_len: int, docs: int, generator):
    """seq_len positions cut into `docs` non-empty documents at random points."""
    import torch

    docs = max(1, min(docs, seq_len))
    cuts = torch.randperm(seq_len - 1, generator=generator)[: docs - 1] + 1
    bounds = torch.cat([torch.tensor([0]), cuts.sort().values, torch.tensor([seq_len])])
    return bounds.diff()


def tile_states(mask):
    """[nQ, nKV] grid of 0 empty / 1 partial / 2 full, from the BlockMask's kv lists."""
    import torch

    from .._python_builder import grid_from_lists

    partial = grid_from_lists(mask.kv_num_blocks.cpu(), mask.kv_indices.cpu())
    full = grid_from_lists(mask.full_kv_num_blocks.cpu(), mask.full_kv_indices.cpu())
    return partial.to(torch.int8) + 2 * full.to(torch.int8)


def save_picture(grid, depth, block_size: tuple[int, int], path: str, title: str) -> str:
    """Write the tile layout with depth boundaries marked; return a sentence saying what was written."""
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
    starts = (depth.cpu().diff() != 0).nonzero().flatten() + 1
    for start in starts.tolist():
        ax.axhline(start / block_size[0] - 0.5, color="black", linewidth=0.6)
        ax.axvline(start / block_size[1] - 0.5, color="black", linewidth=0.6)
    ax.set_xlabel("kv block")
    ax.set_ylabel("q block")
    ax.set_title(f"{title}\nwhite empty, orange partial, blue full; lines: depth boundaries", fontsize=9)
    fmt = picture_format(path)
    fig.savefig(path, format=fmt, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return f"{fmt.upper()} picture of the tile layout written to {path}"


# What a demo build holds per COD element (its sampling, the inputs, the build's sorted lists) and
# per tile (the index, the tile grid drawn), with margin.
BYTES_PER_ELEMENT, BYTES_PER_TILE = 160, 64
# The demo's COD sampling ratios (generate_cod_sample_indices' defaults).
RATIO, RATIO_MIN = 0.7, 0.2


def cod_size(seq_len: int, depths: int, cap: int) -> int:
    """The number of COD elements of a fully supervised sequence (counting stops past ``cap``)."""
    from ..cod import cod_depth_count

    total, pool = seq_len, seq_len
    for depth in range(1, min(depths, seq_len)):
        pool = min(pool, seq_len - depth, cod_depth_count(seq_len, depth, RATIO, RATIO_MIN))
        total += pool
        if pool == 0 or total > cap:
            break
    return total


def check_size(seq_len: int, depths: int, block_size: int, device: str,
               option: str = "--seq-len/--depths/--block-size") -> None:
    """Usage errors (naming ``option``) for a layout past the mask API's element bound or this
    machine's memory."""
    from .._inputs import FIELD_MAX

    n = cod_size(seq_len, depths, FIELD_MAX)
    if n > FIELD_MAX:
        raise UsageError(f"argument {option}: {seq_len} positions at {depths} depths make more than {FIELD_MAX} "
                         "COD elements, the most a mask takes")
    tiles = (-(-n // block_size)) ** 2
    check_memory(option, BYTES_PER_ELEMENT * n + BYTES_PER_TILE * tiles, device,
                 f"N = {n} elements in {tiles} tiles (BLOCK_SIZE {block_size})")


def main(argv: list[str]) -> int:
    parser = parser_for("demo")
    parser.add_argument("--seq-len", type=int_at_least(1), default=4096, help="original sequence length")
    parser.add_argument("--depths", type=int_at_least(1), default=8, help="COD depths, depth 0 included")
    parser.add_argument("--docs", type=int_at_least(1), default=1, help="documents packed into the sequence")
    parser.add_argument("--window", type=int_at_least(1), default=None, help="sliding window W (default: none)")
    parser.add_argument("--block-size", type=int_at_least(1), default=128, help="BlockMask tile size")
    parser.add_argument("--backend", default="auto", choices=["auto", "python", "cpu", "cuda"],
                        help="the builder (auto: the compiled kernel of the device when installed, else python)")
    add_device_option(parser)
    parser.add_argument("--seed", type=int_at_least(0, 2**63 - 1), default=0,
                        help="seed of the COD sampling and document split")
    parser.add_argument("--out", default="peagle_mask.png",
                        help="picture to write (format from the suffix, PNG without one; needs matplotlib)")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    picture_format(check_path("--out", args.out))  # a NUL byte or a blank value is named as such, not as a format
    check_writable("--out", args.out)
    check_size(args.seq_len, args.depths, args.block_size, device)

    import torch
    from torch.nn.attention.flex_attention import create_block_mask

    from .._measure import EAGER_BYTES_PER_PAIR, eager_fits, time_call
    from ..block_mask import _choose_backend, build_block_mask
    from ..cod import generate_cod_sample_indices
    from ..mask_mod import create_peagle_mask_mod
    from ..testing import assert_block_masks_equal

    try:
        backend = _choose_backend(args.backend, torch.device(device))
    except (RuntimeError, ValueError) as error:
        raise UsageError(f"argument --backend: {error}") from None

    generator = torch.Generator().manual_seed(args.seed)
    lengths = split_lengths(args.seq_len, args.docs, generator)
    anchor_pos, depth = generate_cod_sample_indices(args.seq_len, torch.ones(args.seq_len), num_depths=args.depths,
                                                    generator=generator)
    anchor_pos, depth, lengths = (t.to(device) for t in (anchor_pos, depth, lengths))
    n = anchor_pos.numel()
    mask_args = dict(lengths=lengths, total_seq_len=args.seq_len, sliding_window=args.window,
                     BLOCK_SIZE=args.block_size)

    def build():
        return build_block_mask(anchor_pos, depth, backend=backend, **mask_args)

    # Both methods are timed the same way: one warm-up call, then the median of warm calls.
    ours_s, runs = time_call(build, device, repeats=7, budget_s=5.0)
    mask = build()
    grid = tile_states(mask)
    tiles = grid.numel()
    partial, full = int((grid == 1).sum()), int((grid == 2).sum())
    print(f"original length {args.seq_len}, {args.depths} depths, {len(lengths)} document(s), window {args.window}")
    print(f"N = {n} elements, BLOCK_SIZE {args.block_size}: {grid.shape[0]} x {grid.shape[1]} = {tiles} tiles")
    print(f"partial {partial}, full {full}, empty {tiles - partial - full}; "
          f"sparsity {100.0 * (tiles - partial - full) / tiles:.1f}% of tiles skipped")
    print(f"peagle_ext ({backend} backend, {device}): {ours_s * 1e3:.3f} ms "
          f"(median of {runs} warm calls after a warm-up)")

    status = 0
    if eager_fits(n, device):
        mask_mod = create_peagle_mask_mod(anchor_pos, depth, lengths, args.seq_len, sliding_window=args.window)
        results = []

        def eager():
            results.append(create_block_mask(mask_mod, None, None, n, n, device=anchor_pos.device,
                                             BLOCK_SIZE=args.block_size))

        eager_s, eager_runs = time_call(eager, device, repeats=3, budget_s=5.0)
        print(f"create_block_mask (eager, dense grid): {eager_s * 1e3:.1f} ms (median of {eager_runs} warm calls "
              f"after a warm-up); peagle_ext is {eager_s / ours_s:.0f}x faster")
        try:
            assert_block_masks_equal(mask, results[-1])
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
