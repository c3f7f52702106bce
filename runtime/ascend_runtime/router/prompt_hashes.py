"""A request's prompt as prefix-cache block hashes, the way the engines compute them, fast
enough to run on every request. A BlockChain says whose tokens and hashes: SimChain (the sim
engine's, kv/block_hash.py), or hf_prompts.VllmChain (vLLM's, over the model's tokenizer).

For the sim the prompt is read as pieces: each chat message is one line of the sim's chat
template, and every line (or a completion's whole prompt) is cut at the first whitespace after
every `CHUNK_CHARS` characters. The sim's tokenizer splits on whitespace, so the prompt's
tokens are its pieces' tokens one after another, and two prompts that share a prefix share
its pieces. The hash chain after each run of leading pieces is remembered (least recently
used first, bounded), so a system prompt or a conversation's history that repeats is
tokenized and hashed once, and a request pays for its new text only.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..kv.block_hash import ROOT_HASH, block_hashes
from ..sim import model

CHUNK_CHARS = 16384
"""Characters per piece of a long text (about 3,000 words): a piece costs about 25 us to
tokenize besides its length, and shared prefixes are reused a piece at a time."""

Piece = str | int
"""A prompt piece: text, or one token id (a special token the text was cut at)."""


@dataclass(frozen=True, slots=True)
class _State:
    """The chain after some leading pieces: their new hashes on top of `parent`'s."""

    parent: _State | None
    hashes: tuple[int, ...]
    tail: Any
    """The tokens after the last full block, in the chain's packed form."""
    last: Any
    """The last full block's hash in the chain's own form (its root before the first)."""
    tokens: int

    def chain(self) -> list[int]:
        parts, state = [], self
        while state is not None:
            parts.append(state.hashes)
            state = state.parent
        return [h for part in reversed(parts) for h in part]


class BlockChain(Protocol):
    """How one kind of engine turns prompt pieces into tokens, and tokens into its chain of
    block hashes."""

    root: Any
    """The parent of the first block."""
    empty: Any
    """No tokens, in the packed form."""

    def encode(self, piece: Piece) -> tuple[Any, int]:
        """The piece's tokens, packed, and their count."""
        ...

    def extend(self, last: Any, data: Any) -> tuple[tuple[int, ...], Any, Any]:
        """The full blocks of `data` chained after `last`: their hashes, the new last hash,
        and the packed tokens left over."""
        ...

    def token_hashes(self, tokens: Sequence[int]) -> list[int]:
        """The full blocks' hashes of a prompt given as token ids."""
        ...


@dataclass(frozen=True)
class SimChain:
    """The sim engine's tokens (sim/model.py) and block hashes (kv/block_hash.py)."""

    block_size: int
    root: int = ROOT_HASH
    empty: bytes = b""

    def encode(self, piece: Piece) -> tuple[bytes, int]:
        return model.packed_tokens(str(piece))

    def extend(self, last: int, data: bytes) -> tuple[tuple[int, ...], int, bytes]:
        step = 8 * self.block_size
        full = len(data) // step * step
        hashes, parent = [], last
        blake2b = hashlib.blake2b
        for offset in range(0, full, step):
            digest = blake2b(parent.to_bytes(8, "little") + data[offset : offset + step],
                             digest_size=8).digest()  # fmt: skip
            parent = int.from_bytes(digest, "little")
            hashes.append(parent)
        return tuple(hashes), parent, data[full:]

    def token_hashes(self, tokens: Sequence[int]) -> list[int]:
        # The sim gives a prompt without words one token.
        return block_hashes([int(t) for t in tokens] or model.tokenize(""), self.block_size)


def prompt_pieces(route: str, body: dict[str, Any]) -> list[str] | list[int] | None:
    """The text pieces of a request's prompt, its token ids (a list of ints), or None where
    there is no single prompt to place (a batch, or a body the engine will refuse)."""
    if route.endswith("/chat/completions"):
        messages = body.get("messages")
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages
        ):
            return None
        lines = [model.chat_line(m["role"], m.get("content")) for m in messages]
        return [piece for line in lines for piece in _chunks(line)] or None
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and not isinstance(prompt[0], int):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return list(_chunks(prompt)) or [""]
    if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
        return prompt
    return None


_CHAT_TOKENIZE_KEYS = (
    "messages", "add_generation_prompt", "continue_final_message", "add_special_tokens",
    "chat_template", "chat_template_kwargs", "tools", "mm_processor_kwargs",
)  # fmt: skip
"""The fields of a chat request that decide its tokens, as vLLM's /tokenize takes them."""


