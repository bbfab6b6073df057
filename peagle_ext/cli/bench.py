"""``python -m peagle_ext bench``: every builder against create_block_mask, time and peak memory,
over sequence lengths (also ``python benchmarks/bench_block_mask.py``): the command line and the
presentation (progress, table, JSON, Markdown, plot). What is measured and how is in
:mod:`peagle_ext._measure`.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

from .._measure import run

# The methods that are create_block_mask itself: speedups are given over them, not for them.
REFERENCES = ("create_block_mask", "compiled_create_block_mask")


def format_entry(entry: dict) -> str:
    if "skipped" in entry:
        return f"skipped: {entry['skipped']}"
    text = f"{entry['median_s'] * 1e3:10.3f} ms (median of {entry['runs']})"
    if entry.get("peak_bytes") is not None:
        text += f", peak +{entry['peak_bytes'] / 2**20:.1f} MiB"
    if "host_syncs" in entry:
        text += f", {entry['host_syncs']} host sync(s)"
    if "matches_cpu" in entry:
        text += ", same blocks as the CPU kernel" if entry["matches_cpu"] else ", DIFFERS from the CPU kernel"
    if "compile_s" in entry:
        text += f", first call (compile) {entry['compile_s']:.1f} s"
    return text



def table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """The header and one row of cells per (length, method): times, peak memory, speedups of each
    of our methods over eager and compiled create_block_mask, host syncs (GPU runs), and a note."""
    with_syncs = any("host_syncs" in entry for row in rows for entry in row["methods"].values())
    header = ["seq_len", "N", "tiles", "method", "median ms", "peak MiB", "x eager", "x compiled"]
    header += ["host syncs"] if with_syncs else []
    lines = []
    for row in rows:
        methods = row["methods"]
        eager = methods.get("create_block_mask", {}).get("median_s")
        compiled = methods.get("compiled_create_block_mask", {}).get("median_s")
        for method, entry in methods.items():
            cells = [str(row["seq_len"]), str(row["num_elements"]), row["tiles"], method]
            if "skipped" in entry:
                cells += ["skipped", "", "", ""] + ([""] if with_syncs else []) + [f"({entry['skipped']})"]
            else:
                median, peak = entry["median_s"], entry.get("peak_bytes")
                cells += [f"{median * 1e3:.3f}", f"{peak / 2**20:.1f}" if peak is not None else "-",
                          f"{eager / median:.1f}" if eager and method not in REFERENCES else "",
                          f"{compiled / median:.1f}" if compiled and method not in REFERENCES else ""]
                cells += [str(entry.get("host_syncs", ""))] if with_syncs else []
                notes = [f"compile {entry['compile_s']:.1f} s"] if "compile_s" in entry else []
                if entry.get("matches_cpu") is not None:
                    same = entry["matches_cpu"]
                    notes.append("same blocks as the CPU kernel" if same else "DIFFERS from the CPU kernel")
                cells.append(f"({'; '.join(notes)})" if notes else "")
            lines.append(cells)
    return header, lines


def print_table(rows: list[dict]) -> None:
    header, lines = table(rows)
    widths = [7, 7, 11, 27, 11, 9, 9, 10, 10]

    def fmt(cells: list[str]) -> str:
        size = cells[:3]
        measured = [c.rjust(w) for c, w in zip(cells[4:len(header)], widths[4:])]
        note = cells[len(header)] if len(cells) > len(header) else ""
        return (" ".join(c.rjust(w) for c, w in zip(size, widths)) + " | " + cells[3].ljust(widths[3]) + " "
                + " ".join(measured) + "  " + note).rstrip()

    print(fmt(header))
    print("-" * len(fmt(header)))
    for cells in lines:
        print(fmt(cells))
    for row in rows:  # backend-to-backend ratios, same run
        methods = row["methods"]
        if "cpu" in methods and "python" in methods and "median_s" in methods["python"]:
            ratio = methods["python"]["median_s"] / methods["cpu"]["median_s"]
            print(f"seq_len {row['seq_len']}: cpu is {ratio:.1f}x faster than python")


def write_markdown(rows: list[dict], path: str, device: str, command: str, not_yet: tuple = ()) -> None:
    """The table as Markdown, with what it ran on; ``not_yet``: the lengths asked for that the run
    has not measured (yet)."""
    header, lines = table(rows)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    text = [f"# `python -m peagle_ext bench` on {name}", "",
            f"torch {torch.__version__}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
            "8 COD depths unless the command says otherwise, one document, BLOCK_SIZE 128.", "",
            f"    {command}", ""]
    if device == "cuda":
        text += ["Each build timed by CUDA events around it (median; a synchronize after each, so a build's time "
                 "includes its host-side work); ours with validate=False; cuda_graph = the cuda backend captured "
                 "once in a CUDA graph and replayed (its GPU time alone); host syncs counted in one warm call by "
                 "torch.cuda.set_sync_debug_mode; peak MiB = max_memory_allocated above the inputs.", ""]
    text += ["| " + " | ".join(header + ["note"]) + " |", "|" + "---|" * (len(header) + 1)]
    text += ["| " + " | ".join(cells) + " |" for cells in lines]
    if not_yet:
        text += ["", f"Not measured: seq_len {', '.join(map(str, not_yet))} (the run stopped before them)."]
    with open(path, "w") as out:
        out.write("\n".join(text) + "\n")


def plot(rows: list[dict], path: str) -> None:
    """Log-log picture of build time and peak memory against N, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (time_ax, memory_ax) = plt.subplots(1, 2, figsize=(11, 4.5))
    methods = dict.fromkeys(method for row in rows for method in row["methods"])
    for method in methods:
        measured = [(row["num_elements"], row["methods"][method]) for row in rows
                    if "median_s" in row["methods"].get(method, {})]
        if measured:
            time_ax.plot([n for n, _ in measured], [e["median_s"] * 1e3 for _, e in measured], "o-", label=method)
        with_memory = [(n, e["peak_bytes"]) for n, e in measured if e.get("peak_bytes")]
        if with_memory:
            memory_ax.plot([n for n, _ in with_memory], [b / 2**20 for _, b in with_memory], "o-", label=method)
    for ax, label in ((time_ax, "median build time (ms)"), (memory_ax, "peak memory of one build (MiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("N (flattened COD elements)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle("P-EAGLE BlockMask builders, one run of python -m peagle_ext bench", fontsize=10)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str]) -> int:
    from ..block_mask import BACKENDS, available_backends
    from . import (
        UsageError,
        check_distinct_files,
        check_writable,
        int_at_least,
        parser_for,
        positive_float,
        resolve_device,
    )

    parser = parser_for("bench")
    parser.add_argument("--lengths", type=int_at_least(1), nargs="+",
                        default=[1024, 2048, 4096, 8192, 16384, 32768, 65536], help="original sequence lengths")
    parser.add_argument("--depths", type=int_at_least(1), default=8, help="COD depths, depth 0 included")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the builders run")
    parser.add_argument("--backends", nargs="+", default=None, choices=[b for b in BACKENDS if b != "cuda_emulated"],
                        help="default: every available one for the device")
    parser.add_argument("--compiled", action="store_true", help="also time torch.compile(create_block_mask)")
    parser.add_argument("--compiled-max-len", type=int_at_least(1), default=16384,
                        help="longest sequence the compiled create_block_mask is timed at")
    parser.add_argument("--repeats", type=int_at_least(1), default=25,
                        help="timed runs of each method, at most (fewer when the time budget runs out)")
    parser.add_argument("--budget-s", type=positive_float, default=10.0, help="time budget for one method's timed runs")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    parser.add_argument("--json", default="bench-results.json", help="where to write the results")
    parser.add_argument("--markdown", default=None, metavar="FILE",
                        help="also write the table as Markdown")
    parser.add_argument("--plot", default=None, metavar="FILE",
                        help="also draw time and peak memory against N, log-log (needs matplotlib)")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    available = available_backends()
    for backend in args.backends or []:
        if backend not in available:
            raise UsageError(f"argument --backends: {backend!r} is not available here; available: {available}")
        if backend != "python" and backend != device:
            raise UsageError(f"argument --backends: {backend!r} needs --device {backend}")
    from .demo import check_size

    for length in args.lengths:  # the largest build must fit; the default block size
        check_size(length, args.depths, 128, device, option="--lengths/--depths")
    check_writable("--json", args.json)
    if args.markdown is not None:
        check_writable("--markdown", args.markdown)
    if args.plot is not None:
        check_writable("--plot", args.plot)
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError("argument --plot: needs matplotlib (pip install 'peagle_ext[plot]')") from None
    check_distinct_files({"--json": args.json, "--markdown": args.markdown, "--plot": args.plot})
    # Inductor's pool of compile workers would otherwise keep the cores busy after each compile
    # and slow whatever is timed next.
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

    backends = args.backends or [b for b in available if b in ("python", device)]
    print(f"torch {torch.__version__}, device {device}, backends {backends}, {os.cpu_count()} CPUs")
    interactive = sys.stderr.isatty()

    def progress(text: str) -> None:
        # One line rewritten in place on a terminal; one line per measurement elsewhere.
        print(f"\r\033[K{text}" if interactive else text, end="" if interactive else "\n", file=sys.stderr, flush=True)

    def save(rows: list[dict]) -> None:
        # After every length, so that a run stopped by a time limit leaves the lengths it finished.
        with open(args.json, "w") as out:
            json.dump({"torch": torch.__version__, "device": device, "depths": args.depths, "rows": rows}, out,
                      indent=1)
        if args.markdown is not None:
            write_markdown(rows, args.markdown, device, "python -m peagle_ext bench " + " ".join(argv),
                           not_yet=tuple(args.lengths[len(rows):]))

    def log(seq_len: int, n: int, method: str, entry: dict) -> None:
        print(f"  seq_len {seq_len:>6} N {n:>7} {method:<27} {format_entry(entry)}")

    rows = run(args.lengths, args.depths, device, backends, args.compiled, args.compiled_max_len,
               args.repeats, not args.no_memory, args.budget_s, progress=progress, on_entry=log, on_row=save)
    if interactive:
        print("\r\033[K", end="", file=sys.stderr)
    print()
    print_table(rows)
    print(f"\nresults (JSON) written to {args.json}")
    if args.markdown is not None:
        print(f"table (Markdown) written to {args.markdown}")
    if args.plot is not None:
        plot(rows, args.plot)
        print(f"log-log picture of time and peak memory against N written to {args.plot}")
    return 0
