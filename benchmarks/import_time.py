"""What importing peagle_ext's modules costs, each in a fresh process (median of --repeats).

    python benchmarks/import_time.py [--repeats 7]

Rows: torch alone; ``import peagle_ext`` (the mask engine); ``import peagle_ext.peagle_draft``; the
same with ``torch.compile`` replaced by a function that returns its argument, which leaves out what
making ``_peagle_flex_attention_compiled`` at import costs (``torch.compile`` only wraps: the cost is
the import of torch._dynamo and Inductor's configuration, nothing is compiled).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Each snippet prints the seconds its import took, measured inside the process after torch is
# imported (torch's own import time is the first row).
SNIPPETS = {
    "import torch": "import time; t = time.perf_counter(); import torch; print(time.perf_counter() - t)",
    "import peagle_ext": (
        "import torch, time; t = time.perf_counter(); import peagle_ext; print(time.perf_counter() - t)"
    ),
    "import peagle_ext.peagle_draft": (
        "import torch, time; t = time.perf_counter(); import peagle_ext.peagle_draft; print(time.perf_counter() - t)"
    ),
    "  same, torch.compile a no-op": (
        "import torch, time; torch.compile = lambda fn, **kwargs: fn; t = time.perf_counter(); "
        "import peagle_ext.peagle_draft; print(time.perf_counter() - t)"
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print(f"median of {args.repeats} fresh processes, seconds (peagle_ext rows: after torch is imported)")
    for name, code in SNIPPETS.items():
        times = [float(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                                      cwd=ROOT).stdout) for _ in range(args.repeats)]
        print(f"{name:<34} {statistics.median(times):7.3f}   (min {min(times):.3f}, max {max(times):.3f})")


if __name__ == "__main__":
    main()
