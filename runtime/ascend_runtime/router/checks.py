"""Requests the engines would refuse, caught by the router first. In PD mode this matters: the
decode engine refuses a prompt too long for its max_tokens only after a prefill instance has
computed the prompt's KV and holds it for the transfer timeout."""

from __future__ import annotations

from typing import Any

from ..openai import OpenAIError

TOKENS_OVER_BYTES = 16
"""Slack for special tokens (BOS and the like) over the byte bound of a text prompt. Byte-level
BPE tokenizers (Qwen, Llama 3, DeepSeek) never give more tokens than UTF-8 bytes."""

CHAT_TOKENIZE_FIELDS = (
    "messages",
    "tools",
    "chat_template",
    "chat_template_kwargs",
    "add_generation_prompt",
    "continue_final_message",
    "add_special_tokens",
)
"""The fields of a chat request that change how its prompt tokenizes."""

LIMIT_FIELDS = ("max_completion_tokens", "max_tokens")


def output_limit(body: dict[str, Any]) -> int | None:
    """The requested output length (None: the engine's default, or a value only the engine's
    own validation can judge, such as "8"), refused as vLLM refuses it when below 1."""
    for name in LIMIT_FIELDS:
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            return None
        if value < 1:
            raise OpenAIError(400, f"max_tokens must be at least 1, got {value}.", param=name)
        return value
    return None


def prompt_token_bound(route: str, body: dict[str, Any]) -> int | None:
    """The most tokens the prompt can be without tokenizing it (the longest prompt of a batch),
    or None where only the tokenizer knows (chat templates add tokens)."""
    if not route.endswith("/completions") or route.endswith("chat/completions"):
        return None
    prompt = body.get("prompt")
    prompts = prompt if isinstance(prompt, list) and prompt and not _is_ids(prompt) else [prompt]
    bound = 0
    for one in prompts:
        if isinstance(one, str):
            bound = max(bound, len(one.encode("utf-8", "surrogatepass")) + TOKENS_OVER_BYTES)
        elif isinstance(one, list) and _is_ids(one):
            bound = max(bound, len(one))
        else:
            return None  # malformed: the engine says what is wrong
    return bound


def _is_ids(value: list[Any]) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def needs_count(limit: int, bound: int | None, out: int | None) -> bool:
    """Whether the prompt must be tokenized to know it fits."""
    if bound is None:
        return True
    return bound + out > limit if out is not None else bound >= limit


def check_fits(limit: int, prompt_tokens: int, out: int | None) -> None:
    """Raise vLLM's 400 when the prompt (plus the requested output) exceeds the context."""
    if prompt_tokens >= limit and out is None:
        raise OpenAIError(
            400,
            f"This model's maximum context length is {limit} tokens. However, your prompt "
            f"contains {prompt_tokens} input tokens, which exceeds this limit even without "
            "any output tokens. Please reduce the length of the input prompt.",
            param="input_tokens",
        )
    if out is not None and prompt_tokens + out > limit:
        raise OpenAIError(
            400,
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{prompt_tokens + out} tokens ({prompt_tokens} in the prompt, {out} for the "
            "completion). Please reduce the length of the prompt or max_tokens.",
            param="max_tokens",
        )


def tokenize_body(route: str, body: dict[str, Any]) -> dict[str, Any] | None:
    """The /tokenize request that counts this request's prompt tokens as the engine will
    (None for a batch of prompts: each is counted on its own)."""
    if route.endswith("chat/completions"):
        return {k: body[k] for k in CHAT_TOKENIZE_FIELDS if k in body}
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return {"prompt": prompt}
    return None


def prompt_ids_len(body: dict[str, Any]) -> int | None:
    """The exact prompt length of a completion request given as one list of token ids."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and _is_ids(prompt):
        return len(prompt)
    return None


def prompt_batch(route: str, body: dict[str, Any]) -> list[Any] | None:
    """The prompts of a completion request that batches several (None: one prompt)."""
    prompt = body.get("prompt")
    if route != "/v1/completions" or not isinstance(prompt, list) or len(prompt) < 2:
        return None
    return None if _is_ids(prompt) else prompt
