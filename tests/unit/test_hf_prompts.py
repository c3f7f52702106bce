"""The router's own tokenizer for vLLM engines (router/hf_prompts.py) against the same
tokenizer run on the whole prompt: real Hugging Face tokenizers (the `tokenizers` library,
trained here on generated text, loaded through transformers as vLLM loads them), no engine.
tests/realvllm/test_kv_aware_up.py checks the same pieces against real vLLM's /tokenize."""

from __future__ import annotations

import random
import string
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ascend_runtime.kv.vllm_hash import VllmBlockHasher
from ascend_runtime.router.hf_prompts import HfPrompts, VllmChain
from ascend_runtime.router.prompt_hashes import PromptHasher

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
SPECIALS = ["<|endoftext|>", "<pad>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _save(tok, out: Path, **special) -> Path:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **special)
    fast.chat_template = TEMPLATE
    fast.save_pretrained(out)
    return out


def _bpe(extra_specials=(), post=None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=[*SPECIALS, *extra_specials],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    rng = random.Random(0)
    words = ["prefill", "decode", "cache", "block", "token", "router", "kernel", "npu"]
    tok.train_from_iterator(
        [" ".join(rng.choice(words) for _ in range(12)) for _ in range(500)], trainer
    )
    if post is not None:
        tok.post_processor = post(tok)
    return tok


@pytest.fixture(scope="module")
def qwen_like(tmp_path_factory) -> HfPrompts:
    out = tmp_path_factory.mktemp("qwen-like")
    _save(_bpe(), out, eos_token="<|endoftext|>", pad_token="<pad>")
    return HfPrompts.load(str(out))


def _whole(prompts: HfPrompts, route: str, body: dict) -> list[int]:
    """What the tokenizer gives for the whole prompt, as vLLM tokenizes it."""
    tok = prompts._tokenizer
    if route == CHAT:
        text = tok.apply_chat_template(
            body["messages"], tokenize=False,
            add_generation_prompt=body.get("add_generation_prompt", True),
            continue_final_message=body.get("continue_final_message", False),
        )  # fmt: skip
        return tok.encode(text, add_special_tokens=body.get("add_special_tokens", False))
    prompt = body["prompt"]
    prompt = prompt[0] if isinstance(prompt, list) else prompt
    return tok.encode(prompt, add_special_tokens=body.get("add_special_tokens", True))


def _text(rng: random.Random, n: int) -> str:
    parts = [
        "cache",
        " block",
        "  ",
        "\n",
        "\n\n",
        " <|im_end|>",
        "<|im_start|>",
        "caf\u00e9",
        "\u6f22\u5b57",
        " \U0001f600",
        "\t",
        "prefill",
        "x" * rng.randrange(1, 40),
    ]
    return "".join(rng.choice(parts) for _ in range(n))


def test_the_router_tokenizes_as_the_whole_prompt_for_every_supported_form(qwen_like):
    rng = random.Random(7)
    assert qwen_like.splits  # the test model's added tokens are plain: prompts are cut
    system = _text(rng, 400)
    for _ in range(25):
        history = [{"role": "system", "content": system}]
        for turn in range(rng.randrange(1, 4)):
            history += [{"role": "user", "content": _text(rng, rng.randrange(0, 60))},
                        {"role": "assistant", "content": _text(rng, turn * 5)}]  # fmt: skip
        bodies = [
            (CHAT, {"messages": history}),
            (CHAT, {"messages": history[:-1], "add_generation_prompt": False}),
            (
                CHAT,
                {
                    "messages": history,
                    "add_generation_prompt": False,
                    "continue_final_message": True,
                },
            ),
            (CHAT, {"messages": history, "add_special_tokens": True}),
            (CHAT, {"messages": history, "chat_template_kwargs": {"enable_thinking": False}}),
            (COMPLETIONS, {"prompt": system[: rng.randrange(len(system))] + _text(rng, 9)}),
            (COMPLETIONS, {"prompt": [_text(rng, 30)], "add_special_tokens": False}),
        ]
        for route, body in bodies:
            pieces = qwen_like.pieces(route, body)
            assert pieces is not None, body
            assert qwen_like.tokens(pieces) == _whole(qwen_like, route, body), body


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.sampled_from(SPECIALS), st.text(string.printable + "\u00e9\u6f22", max_size=12)
        ),
        max_size=12,
    )
)
def test_cut_pieces_tokenize_as_the_whole_text(qwen_like, parts):
    text = "".join(parts)
    pieces = qwen_like.text_pieces(text)
    assert pieces is not None
    expected = qwen_like._backend.encode(text, add_special_tokens=False).ids
    assert qwen_like.tokens(pieces) == expected


