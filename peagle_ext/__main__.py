"""``python -m peagle_ext COMMAND [options]``: the commands and their one-line descriptions are
listed by ``python -m peagle_ext --help`` (see :mod:`peagle_ext.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