def tokenize_request(
    route: str, body: dict[str, Any]
) -> tuple[list[int] | None, dict[str, Any] | None]:
    """For engines whose tokenizer the router lacks: (the prompt's token ids, None) when the
    request gives them; (None, the body to send an engine's /tokenize) for a single text
    prompt or a chat; (None, None) where there is no single prompt to place."""
    pieces = prompt_pieces(route, body)
    if pieces is None:
        return None, None
    if pieces and not isinstance(pieces[0], str):
        return [int(t) for t in pieces], None
    if route.endswith("/chat/completions"):
        return None, {k: body[k] for k in _CHAT_TOKENIZE_KEYS if k in body}
    prompt = body["prompt"]
    text = prompt[0] if isinstance(prompt, list) else prompt
    keys = (
        {"add_special_tokens": body["add_special_tokens"]} if "add_special_tokens" in body else {}
    )
    return None, {"prompt": text, **keys}


def _chunks(text: str) -> Iterator[str]:
    """`text` cut just before the first whitespace at or after every CHUNK_CHARS characters
    (the cut positions depend only on the text before them)."""
    start, n = 0, len(text)
    while n - start > CHUNK_CHARS:
        cut = start + CHUNK_CHARS
        while cut < n and not text[cut].isspace():
            cut += 1
        yield text[start:cut]
        start = cut
    yield text[start:]


class _Key:
    """The pieces read so far: the key of those before the last, and the last. Its hash is
    computed once; equal keys are found through the stored parent key, so a lookup costs
    one piece's comparison whatever the prompt's length in pieces."""

    __slots__ = ("_hash", "parent", "piece")

    def __init__(self, parent: _Key | None, piece: Piece) -> None:
        self.parent, self.piece = parent, piece
        self._hash = hash((parent._hash if parent is not None else 0, piece))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, _Key)
            and self._hash == other._hash
            and type(self.piece) is type(other.piece)
            and self.piece == other.piece
            and (self.parent is other.parent or self.parent == other.parent)
        )


Encoded = dict[int, tuple[Any, int]]
"""Piece index -> that piece's chain.encode, worked out ahead (off the event loop)."""


@dataclass
class PromptHasher:
    """Block hashes of prompts, equal to the engines' over their tokens of the whole prompt
    (`chain_kind` says whose: the sim's by default)."""

    block_size: int
    max_bytes: int = 64 << 20
    """Roughly what the remembered states may hold (their hashes and the text of the pieces
    that keyed them); least recently used states go first past it."""
    chain_kind: BlockChain | None = None
    _states: OrderedDict[_Key, tuple[_Key, _State, int]] = field(default_factory=OrderedDict)
    _held: int = 0

    def __post_init__(self) -> None:
        if self.chain_kind is None:
            self.chain_kind = SimChain(self.block_size)

    @property
    def chain(self) -> BlockChain:
        assert self.chain_kind is not None
        return self.chain_kind

    def new_pieces(self, pieces: Sequence[Piece]) -> list[int]:
        """The indexes of the pieces past the longest run of leading pieces remembered (what
        `hashes` would encode); touches nothing."""
        key: _Key | None = None
        for i, piece in enumerate(pieces):
            cached = self._states.get(_Key(key, piece))
            if cached is None:
                return list(range(i, len(pieces)))
            key = cached[0]
        return []

    def hashes(self, pieces: Sequence[Piece], encoded: Encoded | None = None) -> list[int]:
        """The full blocks' hashes of a prompt given as pieces (text, or for the sim a list
        of token ids); `encoded` gives pieces already encoded (see new_pieces)."""
        chain = self.chain
        if isinstance(chain, SimChain) and (not pieces or not isinstance(pieces[0], str)):
            return chain.token_hashes([int(t) for t in pieces])
        key: _Key | None = None
        state = _State(None, (), chain.empty, chain.root, 0)
        for i, piece in enumerate(pieces):
            key = _Key(key, piece)
            cached = self._states.get(key)
            if cached is not None:
                self._states.move_to_end(key)
                key, state = cached[0], cached[1]
                continue
            data, count = encoded[i] if encoded and i in encoded else chain.encode(piece)
            hashes, last, tail = chain.extend(state.last, state.tail + data)
            state = _State(state, hashes, tail, last, state.tokens + count)
            self._remember(key, state, len(piece) if isinstance(piece, str) else 8)
        if state.tokens == 0:
            return chain.token_hashes([])
        return state.chain()

    def _remember(self, key: _Key, state: _State, text: int) -> None:
        tail = len(state.tail) * (1 if isinstance(state.tail, bytes) else 8)
        weight = 128 + 8 * len(state.hashes) + tail + text
        self._states[key] = (key, state, weight)
        self._held += weight
        while self._held > self.max_bytes and len(self._states) > 1:
            _, (_, _, old) = self._states.popitem(last=False)
            self._held -= old
