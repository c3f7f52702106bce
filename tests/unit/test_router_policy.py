"""The router's failure policy (pure state over Backend) and the waits built on it."""

from __future__ import annotations

import asyncio
import logging

import pytest

from ascend_runtime.router.policy import Backend, FailurePolicy
from ascend_runtime.router.pool import Pool
from ascend_runtime.router.upstream import (
    StreamWatch,
    UpstreamError,
    WatchedStream,
    before_first_byte,
)


def backend(url: str = "http://a") -> Backend:
    return Backend(url=url, role="decode")


def test_one_failure_does_not_eject_three_in_a_row_do_and_success_resets():
    policy, b = FailurePolicy(), backend()
    assert not policy.failed(b, "reset", now=1.0)
    assert not policy.failed(b, "reset", now=2.0)
    policy.succeeded(b)
    assert not policy.failed(b, "reset", now=3.0)
    assert not policy.failed(b, "reset", now=4.0)
    assert b.available
    assert policy.failed(b, "reset", now=5.0)
    assert not b.available and b.last_error == "reset"


def test_refused_connection_ejects_at_once_and_logs_why(caplog):
    policy, b = FailurePolicy(), backend()
    with caplog.at_level(logging.WARNING, "ascend_runtime.router"):
        assert policy.failed(b, "connection refused", definitive=True)
    assert not b.available
    assert "ejecting decode instance http://a" in caplog.text
    assert "connection refused" in caplog.text


def test_probe_timeouts_need_two_in_a_row_an_error_answer_ejects_at_once():
    policy, b = FailurePolicy(), backend()
    assert not policy.probe_failed(b, "no answer", timed_out=True)
    policy.probe_passed(b)  # a passing probe resets the count
    assert not policy.probe_failed(b, "no answer", timed_out=True)
    assert policy.probe_failed(b, "no answer", timed_out=True)
    c = backend("http://c")
    assert policy.probe_failed(c, "/health answered 503", timed_out=False)


def test_readmission_waits_for_the_period_and_backs_off(caplog, monkeypatch):
    clock = [100.0]
    monkeypatch.setattr("ascend_runtime.router.policy.time.monotonic", lambda: clock[0])
    policy = FailurePolicy(eject_seconds=5, max_eject_seconds=12)
    b = backend()
    policy.failed(b, "refused", definitive=True)
    assert b.ejected_until == 105.0
    assert not policy.probe_passed(b)  # too early
    clock[0] = 105.0
    with caplog.at_level(logging.WARNING, "ascend_runtime.router"):
        assert policy.probe_passed(b)
    assert b.available and "re-admitting decode instance http://a" in caplog.text
    policy.failed(b, "refused again", definitive=True)  # no success in between: 10 s
    assert b.ejected_until == 115.0
    clock[0] = 115.0
    policy.probe_passed(b)
    policy.failed(b, "and again", definitive=True)  # 20 s, capped at 12
    assert b.ejected_until == 127.0
    clock[0] = 127.0
    policy.probe_passed(b)
    policy.succeeded(b)
    policy.failed(b, "after a success", definitive=True)  # back to 5 s
    assert b.ejected_until == 132.0


def test_a_role_with_every_instance_out_still_gets_the_longest_failed_one():
    pool = Pool()
    pool.set_members("decode", ["http://a", "http://b", "http://c"])
    a, b, c = pool.members("decode")
    pool.failures.failed(a, "x", definitive=True, now=30.0)
    pool.failures.failed(b, "x", definitive=True, now=10.0)
    pool.failures.failed(c, "x", definitive=True, now=20.0)
    assert pool.pick("decode") is b
    assert pool.pick("decode", exclude={"http://b"}) is c
    assert pool.pick("decode", exclude={"http://a", "http://b", "http://c"}) is None
    assert pool.fallback_picks == 2
    pool.failures.probe_passed(a, now=1e12)
    assert pool.pick("decode") is a  # one back in rotation: it takes the traffic


