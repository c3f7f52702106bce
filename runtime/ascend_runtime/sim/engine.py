"""The sim engine's core: block-based KV cache, continuous batching, preemption, latency.

One asyncio task runs scheduler steps. Each step takes the running sequences' decode tokens
and then prefill chunks of waiting sequences, bounded by max_num_seqs and
max_num_batched_tokens, sleeps for the latency model's step time, and emits tokens. When a
running sequence needs a block and none is free, the most recently admitted sequence is
preempted (its blocks freed, recomputed later), as vLLM does.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from ..config import SimSettings
from . import latency, model
from .outputs import StopText
from .prefix_cache import BlockPool, PrefixCachePool


@dataclass
class Event:
    """What a sequence's consumer receives: a token, or the end."""

    kind: Literal["token", "finish", "error"]
    token: int | None = None
    reason: str | None = None
    text: str = ""
    """A token's text as far as it can be sent (see StopText)."""
    state: int = 0
    """The state the token was drawn from (its logprobs derive from it)."""


@dataclass(eq=False)
class Sequence:
    """One request inside the engine (compared and hashed by identity: the scheduler looks
    sequences up in O(1) every step)."""

    request_id: str
    prompt: list[int]
    max_tokens: int
    temperature: float
    sample_seed: int
    seed: int
    stop: tuple[str, ...] = ()
    hold_blocks: bool = False
    """PD producer: keep the blocks after finishing, for a decode instance to pull."""
    imported_states: list[int] | None = None
    """PD consumer: the prompt's KV pulled from a prefill instance (no prefill compute)."""
    pooling: bool = False
    """An embedding input: it finishes once its prompt is prefilled, sampling nothing."""
    timing_only: bool = False
    """Virtual benchmarks: keep the scheduling and timing, skip token values, text and events
    (nobody reads them; per-token hashing would dominate the run)."""
    output: list[int] = field(default_factory=list)
    states: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    computed: int = 0
    block_hashes: list[int] = field(default_factory=list)
    """Prefix caching: chain hashes of its full blocks known so far (tokens never change)."""
    stored_blocks: int = 0
    """Prefix caching: how many of its blocks are offered to the cache."""
    arrival: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    last_token_at: float | None = None
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    finished: bool = False
    finish_reason: str | None = None
    preemptions: int = 0
    rank: int = 0
    """The data-parallel rank of the instance that runs it (set at admission)."""
    text: StopText = field(init=False)

    def __post_init__(self) -> None:
        self.text = StopText(self.stop)

    @property
    def tokens(self) -> list[int]:
        """Prompt and output (a copy: the scheduler's hot path uses num_tokens instead)."""
        return self.prompt + self.output

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    def token_range(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output, without copying the rest."""
        n = len(self.prompt)
        if end <= n:
            return self.prompt[start:end]
        return self.prompt[start:n] + self.output[max(0, start - n) : end - n]

    @property
    def prefilled(self) -> bool:
        return self.computed >= self.num_tokens


@dataclass
class Step:
    """One scheduled step: prefill chunks, decoding sequences, and its duration."""

    prefills: list[tuple[Sequence, int]]
    decodes: list[Sequence]
    prefill_tokens: int
    seconds: float


class EngineObserver:
    """Hooks the metrics layer implements (no-ops by default)."""

    def on_first_token(self, seq: Sequence, ttft: float) -> None: ...
    def on_token(self, seq: Sequence, itl: float | None) -> None: ...
    def on_finish(self, seq: Sequence) -> None: ...
    def on_preempt(self, seq: Sequence) -> None: ...
    def on_error(self, seq: Sequence) -> None: ...
    def on_step(self, prefill_tokens: int, decode_tokens: int) -> None: ...
    def on_prefix_lookup(self, queried_tokens: int, hit_tokens: int) -> None: ...


class SimEngine:
    """Continuous batching over a block-based KV cache."""

    def __init__(
        self,
        settings: SimSettings,
        observer: EngineObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.settings = settings
        self.cache = (
            PrefixCachePool(settings.num_blocks, settings.block_size)
            if settings.prefix_caching
            else None
        )
        """Automatic prefix caching (settings.prefix_caching): the pool, keyed by block hash."""
        self.pool: BlockPool = self.cache or BlockPool(settings.num_blocks)
        self.waiting: deque[Sequence] = deque()
        self.running: dict[Sequence, None] = {}
        """Running sequences in admission order (a dict: O(1) membership and removal)."""
        self.clock = clock
        """Seconds; time.monotonic when serving, a virtual clock under `simulate`."""
        self.observer = observer or EngineObserver()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.steps = 0
        self.after_step: list[Callable[[], None]] = []
        """Called once each step has ended (the KV-event publisher sends its batch)."""

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="sim-engine")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    @property
    def kv_usage(self) -> float:
        return self.pool.used / self.pool.num_blocks

    def blocks_needed(self, tokens: int) -> int:
        return math.ceil(tokens / self.settings.block_size)

    # ------------------------------------------------------------------ requests

    def add(self, seq: Sequence) -> None:
        if seq.imported_states is not None:
            seq.states = list(seq.imported_states)
            seq.computed = len(seq.prompt)
        self.waiting.append(seq)
        self._wake.set()

    def abort(self, seq: Sequence) -> None:
        """Drop a sequence wherever it is (client gone); frees its blocks."""
        if seq.finished:
            return
        if seq in self.waiting:
            self.waiting.remove(seq)
        self.running.pop(seq, None)
        self._release(seq)
        seq.finished, seq.finish_reason = True, "abort"

    def release_held(self, seq: Sequence) -> None:
        """Free the blocks a finished PD producer sequence kept for transfer."""
        self._release(seq)

    def _release(self, seq: Sequence) -> None:
        if seq.blocks:
            self.pool.release(seq.blocks)
            seq.blocks = []
        seq.stored_blocks = 0

    def _cached_prefix(self, seq: Sequence) -> list[int] | None:
        """Cached blocks of a waiting sequence's prefix; None when it is not looked up (no
        cache, blocks given already, or a sequence partly computed). Imported KV without
        blocks (virtual runs) is looked up: its cached blocks are shared, not filled."""
        if self.cache is None or seq.blocks:
            return None
        if seq.computed and seq.imported_states is None:
            return None
        return self.cache.lookup(seq)

    def allocate_imported(self, seq: Sequence, use_cache: bool = True) -> int | None:
        """PD decode side, before an imported prompt's KV is pulled: all its blocks at once,
        those of its prefix this instance caches (their KV need not travel: vLLM's scheduler
        counts local hits before a KV connector loads the rest) and free ones for the rest.
        None while too few are free (nothing taken). Returns how many blocks were cached."""
        n = self.blocks_needed(len(seq.prompt))
        cache = self.cache if use_cache else None
        hit = cache.lookup(seq) if cache is not None else []
        reusable = cache.free_among(hit) if cache is not None else 0
        if n - len(hit) > self.pool.free - reusable:
            return None
        if cache is not None:
            cache.reuse(seq, hit)
            self.observer.on_prefix_lookup(seq.num_tokens, seq.computed)
        got = self.pool.allocate(n - len(hit))
        assert got is not None
        seq.blocks = list(hit) + got
        return len(hit)

    def _store_full_blocks(self, seq: Sequence) -> None:
        if self.cache is not None:
            self.cache.store_filled(seq)

    # ------------------------------------------------------------------ scheduling

    def _preempt_one(self, keep: Sequence) -> bool:
        """Free the youngest running sequence other than `keep` (recompute preemption)."""
        victims = [s for s in self.running if s is not keep]
        if not victims:
            return False
        victim = max(victims, key=lambda s: s.arrival)
        del self.running[victim]
        self._release(victim)
        victim.computed, victim.states = 0, []
        victim.imported_states = None
        victim.preemptions += 1
        self.waiting.appendleft(victim)
        self.observer.on_preempt(victim)
        return True

    def _ensure_blocks(self, seq: Sequence, tokens: int) -> bool:
        need = self.blocks_needed(tokens) - len(seq.blocks)
        while need > 0:
            got = self.pool.allocate(need)
            if got is not None:
                seq.blocks += got
                return True
            if not self._preempt_one(seq):
                return False
        return True

    @property
    def ranks(self) -> int:
        """Data-parallel ranks of the instance: each schedules its own sequences under its own
        share of the batch limits (one rank without a step model)."""
        model = self.settings.step_model
        return model.data_parallel if model is not None else 1

    def _schedule(self) -> tuple[list[tuple[Sequence, int]], list[Sequence]]:
        """This step's prefill chunks and decode sequences, each rank within its budget."""
        ranks = self.ranks
        budget = [max(1, self.settings.max_num_batched_tokens // ranks)] * ranks
        seq_cap = max(1, self.settings.max_num_seqs // ranks)
        count = [0] * ranks
        decodes: list[Sequence] = []
        for seq in list(self.running):
            if seq not in self.running:
                continue
            count[seq.rank] += 1
            if not seq.prefilled or budget[seq.rank] <= 0:
                continue
            if not self._ensure_blocks(seq, seq.num_tokens + 1):
                # Nothing left to preempt: this sequence alone overflows the cache.
                del self.running[seq]
                count[seq.rank] -= 1
                self._fail(seq, "the KV cache cannot hold this sequence")
                continue
            decodes.append(seq)
            budget[seq.rank] -= 1
        prefills: list[tuple[Sequence, int]] = []
        for seq in list(self.running):
            if seq in self.running and not seq.prefilled and budget[seq.rank] > 0:
                chunk = min(seq.num_tokens - seq.computed, budget[seq.rank])
                if self._ensure_blocks(seq, seq.computed + chunk):
                    prefills.append((seq, chunk))
                    budget[seq.rank] -= chunk
        while self.waiting:
            open_ranks = [r for r in range(ranks) if budget[r] > 0 and count[r] < seq_cap]
            if not open_ranks:
                break
            rank = min(open_ranks, key=lambda r: (count[r], -budget[r]))
            seq = self.waiting[0]
            looked_up = self._cached_prefix(seq)
            hit = looked_up or []
            imported = seq.imported_states is not None
            start = len(hit) * self.settings.block_size if hit and not imported else seq.computed
            remaining = seq.num_tokens - start
            chunk = min(remaining, budget[rank])
            need = self.blocks_needed(start + max(chunk, 1)) - len(seq.blocks) - len(hit)
            reusable = self.cache.free_among(hit) if self.cache is not None and hit else 0
            if need > 0 and need > self.pool.free - reusable:
                break  # wait for blocks to free up; never preempt to admit
            if looked_up is not None:
                assert self.cache is not None
                self.cache.reuse(seq, hit, imported=imported)
                self.observer.on_prefix_lookup(seq.num_tokens, len(hit) * self.settings.block_size)
            if need > 0:
                got = self.pool.allocate(need)
                assert got is not None
                seq.blocks += got
            self.waiting.popleft()
            self.running[seq] = None
            seq.rank = rank
            count[rank] += 1
            if remaining > 0:
                prefills.append((seq, chunk))
                budget[rank] -= chunk
            else:
                self._store_full_blocks(seq)  # imported KV is cached once it landed
                decodes.append(seq)  # imported KV: straight to decode
                budget[rank] -= 1
        return prefills, decodes

    def step_seconds(
        self,
        prefill_tokens: int,
        decodes: list[Sequence],
        prefills: list[tuple[Sequence, int]] | None = None,
    ) -> float:
        s = self.settings
        fixed = s.fixed_ttft_seconds is not None or s.fixed_itl_seconds is not None
        if s.step_model is not None and not fixed:
            loads: list[tuple[list[tuple[int, int]], list[int]]] = [
                ([], []) for _ in range(self.ranks)
            ]
            for seq, chunk in prefills or []:
                loads[seq.rank][0].append((seq.computed, chunk))
            for seq in decodes:
                loads[seq.rank][1].append(seq.num_tokens)
            return latency.step_seconds(s.step_model, loads)
        seconds = 0.0
        if prefill_tokens:
            if s.fixed_ttft_seconds is not None:
                seconds += s.fixed_ttft_seconds
            elif s.prefill_tokens_per_second:
                seconds += prefill_tokens / s.prefill_tokens_per_second
        if decodes:
            if s.fixed_itl_seconds is not None:
                seconds += s.fixed_itl_seconds
            else:
                kv_tokens = sum(seq.num_tokens for seq in decodes)
                seconds += s.decode_step_seconds + kv_tokens * s.decode_seconds_per_kv_token
        return seconds

    def begin_step(self) -> Step | None:
        """Schedule one step: what it computes and how long it takes (None: nothing to run)."""
        prefills, decodes = self._schedule()
        if not prefills and not decodes:
            return None
        prefill_tokens = sum(chunk for _, chunk in prefills)
        seconds = self.step_seconds(prefill_tokens, decodes, prefills)
        return Step(prefills, decodes, prefill_tokens, seconds)

    def end_step(self, step: Step) -> None:
        """The step's time has passed: advance prefills and emit the tokens."""
        self.steps += 1
        self.observer.on_step(step.prefill_tokens, len(step.decodes))
        for seq, chunk in step.prefills:
            self._advance_prefill(seq, chunk)
        for seq in step.decodes:
            if not seq.finished:
                self._emit(seq)
        for hook in self.after_step:
            hook()

    async def _loop(self) -> None:
        while True:
            if not self.waiting and not self.running:
                self._wake.clear()
                await self._wake.wait()
            step = self.begin_step()
            if step is None:
                self._wake.clear()
                # Blocked on KV space held by PD transfers: poll until blocks free up.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), 0.05)
                continue
            await asyncio.sleep(step.seconds)
            self.end_step(step)

    def _advance_prefill(self, seq: Sequence, chunk: int) -> None:
        if seq.finished:
            return
        start = seq.computed
        if seq.timing_only:
            seq.computed += chunk
            self._store_full_blocks(seq)
            if seq.prefilled:
                self._emit(seq)
            return
        state = seq.states[-1] if seq.states else model.initial_state(seq.seed)
        for token in seq.token_range(start, start + chunk):
            state = model.advance(state, token)
            seq.states.append(state)
        seq.computed += chunk
        self._store_full_blocks(seq)
        if seq.prefilled:
            if seq.pooling:
                self._finish(seq, "stop")
            else:
                self._emit(seq)

    def _emit(self, seq: Sequence) -> None:
        """Sample the next token from the current state and hand it to the consumer."""
        now = self.clock()
        if seq.timing_only:
            token = state = 0
        else:
            state = seq.states[-1]
            token = model.next_token(state, seq.temperature, seq.sample_seed, len(seq.output))
            seq.states.append(model.advance(state, token))
        seq.output.append(token)
        seq.computed += 1
        if self.cache is not None and (seq.num_tokens - 1) % self.settings.block_size == 0:
            self._store_full_blocks(seq)
        if seq.first_token_at is None:
            seq.first_token_at = now
            self.observer.on_first_token(seq, now - seq.arrival)
            self.observer.on_token(seq, None)
        else:
            self.observer.on_token(seq, now - (seq.last_token_at or now))
        seq.last_token_at = now
        if seq.timing_only:
            if len(seq.output) >= seq.max_tokens:
                self._finish(seq, "length")
            return
        delta, stopped = seq.text.push(model.detokenize(token))
        finish = "stop" if stopped else "length" if len(seq.output) >= seq.max_tokens else None
        if finish == "length":
            delta += seq.text.flush()
        seq.events.put_nowait(Event("token", token=token, text=delta, state=state))
        if finish:
            self._finish(seq, finish)

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.finished, seq.finish_reason = True, reason
        self.running.pop(seq, None)
        if not seq.hold_blocks:
            self._release(seq)
        self.observer.on_finish(seq)
        if not seq.timing_only:
            seq.events.put_nowait(Event("finish", reason=reason))
        self._wake.set()

    def _fail(self, seq: Sequence, message: str) -> None:
        self._release(seq)
        seq.finished, seq.finish_reason = True, "error"
        self.observer.on_error(seq)
        seq.events.put_nowait(Event("error", reason=message))
