"""``peagle_ext.peagle_draft`` is documented API: the code lives in :mod:`peagle_ext.draft.peagle_draft`, and
this path is that same module object (so setting a module attribute here sets it there)."""

import sys

from .draft import peagle_draft

sys.modules[__name__] = peagle_draft
