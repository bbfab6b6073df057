"""``peagle_ext.training`` is documented API: the code lives in :mod:`peagle_ext.draft.training`, and
this path is that same module object (so setting a module attribute here sets it there)."""

import sys

from .draft import training

sys.modules[__name__] = training
