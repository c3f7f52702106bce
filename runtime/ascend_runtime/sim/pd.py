"""Prefill/decode KV hand-off of the sim engine, through the same KV-transfer component as
production (`ascend_runtime.kv`): real bytes, the real rank map, the TCP transport.

Each simulated rank owns a small KV cache (2 layers, 8-byte K and 4- or 8-byte V per head) in
the instance's layout, in anonymous memory that the OS fills lazily. When a prefill finishes,
every prefill rank writes its share of the prompt's KV (a token's K encodes its sim state, so
the KV is self-checking), the blocks are held, and the answer carries kv_transfer_params.
A decode instance allocates its blocks, pulls every decode rank's share from the prefill ranks
with `kv.pull`, verifies and decodes the states from its own ranks' caches, and the prefill side
frees its blocks when every rank pair reported done (or the hold times out).
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import struct
from collections.abc import Iterator
from typing import Any

from ..config import RuntimeConfig
from ..kv.holds import Holds, KvTransferError
from ..kv.layout import KvLayout, KvSpec
from ..kv.pull import placement_params, pull
from ..kv.rank_map import KvPlacement
from ..kv.tcp import TcpKvClient, TcpKvServer
from ..kv.transfer import Region, region_of_bytes
from ..openai import OpenAIError
from .engine import Sequence, SimEngine

LAYERS = 2
K_BYTES = 8
REQUIRED_PARAMS = (
    "remote_engine_id",
    "remote_host",
    "remote_port",
    "remote_block_ids",
    "remote_request_id",
)
_U64 = struct.Struct("<Q")
_MASK = (1 << 64) - 1


def placement_of(config: RuntimeConfig) -> KvPlacement:
    """This instance's placement: its TP/PCP/DCP and the model's KV heads (one replicated
    latent-like head when the architecture is unknown)."""
    topo, sim = config.topology, config.sim
    slots = topo.prefill_context * topo.decode_context
    return KvPlacement(
        tp=topo.tensor,
        kv_heads=sim.kv_heads or 1,
        block_size=sim.block_size,
        pcp=topo.prefill_context,
        dcp=topo.decode_context,
        interleave=sim.block_size if slots > 1 else 1,  # vllm-ascend's rule with PD
        mla=bool(sim.kv_mla) or sim.kv_heads is None,
        role=config.role,
    )


def layout_of(placement: KvPlacement, num_blocks: int) -> KvLayout:
    v_bytes = 4 if placement.mla else 8  # MLA: K and V sizes differ
    spec = KvSpec(LAYERS, num_blocks, placement.block_size, placement.heads_per_rank, K_BYTES,
                  v_bytes, 1)  # fmt: skip
    return KvLayout(spec, "cross_layer")


def _mix(token: int, layer: int, head: int) -> int:
    return (
        token * 0x9E3779B97F4A7C15 + layer * 0xC2B2AE3D27D4EB4F + head * 0x165667B19E3779F9
    ) & _MASK


def k_bytes(state: int, token: int, layer: int, head: int) -> bytes:
    return _U64.pack((state ^ _mix(token, layer, head)) & _MASK)


def v_bytes(state: int, token: int, layer: int, head: int, size: int) -> bytes:
    return _U64.pack((state * 0xFF51AFD7ED558CCD + _mix(token, head, layer)) & _MASK)[:size]


class RankCaches:
    """Every simulated rank's K and V buffers of one instance."""

    def __init__(self, placement: KvPlacement, num_blocks: int):
        self.placement = placement
        self.layout = layout_of(placement, num_blocks)
        self.buffers = {
            r: {w: mmap.mmap(-1, max(1, self.layout.buffer_bytes(w))) for w in ("k", "v")}
            for r in range(placement.ranks)
        }
        self.regions = {
            r: {w: region_of_bytes(w, buf) for w, buf in bufs.items()}
            for r, bufs in self.buffers.items()
        }

    def region(self, rank: int) -> dict[str, Region]:
        return self.regions[rank]

    def _slots(
        self, rank: int, num_tokens: int, blocks: list[int], start: int = 0
    ) -> Iterator[tuple[int, int, int, int, int]]:
        """(token, global head, local head, block, offset) of every (token, head) rank holds,
        tokens from `start` on."""
        p = self.placement
        first = p.first_head(p.split(rank)[1])
        slot = p.slot_of_rank(rank)
        for t in range(start, num_tokens):
            if p.slot_of_token(t) != slot:
                continue
            pos = p.local_position(t)
            for j in range(p.heads_per_rank):
                yield t, first + j, j, blocks[pos // p.block_size], pos % p.block_size

    def write(self, states: list[int], blocks: list[int]) -> None:
        v_size = self.layout.spec.v_dim
        for rank, bufs in self.buffers.items():
            for t, head, j, block, off in self._slots(rank, len(states), blocks):
                for layer in range(LAYERS):
                    k = self.layout.offset("k", block, layer, off, j)
                    bufs["k"][k : k + K_BYTES] = k_bytes(states[t], t, layer, head)
                    v = self.layout.offset("v", block, layer, off, j)
                    bufs["v"][v : v + v_size] = v_bytes(states[t], t, layer, head, v_size)

    def read(self, num_tokens: int, blocks: list[int], start: int = 0) -> list[int]:
        """The states every rank's copy of the KV encodes, of tokens [start, num_tokens);
        raises if any copy disagrees."""
        v_size = self.layout.spec.v_dim
        states: list[int | None] = [None] * num_tokens
        for rank, bufs in self.buffers.items():
            for t, head, j, block, off in self._slots(rank, num_tokens, blocks, start):
                for layer in range(LAYERS):
                    k = self.layout.offset("k", block, layer, off, j)
                    state = _U64.unpack(bufs["k"][k : k + K_BYTES])[0] ^ _mix(t, layer, head)
                    v = self.layout.offset("v", block, layer, off, j)
                    if bytes(bufs["v"][v : v + v_size]) != v_bytes(state, t, layer, head, v_size):
                        raise ValueError(f"token {t} layer {layer} head {head}: K and V disagree")
                    if states[t] is None:
                        states[t] = state
                    elif states[t] != state:
                        raise ValueError(f"token {t}: ranks hold different KV")
        missing = [t for t in range(start, num_tokens) if states[t] is None]
        if missing:
            raise ValueError(f"no rank received the KV of tokens {missing[:5]}")
        return [s for s in states[start:] if s is not None]


class KvExporter:
    """Prefill side: writes finished prompts' KV into its ranks and serves it over TCP."""

    def __init__(  # noqa: PLR0917
        self,
        engine: SimEngine,
        config: RuntimeConfig,
        engine_id: str,
        host: str,
        port: int,
        bind_host: str = "0.0.0.0",
    ):
        self.engine, self.engine_id, self.host = engine, engine_id, host
        self.placement = placement_of(config)
        self.caches = RankCaches(self.placement, config.sim.num_blocks)
        self.timeout = config.sim.kv_transfer_timeout_seconds
        self.held: dict[str, Sequence] = {}
        self.holds = Holds(self._release, self.timeout)
        self.server = TcpKvServer(self.caches.region, self.holds, engine_id, bind_host, port)
        self._reaper: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        return self.server.port

    async def start(self) -> None:
        await self.server.start()
        self._reaper = asyncio.create_task(self._reap(), name="kv-reaper")

    async def stop(self) -> None:
        if self._reaper:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        await self.server.stop()
        self.holds.release_all()

    def hold(self, seq: Sequence) -> dict[str, Any]:
        """Write `seq`'s prompt KV into every rank, keep its blocks, return kv_transfer_params."""
        prompt = len(seq.prompt)
        self.caches.write(seq.states[:prompt], seq.blocks)
        self.held[seq.request_id] = seq
        self.holds.hold(seq.request_id)
        ports = {str(r): self.port for r in range(self.placement.ranks)}  # one port, all ranks
        return {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_engine_id": self.engine_id,
            "remote_host": self.host,
            "remote_port": self.port,
            "remote_ports": ports,
            "remote_request_id": seq.request_id,
            "remote_block_ids": list(seq.blocks),
            "remote_num_tokens": prompt,
        } | placement_params(self.placement, self.caches.layout)

    def _release(self, request_id: str) -> None:
        seq = self.held.pop(request_id, None)
        if seq is not None:
            self.engine.release_held(seq)

    def release_expired(self, now: float | None = None) -> int:
        return len(self.holds.expire(now))

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.timeout / 4))
            self.holds.expire()


