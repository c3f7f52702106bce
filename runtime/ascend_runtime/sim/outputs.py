"""What the sim engine says about its tokens, the way vLLM's OpenAI server says it: text that
ends before a stop string (held back while it could still become one), the stop string as
`stop_reason`, and deterministic log-probabilities."""

from __future__ import annotations

import hashlib
import math
import struct
from typing import Any

from . import model


class StopText:
    """The generated text of one sequence, released as far as no stop string can start.

    vLLM matches stop strings on the detokenized text, leaves them out of the output, and
    holds back the last characters while they could be the start of one."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.text, self.sent = "", 0
        self.stop_reason: str | None = None

    def push(self, word: str) -> tuple[str, bool]:
        """Add one token's text; (the text now safe to send, whether a stop string ended it)."""
        before = len(self.text)
        self.text += " " + word
        hits = [
            (i, s) for s in self.stops if (i := self.text.find(s, max(0, before - len(s) + 1))) >= 0
        ]
        if hits:
            end, self.stop_reason = min(hits)
            self.text = self.text[:end]
            return self._release(len(self.text)), True
        return self._release(len(self.text) - self.hold), False

    def flush(self) -> str:
        """Everything not sent yet (the sequence ended for another reason)."""
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        out, self.sent = self.text[self.sent : upto], upto
        return out


_LOGIT_SCALE = 4.0


def _logits(state: int, chosen: int) -> list[float]:
    """A fixed pseudo-distribution over the vocabulary for one state; the token the sim chose
    (greedy: the state's token) is the most likely, so logprobs agree with greedy output."""
    digest = hashlib.blake2b(struct.pack("<Q", state & (2**64 - 1)), digest_size=64).digest()
    seed = int.from_bytes(digest, "little")
    logits = []
    for _ in model.VOCAB:
        seed = (seed * 6364136223846793005 + 1442695040888963407) & (2**64 - 1)
        logits.append(_LOGIT_SCALE * (seed >> 11) / 2**53)
    logits[chosen % len(model.VOCAB)] = _LOGIT_SCALE + 1.0
    return logits


def logprobs(state: int, chosen: int, top: int) -> tuple[float, list[tuple[str, float]]]:
    """(log-probability of the chosen token, the `top` most likely tokens with theirs)."""
    logits = _logits(state, chosen)
    peak = max(logits)
    norm = peak + math.log(sum(math.exp(x - peak) for x in logits))
    ranked = sorted(range(len(logits)), key=lambda i: -logits[i])[:top]
    chosen_lp = logits[chosen % len(model.VOCAB)] - norm
    return chosen_lp, [(model.VOCAB[i], logits[i] - norm) for i in ranked]


def completion_logprobs(
    entries: list[tuple[str, int, float, list[tuple[str, float]]]],
) -> dict[str, Any]:
    """The completions API's `logprobs` object from (text, offset, logprob, top) per token."""
    return {
        "tokens": [text for text, _, _, _ in entries],
        "token_logprobs": [lp for _, _, lp, _ in entries],
        "top_logprobs": [dict(top) for _, _, _, top in entries],
        "text_offset": [offset for _, offset, _, _ in entries],
    }


def chat_logprobs(entries: list[tuple[str, int, float, list[tuple[str, float]]]]) -> dict[str, Any]:
    """The chat API's `logprobs` object."""

    def item(token: str, lp: float) -> dict[str, Any]:
        return {"token": token, "logprob": lp, "bytes": list(token.encode())}

    return {
        "content": [
            {**item(text, lp), "top_logprobs": [item(t, v) for t, v in top]}
            for text, _, lp, top in entries
        ]
    }
