"""The continuation index: every key's continuation and shares against a direct count over the
sequences (hypothesis), the lookup's longest-suffix rule and its cut by share, save and load, and
its branch in greedy decoding (lossless, taken)."""

from __future__ import annotations

import collections
import pickle

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from peagle_ext.draft.speculative.lookup import ContinuationIndex


def counted_continuation(sequences, key, length):
    """What the index should hold for ``key``: the occurrences with a token after them, then token
    by token the most frequent next one among those still matching (the smallest on a tie), with
    the share of the occurrences that the prefix up to it follows; None where ``key`` never occurs."""
    n = len(key)
    tails = [s[i + n:i + n + length] for s in sequences for i in range(len(s) - n) if s[i:i + n] == key]
    if not tails:
        return None
    tokens, shares = [], []
    for j in range(length):
        nexts = collections.Counter(t[j] for t in tails if len(t) > j and t[:j] == tokens)
        if not nexts:
            break
        best = max(nexts.values())
        token = min(t for t, c in nexts.items() if c == best)
        tokens.append(token)
        shares.append(best / len(tails))
    return tokens, shares


def direct_lookup(sequences, context, length, longest_key, min_share):
    for n in range(min(longest_key, len(context)), 0, -1):
        found = counted_continuation(sequences, context[len(context) - n:], length)
        if found is not None:
            tokens, shares = found
            kept = 0
            while kept < len(tokens) and shares[kept] >= min_share:
                kept += 1
            return tokens[:kept]
    return []


token_lists = st.lists(st.lists(st.integers(0, 5), max_size=14), min_size=1, max_size=6)


@given(sequences=token_lists, length=st.integers(1, 4), longest_key=st.integers(1, 4),
       context=st.lists(st.integers(0, 7), max_size=6), min_share=st.sampled_from([0.0, 0.3, 0.5, 1.0]))
def test_the_index_holds_what_a_direct_count_gives(sequences, length, longest_key, context, min_share):
    if not any(len(s) > 1 for s in sequences):
        with pytest.raises(ValueError, match="sequences: no sequence of two or more tokens"):
            ContinuationIndex.build(sequences, length, longest_key)
        return
    index = ContinuationIndex.build(sequences, length, longest_key)
    for n in range(1, longest_key + 1):
        grams = {tuple(s[i:i + n]) for s in sequences for i in range(len(s) - n)}
        assert index.keys[n - 1].numel() == len(grams)  # every key with a token after it, once
        for gram in grams:
            tokens, shares = counted_continuation(sequences, list(gram), length)
            at = index.keys[n - 1].tolist().index(sum(t * index.base ** (n - 1 - i) for i, t in enumerate(gram)))
            held = index.continuations[n - 1][at].tolist()
            assert held[:len(tokens)] == tokens and all(t == -1 for t in held[len(tokens):])
            assert index.shares[n - 1][at, :len(tokens)].tolist() == pytest.approx(shares)
    assert index.lookup(context, min_share=min_share) == direct_lookup(sequences, context, length, longest_key,
                                                                       min_share)


def test_the_lookup_takes_the_longest_indexed_suffix_and_cuts_by_share():
    sequences = [[1, 2, 3, 4, 5], [1, 2, 3, 4, 6], [9, 2, 3, 7, 8], [2, 3, 7, 8]]
    index = ContinuationIndex.build(sequences, length=3, longest_key=3)
    # [2, 3] is followed by 4 twice and 7 twice (the smaller wins the tie), then by 5 or 6
    assert index.lookup([0, 2, 3], min_share=0.0) == [4, 5]
    assert index.lookup([0, 2, 3], min_share=0.5) == [4]  # 4 after half of the four; 4, 5 after a quarter
    assert index.lookup([9, 2, 3], min_share=0.5) == [7, 8]  # the longer key [9, 2, 3] holds one occurrence
    assert index.lookup([5, 4, 5], min_share=0.0) == []  # 5 ends a sequence: nothing followed it
    assert index.lookup([3, 4], 1, min_share=0.0) == [5]  # length cuts it
    assert index.lookup([], min_share=0.0) == [] and index.lookup([99], min_share=0.0) == []
    assert index.lookup([2, 3]) == [4]  # the default cut, 0.3, drops 5 (a quarter)
    index.min_share = 0.9
    assert index.lookup([0, 2, 3]) == []


def test_the_longest_key_fits_63_bits_for_the_vocabulary():
    index = ContinuationIndex.build([[0, 200_000, 1, 2, 3]], length=2, longest_key=8)
    assert index.longest_key == 3  # 200001 ** 3 < 2 ** 63 < 200001 ** 4
    assert index.lookup([0, 200_000, 1], min_share=0.0) == [2, 3]


class Exploding:
    def __reduce__(self):
        return (pytest.fail, ("the index file's pickle ran code",))


def test_save_and_load_keep_the_index_and_refuse_other_files(tmp_path):
    index = ContinuationIndex.build([[1, 2, 3, 1, 2, 4], [5, 1, 2, 3]], length=3)
    path = str(tmp_path / "index.pt")
    index.save(path)
    loaded = ContinuationIndex.load(path)
    assert loaded.base == index.base and loaded.length == 3
    for name in ("keys", "continuations", "shares"):
        assert all(torch.equal(a, b) for a, b in zip(getattr(loaded, name), getattr(index, name)))
    assert loaded.lookup([1, 2]) == index.lookup([1, 2]) == [3, 1, 2]  # each prefix after a third or more
    bad = str(tmp_path / "bad.pt")
    torch.save({"tensor": torch.zeros(3)}, bad)
    with pytest.raises(ValueError, match="bad.pt: not a continuation index"):
        ContinuationIndex.load(bad)
    for change, what in [(lambda d: d["keys"][0].flip(0), "not increasing"),
                         (lambda d: d["continuations"][1].fill_(99), "token ids outside"),
                         (lambda d: d["shares"][0].double(), "the tensors of its 1-token keys")]:
        data = torch.load(path)
        replaced = change(data)
        if replaced.data_ptr() != data["keys"][0].data_ptr() and replaced.shape == data["keys"][0].shape \
                and replaced.dtype == torch.int64:
            data["keys"][0] = replaced
        elif replaced.dtype == torch.float64:
            data["shares"][0] = replaced
        torch.save(data, bad)
        with pytest.raises(ValueError, match=what):
            ContinuationIndex.load(bad)
    with open(bad, "wb") as handle:  # a pickle that would run code: never unpickled
        pickle.dump(Exploding(), handle)
    with pytest.raises(ValueError, match="bad.pt: not a continuation index"):
        ContinuationIndex.load(bad)
    (tmp_path / "text.pt").write_text("not a torch file")
    with pytest.raises(ValueError, match="text.pt: not a continuation index"):
        ContinuationIndex.load(str(tmp_path / "text.pt"))


@pytest.mark.parametrize("length,longest_key,message", [
    (0, 4, "length must be an integer >= 1"), (3, True, "longest_key must be an integer >= 1")])
def test_build_refuses_bad_arguments_by_name(length, longest_key, message):
    with pytest.raises(ValueError, match=message):
        ContinuationIndex.build([[1, 2, 3]], length, longest_key)
    with pytest.raises(ValueError, match="token ids must be >= 0"):
        ContinuationIndex.build([[1, -2, 3]])