class KvImporter:
    """Decode side: allocates blocks, pulls every rank's share, decodes the states."""

    def __init__(self, engine: SimEngine, config: RuntimeConfig):
        self.engine = engine
        self.placement = placement_of(config)
        self.caches = RankCaches(self.placement, config.sim.num_blocks)
        self.timeout = config.sim.kv_transfer_timeout_seconds
        self.client = TcpKvClient(timeout=self.timeout, checksum=True)

    async def close(self) -> None:
        await self.client.close()

    async def pull(self, params: dict[str, Any], seq: Sequence) -> None:
        """Give `seq` its prompt's KV: blocks this instance caches already (one context slot
        only: with PCP/DCP a local block is not one prefix block), the rest pulled from the
        prefill instance. Sets its blocks (the engine's after) and imported states."""
        check_params(params)
        prompt_len = len(seq.prompt)
        num = params.get("remote_num_tokens")
        if num is not None and num != prompt_len:
            raise OpenAIError(
                400,
                f"kv_transfer_params cover {num} tokens but the prompt has {prompt_len}: "
                "they belong to another request",
                param="kv_transfer_params",
            )
        cached = await self._allocate(seq)
        start = cached * self.placement.block_size
        blocks = seq.blocks
        try:
            await pull(
                self.client, params, local=self.placement, local_layout=self.caches.layout,
                dst_blocks=blocks, regions=self.caches.region, num_tokens=prompt_len,
                skip_dst_blocks=cached,
            )  # fmt: skip
            pulled = self.caches.read(prompt_len, blocks, start)
        except KvTransferError as exc:
            self._drop(seq)
            raise _as_openai(exc, params) from exc
        except ValueError as exc:
            self._drop(seq)
            raise OpenAIError(
                502,
                f"KV pulled from the prefill engine is corrupt: {exc}",
                type_="kv_transfer_error",
            ) from exc
        except BaseException:
            self._drop(seq)
            raise
        seq.imported_states = seq.states[:start] + pulled

    def _drop(self, seq: Sequence) -> None:
        """Undo a failed import: its blocks back to the pool, nothing computed."""
        self.engine.pool.release(seq.blocks)
        seq.blocks, seq.states, seq.computed, seq.stored_blocks = [], [], 0, 0

    async def _allocate(self, seq: Sequence) -> int:
        """Wait (up to the transfer timeout) until the prompt's blocks can be had at once,
        as vLLM's scheduler would; returns how many were cached here already (one context
        slot only: with PCP/DCP a local block is not one prefix block)."""
        deadline = asyncio.get_running_loop().time() + self.timeout
        while True:
            cached = self.engine.allocate_imported(seq, use_cache=self.placement.slots == 1)
            if cached is not None:
                return cached
            if asyncio.get_running_loop().time() > deadline:
                n = self.engine.blocks_needed(len(seq.prompt))
                raise OpenAIError(
                    503,
                    f"no {n} free KV blocks on this decode instance within {self.timeout:g} s",
                    type_="server_error",
                )
            await asyncio.sleep(0.01)


