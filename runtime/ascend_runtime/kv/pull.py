"""Decode side of a prefill->decode transfer: from kv_transfer_params to bytes in place.

The prefill side publishes its placement and layout in kv_transfer_params (`placement_params`);
the decode side plans with `rank_map`, turns chunks into segments, reads every (decode rank,
prefill rank) share concurrently, then reports each pair done so the prefill side frees its
blocks. Any failure aborts the request on every prefill rank it touched and raises.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .holds import KvTransferError
from .layout import KvLayout, KvSpec
from .rank_map import KvPlacement, plan_pulls, prefill_endpoint
from .transfer import KvTransport, PullOrder, Region, chunk_segments, completion_pairs

PARAM_KEYS = (
    "remote_tp_size",
    "remote_pcp_size",
    "remote_dcp_size",
    "remote_interleave",
    "remote_block_size",
    "remote_num_blocks",
    "remote_kv_layout",
)


def placement_params(placement: KvPlacement, layout: KvLayout) -> dict[str, Any]:
    """What a prefill instance adds to kv_transfer_params so decode ranks can plan."""
    return {
        "remote_tp_size": placement.tp,
        "remote_pcp_size": placement.pcp,
        "remote_dcp_size": placement.dcp,
        "remote_interleave": placement.interleave,
        "remote_block_size": placement.block_size,
        "remote_num_blocks": layout.spec.num_blocks,
        "remote_kv_layout": layout.name,
    }


def remote_side(
    params: Mapping[str, Any], local: KvPlacement, local_layout: KvLayout
) -> tuple[KvPlacement, KvLayout]:
    """The prefill instance's placement and layout, from its kv_transfer_params."""
    missing = [k for k in PARAM_KEYS if k not in params]
    if missing:
        raise KvTransferError(
            "bad_params",
            f"kv_transfer_params lack {', '.join(missing)}: they must come from an ascend-serve "
            "prefill instance of the same deployment",
        )
    try:
        placement = KvPlacement(
            tp=int(params["remote_tp_size"]),
            kv_heads=local.kv_heads,
            block_size=int(params["remote_block_size"]),
            pcp=int(params["remote_pcp_size"]),
            dcp=int(params["remote_dcp_size"]),
            interleave=int(params["remote_interleave"]),
            mla=local.mla,
            role="prefill",
        )
        spec = local_layout.spec
        layout = KvLayout(
            KvSpec(
                spec.num_layers,
                int(params["remote_num_blocks"]),
                placement.block_size,
                placement.heads_per_rank,
                spec.k_dim,
                spec.v_dim,
                spec.itemsize,
            ),
            str(params["remote_kv_layout"]),
        )
    except (TypeError, ValueError) as exc:
        raise KvTransferError("bad_params", f"kv_transfer_params do not fit: {exc}") from exc
    return placement, layout


@dataclass
class PullResult:
    bytes: int
    reads: int
    released: bool


async def pull(
    transport: KvTransport,
    params: Mapping[str, Any],
    *,
    local: KvPlacement,
    local_layout: KvLayout,
    dst_blocks: Sequence[int],
    regions: Callable[[int], dict[str, Region]],
    num_tokens: int,
    ranks: Iterable[int] | None = None,
    skip_dst_blocks: int = 0,
) -> PullResult:
    """Pull a request's KV into this instance's `ranks` (all of them by default); blocks of
    the block table before `skip_dst_blocks` are cached locally already and not read."""
    remote, remote_layout = remote_side(params, local, local_layout)
    request_id, engine_id = str(params["remote_request_id"]), str(params["remote_engine_id"])
    src_blocks = list(params["remote_block_ids"])
    if len(src_blocks) < remote.blocks_needed(num_tokens):
        raise KvTransferError(
            "bad_params",
            f"kv_transfer_params list {len(src_blocks)} blocks but {num_tokens} tokens need "
            f"{remote.blocks_needed(num_tokens)}: they belong to another request",
        )
    plans = plan_pulls(remote, local, num_tokens)
    expected = completion_pairs(plans, remote.ranks)
    mine = list(range(local.ranks)) if ranks is None else list(ranks)
    orders: list[PullOrder] = []
    for r in mine:
        chunks = [c for c in plans[r] if c.dst_block >= skip_dst_blocks]
        for p, (reads, writes) in chunk_segments(
            chunks, remote_layout, src_blocks, local_layout, dst_blocks
        ).items():
            orders.append(PullOrder(request_id, engine_id, p, r, expected, reads, writes))
    try:
        endpoints = {o.rank: prefill_endpoint(params, remote, o.rank) for o in orders} | {
            p: prefill_endpoint(params, remote, p) for p, d in expected if d in mine
        }
    except ValueError as exc:
        raise KvTransferError("bad_params", str(exc)) from exc
    results = await asyncio.gather(
        *(transport.read(endpoints[o.rank], o, regions(o.consumer)) for o in orders),
        return_exceptions=True,
    )
    failure = next((r for r in results if isinstance(r, BaseException)), None)
    if failure is not None:
        for endpoint in set(endpoints.values()):
            with contextlib.suppress(KvTransferError):
                await transport.abort(endpoint, request_id, engine_id)
        raise failure
    released = False
    for p, d in sorted(expected):
        if d in mine:
            note = PullOrder(request_id, engine_id, p, d, expected, [], [])
            released = await transport.done(endpoints[p], note) or released
    return PullResult(sum(int(r) for r in results), len(orders), released)  # type: ignore[arg-type]
