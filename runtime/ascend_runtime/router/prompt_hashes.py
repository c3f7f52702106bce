"""A request's prompt as prefix-cache block hashes, the way the engines compute them
(kv/block_hash.py over the sim engine's tokens), fast enough to run on every request.

The prompt is read as pieces: each chat message is one line of the sim's chat template, and
every line (or a completion's whole prompt) is cut at the first whitespace after every
`CHUNK_CHARS` characters. The sim's tokenizer splits on whitespace, so the prompt's tokens are
its pieces' tokens one after another, and two prompts that share a prefix share its pieces.
The hash chain after each run of leading pieces is remembered (least recently used first,
bounded), so a system prompt or a conversation's history that repeats is tokenized and hashed
once, and a request pays for its new text only.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..kv.block_hash import ROOT_HASH, block_hashes
from ..sim import model

CHUNK_CHARS = 16384
"""Characters per piece of a long text (about 3,000 words): a piece costs about 25 us to
tokenize besides its length, and shared prefixes are reused a piece at a time."""

_Key = tuple[Any, ...]
"""The pieces read so far, as nested pairs (previous key, piece)."""


@dataclass(frozen=True, slots=True)
class _State:
    """The chain after some leading pieces: their new hashes on top of `parent`'s."""

    parent: _State | None
    hashes: tuple[int, ...]
    tail: bytes
    """Packed tokens after the last full block."""
    last: int
    """The last full block's hash (ROOT_HASH before the first)."""
    tokens: int

    def chain(self) -> list[int]:
        parts, state = [], self
        while state is not None:
            parts.append(state.hashes)
            state = state.parent
        return [h for part in reversed(parts) for h in part]


_EMPTY = _State(None, (), b"", ROOT_HASH, 0)


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


@dataclass
class PromptHasher:
    """Block hashes of prompts, equal to kv.block_hash.block_hashes over the engine's tokens."""

    block_size: int
    max_bytes: int = 64 << 20
    """Roughly what the remembered states may hold (their hashes and the text of the pieces
    that keyed them); least recently used states go first past it."""
    _states: OrderedDict[_Key, tuple[_State, int]] = field(default_factory=OrderedDict)
    _held: int = 0

    def hashes(self, pieces: Sequence[str] | Sequence[int]) -> list[int]:
        """The full blocks' hashes of a prompt given as text pieces (or as token ids)."""
        if not pieces or not isinstance(pieces[0], str):
            return block_hashes([int(t) for t in pieces], self.block_size)
        key: _Key = ()
        state = _EMPTY
        for piece in pieces:
            key = (key, piece)
            cached = self._states.get(key)
            if cached is not None:
                self._states.move_to_end(key)
                state = cached[0]
                continue
            state = self._extend(state, *model.packed_tokens(str(piece)))
            self._remember(key, state, len(piece))
        if state.tokens == 0:  # the engine gives a prompt without words one token
            return block_hashes(model.tokenize(""), self.block_size)
        return state.chain()

    def _extend(self, state: _State, data: bytes, count: int) -> _State:
        data = state.tail + data
        step = 8 * self.block_size
        full = len(data) // step * step
        hashes, parent = [], state.last
        blake2b = hashlib.blake2b
        for offset in range(0, full, step):
            digest = blake2b(parent.to_bytes(8, "little") + data[offset : offset + step],
                             digest_size=8).digest()  # fmt: skip
            parent = int.from_bytes(digest, "little")
            hashes.append(parent)
        return _State(state, tuple(hashes), data[full:], parent, state.tokens + count)

    def _remember(self, key: _Key, state: _State, text: int) -> None:
        weight = 128 + 8 * len(state.hashes) + len(state.tail) + text
        self._states[key] = (state, weight)
        self._held += weight
        while self._held > self.max_bytes and len(self._states) > 1:
            _, (_, old) = self._states.popitem(last=False)
            self._held -= old