def test_waits_end_when_the_instance_is_ejected_or_the_timeout_passes():
    async def scenario() -> list[str]:
        policy, b = FailurePolicy(), backend()
        messages = []
        never = asyncio.get_running_loop().create_future()
        try:
            await before_first_byte(b, never, 0.05, "the response")
        except UpstreamError as exc:
            messages.append(str(exc))
        waiting = asyncio.ensure_future(
            before_first_byte(b, asyncio.sleep(30), 30, "the first token")
        )
        await asyncio.sleep(0.01)
        policy.failed(b, "health check failed", definitive=True)
        try:
            await asyncio.wait_for(waiting, 2)
        except UpstreamError as exc:
            messages.append(str(exc))
        return messages

    timeout, lost = asyncio.run(scenario())
    assert timeout == "the response from http://a took longer than 0.05 s"
    assert lost == "http://a was taken out of rotation: health check failed"


def test_ejection_interrupts_only_its_own_waits():
    """The wait runs in the caller's task: a cancellation from elsewhere (a client that left)
    stays a cancellation, and the task is not left marked as cancelling after an ejection."""

    async def scenario() -> tuple[bool, int, int]:
        policy, b = FailurePolicy(), backend()
        outer = asyncio.ensure_future(before_first_byte(b, asyncio.sleep(30), 30, "the response"))
        await asyncio.sleep(0.01)
        outer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await outer
        ejected = asyncio.ensure_future(before_first_byte(b, asyncio.sleep(30), 30, "the response"))
        await asyncio.sleep(0.01)
        policy.failed(b, "gone", definitive=True)
        with pytest.raises(UpstreamError):
            await ejected
        return outer.cancelled(), ejected.cancelling(), len(b.waiters)

    assert asyncio.run(scenario()) == (True, 0, 0)


class _Response:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


def test_stream_watch_cuts_quiet_streams_and_streams_of_ejected_instances():
    watch = StreamWatch(inter_token_timeout=10)
    quiet, busy, gone = backend("http://q"), backend("http://b"), backend("http://g")
    streams = {
        name: WatchedStream(b, _Response(), last_chunk=100.0)  # type: ignore[arg-type]
        for name, b in (("quiet", quiet), ("busy", busy), ("gone", gone))
    }
    streams["busy"].last_chunk = 105.0
    watch.streams.update(streams.values())
    FailurePolicy().failed(gone, "refused", definitive=True)
    assert watch.sweep(now=111.0) == 2
    assert streams["quiet"].cut == "no token for 10 s"
    assert "taken out of rotation" in (streams["gone"].cut or "")
    assert streams["busy"].cut is None and not streams["busy"].response.closed
    assert watch.sweep(now=111.0) == 0  # each stream is cut once


@pytest.mark.parametrize("bad", [0, -3])
def test_output_limit_is_checked_as_vllm_checks_it(bad):
    from ascend_runtime.openai import OpenAIError
    from ascend_runtime.router import checks

    with pytest.raises(OpenAIError) as err:
        checks.output_limit({"max_tokens": bad})
    assert err.value.status == 400 and err.value.param == "max_tokens"
    assert checks.output_limit({"max_completion_tokens": 7, "max_tokens": 0}) == 7
    for unjudged in (1.5, True, "8"):  # the engine's own validation decides these
        assert checks.output_limit({"max_tokens": unjudged}) is None


def test_prompt_bounds_and_fits():
    from ascend_runtime.openai import OpenAIError
    from ascend_runtime.router import checks

    route = "/v1/completions"
    assert checks.prompt_token_bound(route, {"prompt": "héllo"}) == 6 + checks.TOKENS_OVER_BYTES
    assert checks.prompt_token_bound(route, {"prompt": [1, 2, 3]}) == 3
    assert checks.prompt_token_bound(route, {"prompt": ["ab", "abcd"]}) == 4 + 16
    assert checks.prompt_token_bound("/v1/chat/completions", {"messages": []}) is None
    assert not checks.needs_count(100, 20, 80)
    assert checks.needs_count(100, 21, 80)
    assert checks.needs_count(100, None, 1)
    assert checks.needs_count(100, 100, None)
    checks.check_fits(100, 20, 80)
    with pytest.raises(OpenAIError, match="you requested 101 tokens"):
        checks.check_fits(100, 21, 80)
    with pytest.raises(OpenAIError, match="even without any output tokens"):
        checks.check_fits(100, 100, None)
