"""``peagle_ext.checkpoint``: the names of :mod:`peagle_ext.draft.checkpoint`, where the code lives."""

from .draft.checkpoint import (  # noqa: F401
    CONFIG_NAME,
    LAYOUTS,
    WEIGHTS_NAME,
    InteropWarning,
    OpenedCheckpoint,
    config_fields,
    load_checkpoint,
    open_checkpoint,
    save_checkpoint,
)
