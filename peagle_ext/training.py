"""``peagle_ext.training``: the names of :mod:`peagle_ext.draft.training`, where the code lives."""

from .draft.training import *  # noqa: F403
from .draft.training import __all__  # noqa: F401
