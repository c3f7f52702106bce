"""The official `openai` client against `ascend-serve up` (sim engines behind our router), in a
unified and a PD deployment: every OpenAI behaviour vLLM's server has that a client relies on
(stop strings and stop_reason, logprobs, echo, batched prompts, no model, error shapes)."""

from __future__ import annotations

import httpx
import openai
import pytest

from procs import up

PROMPT = "the quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module", params=["tiny-sim.yaml", "tiny-sim-pd.yaml"], ids=["unified", "pd"])
def client(request, tmp_path_factory):
    with up(request.param, tmp_path_factory.mktemp("openai")) as (url, _proc, _out):
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def complete(client: openai.OpenAI, **kw):
    return client.completions.create(model="tiny", prompt=PROMPT, temperature=0, **kw)


def test_stop_strings_are_left_out_and_named_in_stop_reason(client):
    full = complete(client, max_tokens=12).choices[0]
    assert full.finish_reason == "length" and full.stop_reason is None
    words = full.text.split()
    stop = words[4]
    cut = full.text[: full.text.index(stop)]
    stopped = complete(client, max_tokens=12, stop=[stop, "never-generated"]).choices[0]
    assert stopped.text == cut and stop not in stopped.text
    assert stopped.finish_reason == "stop" and stopped.stop_reason == stop
    streamed = complete(client, max_tokens=12, stop=stop, stream=True)
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].choices[0].stop_reason == stop


def test_completion_logprobs_are_deterministic_and_agree_with_greedy(client):
    first = complete(client, max_tokens=6, logprobs=3).choices[0]
    again = complete(client, max_tokens=6, logprobs=3).choices[0]
    lp = first.logprobs
    assert lp == again.logprobs and lp is not None
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert "".join(lp.tokens) == first.text
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert logprob <= 0 and len(top) == 3
        assert max(top.values()) == pytest.approx(logprob)  # greedy took the likeliest
        assert token.strip() == max(top, key=top.get)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0


def test_chat_logprobs(client):
    answer = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    choice = answer.choices[0]
    assert choice.logprobs is not None and len(choice.logprobs.content) == 5
    assert "".join(t.token for t in choice.logprobs.content) == choice.message.content
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in choice.logprobs.content)
    assert choice.stop_reason is None and choice.finish_reason == "length"
    plain = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=5, temperature=0
    )
    assert plain.choices[0].logprobs is None
    assert plain.choices[0].message.content == choice.message.content


def test_echo_returns_the_prompt_first(client):
    plain = complete(client, max_tokens=4).choices[0].text
    echoed = complete(client, max_tokens=4, echo=True).choices[0].text
    assert echoed == PROMPT + plain


def test_a_batch_of_prompts_gets_one_choice_each(client):
    prompts = [PROMPT, "Ascend NPU serving", "one two three"]
    alone = [
        client.completions.create(model="tiny", prompt=p, max_tokens=5, temperature=0)
        for p in prompts
    ]
    batch = client.completions.create(model="tiny", prompt=prompts, max_tokens=5, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1, 2]
    assert [c.text for c in batch.choices] == [a.choices[0].text for a in alone]
    assert batch.usage.completion_tokens == 15
    assert batch.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)


def test_no_model_means_the_served_model(client):
    answer = client.completions.create(model=openai.omit, prompt=PROMPT, max_tokens=3)
    assert answer.model == "tiny" and answer.choices[0].text


def test_errors_are_openai_errors_with_integer_codes(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="gpt-4", prompt="x", max_tokens=3)
    assert "gpt-4" in err.value.message
    assert err.value.response.json()["error"]["code"] == 404  # an integer, as vLLM sends
    with pytest.raises(openai.BadRequestError) as err:
        complete(client, max_tokens=0)
    assert "at least 1" in err.value.message
    assert err.value.response.json()["error"]["code"] == 400
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("gpt-4")
    assert err.value.response.json()["error"]["code"] == 404
    assert client.models.retrieve("tiny").id == "tiny"
    base = str(client.base_url).removesuffix("/v1/")
    missing = httpx.get(f"{base}/v1/nothing-here")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == 404


def test_a_lone_surrogate_is_text_not_a_server_error(client):
    # The openai client cannot encode one; a hostile client sends the JSON escape itself.
    base = str(client.base_url).removesuffix("/v1/")
    raw = b'{"model": "tiny", "prompt": "odd \\ud800 text", "max_tokens": 3}'
    r = httpx.post(
        f"{base}/v1/completions", content=raw, headers={"content-type": "application/json"}
    )
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"]
