"""The P-EAGLE draft model: the mixins (:mod:`.peagle_draft`), the host Llama classes
(:mod:`.llama`), checkpoints in the speculators layout (:mod:`.checkpoint`) and the training step
(:mod:`.training`). Building masks never imports this package."""
