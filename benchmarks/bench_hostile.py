"""Peak memory of mask builds on input shapes that used to make a builder allocate far more than
the index it returns. Each (family, backend) runs in a fresh process; the figure is the rise of
peak RSS (ru_maxrss) over the RSS after the inputs exist.

    python benchmarks/bench_hostile.py [--families one_query_million_keys ...] [--backends python cpu]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

# family -> (what it is, code that builds the inputs as `args` and `kwargs` of build_block_mask)
FAMILIES = {
    "one_query_million_keys": (
        "1 query against 1M keys (Q != KV), one document",
        "n = 1 << 20; args = (torch.tensor([n - 1]), torch.tensor([0]), torch.tensor([n]), n); "
        "kwargs = dict(kv_anchor_pos=torch.arange(n), kv_depth=torch.zeros(n, dtype=torch.long))",
    ),
    "huge_block_sizes_apart": (
        "8 queries, 8 keys, BLOCK_SIZE (2^31 - 1, 2^31 - 2): one tile",
        "args = (torch.arange(8), torch.zeros(8, dtype=torch.long), torch.tensor([8]), 8); "
        "kwargs = dict(kv_anchor_pos=torch.arange(8), kv_depth=torch.zeros(8, dtype=torch.long), "
        "BLOCK_SIZE=(2**31 - 1, 2**31 - 2))",
    ),
    "huge_block_size": (
        "8 elements, BLOCK_SIZE 2^31 - 1: one tile",
        "args = (torch.arange(8), torch.zeros(8, dtype=torch.long), torch.tensor([8]), 8); "
        "kwargs = dict(BLOCK_SIZE=2**31 - 1)",
    ),
    "shuffled_context_walk": (
        "64K depth-0 elements in shuffled order, no window (every q-block walks a run per key)",
        "n = 1 << 16; g = torch.Generator().manual_seed(0); "
        "args = (torch.randperm(n, generator=g), torch.zeros(n, dtype=torch.long), torch.tensor([n]), n); kwargs = {}",
    ),
    "cod_16k": (
        "COD layout, S = 16K, 8 depths (the ordinary case, for scale)",
        "from peagle_ext import generate_cod_sample_indices; s = 1 << 14; "
        "a, d = generate_cod_sample_indices(s, torch.ones(s), 8, generator=torch.Generator().manual_seed(0)); "
        "args = (a, d, torch.tensor([s]), s); kwargs = {}",
    ),
}

CHILD = """
import resource, sys, json, torch
torch.set_num_threads(1)
import peagle_ext
{setup}
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    mask = peagle_ext.build_block_mask(*args, backend={backend!r}, **kwargs)
    outcome = "built %d x %d tiles" % tuple(mask.kv_num_blocks.shape[-1:] + mask.kv_indices.shape[-1:])
except (MemoryError, ValueError) as error:
    outcome = "refused: %s" % error
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps(dict(rise_mib=(peak - base) / 1024, outcome=outcome)))
"""


def measure(family: str, backend: str, timeout: float = 600) -> dict:
    code = CHILD.format(setup=FAMILIES[family][1], backend=backend)
    try:
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(rise_mib=float("nan"), outcome=f"timed out after {timeout:.0f} s")
    if result.returncode:
        tail = (result.stderr.strip().splitlines() or ["?"])[-1]
        return dict(rise_mib=float("nan"), outcome=f"exit {result.returncode}: {tail[:120]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--backends", nargs="+", default=["python", "cpu", "cuda_emulated"])
    args = parser.parse_args()
    print(f"{'family':<26} {'backend':<14} {'peak rise MiB':>13}  outcome")
    for family in args.families:
        for backend in args.backends:
            row = measure(family, backend)
            print(f"{family:<26} {backend:<14} {row['rise_mib']:>13.1f}  {row['outcome']}", flush=True)


if __name__ == "__main__":
    main()
