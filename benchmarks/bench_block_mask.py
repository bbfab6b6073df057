"""Benchmark every BlockMask builder against create_block_mask (measured by peagle_ext/_measure.py).

    python benchmarks/bench_block_mask.py [--device cuda] [--compiled] [--lengths 1024 4096 ...] [--plot FILE]

Same as `python -m peagle_ext bench`.
"""

import sys

from peagle_ext.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
