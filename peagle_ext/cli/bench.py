"""``python -m peagle_ext bench``: every builder against create_block_mask, time and peak memory,
over sequence lengths (also ``python benchmarks/bench_block_mask.py``). Times are
medians after a warm-up, measured in one process so ratios compare like with like. CPU peak
memory is measured in a fresh subprocess per (method, length): the rise of peak RSS over the
RSS after the inputs exist.

On ``--device cuda`` each build is timed by CUDA events recorded around it (a synchronize after
each, so a build's time includes its host-side launch work), our backends run with
``validate=False`` (the configuration without host syncs), ``cuda_graph`` times the cuda backend
captured once in a CUDA graph and replayed (its GPU time alone), every method's host syncs in one
warm call are counted under ``torch.cuda.set_sync_debug_mode("warn")``, each of our masks is
checked against the CPU kernel's, and peak memory is torch.cuda.max_memory_allocated above the inputs.
``--markdown FILE`` writes the table and the issue's targets as Markdown.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
import warnings

import torch

from .._inputs import available_memory_bytes

# Eager create_block_mask materializes the dense mask plus int64 temporaries: about 11 bytes per
# (q, kv) pair measured here (shared/DESIGN.md §3: 8 GB at N = 27.6K).
EAGER_BYTES_PER_PAIR = 11


def cod_inputs(seq_len: int, depths: int, device: str, seed: int = 0):
    """One document of seq_len positions, COD-sampled with the trainers' defaults."""
    from ..cod import generate_cod_sample_indices

    anchor_pos, depth = generate_cod_sample_indices(
        seq_len, torch.ones(seq_len), num_depths=depths, generator=torch.Generator().manual_seed(seed)
    )
    lengths = torch.tensor([seq_len])
    return anchor_pos.to(device), depth.to(device), lengths.to(device)


def eager_fits(num_elements: int, device: str) -> bool:
    need = EAGER_BYTES_PER_PAIR * num_elements**2
    have = available_memory_bytes(torch.device(device))
    return need < 0.7 * have


def make_builder(method: str, anchor_pos, depth, lengths, seq_len: int):
    """A zero-argument callable that builds the BlockMask with `method`."""
    from torch.nn.attention.flex_attention import create_block_mask

    from ..block_mask import build_block_mask
    from ..mask_mod import create_peagle_mask_mod

    n = anchor_pos.numel()
    if method in ("python", "cpu", "cuda"):
        # On the GPU without the value checks: they read tensors back (one host sync).
        validate = anchor_pos.device.type != "cuda"
        return lambda: build_block_mask(anchor_pos, depth, lengths, seq_len, backend=method, validate=validate)
    if method == "cuda_graph":
        # The cuda backend captured once in a CUDA graph and replayed: the build's GPU time alone,
        # without the host-side work (Python, dispatch, launches) that a plain call pays.
        def plain():
            return build_block_mask(anchor_pos, depth, lengths, seq_len, backend="cuda", validate=False)

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            plain()  # allocations warm, outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = plain()
        return lambda: (graph.replay(), captured)[1]
    mask_mod = create_peagle_mask_mod(anchor_pos, depth, lengths, seq_len)
    if method == "create_block_mask":
        return lambda: create_block_mask(mask_mod, None, None, n, n, device=anchor_pos.device)
    if method == "compiled_create_block_mask":
        # A fresh compile per length: static shapes, its fastest form (a reused graph would have
        # gone dynamic after the second length and run several times slower).
        torch._dynamo.reset()
        compiled = torch.compile(create_block_mask)
        return lambda: compiled(mask_mod, None, None, n, n, device=anchor_pos.device)
    raise ValueError(f"unknown method {method!r}")


def time_call(fn, device: str, repeats: int, budget_s: float) -> tuple[float, int]:
    """Median seconds of fn() after a warm-up, and how many timed runs that took. On CUDA each run
    is timed by events recorded before and after it on the current stream."""

    def once() -> float:
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    if device == "cuda":  # the caching allocator and the kernels' first loads settle in a few calls
        for _ in range(3):
            once()

    warm = once()
    runs = max(1, min(repeats, int(budget_s / max(warm, 1e-9))))
    return statistics.median(once() for _ in range(runs)), runs


