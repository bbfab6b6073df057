"""``peagle_ext.checkpoint`` is documented API: the code lives in :mod:`peagle_ext.draft.checkpoint`, and
this path is that same module object (so setting a module attribute here sets it there)."""

import sys

from .draft import checkpoint

sys.modules[__name__] = checkpoint
