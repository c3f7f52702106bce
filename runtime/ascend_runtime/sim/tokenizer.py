"""The sim engine's tokenizer: whitespace-separated words (str.split's words), each hashed
to a 32-bit token id. The engine and the router both tokenize with it; the router does so on
every request, so ASCII text (nearly all prompts) is tokenized in bulk with numpy: an 8k-word
prompt in a few hundred microseconds, where one dictionary lookup per word took milliseconds.

A word's id: v = sum over its UTF-8 bytes c_i of (c_i + 1) * P**i (mod 2**64), mixed by a
multiplication, high 32 bits. Over the whole text, prefix sums of (c + 1) * P**position give
every word's v with one subtraction and one multiplication by P**-start, so no per-word Python
runs. Other text goes word by word through the same formula (memoized)."""

from __future__ import annotations

import numpy as np

_M = (1 << 64) - 1
_P = 0x100000001B3  # odd, so invertible modulo 2**64
_P_INV = pow(_P, -1, 1 << 64)
_MIX = 0x9E3779B97F4A7C15

_IS_SPACE = np.zeros(256, dtype=bool)
_IS_SPACE[[9, 10, 11, 12, 13, 28, 29, 30, 31, 32]] = True  # what str.split() splits on in ASCII

_SEGMENT = 1 << 20
"""Longest run of text tokenized at once (the power tables grow to it, 16 MB)."""
_TABLES = {"powers": np.ones(1, dtype=np.uint64), "inverse": np.ones(1, dtype=np.uint64)}
"""P**i and P**-i (mod 2**64) for the positions of the longest text seen so far."""

_IDS: dict[str, int] = {}
"""Ids of words seen in non-ASCII text (bounded: cleared past _MAX_IDS)."""
_MAX_IDS = 1 << 18


def word_id(word: str) -> int:
    """The id of one word (the formula above, one byte at a time)."""
    # surrogatepass: JSON may carry a lone surrogate (\ud800); it is text, not an error
    value, power = 0, 1
    for c in word.encode("utf-8", "surrogatepass"):
        value = (value + (c + 1) * power) & _M
        power = (power * _P) & _M
    return ((value * _MIX) & _M) >> 32


def token_ids(text: str) -> np.ndarray:
    """The ids of the words of `text` (uint64; empty for a text without words)."""
    if not text.isascii():
        return np.array([_memo(w) for w in text.split()], dtype=np.uint64)
    data = text.encode("ascii")
    if len(data) <= _SEGMENT:
        return _ascii_ids(data)
    parts, start = [], 0
    while start < len(data):  # cut at a space so that no word straddles two runs
        end = min(start + _SEGMENT, len(data))
        while end < len(data) and not _IS_SPACE[data[end]]:
            end += 1
        parts.append(_ascii_ids(data[start:end]))
        start = end
    return np.concatenate(parts)


def _memo(word: str) -> int:
    found = _IDS.get(word)
    if found is None:
        if len(_IDS) > _MAX_IDS:
            _IDS.clear()
        found = _IDS[word] = word_id(word)
    return found


def _tables(n: int) -> tuple[np.ndarray, np.ndarray]:
    if len(_TABLES["powers"]) < n:
        size = max(n, min(2 * len(_TABLES["powers"]), _SEGMENT + 1))
        for base, name in ((_P, "powers"), (_P_INV, "inverse")):
            steps = np.full(size, base, dtype=np.uint64)
            steps[0] = 1
            _TABLES[name] = np.cumprod(steps, dtype=np.uint64)
    return _TABLES["powers"][:n], _TABLES["inverse"][:n]


def _ascii_ids(data: bytes) -> np.ndarray:
    codes = np.frombuffer(data, dtype=np.uint8)
    n = len(codes)
    space = _IS_SPACE[codes]
    powers, inverse = _tables(n)
    terms = (codes.astype(np.uint64) + 1) * powers
    terms[space] = 0
    sums = np.zeros(n + 1, dtype=np.uint64)
    np.cumsum(terms, out=sums[1:])
    edges = np.ones(n + 2, dtype=np.int8)
    edges[1:-1] = space
    change = np.diff(edges)
    starts, ends = np.flatnonzero(change == -1), np.flatnonzero(change == 1)
    values = (sums[ends] - sums[starts]) * inverse[starts]
    return (values * np.uint64(_MIX)) >> np.uint64(32)
