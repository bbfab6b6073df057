"""Prompt lookup: tokens that followed an earlier occurrence of the context's last tokens, which
greedy decoding verifies as branches beside the draft's chain in the same target forward."""

from __future__ import annotations

# The longest suffix of the context that is looked for (then shorter ones, down to one token): on
# SmolLM2-135M's held-out prompts, keys of up to 4 or 6 tokens found no more accepted tokens than 3.
LONGEST_KEY = 3


def prompt_lookups(context: list[int], length: int, count: int, longest_key: int = LONGEST_KEY) -> list[list[int]]:
    """Up to ``count`` different continuations of up to ``length`` tokens: what followed the
    earlier occurrences of the last n tokens of ``context``, the latest first, for n =
    ``longest_key`` down to 1 (a longer key's before a shorter one's); [] where none occurs."""
    end, found = len(context), []
    for n in range(min(longest_key, end - 1), 0, -1):
        key = context[end - n:]
        first = key[0]
        for start in range(end - n - 1, -1, -1):
            if context[start] == first and context[start:start + n] == key:
                tokens = context[start + n:start + n + length]
                if tokens not in found:
                    found.append(tokens)
                    if len(found) == count:
                        return found
    return found


def prompt_lookup(context: list[int], length: int, longest_key: int = LONGEST_KEY) -> list[int]:
    """The first of :func:`prompt_lookups`: up to ``length`` tokens that followed the latest earlier
    occurrence of the longest suffix of ``context`` (up to ``longest_key`` tokens) that occurred
    before; [] where none did."""
    found = prompt_lookups(context, length, 1, longest_key)
    return found[0] if found else []
