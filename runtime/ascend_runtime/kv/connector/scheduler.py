"""Scheduler side of the connector: which requests move KV this step, as plain data.

Decode instance: a request arriving with kv_transfer_params (do_remote_prefill) reports its
prompt as matched externally and asynchronously; once vLLM allocated its blocks the request
goes into the next step's `loads`. Prefill instance: a request with do_remote_decode whose
prompt completes in a step goes into that step's `saves` (the worker stages and holds its
blocks right after the forward pass); when it finishes length-capped, vLLM keeps its blocks
(delay free) and the answer carries kv_transfer_params for the decode instance. A request that
finishes any other way has its hold released (prefill) or its prefill side told (decode).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..layout import KvLayout, KvSpec
from ..pull import placement_params
from .settings import ConnectorSettings

REMOTE_KEYS = ("remote_engine_id", "remote_host", "remote_port", "remote_block_ids")


@dataclass(frozen=True)
class LoadReq:
    """Decode: pull request `request_id`'s prompt KV into `block_ids` (its whole block table);
    blocks before `skip_blocks` are already cached locally."""

    request_id: str
    block_ids: tuple[int, ...]
    num_tokens: int
    params: Mapping[str, Any]
    skip_blocks: int = 0


@dataclass(frozen=True)
class SaveReq:
    """Prefill: after this step's forward pass, stage and hold `block_ids` for decode."""

    request_id: str
    block_ids: tuple[int, ...]
    num_tokens: int


@dataclass
class PdMeta:
    """One step's work for every worker of the instance."""

    loads: list[LoadReq] = field(default_factory=list)
    saves: list[SaveReq] = field(default_factory=list)
    releases: list[str] = field(default_factory=list)
    """Prefill: held requests that will not be handed off (finished otherwise, aborted)."""
    aborts: list[Mapping[str, Any]] = field(default_factory=list)
    """Decode: kv_transfer_params of requests cancelled before their load, so that the prefill
    side frees their blocks now instead of at the timeout."""

    def __bool__(self) -> bool:
        return bool(self.loads or self.saves or self.releases or self.aborts)


def wants_remote_prefill(params: Mapping[str, Any] | None) -> bool:
    return bool(params and params.get("do_remote_prefill"))


def wants_remote_decode(params: Mapping[str, Any] | None) -> bool:
    return bool(params and params.get("do_remote_decode"))


class PdScheduler:
    """Connector bookkeeping in vLLM's scheduler process."""

    def __init__(self, settings: ConnectorSettings):
        self.settings = settings
        placement = settings.placement()
        # Transfers read the workers' host staging buffers, whose layout the settings fix.
        spec = KvSpec(1, settings.num_blocks, settings.block_size, placement.heads_per_rank, 1,
                      1, 1)  # fmt: skip
        self._placement_params = placement_params(placement, KvLayout(spec, settings.layout))
        self._meta = PdMeta()
        self._loading: set[str] = set()
        self._saved: set[str] = set()

    # ------------------------------------------------------------------ decode side

    def matched_tokens(
        self, params: Mapping[str, Any] | None, prompt_len: int, num_computed: int
    ) -> tuple[int, bool]:
        """(tokens the prefill instance provides, loaded asynchronously?)."""
        if not self.settings.consumes or not wants_remote_prefill(params):
            return 0, False
        assert params is not None
        missing = [k for k in REMOTE_KEYS if params.get(k) in (None, "")]
        if missing:
            # Without them nothing can be pulled: compute the prompt locally instead.
            return 0, False
        count = prompt_len - num_computed
        return (count, True) if count > 0 else (0, False)

    def after_alloc(
        self,
        request_id: str,
        params: dict[str, Any] | None,
        block_ids: Sequence[int],
        num_external: int,
        prompt_len: int,
    ) -> None:
        """Blocks are allocated: queue the load (once; vLLM may call this twice)."""
        if not self.settings.consumes or not wants_remote_prefill(params):
            return
        assert params is not None
        params["do_remote_prefill"] = False  # a second call (after the load) queues nothing
        if num_external <= 0:
            return
        local = self.settings.placement()
        cached = prompt_len - num_external
        self._meta.loads.append(
            LoadReq(
                request_id,
                tuple(block_ids),
                prompt_len,
                dict(params),
                skip_blocks=cached // (local.block_size * local.slots),
            )
        )
        self._loading.add(request_id)

    def load_finished(self, request_id: str) -> None:
        self._loading.discard(request_id)

    # ------------------------------------------------------------------ prefill side

    def scheduled(
        self,
        request_id: str,
        params: Mapping[str, Any] | None,
        block_ids: Sequence[int],
        prompt_len: int,
        computed_after_step: int,
    ) -> None:
        """A request runs this step; `computed_after_step` counts its tokens with KV after it."""
        if (
            not self.settings.produces
            or not wants_remote_decode(params)
            or request_id in self._saved
            or computed_after_step < prompt_len
        ):
            return
        self._meta.saves.append(SaveReq(request_id, tuple(block_ids), prompt_len))
        self._saved.add(request_id)

    def finished(
        self,
        request_id: str,
        params: Mapping[str, Any] | None,
        block_ids: Sequence[int],
        length_capped: bool,
        prompt_len: int,
    ) -> tuple[bool, dict[str, Any] | None]:
        """(keep the blocks until the decode side is done?, kv_transfer_params to return)."""
        if request_id in self._loading:  # cancelled while its KV was on the way
            self._loading.discard(request_id)
            if params:
                self._meta.aborts.append(dict(params))
            return False, None
        if wants_remote_prefill(params):  # cancelled before its blocks were allocated
            assert params is not None
            self._meta.aborts.append(dict(params))
            return False, None
        saved = request_id in self._saved
        self._saved.discard(request_id)
        if not saved:
            return False, None
        if not length_capped or not block_ids:
            self._meta.releases.append(request_id)
            return False, None
        s = self.settings
        out = {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_engine_id": s.engine_id,
            "remote_host": s.host,
            "remote_port": s.side_port,
            "remote_request_id": request_id,
            "remote_block_ids": list(block_ids),
            "remote_num_tokens": prompt_len,
        } | self._placement_params
        if s.rank_hosts:
            out["remote_hosts"] = {str(r): h for r, h in s.rank_hosts.items()}
        return True, out

    # ------------------------------------------------------------------ every step

    def build_meta(self) -> PdMeta:
        """This step's work; the scheduler starts collecting the next step's."""
        meta, self._meta = self._meta, PdMeta()
        return meta
