"""``peagle_ext.draft_llama`` is documented API: the code lives in :mod:`peagle_ext.draft.llama`, and
this path is that same module object (so setting a module attribute here sets it there)."""

import sys

from .draft import llama

sys.modules[__name__] = llama
