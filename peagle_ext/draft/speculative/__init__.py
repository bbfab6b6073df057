"""Speculative decoding with P-EAGLE and EAGLE-3 drafts, in plain PyTorch.

    target = TransformersTarget(hf_model, draft.config.eagle_aux_hidden_state_layer_ids)
    result = speculative_generate(target, draft, prompts, num_speculative_tokens=5, max_new_tokens=64)
    result.acceptance_length, result.rows[0].generated_ids

Each step, the draft proposes K tokens and the target checks them in one forward over
``[last token, K proposals]`` (with its KV cache); the accepted prefix and the target's own next
token are appended, and the auxiliary hidden states of that same forward feed the draft's next
step. A P-EAGLE draft (``parallel_drafting``) proposes the K tokens in one forward; an EAGLE-3
draft runs K forwards, one token each.

The draft's inputs are laid out as vLLM 0.33's proposer lays them out (its
``copy_and_expand_eagle_inputs_kernel`` with shifted input ids, then ``mask_hidden`` on the
masked slots): the slot of target position p holds the token at p + 1 (for the last accepted
position: the target's next token, the "bonus" token) with the target's states at p, projected
by ``fc`` (``combine_hidden_states``), at position p; the K - 1 slots after the bonus slot hold
``mask_token_id`` and the projected ``mask_hidden``, at the positions that follow. The proposals
are the draft's tokens at the bonus slot and at the masked slots, mapped to target ids through
``d2t``. Slots of rejected proposals are holes (kept out of every cache), as vLLM's padding slots
are. An EAGLE-3 draft's later steps read its own previous token and its own output state (the
pre-norm state; the post-norm one with ``norm_output``), one position further, as vLLM's loop.

Verification is greedy (``temperature == 0``: a proposal is accepted when it is the target's
argmax, so the output is the target's own greedy decode) or sampled with the standard rejection
rule (accept proposal x with probability min(1, p(x) / q(x)), else draw from the normalized
max(p - q, 0); a bonus draw from p when all are accepted), which keeps the target's distribution.
Greedy decoding also verifies the draft's next-best first tokens (``alternatives``, 2 by default)
in the same forward, as a tree beside the chain: a row whose first proposal is rejected keeps an
alternative that equals the target's token, and the target's token after it. It also verifies
prompt-lookup branches (``lookup``, reaching 5 tokens by default): what followed earlier
occurrences of the context's last tokens (:mod:`.lookup`), two continuations after the step's first
token and one after the first proposal; with a :class:`ContinuationIndex` (``index``; ``train``
writes one of the training responses beside the draft), also the continuation that most often
followed the context's last tokens in those responses. Each row keeps its deepest accepted path
(``tree_verify``).

Targets (:mod:`.targets`, one small interface): :class:`TransformersTarget` (any transformers
causal LM; the auxiliary states are ``output_hidden_states[l]`` for the draft's layer ids l: the
input of decoder layer l, which is what vLLM captures) and :class:`TokenwiseTarget` (a module whose
outputs at a position depend on that position's token alone, such as the demo's tiny target).
Several prompts decode as one batch: each row keeps its own positions. The target's cache is
cropped to the longest accepted prefix after each step (at batch 1: exactly the accepted tokens);
what a row rejected but another row kept stays as a hole that the attention mask hides.

Modules: :mod:`.slots` (the draft's inputs), :mod:`.draft` (its cache, forward and proposals),
:mod:`.targets`, :mod:`.verify`, :mod:`.lookup`, :mod:`.loop` (the loop, the plain baseline, the input checks),
:mod:`.measure` (both on the same prompts, as a report).
"""

from .draft import DRAFT_DTYPES, DraftCache, draft_for_decoding, draft_forward, native_bfloat16_cpu, propose
from .lookup import ContinuationIndex, prompt_lookup, prompt_lookups
from .loop import (
    DEFAULT_ALTERNATIVES,
    DEFAULT_LOOKUP,
    GREEDY_BELOW_TEMPERATURE,
    RowResult,
    SpeculativeResult,
    check_decode,
    speculative_generate,
    target_generate,
)
from .measure import TIE_TOLERANCE, first_difference, measure, output_agreement
from .slots import DraftSlots, draft_slots
from .targets import Target, TokenwiseTarget, TransformersTarget, left_pad
from .verify import draw, greedy_verify, next_tokens, rejection_verify, tree_verify, tree_visibility

__all__ = [
    "DEFAULT_ALTERNATIVES", "DEFAULT_LOOKUP", "DRAFT_DTYPES", "GREEDY_BELOW_TEMPERATURE", "TIE_TOLERANCE",
    "ContinuationIndex", "DraftCache", "DraftSlots", "RowResult", "SpeculativeResult", "Target", "TokenwiseTarget",
    "TransformersTarget",
    "check_decode", "draft_for_decoding", "draft_forward", "draft_slots", "draw", "first_difference",
    "greedy_verify", "left_pad", "measure", "native_bfloat16_cpu", "next_tokens", "output_agreement",
    "prompt_lookup", "prompt_lookups", "propose", "rejection_verify", "speculative_generate", "target_generate",
    "tree_verify", "tree_visibility",
]
