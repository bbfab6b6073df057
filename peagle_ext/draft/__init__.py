"""The P-EAGLE draft model: the host Llama classes (:mod:`.llama`, with the P-EAGLE mixins of
:mod:`peagle_ext.peagle_draft`), checkpoints in speculators' and NeMo Automodel's layouts
(:mod:`.checkpoint`), the training step (:mod:`.training`) and speculative decoding
(:mod:`.speculative`). Building masks never imports this package."""