@pytest.mark.parametrize("block_size", [1, 5, 16, 128])
def test_router_hashes_equal_vllms_over_the_whole_prompts_tokens(qwen_like, block_size):
    rng = random.Random(block_size)
    vllm = VllmBlockHasher("sha256_cbor", "0")
    hasher = PromptHasher(block_size, chain_kind=VllmChain(block_size, vllm, qwen_like))
    tiny = PromptHasher(block_size, max_bytes=2048, chain_kind=hasher.chain)
    system = _text(rng, 300)
    for _ in range(10):
        question = _text(rng, rng.randrange(40))
        body = {
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": question},
            ]
        }
        pieces = qwen_like.pieces(CHAT, body)
        expected = vllm.block_hashes(_whole(qwen_like, CHAT, body), block_size)
        assert hasher.hashes(pieces) == expected  # the system prompt's chain is remembered
        assert tiny.hashes(pieces) == expected  # ... and forgotten: the same hashes
    # pieces worked out off the event loop give the same
    body = {"messages": [{"role": "user", "content": _text(rng, 200)}]}
    pieces = qwen_like.pieces(CHAT, body)
    new = [i for i in hasher.new_pieces(pieces) if isinstance(pieces[i], str)]
    ids = qwen_like.encode_many([pieces[i] for i in new])
    encoded = {i: (t, len(t)) for i, t in zip(new, ids, strict=True)}
    expected = vllm.block_hashes(_whole(qwen_like, CHAT, body), block_size)
    assert hasher.hashes(pieces, encoded) == expected
    assert hasher.new_pieces(pieces) == []


@pytest.mark.parametrize(
    "route, body",
    [
        (CHAT, {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}),
        (CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}),
        (CHAT, {"messages": [{"role": "user", "content": "hi", "name": "bob"}]}),
        (CHAT, {"messages": [{"role": "user", "content": None}]}),
        (CHAT, {"messages": [{"role": "user", "content": "hi"}], "chat_template": "{{ 1 }}"}),
        (CHAT, {"messages": [{"role": "user", "content": "hi"}], "continue_final_message": True}),
        (CHAT, {"messages": [{"role": "user", "content": "hi"}], "add_generation_prompt": "yes"}),
        (
            CHAT,
            {
                "messages": [{"role": "user", "content": "hi"}],
                "chat_template_kwargs": {"add_generation_prompt": False},
            },
        ),
        (
            CHAT,
            {
                "messages": [{"role": "user", "content": "hi"}],
                "chat_template_kwargs": {"tools": [{"type": "function"}]},
            },
        ),
        (
            CHAT,
            {
                "messages": [{"role": "user", "content": "hi"}],
                "chat_template_kwargs": {"tokenize": True},
            },
        ),
        (CHAT, {"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": [1]}),
        (CHAT, {"messages": []}),
        (CHAT, {"messages": "hi"}),
        (COMPLETIONS, {"prompt": ["a", "b"]}),
        (COMPLETIONS, {"prompt": 7}),
        (COMPLETIONS, {"prompt": "hi", "prompt_embeds": "AAAA"}),
    ],
)
def test_prompts_only_the_engine_can_tokenize_are_left_to_it(qwen_like, route, body):
    assert qwen_like.pieces(route, body) is None


def test_special_tokens_a_post_processor_adds(tmp_path):
    from tokenizers import processors

    def bos(tok):
        return processors.TemplateProcessing(
            single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)]
        )

    def bos_eos(tok):
        return processors.TemplateProcessing(
            single="<|endoftext|> $A <|im_end|>",
            special_tokens=[("<|endoftext|>", 0), ("<|im_end|>", 3)],
        )

    with_bos = HfPrompts.load(str(_save(_bpe(post=bos), tmp_path / "bos")))
    body = {"prompt": "prefill <|im_start|> decode"}
    pieces = with_bos.pieces(COMPLETIONS, body)
    assert pieces is not None and pieces[0] == 0
    assert with_bos.tokens(pieces) == _whole(with_bos, COMPLETIONS, body)
    # a suffix cannot be reproduced piece by piece: the engine tokenizes those
    with_eos = HfPrompts.load(str(_save(_bpe(post=bos_eos), tmp_path / "eos")))
    assert with_eos.pieces(COMPLETIONS, body) is None
    no_special = {**body, "add_special_tokens": False}
    assert with_eos.tokens(with_eos.pieces(COMPLETIONS, no_special)) == _whole(
        with_eos, COMPLETIONS, no_special
    )


def test_added_tokens_that_strip_whitespace_are_not_cut_at(tmp_path):
    from tokenizers import AddedToken

    tok = _bpe()
    tok.add_special_tokens([AddedToken("<tool>", lstrip=True, rstrip=True)])
    prompts = HfPrompts.load(str(_save(tok, tmp_path / "strip")))
    assert not prompts.splits
    body = {"messages": [{"role": "user", "content": "call   <tool>   now"}]}
    pieces = prompts.pieces(CHAT, body)
    assert pieces is not None and len(pieces) == 1  # the whole text, tokenized at once
    assert prompts.tokens(pieces) == _whole(prompts, CHAT, body)


