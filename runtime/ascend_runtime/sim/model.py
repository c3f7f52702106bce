"""The sim engine's stand-in for a network: a tokenizer and a deterministic next-token rule.

The "hidden state" after each token is a 64-bit rolling hash of every token so far; the next
token is drawn from that state (greedy at temperature 0, seeded otherwise). The KV a sim rank
holds encodes these states (`sim.pd`), so a decode instance that pulls a prefill instance's
blocks continues exactly where a unified instance would: outputs match across layouts.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Any

from . import tokenizer

VOCAB = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "a",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "be",
    "by",
    "on",
    "not",
    "he",
    "this",
    "are",
    "or",
    "his",
    "from",
    "at",
    "which",
    "but",
    "have",
    "an",
    "they",
    "you",
    "were",
    "her",
    "she",
    "there",
    "one",
    "all",
    "we",
    "their",
    "can",
    "has",
    "been",
    "more",
    "when",
    "will",
    "would",
    "who",
    "so",
    "no",
    "if",
    "out",
    "time",
    "up",
    "about",
    "into",
    "than",
    "them",
    "only",
    "other",
    "new",
    "some",
    "could",
    "these",
    "two",
    "may",
    "first",
    "then",
    "do",
    "any",
    "like",
    "my",
    "now",
    "over",
    "such",
    "our",
    "man",
    "me",
    "even",
    "most",
    "made",
    "after",
    "also",
    "did",
    "many",
    "before",
    "must",
    "through",
    "back",
    "years",
    "where",
    "much",
    "your",
    "way",
    "well",
    "down",
    "should",
    "because",
    "each",
    "just",
    "those",
    "people",
    "how",
    "too",
    "little",
    "state",
    "good",
    "very",
    "make",
    "world",
    "still",
    "own",
    "see",
    "men",
    "work",
    "long",
    "here",
    "get",
    "both",
    "between",
    "life",
    "being",
    "under",
    "never",
    "day",
    "same",
    "another",
    "know",
    "while",
    "last",
    "might",
    "us",
    "great",
    "old",
    "year",
    "off",
    "come",
    "since",
    "against",
    "go",
    "came",
    "right",
    "used",
    "take",
    "three",
    "Ascend",
    "NPU",
    "model",
    "token",
    "cache",
    "block",
    "prefill",
    "decode",
    "router",
    "serve",
    "graph",
    "tensor",
    "expert",
]


def tokenize(text: str) -> list[int]:
    """Whitespace-separated words (str.split: the same words as the regex \\S+), each hashed
    to a token id (sim/tokenizer.py); at least one token."""
    return tokenizer.token_ids(text).tolist() or [0]


def packed_tokens(text: str) -> tuple[bytes, int]:
    """The tokens of `text` packed as little-endian 64-bit integers (what block hashes are
    computed over), and their count; no tokens for a text without words (unlike tokenize)."""
    ids = tokenizer.token_ids(text)
    return ids.astype("<u8", copy=False).tobytes(), len(ids)


def chat_line(role: str, content: Any) -> str:
    """The sim's chat template: one `role: content` line per message (text parts of a list
    content joined by spaces; other parts ignored)."""
    if content is None:
        text = ""
    elif isinstance(content, str):
        text = content
    elif isinstance(content, list):
        text = " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    else:
        text = str(content)
    return f"{role}: {text}"


def initial_state(seed: int) -> int:
    return int.from_bytes(
        hashlib.blake2b(struct.pack("<q", seed), digest_size=8).digest(), "little"
    )


def advance(state: int, token: int) -> int:
    """The state after one more token."""
    digest = hashlib.blake2b(
        struct.pack("<QQ", state, token & 0xFFFFFFFFFFFFFFFF), digest_size=8
    ).digest()
    return int.from_bytes(digest, "little")


def states(seed: int, tokens: list[int]) -> list[int]:
    """The state after each token (what the KV cache holds for it)."""
    out, state = [], initial_state(seed)
    for token in tokens:
        state = advance(state, token)
        out.append(state)
    return out


def next_token(state: int, temperature: float, sample_seed: int, position: int) -> int:
    """Greedy at temperature 0; otherwise a seeded draw that depends on the position."""
    if temperature == 0:
        return state % len(VOCAB)
    mixed = advance(state ^ (sample_seed & 0xFFFFFFFFFFFFFFFF), position)
    return mixed % len(VOCAB)


def detokenize(token: int) -> str:
    return VOCAB[token % len(VOCAB)]
