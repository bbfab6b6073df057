"""Benchmark every BlockMask builder against create_block_mask (see peagle_ext/benchmark.py).

    python benchmarks/bench_block_mask.py [--device cuda] [--compiled] [--lengths 1024 4096 ...]

Same as `python -m peagle_ext bench`.
"""

import sys

from peagle_ext.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
