"""The sim engine on a virtual clock: the same scheduler, block pool and latency model as
`ascend-serve sim`, driven step by step without sleeps or sockets, so a benchmark of hundreds
of requests over many simulated NPUs runs in seconds. A client issues requests like `vllm bench
serve` (all at once or Poisson at a rate, at most `concurrency` in flight, output lengths
forced as with `--ignore-eos`; a conversation's next turn waits for the previous one); a router
sends each to the instance with the fewest outstanding requests, or as a `VirtualRouter`
decides; in PD, prefill instances hold the KV until a decode instance takes it over (only
the part of the prompt the decode instance does not cache travels).
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from ..config import SimSettings
from .engine import EngineObserver, Sequence, SimEngine, Step


@dataclass(frozen=True)
class Workload:
    """Prompt and output lengths, as vLLM's random dataset draws them: uniform integers within
    `range_ratio` of each length (0: fixed)."""

    input_len: int
    output_len: int
    range_ratio: float = 0.0

    @classmethod
    def parse(cls, text: str) -> Workload:
        """`random:IN:OUT[:RATIO]` or `fixed:IN:OUT`."""
        kind, *parts = text.split(":")
        try:
            numbers = [float(p) for p in parts]
        except ValueError:
            numbers = []
        ok = kind in ("random", "fixed") and len(numbers) in ((2, 3) if kind == "random" else (2,))
        if not ok or any(n < 0 for n in numbers) or min(numbers[:2] or [0]) < 1:
            raise ValueError(
                f"workload {text!r}: write random:IN:OUT[:RATIO] or fixed:IN:OUT, lengths >= 1"
            )
        ratio = numbers[2] if len(numbers) == 3 else 0.0
        if ratio >= 1:
            raise ValueError(f"workload {text!r}: the range ratio must be below 1")
        return cls(int(numbers[0]), int(numbers[1]), ratio)

    @property
    def longest(self) -> int:
        """The most tokens (prompt + output) one request can reach."""

        def top(length: int) -> int:
            return max(1, math.ceil(length * (1 + self.range_ratio)))

        return top(self.input_len) + top(self.output_len)

    def draw(self, rng: random.Random, n: int) -> list[tuple[int, int]]:
        def one(length: int) -> int:
            low = max(1, math.floor(length * (1 - self.range_ratio)))
            return rng.randint(low, max(low, math.ceil(length * (1 + self.range_ratio))))

        return [(one(self.input_len), one(self.output_len)) for _ in range(n)]


class VirtualRouter(Protocol):
    """Chooses an instance for each request of a virtual run (by engine index): unified or
    prefill on arrival, in PD the decode instance when the prefill ends. `first_token`: the
    request's first token on an instance (a prefill's, or a decode's); `done`: it finished
    there (or failed)."""

    def pick(self, role: str, prompt: list[int], candidates: list[int]) -> int: ...
    def first_token(self, index: int, prompt: list[int]) -> None: ...
    def done(self, index: int, prompt: list[int]) -> None: ...


@dataclass
class _Request:
    index: int
    prompt: list[int]
    output_len: int
    engine: int = -1
    """The instance it was sent to (unified or prefill)."""
    issued: float = 0.0
    token_times: list[float] = field(default_factory=list)
    done: bool = False
    failed: bool = False


class _Recorder(EngineObserver):
    """Token times of the sequences the client sees (unified or decode engines)."""

    def __init__(self, sim: VirtualRun, engine_index: int):
        self.sim, self.engine_index = sim, engine_index

    def on_first_token(self, seq: Sequence, ttft: float) -> None:
        request = self.sim.owner.get(seq)
        router = self.sim.router
        if request is not None and router is not None:
            # this engine's first token: a PD request's decode instance is not request.engine
            router.first_token(self.engine_index, request.prompt)

    def on_token(self, seq: Sequence, itl: float | None) -> None:
        request = self.sim.owner.get(seq)
        if request is not None and self.sim.engines[self.engine_index][0] != "prefill":
            request.token_times.append(self.sim.now)

    def on_finish(self, seq: Sequence) -> None:
        self.sim.finished.append((self.engine_index, seq))

    def on_preempt(self, seq: Sequence) -> None:
        self.sim.preemptions += 1

    def on_error(self, seq: Sequence) -> None:
        request = self.sim.owner.get(seq)
        if request is not None:
            request.failed = True
            self.sim.finished.append((self.engine_index, seq))


class VirtualRun:
    """One simulated benchmark over a deployment's instances."""

    def __init__(
        self,
        roles: dict[str, tuple[SimSettings, int]],
        kv_transfer_seconds: float | Callable[[int], float] = 0.0,
        router: VirtualRouter | None = None,
    ):
        """`roles`: role name -> (settings of one instance, instance count); `unified`, or
        `prefill` and `decode`. `kv_transfer_seconds`: from a prefill's end to decode taking
        over: seconds per request, or a function of its prompt length."""
        self.now = 0.0
        self.pd = "prefill" in roles
        self.kv_transfer_seconds = kv_transfer_seconds
        self.router = router
        self.engines: list[tuple[str, SimEngine]] = []
        for role, (settings, count) in roles.items():
            for _ in range(count):
                index = len(self.engines)
                engine = SimEngine(settings, _Recorder(self, index), clock=lambda: self.now)
                self.engines.append((role, engine))
        self.owner: dict[Sequence, _Request] = {}
        self.finished: list[tuple[int, Sequence]] = []
        self.preemptions = 0
        self.kv_samples: list[float] = []
        self._steps: dict[int, tuple[float, Step]] = {}
        self._transfers: list[tuple[float, int, _Request, Sequence, int, int, Sequence]] = []
        """(due, order, request, the prefill's held sequence, its instance, the decode
        instance, the decode sequence)."""
        self.transferred_tokens = 0
        """PD: prompt tokens whose KV travelled (a decode instance's cached prefix does not)."""
        self._order = itertools.count()
        self._shared: dict[int, list[int]] = {}

    def _prompt(self, index: int, length: int) -> list[int]:
        """Token values are never read in timing-only runs, so requests of one length share
        a prompt list (memory grows with the distinct lengths, not the requests), unless an
        engine caches prefixes: then each prompt starts with its own token, so no two share
        a block, as no two prompts of vLLM's random dataset do."""
        if any(engine.cache is not None for _, engine in self.engines):
            return [index + 1] + [0] * (length - 1)
        return self._shared.setdefault(length, [0] * length)

    def load(self, index: int) -> int:
        """Requests running or waiting on one instance."""
        engine = self.engines[index][1]
        return len(engine.running) + len(engine.waiting)

    def _least_loaded(self, role: str) -> int:
        candidates = [i for i, (r, _) in enumerate(self.engines) if r == role]
        return min(candidates, key=self.load)

    def _choose(self, role: str, prompt: list[int]) -> int:
        """The instance of `role` the router picks (the least loaded without one)."""
        if self.router is None:
            return self._least_loaded(role)
        candidates = [i for i, (r, _) in enumerate(self.engines) if r == role]
        return self.router.pick(role, prompt, candidates)

    def _submit(self, request: _Request) -> None:
        index = self._choose("prefill" if self.pd else "unified", request.prompt)
        request.engine = index
        seq = Sequence(
            request_id=str(request.index),
            prompt=request.prompt,
            max_tokens=1 if self.pd else request.output_len,
            temperature=0.0,
            sample_seed=request.index,
            seed=0,
            hold_blocks=self.pd,
            arrival=self.now,
            timing_only=True,
        )
        self.owner[seq] = request
        self.engines[index][1].add(seq)

    def _handle_finished(self) -> list[_Request]:
        """Prefill ends start KV transfers; decode/unified ends complete requests."""
        completed = []
        for index, seq in self.finished:
            request = self.owner.pop(seq, None)
            if request is None:
                continue
            if self.engines[index][0] == "prefill" and not request.failed:
                self._start_transfer(request, seq, index)
            else:
                request.done = True
                completed.append(request)
            if self.router is not None:
                self.router.done(index, request.prompt)
        self.finished.clear()
        return completed

    def _start_transfer(self, request: _Request, held: Sequence, source: int) -> None:
        """A prefill ended: its decode instance is chosen now (as the router does on the
        prefill's answer), and what that instance does not cache of the prompt travels. Its
        scheduler shares the cached blocks when it admits the sequence (blocks taken before
        could starve the sequences waiting ahead)."""
        index = self._choose("decode", request.prompt)
        seq = Sequence(
            request_id=str(request.index),
            prompt=request.prompt,
            max_tokens=request.output_len,
            temperature=0.0,
            sample_seed=request.index,
            seed=0,
            imported_states=[],
            arrival=request.issued,
            timing_only=True,
        )
        engine = self.engines[index][1]
        cached = len(engine.cache.lookup(seq)) if engine.cache is not None else 0
        tokens = len(request.prompt) - cached * engine.settings.block_size
        self.transferred_tokens += tokens
        transfer = self.kv_transfer_seconds
        due = self.now + (transfer(tokens) if callable(transfer) else transfer)
        heapq.heappush(self._transfers, (due, next(self._order), request, held, source, index, seq))

    def _land_transfers(self) -> None:
        while self._transfers and self._transfers[0][0] <= self.now:
            _, _, request, held, source, index, seq = heapq.heappop(self._transfers)
            self.owner[seq] = request
            self.engines[index][1].add(seq)
            self.engines[source][1].release_held(held)

    def run(
        self,
        lengths: list[tuple[int, int]],
        concurrency: int | None,
        request_rate: float,
        seed: int = 0,
        *,
        prompts: list[list[int]] | None = None,
        after: list[int | None] | None = None,
    ) -> list[_Request]:
        """Issue every request and run until all have finished; returns them with their
        token times. `prompts`: the token ids of each (default: made up from the lengths);
        `after[i]`: the request whose completion request i waits for (the previous turn of
        its conversation), or None."""
        rng = random.Random(seed)
        issue_at, t = [], 0.0
        for _ in lengths:
            issue_at.append(t)
            if math.isfinite(request_rate) and request_rate > 0:
                t += rng.expovariate(request_rate)
        requests = [
            _Request(i, prompts[i] if prompts else self._prompt(i, n_in), n_out)
            for i, (n_in, n_out) in enumerate(lengths)
        ]
        followers: dict[int, list[int]] = {}
        ready: list[tuple[float, int]] = []
        for i in range(len(requests)):
            parent = after[i] if after else None
            if parent is None:
                ready.append((issue_at[i], i))
            else:
                followers.setdefault(parent, []).append(i)
        heapq.heapify(ready)
        limit = concurrency or len(requests)
        in_flight = 0
        done: list[_Request] = []

        def completed(finished: list[_Request]) -> None:
            nonlocal in_flight
            in_flight -= len(finished)
            done.extend(finished)
            for request in finished:
                for follower in followers.pop(request.index, []):
                    heapq.heappush(ready, (max(self.now, issue_at[follower]), follower))

        while len(done) < len(requests):
            while ready and ready[0][0] <= self.now and in_flight < limit:
                _, i = heapq.heappop(ready)
                requests[i].issued = self.now
                self._submit(requests[i])
                in_flight += 1
            for index, (_, engine) in enumerate(self.engines):
                if index not in self._steps:
                    step = engine.begin_step()
                    if step is not None:
                        self._steps[index] = (self.now + step.seconds, step)
            failed = self._handle_finished()  # scheduling can fail a sequence the cache can't hold
            if failed:
                completed(failed)
                continue
            events = [until for until, _ in self._steps.values()]
            events += [due for due, *_ in self._transfers[:1]]
            if ready and in_flight < limit:
                events.append(max(self.now, ready[0][0]))
            if not events:
                raise RuntimeError(
                    "the simulated deployment stalled: no step can run (KV cache too small "
                    "for one request?)"
                )
            self.now = max(self.now, min(events))
            for index in [i for i, (until, _) in self._steps.items() if until <= self.now]:
                _, step = self._steps.pop(index)
                self.engines[index][1].end_step(step)
                self.kv_samples.append(self.engines[index][1].kv_usage)
            completed(self._handle_finished())
            self._land_transfers()
        return requests


