"""Lookups that greedy decoding verifies as branches beside the draft's chain in the same target
forward: in the context itself (prompt lookup: what followed an earlier occurrence of its last
tokens) and in a body of earlier text (:class:`ContinuationIndex`: what most often followed them
in the draft's training responses)."""

from __future__ import annotations

import math
import pickle

import torch

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


# How many tokens an index keeps after each n-gram by default (the lookup branches' default reach).
INDEX_LENGTH = 5
# The longest n-gram an index keys on by default (shorter ones too, down to one token); on
# SmolLM2-135M's held-out prompts keys of 3 tokens found a little less, of 6 no more.
INDEX_LONGEST_KEY = 4
# The share of a key's occurrences below which a continuation is cut by default. Replayed over
# SmolLM2-135M's held-out decodes (an index of 432K training response tokens): 0 added 4.4 tokens
# a step to the tree for +0.17 tokens per forward, 0.3 added 2.5 for +0.17, 0.5 added 1.9 for
# +0.16; decoded, 0.3 was 2-3% faster than 0.
INDEX_MIN_SHARE = 0.3
# The index's file in a draft's checkpoint folder (a torch.save file: loaders of the weights read *.safetensors).
INDEX_FILE = "continuations.pt"


class ContinuationIndex:
    """What most often followed every n-gram of 1 to ``longest_key`` tokens in a body of token
    sequences, up to ``length`` tokens, token by token (each the most frequent after the key and
    the tokens before it), with the share of the key's occurrences that each prefix of it
    followed. A draft's training sequences hold what the target itself answered, and its phrasing
    recurs in answers to other prompts: greedy decoding verifies the continuation of a context's
    longest indexed suffix as one more branch (``speculative_generate(..., index=)``). Keys are
    stored as integers (one base-``base`` digit per token), so the longest key is cut to what 63
    bits hold for this vocabulary."""

    def __init__(self, keys: list[torch.Tensor], continuations: list[torch.Tensor], shares: list[torch.Tensor],
                 base: int, min_share: float = INDEX_MIN_SHARE):
        # per key length n (index n - 1): the sorted codes of the n-grams [M], their continuations
        # [M, length] (-1 past the end) and the share of the key's occurrences each prefix followed [M, length]
        self.keys, self.continuations, self.shares, self.base = keys, continuations, shares, base
        self.min_share = min_share  # what lookup() keeps by default: a decoding choice, not saved

    @property
    def length(self) -> int:
        return self.continuations[0].shape[1]

    @property
    def longest_key(self) -> int:
        return len(self.keys)

    @classmethod
    def build(cls, sequences, length: int = INDEX_LENGTH, longest_key: int = INDEX_LONGEST_KEY) -> ContinuationIndex:
        """The index of ``sequences`` (lists or 1-D tensors of token ids; an n-gram never spans two)."""
        for name, value in (("length", length), ("longest_key", longest_key)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        sequences = [torch.as_tensor(s, dtype=torch.int64).flatten() for s in sequences]
        sequences = [s for s in sequences if s.numel() > 1]
        if not sequences:
            raise ValueError("sequences: no sequence of two or more tokens to index")
        if any(bool((s < 0).any()) for s in sequences):
            raise ValueError("sequences: token ids must be >= 0")
        base = 1 + max(int(s.max()) for s in sequences)
        longest_key = max(1, min(longest_key, int(63 / math.log2(max(base, 2)))))
        gap = torch.full((longest_key + length,), -1, dtype=torch.int64)  # no window spans two sequences
        flat = torch.cat([part for s in sequences for part in (s, gap)])
        keys, continuations, shares = [], [], []
        for n in range(1, longest_key + 1):
            windows = flat.unfold(0, n + length, 1)
            windows = windows[(windows[:, :n + 1] >= 0).all(1)]  # a whole key and a token after it
            after = windows[:, n:]
            windows = torch.cat([windows[:, :n], after.masked_fill((after < 0).cummax(1).values, -1)], 1)
            codes, tokens, share = cls._walk(*torch.unique(windows, dim=0, return_counts=True), n, base)
            keys.append(codes)
            continuations.append(tokens)
            shares.append(share)
        return cls(keys, continuations, shares, base)

    @staticmethod
    def _walk(rows: torch.Tensor, counts: torch.Tensor, n: int, base: int):
        """For the distinct windows ``rows`` [R, n + length] (sorted) and their ``counts``: each
        key's code, its continuation token by token and each prefix's share of the key's count."""
        if not rows.numel():  # no n-gram this long with a token after it
            return (torch.zeros(0, dtype=torch.int64), torch.zeros(0, rows.shape[1] - n, dtype=torch.int32),
                    torch.zeros(0, rows.shape[1] - n))
        boundary = torch.zeros(rows.shape[0], dtype=torch.bool)
        boundary[0] = True
        chosen = key_count = codes = None
        tokens, shares = [], []
        for m in range(1, rows.shape[1] + 1):  # groups of rows that share their first m tokens
            parent = boundary.cumsum(0) - 1  # the row's group at m - 1 tokens
            boundary = boundary.clone()
            boundary[1:] |= rows[1:, m - 1] != rows[:-1, m - 1]
            first = boundary.nonzero().squeeze(1)  # each group's first row
            group = boundary.cumsum(0) - 1
            count = torch.zeros(first.numel(), dtype=counts.dtype).index_add_(0, group, counts)
            if m == n:
                codes = torch.zeros(first.numel(), dtype=torch.int64)
                for column in rows[first, :n].unbind(1):
                    codes = codes * base + column
                chosen, key_count = torch.arange(first.numel()), count
            elif m > n:
                token = rows[first, m - 1]
                # the most frequent next token in each parent group (an end of sequence never)
                score = torch.where(token >= 0, count, -1)
                parents = parent[first]
                best = torch.full((int(parents.max()) + 1,), -2, dtype=score.dtype).scatter_reduce(
                    0, parents, score, "amax")
                winner = torch.full_like(best, first.numel()).scatter_reduce(
                    0, parents, torch.where(score == best[parents], torch.arange(first.numel()), first.numel()),
                    "amin")
                chosen = winner[chosen]
                tokens.append(token[chosen])
                shares.append(count[chosen].float() / key_count)
        return codes, torch.stack(tokens, 1).to(torch.int32), torch.stack(shares, 1)

    def lookup(self, context: list[int], length: int | None = None, min_share: float | None = None) -> list[int]:
        """Up to ``length`` (default: all kept) tokens that followed the longest suffix of
        ``context`` that the index holds, as long as each prefix followed at least ``min_share``
        (default: ``self.min_share``) of that suffix's occurrences; [] where not even its last token
        is held."""
        length = self.length if length is None else min(length, self.length)
        min_share = self.min_share if min_share is None else min_share
        code, end = 0, len(context)
        at = None
        for n in range(1, min(self.longest_key, end) + 1):  # codes of ever longer suffixes
            token = context[end - n]
            if not 0 <= token < self.base:
                break
            code += token * self.base ** (n - 1)
            keys = self.keys[n - 1]
            place = int(torch.searchsorted(keys, code))
            if place == keys.numel() or int(keys[place]) != code:
                break  # no longer suffix that ends with this one is indexed either
            at = (n - 1, place)
        if at is None:
            return []
        tokens = self.continuations[at[0]][at[1], :length].tolist()
        shares = self.shares[at[0]][at[1], :length].tolist()
        kept = 0
        while kept < len(tokens) and tokens[kept] >= 0 and shares[kept] >= min_share:
            kept += 1
        return tokens[:kept]

    def save(self, path: str) -> None:
        """Write the index to ``path`` (a ``torch.save`` file of tensors and one int)."""
        torch.save({"base": self.base, "keys": self.keys, "continuations": self.continuations, "shares": self.shares},
                   path)

    @classmethod
    def load(cls, path: str) -> ContinuationIndex:
        """An index written by :meth:`save`; a ValueError naming ``path`` where the file is not one."""
        try:
            data = torch.load(path, weights_only=True)
            base, keys = data["base"], list(data["keys"])
            continuations, shares = list(data["continuations"]), list(data["shares"])
        except (OSError, RuntimeError, KeyError, TypeError, pickle.UnpicklingError) as error:
            raise ValueError(f"{path}: not a continuation index ({error})") from None
        wrong = None
        if (not isinstance(base, int) or isinstance(base, bool) or base < 1 or not keys
                or not len(keys) == len(continuations) == len(shares)):
            wrong = "its base or its number of key lengths"
        for n, (codes, after, share) in enumerate(zip(keys, continuations, shares), 1):
            if wrong:
                break
            if not (isinstance(codes, torch.Tensor) and codes.dtype == torch.int64 and codes.dim() == 1 and
                    isinstance(after, torch.Tensor) and after.dtype == torch.int32 and after.dim() == 2 and
                    after.shape[0] == codes.numel() and after.shape[1] == continuations[0].shape[1] > 0 and
                    isinstance(share, torch.Tensor) and share.dtype == torch.float32 and share.shape == after.shape):
                wrong = f"the tensors of its {n}-token keys"
            elif math.log2(max(base, 2)) * n > 63 or codes.numel() and (
                    bool((codes[1:] <= codes[:-1]).any()) or int(codes[0]) < 0):
                wrong = f"its {n}-token keys (not increasing, or not codes of {n} tokens)"
            elif after.numel() and (int(after.min()) < -1 or int(after.max()) >= base):
                wrong = f"its continuations after {n}-token keys (token ids outside [0, {base}))"
        if wrong:
            raise ValueError(f"{path}: not a continuation index: {wrong}")
        return cls(keys, continuations, shares, base)
