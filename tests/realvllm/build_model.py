"""Build a tiny model directory vLLM can serve, with no model hub: a byte-level BPE tokenizer
trained on generated text, a Hugging Face config of the architecture family our examples use,
and random weights from a fixed seed (float32, initializer_range wide enough that greedy
outputs do not collapse into repeats).

Runs inside the real-engine virtual environment (transformers, tokenizers, torch):

    python tests/realvllm/build_model.py {qwen3,qwen3-moe,xlm-roberta} OUT_DIR
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

WORDS = [
    "ascend",
    "npu",
    "serves",
    "large",
    "language",
    "models",
    "prefill",
    "decode",
    "cache",
    "block",
    "token",
    "layer",
    "expert",
    "router",
    "request",
    "stream",
    "batch",
    "graph",
    "kernel",
    "tensor",
    "parallel",
    "pipeline",
    "context",
    "data",
    "shard",
    "memory",
    "bandwidth",
    "latency",
    "throughput",
    "node",
    "pod",
    "cluster",
    "operator",
    "spec",
    "plan",
    "render",
    "launch",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<pad>", "<|im_start|>", "<|im_end|>"]
"""Ids 0 (end of text) and 1 (padding, RoBERTa's padding_idx as in bge-m3) first."""
VOCAB = 1024


def corpus(lines: int = 4000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 24))) for _ in range(lines)]


def tokenizer(out: Path, max_length: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<pad>",
        bos_token=None,
        model_max_length=max_length,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)


def config(kind: str, vocab: int) -> object:
    import transformers

    common = {
        "vocab_size": vocab,
        "max_position_embeddings": 4096,
        "initializer_range": 0.5,
        "dtype": "float32",
        "eos_token_id": 0,
        "pad_token_id": 1,
    }
    if kind == "qwen3":
        return transformers.Qwen3Config(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=64,  # vLLM's CPU attention kernels take 32, 64, 80, 96, 112, 128, ...
            tie_word_embeddings=False,
            **common,
        )
    if kind == "qwen3-moe":
        return transformers.Qwen3MoeConfig(
            hidden_size=128,
            intermediate_size=256,
            moe_intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=8,  # divisible by the examples' TP 4 and 8
            num_key_value_heads=4,  # as Qwen3-235B-A22B, and its experts, top-k and context:
            head_dim=64,
            num_experts=128,
            num_experts_per_tok=8,
            decoder_sparse_step=1,
            norm_topk_prob=True,
            tie_word_embeddings=False,
            **{**common, "max_position_embeddings": 40960},
        )
    if kind == "xlm-roberta":
        return transformers.XLMRobertaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            type_vocab_size=1,
            position_embedding_type="absolute",  # vLLM reads it; transformers 5 dropped it
            **{**common, "max_position_embeddings": 8194},
        )
    raise SystemExit(f"unknown model kind {kind!r}: qwen3, qwen3-moe or xlm-roberta")


def build(kind: str, out: Path) -> None:
    import torch
    import transformers

    out.mkdir(parents=True, exist_ok=True)
    cfg = config(kind, VOCAB)
    # RoBERTa's positions start after the padding index: 8194 positions serve 8192 tokens.
    offset = 2 if kind == "xlm-roberta" else 0
    tokenizer(out, cfg.max_position_embeddings - offset)
    vocab = len(json.loads((out / "tokenizer.json").read_text())["model"]["vocab"])
    assert vocab <= VOCAB, f"the tokenizer has {vocab} tokens, the model {VOCAB}"
    torch.manual_seed(0)
    if kind == "xlm-roberta":
        model = transformers.XLMRobertaModel(cfg)
    else:
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    (out / "BUILT").write_text(f"{kind}\n")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    build(sys.argv[1], Path(sys.argv[2]))