def cuda_peak_bytes(build) -> int:
    """Peak CUDA memory of one (warm) build above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    build()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def peak_memory_bytes(method: str, seq_len: int, depths: int, device: str) -> int | None:
    """Peak memory of one build above the inputs (a fresh process on CPU, so RSS peaks are its own)."""
    if device == "cuda":
        anchor_pos, depth, lengths = cod_inputs(seq_len, depths, device)
        build = make_builder(method, anchor_pos, depth, lengths, seq_len)
        build()  # compile / warm caches first
        return cuda_peak_bytes(build)
    code = (
        "from peagle_ext.cli.bench import cod_inputs, make_builder, reset_peak_rss, peak_rss_bytes;"
        f"a, d, l = cod_inputs({seq_len}, {depths}, 'cpu'); build = make_builder({method!r}, a, d, l, {seq_len});"
        "base = reset_peak_rss(); build(); print(peak_rss_bytes() - base)"
    )
    env = dict(os.environ, TORCHINDUCTOR_COMPILE_THREADS="1")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        return None
    return max(0, int(result.stdout.strip().splitlines()[-1]))


def count_host_syncs(fn) -> int:
    """Host-device synchronizations in one call of fn, as torch's sync debug mode reports them."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(warning.message) for warning in caught)


def matches_cpu_kernel(mask, anchor_pos, depth, lengths, seq_len: int) -> bool | None:
    """Whether a mask built on the GPU holds the CPU backend's blocks (None: no CPU backend to ask)."""
    from ..block_mask import available_backends, build_block_mask
    from ..testing import assert_block_masks_equal

    reference_backend = "cpu" if "cpu" in available_backends() else "python"
    reference = build_block_mask(anchor_pos.cpu(), depth.cpu(), lengths.cpu(), seq_len, backend=reference_backend)
    try:
        assert_block_masks_equal(mask, reference)
    except AssertionError:
        return False
    return True


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> int:
    """Reset this process's peak RSS (VmHWM) to its current RSS and return that, in bytes.

    (getrusage's ru_maxrss would not do: it survives fork and exec, so a child inherits the
    parent's peak.)"""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    return _status_kib("VmHWM") * 1024


