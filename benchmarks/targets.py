"""The CUDA backend's targets, each checked against what `python -m peagle_ext bench --device cuda`
measured (its JSON):

    python benchmarks/targets.py benchmarks/results/h200.json [--markdown benchmarks/results/h200.md]

prints one line per target (met / MISSED) and with --markdown appends them to that file; exits 1 when
one is missed. benchmarks/gpu_check.sh runs it after the benchmark.
"""

from __future__ import annotations

import argparse
import json
import sys

# (S, most seconds per build of the cuda backend)
BUILD_TIME_TARGETS = ((8192, 100e-6), (65536, 2e-3))
# at S = 8192, how many times faster than compiled create_block_mask
SPEEDUP_OVER_COMPILED_AT_8192 = 10


def gpu_targets(rows: list[dict]) -> list[str]:
    """One Markdown bullet per target, with what this run measured; a target without figures is left out."""
    by_len = {row["seq_len"]: row["methods"] for row in rows}
    ours = {seq_len: methods.get("cuda", {}) for seq_len, methods in by_len.items()}
    lines = []

    def target(text, value, met):
        lines.append(f"- {text}: {value} -> {'met' if met else 'MISSED'}")

    for seq_len, most_s in BUILD_TIME_TARGETS:
        if "median_s" not in ours.get(seq_len, {}):
            continue
        median = ours[seq_len]["median_s"]
        if most_s < 1e-3:
            target(f"S = {seq_len} in <= {most_s * 1e6:.0f} us per build", f"{median * 1e6:.1f} us", median <= most_s)
        else:
            target(f"S = {seq_len} in <= {most_s * 1e3:.0f} ms", f"{median * 1e3:.3f} ms", median <= most_s)
        if seq_len != 8192:
            continue
        compiled = by_len[8192].get("compiled_create_block_mask", {}).get("median_s")
        if compiled:
            ratio = compiled / median
            target(f">= {SPEEDUP_OVER_COMPILED_AT_8192}x faster than compiled create_block_mask at S = 8192",
                   f"{ratio:.1f}x", ratio >= SPEEDUP_OVER_COMPILED_AT_8192)
        replay = by_len[8192].get("cuda_graph", {}).get("median_s")
        if replay:
            lines.append(f"- (S = 8192 replayed from a CUDA graph: {replay * 1e6:.1f} us, the GPU's share of a build)")
    syncs = {seq_len: entry["host_syncs"] for seq_len, entry in ours.items() if "host_syncs" in entry}
    if syncs:
        target("zero host syncs (validate=False)", f"{sum(syncs.values())} over {len(syncs)} lengths",
               sum(syncs.values()) == 0)
    checked = {seq_len: entry["matches_cpu"] for seq_len, entry in ours.items() if "matches_cpu" in entry}
    if checked:
        target("the CPU kernel's blocks at every length", f"{sum(checked.values())} of {len(checked)} lengths",
               all(checked.values()))
    return lines or ["- no figures of the cuda backend in this run"]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("results", help="the JSON that python -m peagle_ext bench --json wrote")
    parser.add_argument("--markdown", default=None, metavar="FILE", help="append the targets to this Markdown file")
    args = parser.parse_args(argv)
    with open(args.results) as results:
        lines = gpu_targets(json.load(results)["rows"])
    print("\n".join(["targets:"] + lines))
    if args.markdown is not None:
        with open(args.markdown, "a") as markdown:
            markdown.write("\n".join(["", "Targets:", ""] + lines) + "\n")
    return 1 if any(line.endswith("-> MISSED") for line in lines) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
