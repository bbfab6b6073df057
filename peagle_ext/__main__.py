"""``python -m peagle_ext {demo,info,bench,train-demo} [options]`` (see :mod:`peagle_ext.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