def test_the_router_never_loads_weights_or_downloads(tmp_path):
    with pytest.raises(OSError):
        HfPrompts.load(str(tmp_path / "missing"))
    with pytest.raises(OSError):  # a hub id not in the local cache: no download is tried
        HfPrompts.load("no-such-org/no-such-model")


@pytest.mark.asyncio
async def test_kv_routing_checks_its_tokenizer_against_the_engines_and_drops_it_on_a_difference(
    qwen_like, tmp_path
):
    """KvRouting with a tokenizer: prompts are hashed in the router, the first ones checked
    against the engine's tokens (here the same tokenizer run on the whole prompt, standing in
    for vLLM's /tokenize); the first difference sends every later prompt to the engines."""
    from ascend_runtime.config import KvAwareRouting, RouterBackends
    from ascend_runtime.router.kv_routing import CHECK_FIRST, KvRouting
    from ascend_runtime.router.metrics import RouterMetrics
    from helpers import until

    out = _save(_bpe(), tmp_path / "tok", eos_token="<|endoftext|>", pad_token="<pad>")
    skew: list[int] = []
    asked: list[dict] = []

    async def engine_tokenize(role, query):
        asked.append(query)
        route = CHAT if "messages" in query else COMPLETIONS
        return _whole(qwen_like, route, query) + skew

    metrics = RouterMetrics()
    settings = KvAwareRouting(mode="precise", block_size=4, hashing="vllm", tokenizer=str(out))
    kv = KvRouting(settings, RouterBackends(), metrics, tokenize=engine_tokenize)
    await kv.start([])
    await until(lambda: kv.prompts is not None, timeout=60)
    assert metrics.kv_router_tokenizer._value.get() == 1
    vllm = VllmBlockHasher("sha256_cbor", "0")

    def body(i):
        return {"messages": [{"role": "system", "content": "cache block " * 50},
                             {"role": "user", "content": f"question {i}"}]}  # fmt: skip

    checks = metrics.kv_tokenizer_checks
    for i in range(CHECK_FIRST):
        affinity = await kv.affinity("unified", CHAT, body(i))
        assert affinity.hashes == vllm.block_hashes(_whole(qwen_like, CHAT, body(i)), 4)
    await until(lambda: checks.labels("match")._value.get() == CHECK_FIRST, timeout=30)
    assert metrics.kv_tokenized.labels("unified", "router")._value.get() == CHECK_FIRST
    assert metrics.kv_tokenized.labels("unified", "engine")._value.get() == 0

    # a salted prompt keys its first block with the salt, tokenized by the router all the same
    salted = await kv.affinity("unified", CHAT, {**body(1), "cache_salt": "tenant-a"})
    tokens = _whole(qwen_like, CHAT, body(1))
    assert salted.hashes == vllm.block_hashes(tokens, 4, cache_salt="tenant-a")
    assert salted.hashes[0] != vllm.block_hashes(tokens, 4)[0]
    assert metrics.kv_tokenized.labels("unified", "engine")._value.get() == 0

    # past the first prompts only one in CHECK_EVERY is checked; force one with a skewed engine
    kv._tokenized = 255
    skew.append(7)
    await kv.affinity("unified", CHAT, body(99))
    await until(lambda: checks.labels("mismatch")._value.get() == 1, timeout=30)
    assert kv.prompts is None and metrics.kv_router_tokenizer._value.get() == 0
    asked.clear()
    affinity = await kv.affinity("unified", CHAT, body(100))
    assert len(asked) == 1  # the engine's tokens now, skew and all
    assert affinity.hashes == vllm.block_hashes([*_whole(qwen_like, CHAT, body(100)), 7], 4)
    assert metrics.kv_tokenized.labels("unified", "engine")._value.get() == 1
    await kv.stop()


@pytest.mark.asyncio
async def test_kv_routing_without_its_tokenizer_files_asks_the_engines(tmp_path, caplog):
    from ascend_runtime.config import KvAwareRouting, RouterBackends
    from ascend_runtime.router.kv_routing import KvRouting
    from ascend_runtime.router.metrics import RouterMetrics
    from helpers import until

    async def engine_tokenize(role, query):
        return list(range(9))

    settings = KvAwareRouting(
        mode="precise", block_size=4, hashing="vllm", tokenizer=str(tmp_path / "nothing")
    )
    kv = KvRouting(settings, RouterBackends(), RouterMetrics(), tokenize=engine_tokenize)
    await kv.start([])
    await until(lambda: "cannot load the tokenizer" in caplog.text, timeout=60)
    assert kv.prompts is None
    affinity = await kv.affinity("unified", COMPLETIONS, {"prompt": "hello"})
    assert affinity.hashes == VllmBlockHasher("sha256_cbor", "0").block_hashes(list(range(9)), 4)
    await kv.stop()