def _as_openai(exc: KvTransferError, params: dict[str, Any]) -> OpenAIError:
    if exc.code == "kv_not_found":
        return OpenAIError(
            400,
            f"kv_transfer_params are expired or unknown: {exc}",
            param="kv_transfer_params",
        )
    if exc.code == "bad_params":
        return OpenAIError(400, str(exc), param="kv_transfer_params")
    where = f"prefill engine {params.get('remote_engine_id')}"
    return OpenAIError(
        502, f"could not pull KV blocks from {where}: {exc}", type_="kv_transfer_error"
    )


def check_params(params: dict[str, Any]) -> None:
    missing = [k for k in REQUIRED_PARAMS if params.get(k) in (None, "")]
    if missing:
        raise OpenAIError(
            400,
            f"kv_transfer_params lacks {', '.join(missing)}: pass the "
            "kv_transfer_params a prefill instance returned",
            param="kv_transfer_params",
        )
    if not isinstance(params["remote_block_ids"], list) or not all(
        isinstance(b, int) for b in params["remote_block_ids"]
    ):
        raise OpenAIError(
            400,
            "kv_transfer_params.remote_block_ids must be a list of integers",
            param="kv_transfer_params",
        )
    if not isinstance(params["remote_port"], int):
        raise OpenAIError(
            400, "kv_transfer_params.remote_port must be an integer", param="kv_transfer_params"
        )