def _percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def _stats(name: str, seconds: list[float]) -> dict[str, float]:
    ms = [1000 * s for s in seconds]
    return {
        f"mean_{name}_ms": statistics.fmean(ms) if ms else 0.0,
        f"median_{name}_ms": _percentile(ms, 50),
        f"std_{name}_ms": statistics.pstdev(ms) if ms else 0.0,
        f"p99_{name}_ms": _percentile(ms, 99),
    }


def summarize(run: VirtualRun, requests: list[_Request]) -> dict[str, float]:
    """`vllm bench serve`'s result keys (durations in seconds, latencies in ms), plus KV usage
    and preemptions."""
    duration = max((r.token_times[-1] for r in requests if r.token_times), default=0.0)
    outputs = sum(len(r.token_times) for r in requests)
    inputs = sum(len(r.prompt) for r in requests)
    ttft = [r.token_times[0] - r.issued for r in requests if r.token_times]
    tpot = [
        (r.token_times[-1] - r.token_times[0]) / (len(r.token_times) - 1)
        for r in requests
        if len(r.token_times) > 1
    ]
    itl = [b - a for r in requests for a, b in itertools.pairwise(r.token_times)]
    per_second = 1 / duration if duration > 0 else 0.0
    return {
        "duration": duration,
        "completed": sum(r.done and not r.failed for r in requests),
        "failed": sum(r.failed for r in requests),
        "total_input_tokens": inputs,
        "total_output_tokens": outputs,
        "request_throughput": len(requests) * per_second,
        "output_throughput": outputs * per_second,
        "total_token_throughput": (inputs + outputs) * per_second,
        **_stats("ttft", ttft),
        **_stats("tpot", tpot),
        **_stats("itl", itl),
        "mean_kv_cache_usage": statistics.fmean(run.kv_samples) if run.kv_samples else 0.0,
        "max_kv_cache_usage": max(run.kv_samples, default=0.0),
        "preemptions": run.preemptions,
    }