def run(lengths, depths: int, device: str, backends, compiled: bool, compiled_max_len: int, repeats: int,
        memory: bool, budget_s: float, log=print, progress=None, on_row=None) -> list[dict]:
    """Measure every method at every length; ``progress(text)`` is told what is being measured, and
    ``on_row(rows)`` gets the rows so far after each length."""
    rows = []
    ours = list(backends) + (["cuda_graph"] if device == "cuda" and "cuda" in backends else [])
    methods = ours + ["create_block_mask"] + (["compiled_create_block_mask"] if compiled else [])
    total, done = len(lengths) * len(methods), 0
    for seq_len in lengths:
        anchor_pos, depth, doc_lengths = cod_inputs(seq_len, depths, device)
        n = anchor_pos.numel()
        tiles = -(-n // 128)
        row = {"seq_len": seq_len, "num_elements": n, "tiles": f"{tiles}x{tiles}", "methods": {}}
        for method in methods:
            done += 1
            if progress is not None:
                progress(f"[{done}/{total}] seq_len {seq_len} (N {n}): {method}")
            entry: dict = {}
            if method == "create_block_mask" and not eager_fits(n, device):
                entry["skipped"] = f"needs ~{EAGER_BYTES_PER_PAIR * n * n / 2**30:.0f} GiB for the dense mask"
            elif method == "compiled_create_block_mask" and seq_len > compiled_max_len:
                entry["skipped"] = f"above --compiled-max-len {compiled_max_len}"
            elif device == "cuda":
                entry = measure_on_gpu(method, method in ours, anchor_pos, depth, doc_lengths, seq_len, repeats,
                                       budget_s, memory)
            else:
                build = make_builder(method, anchor_pos, depth, doc_lengths, seq_len)
                if method == "compiled_create_block_mask":
                    start = time.perf_counter()
                    build()
                    entry["compile_s"] = time.perf_counter() - start
                entry["median_s"], entry["runs"] = time_call(build, device, repeats, budget_s)
                if memory:
                    entry["peak_bytes"] = peak_memory_bytes(method, seq_len, depths, device)
            row["methods"][method] = entry
            log(f"  seq_len {seq_len:>6} N {n:>7} {method:<27} {format_entry(entry)}")
        rows.append(row)
        if on_row is not None:
            on_row(rows)
    return rows


def measure_on_gpu(method: str, ours: bool, anchor_pos, depth, lengths, seq_len: int, repeats: int,
                   budget_s: float, memory: bool) -> dict:
    """One method at one length on the GPU: compile time (compiled create_block_mask), median time
    by CUDA events, host syncs, peak memory (same process, the same compiled function), and for our
    backends whether the mask holds the CPU kernel's blocks. Running out of GPU memory skips it."""
    entry: dict = {}
    try:
        build = make_builder(method, anchor_pos, depth, lengths, seq_len)
        if method == "compiled_create_block_mask":
            start = time.perf_counter()
            build()
            torch.cuda.synchronize()
            entry["compile_s"] = time.perf_counter() - start
        entry["median_s"], entry["runs"] = time_call(build, "cuda", repeats, budget_s)
        entry["host_syncs"] = count_host_syncs(build)
        if memory:
            entry["peak_bytes"] = cuda_peak_bytes(build)
        if ours:
            entry["matches_cpu"] = matches_cpu_kernel(build(), anchor_pos, depth, lengths, seq_len)
    except torch.cuda.OutOfMemoryError:
        entry = {"skipped": "out of GPU memory"}
    torch.cuda.empty_cache()
    return entry


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


REFERENCES = ("create_block_mask", "compiled_create_block_mask")


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
                    notes.append("same blocks as the CPU kernel" if entry["matches_cpu"] else "DIFFERS from the CPU kernel")
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


def gpu_targets(rows: list[dict]) -> list[str]:
    """The CUDA kernel's targets (README), each with what this run measured."""
    by_len = {row["seq_len"]: row["methods"] for row in rows}
    ours = {seq_len: methods.get("cuda", {}) for seq_len, methods in by_len.items()}
    lines = []

    def target(text, value, met):
        lines.append(f"- {text}: {value} -> {'met' if met else 'MISSED'}")

    if "median_s" in ours.get(8192, {}):
        median = ours[8192]["median_s"]
        target("S = 8192 in <= 100 us per build", f"{median * 1e6:.1f} us", median <= 100e-6)
        compiled = by_len[8192].get("compiled_create_block_mask", {}).get("median_s")
        if compiled:
            ratio = compiled / median
            target(">= 10x faster than compiled create_block_mask at S = 8192", f"{ratio:.1f}x", ratio >= 10)
        replay = by_len[8192].get("cuda_graph", {}).get("median_s")
        if replay:
            lines.append(f"- (S = 8192 replayed from a CUDA graph: {replay * 1e6:.1f} us, the GPU's share of a build)")
    if "median_s" in ours.get(65536, {}):
        median = ours[65536]["median_s"]
        target("S = 65536 in <= 2 ms", f"{median * 1e3:.3f} ms", median <= 2e-3)
    syncs = {seq_len: entry["host_syncs"] for seq_len, entry in ours.items() if "host_syncs" in entry}
    if syncs:
        target("zero host syncs (validate=False)", f"{sum(syncs.values())} over {len(syncs)} lengths",
               sum(syncs.values()) == 0)
    checked = {seq_len: entry["matches_cpu"] for seq_len, entry in ours.items() if "matches_cpu" in entry}
    if checked:
        target("the CPU kernel's blocks at every length", f"{sum(checked.values())} of {len(checked)} lengths",
               all(checked.values()))
    return lines or ["- no figures of the cuda backend in this run"]


def write_markdown(rows: list[dict], path: str, device: str, command: str, not_yet: tuple = ()) -> None:
    """The table (and on the GPU the targets) as Markdown, with what it ran on; ``not_yet``: the
    lengths asked for that the run has not measured (yet)."""
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
    if device == "cuda":
        text += ["", "Targets (issue 8):", ""] + gpu_targets(rows)
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
    from . import UsageError, check_writable, int_at_least, parser_for, positive_float, resolve_device
    from ..block_mask import BACKENDS, available_backends

    parser = parser_for("bench")
    parser.add_argument("--lengths", type=int_at_least(1), nargs="+",
                        default=[1024, 2048, 4096, 8192, 16384, 32768, 65536], help="original sequence lengths")
    parser.add_argument("--depths", type=int_at_least(1), default=8)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--backends", nargs="+", default=None, choices=[b for b in BACKENDS if b != "cuda_emulated"],
                        help="default: every available one for the device")
    parser.add_argument("--compiled", action="store_true", help="also time torch.compile(create_block_mask)")
    parser.add_argument("--compiled-max-len", type=int_at_least(1), default=16384)
    parser.add_argument("--repeats", type=int_at_least(1), default=25)
    parser.add_argument("--budget-s", type=positive_float, default=10.0, help="time budget for one method's timed runs")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    parser.add_argument("--json", default="bench-results.json", help="where to write the results")
    parser.add_argument("--markdown", default=None, metavar="FILE",
                        help="also write the table (and on --device cuda the targets) as Markdown")
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

    rows = run(args.lengths, args.depths, device, backends, args.compiled, args.compiled_max_len,
               args.repeats, not args.no_memory, args.budget_s, progress=progress, on_row=save)
    if interactive:
        print("\r\033[K", end="", file=sys.stderr)
    print()
    print_table(rows)
    print(f"\nresults (JSON) written to {args.json}")
    if device == "cuda":
        print("\n".join(["targets:"] + gpu_targets(rows)))
    if args.markdown is not None:
        print(f"table (Markdown) written to {args.markdown}")
    if args.plot is not None:
        plot(rows, args.plot)
        print(f"log-log picture of time and peak memory against N written to {args.plot}")
    return 0
