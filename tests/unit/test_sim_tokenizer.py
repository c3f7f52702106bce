"""The sim's tokenizer (sim/tokenizer.py): the bulk numpy path over ASCII text gives exactly
the per-word formula over str.split's words, for any text, in any number of runs; other text
is split as str.split splits it. Pure functions."""

from __future__ import annotations

import string

from hypothesis import given, settings
from hypothesis import strategies as st

from ascend_runtime.sim import model, tokenizer

ASCII = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=127), max_size=400)
WORDY = st.text(alphabet=string.ascii_letters + string.digits + string.whitespace + "\x1c\x1f.,")


@settings(max_examples=300, deadline=None)
@given(st.one_of(ASCII, WORDY))
def test_bulk_ascii_equals_the_per_word_formula(text):
    assert tokenizer.token_ids(text).tolist() == [tokenizer.word_id(w) for w in text.split()]


@settings(max_examples=50, deadline=None)
@given(WORDY)
def test_long_texts_tokenize_the_same_in_runs(text):
    saved = tokenizer._SEGMENT
    tokenizer._SEGMENT = 8
    try:
        got = tokenizer.token_ids(text).tolist()
    finally:
        tokenizer._SEGMENT = saved
    assert got == [tokenizer.word_id(w) for w in text.split()]


def test_other_text_splits_as_python_does():
    text = "héllo wörld\u00a0nbsp line\u2028sep lone\ud800surrogate 漢字 ok"
    ids = tokenizer.token_ids(text).tolist()
    assert len(ids) == len(text.split()) == 8
    assert ids == [tokenizer.word_id(w) for w in text.split()]
    assert tokenizer.token_ids("ok").tolist() == [ids[-1]]  # one word, one id, either path


def test_ids_are_32_bit_and_words_differ():
    ids = tokenizer.token_ids(" ".join(f"w{i}" for i in range(5000))).tolist()
    assert all(0 <= i < 1 << 32 for i in ids) and len(set(ids)) == 5000


def test_the_engine_gives_an_empty_prompt_one_token():
    assert model.tokenize("") == model.tokenize(" \n\t") == [0]
    assert model.packed_tokens(" ") == (b"", 0)
    data, count = model.packed_tokens("a b")
    assert count == 2 and data == b"".join(i.to_bytes(8, "little") for i in model.tokenize("a b"))
