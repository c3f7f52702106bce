"""Prompts tokenized in the router with the model's own tokenizer, for kv-aware routing over
vLLM engines without a /tokenize round trip per request.

The tokenizer is the model directory's (or Hugging Face cache's) files, loaded with
transformers as vLLM loads them; chats go through the same `apply_chat_template`. The rendered
text is cut at the tokenizer's added tokens (`<|im_start|>`, `<|im_end|>`, ...): the
tokenizer splits there before anything else, so the pieces' tokens one after another are the
whole text's, and a system prompt or a conversation's history that repeats is tokenized and
hashed once (prompt_hashes.PromptHasher remembers the chain after each run of pieces). The cut
is checked against whole-text tokenization when the tokenizer loads, and the router checks a
sample of requests against an engine's /tokenize (router/kv_routing.py).

Requests this cannot reproduce exactly (tools, a request's own chat template, content parts
other than one text, message fields besides role and content) return None: the router then
asks an engine's /tokenize, as it does without a tokenizer.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..kv.vllm_hash import VllmBlockHasher
from .prompt_hashes import Piece

_CHAT_DEFAULTS = {
    "add_generation_prompt": True, "continue_final_message": False, "add_special_tokens": False,
}  # fmt: skip
"""vLLM's defaults for a chat request's fields that change its tokens."""
_CHAT_FIELDS = frozenset(_CHAT_DEFAULTS) | {"chat_template_kwargs"}
_UNSUPPORTED = ("tools", "chat_template", "documents", "mm_processor_kwargs", "prompt_embeds")
"""Chat or completion fields whose tokens only the engine can say."""

_PROBES = (
    "", " ", "a", "  two  spaces ", "line\nbreak\n\n",
    "\tTabs\tand caf\u00e9 \u6f22\u5b57 \U0001f600", "x" * 300, "end with space ",
    "0123456789 3.14 -1e9", "CamelCase snake_case kebab-case",
)  # fmt: skip
"""Texts around which the added tokens are put when the tokenizer loads, to check the cut."""


@dataclass(frozen=True)
class VllmChain:
    """prompt_hashes.BlockChain for vLLM engines: pieces tokenized by the model's tokenizer
    (token-id pieces as themselves), blocks hashed as vLLM does (kv/vllm_hash.py)."""

    block_size: int
    hasher: VllmBlockHasher
    prompts: HfPrompts
    empty: tuple[int, ...] = ()

    @property
    def root(self) -> bytes:
        return self.hasher.none_hash

    def encode(self, piece: Piece) -> tuple[tuple[int, ...], int]:
        ids = self.prompts.encode(piece)
        return ids, len(ids)

    def extend(
        self, last: bytes, data: tuple[int, ...]
    ) -> tuple[tuple[int, ...], bytes, tuple[int, ...]]:
        full = len(data) // self.block_size * self.block_size
        hashes, last = self.hasher.chain(last, data[:full], self.block_size)
        return tuple(hashes), last, data[full:]

    def token_hashes(self, tokens: Sequence[int]) -> list[int]:
        return self.hasher.block_hashes(tokens, self.block_size)


class HfPrompts:
    """A request's prompt as pieces the model's tokenizer turns into exactly its tokens."""

    def __init__(self, tokenizer: Any) -> None:
        """`tokenizer`: a transformers fast tokenizer (its backend_tokenizer is used)."""
        self._tokenizer = tokenizer
        self._backend = tokenizer.backend_tokenizer
        added = self._backend.get_added_tokens_decoder()
        plain = all(
            not (t.lstrip or t.rstrip or t.single_word) for t in added.values() if not t.normalized
        )
        cuts = {t.content: i for i, t in added.items() if not t.normalized and t.content}
        self._ids = cuts
        longest_first = sorted(cuts, key=len, reverse=True)
        self._cut = (
            re.compile("(" + "|".join(map(re.escape, longest_first)) + ")")
            if cuts and plain
            else None
        )
        prefix, suffix = self._special_ends()
        self._prefix: tuple[int, ...] | None = prefix if not suffix else None
        """Token ids add_special_tokens puts first; None when it adds some at the end too
        (such prompts go to the engine)."""
        if self._cut is not None and not self._cut_holds():
            self._cut = None
        # A chat_template_kwargs key that is one of apply_chat_template's own parameters
        # (tools, chat_template, tokenize, ...) would change what it does, not the template's
        # variables: such requests go to the engine.
        own = inspect.signature(tokenizer.apply_chat_template).parameters
        self._reserved = frozenset(own) | _CHAT_FIELDS | {"messages"}

    @classmethod
    def load(cls, name: str, revision: str | None = None) -> HfPrompts:
        """The tokenizer of a model directory or of a Hugging Face id in the local cache
        (never downloads); raises what transformers raises when it cannot."""
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(name, revision=revision, local_files_only=True))

    @property
    def splits(self) -> bool:
        """Whether prompts are cut at added tokens (else each text is one piece)."""
        return self._cut is not None

    def pieces(self, route: str, body: dict[str, Any]) -> list[Piece] | None:
        """The prompt of a chat or completion request as pieces, None where the engine must
        say (see the module's docstring) or the body is not one prompt."""
        if any(body.get(k) is not None for k in _UNSUPPORTED):
            return None
        if route.endswith("/chat/completions"):
            text = self._chat_text(body)
            special = body.get("add_special_tokens", False)
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1:
                prompt = prompt[0]
            text, special = prompt, body.get("add_special_tokens", True)
        if not isinstance(text, str) or not isinstance(special, bool):
            return None
        return self.text_pieces(text, special)

    def text_pieces(self, text: str, add_special_tokens: bool = False) -> list[Piece] | None:
        """`text` as pieces: the special tokens added first (when asked), then the text cut
        just before and after every added token."""
        head: list[Piece] = []
        if add_special_tokens:
            if self._prefix is None:
                return None
            head = list(self._prefix)
        if self._cut is None:
            return [*head, text]
        parts = self._cut.split(text)  # text, token, text, ... (the tokens at odd places)
        return head + [self._ids[p] if i % 2 else p for i, p in enumerate(parts) if p]

    def encode(self, piece: Piece) -> tuple[int, ...]:
        """One piece's token ids (an int piece is its own)."""
        if isinstance(piece, int):
            return (piece,)
        return tuple(self._backend.encode(piece, add_special_tokens=False).ids)

    def encode_many(self, pieces: Sequence[str]) -> list[tuple[int, ...]]:
        """Several text pieces' token ids at once; the GIL is released meanwhile (so a thread
        can do this beside the event loop)."""
        return [
            tuple(e.ids) for e in self._backend.encode_batch(list(pieces), add_special_tokens=False)
        ]

    def tokens(self, pieces: Sequence[Piece]) -> list[int]:
        """The prompt's token ids from its pieces (the GIL released while it tokenizes)."""
        texts = iter(self.encode_many([p for p in pieces if isinstance(p, str)]))
        return [t for p in pieces for t in ((p,) if isinstance(p, int) else next(texts))]

    def _chat_text(self, body: dict[str, Any]) -> str | None:
        messages = body.get("messages")
        options = {k: body.get(k, v) for k, v in _CHAT_DEFAULTS.items()}
        kwargs = body.get("chat_template_kwargs") or {}
        if not (
            _plain(messages)
            and isinstance(kwargs, dict)
            and not kwargs.keys() & self._reserved
            and all(isinstance(v, bool) for v in options.values())
            # the engine refuses both at once
            and not (options["add_generation_prompt"] and options["continue_final_message"])
        ):
            return None
        try:
            text = self._tokenizer.apply_chat_template(
                messages,
                tokenize=False,
                add_generation_prompt=options["add_generation_prompt"],
                continue_final_message=options["continue_final_message"],
                **kwargs,
            )
        except Exception:  # a template that raises (its own checks): the engine will say
            return None
        return text if isinstance(text, str) else None

    def _special_ends(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The ids add_special_tokens puts before and after a text."""
        plain = self._backend.encode("a", add_special_tokens=False).ids
        full = self._backend.encode("a", add_special_tokens=True).ids
        for start in range(len(full) - len(plain) + 1):
            if full[start : start + len(plain)] == plain:
                return tuple(full[:start]), tuple(full[start + len(plain) :])
        return (), (-1,)  # not found: treat as a suffix (never reproduced)

    def _cut_holds(self) -> bool:
        """Whether cut pieces tokenize as the whole text does, around every added token."""
        for token in self._ids:
            for before in _PROBES:
                for after in _PROBES[:4]:
                    text = f"{before}{token}{after}{token}{before}"
                    pieces = self.text_pieces(text)
                    expected = self._backend.encode(text, add_special_tokens=False).ids
                    if pieces is None or self.tokens(pieces) != expected:
                        return False
        return True


def _plain(messages: Any) -> bool:
    """Whether a chat is messages of a role and one text each (what is reproduced here)."""
    return (
        isinstance(messages, list)
        and bool(messages)
        and all(
            isinstance(m, dict)
            and m.keys() <= {"role", "content"}
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in messages
        )
    )
