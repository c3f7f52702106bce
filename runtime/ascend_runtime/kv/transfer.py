"""Turning a rank map's chunks into byte segments, and the memory the transports move.

A transport reads `src` segments of a remote rank's registered regions (named "k" and "v")
into `dst` segments of local regions; both lists hold the same bytes in the same order, so one
message carries many blocks with no per-block round trip.
"""

from __future__ import annotations

import ctypes
import mmap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from .holds import Pair
from .layout import DIMS, KvLayout, Which
from .rank_map import Chunk

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Segment:
    region: str
    offset: int
    length: int


@dataclass
class Region:
    """A registered buffer: a writable memoryview of it plus its address (for RDMA engines)."""

    name: str
    view: memoryview
    address: int

    @property
    def length(self) -> int:
        return self.view.nbytes


def region_of_bytes(name: str, buf: bytearray | mmap.mmap) -> Region:
    """A writable host buffer (bytearray, anonymous mmap) as a region."""
    view = memoryview(buf).cast("B")
    address = ctypes.addressof(ctypes.c_char.from_buffer(buf)) if len(buf) else 0
    return Region(name, view, address)


def region_of_tensor(name: str, tensor: torch.Tensor) -> Region:
    """A host tensor's bytes, without copying (pinned buffers stay pinned)."""
    if tensor.device.type != "cpu":
        raise ValueError(
            f"region {name!r}: the TCP transport sends host memory, got a {tensor.device} "
            "tensor; offload it to a pinned host buffer first"
        )
    if not tensor.is_contiguous():
        raise ValueError(f"region {name!r} must be a contiguous buffer (the raw KV allocation)")
    nbytes = tensor.numel() * tensor.element_size()
    array = (ctypes.c_char * nbytes).from_address(tensor.data_ptr())
    return Region(name, memoryview(array).cast("B"), tensor.data_ptr())


def check_compatible(src: KvLayout, dst: KvLayout) -> None:
    """Segments pair up byte for byte only when both sides order a block's inside alike."""
    inner = [DIMS[d] for d in src.order if DIMS[d] in ("tokens", "heads", "dim")]
    other = [DIMS[d] for d in dst.order if DIMS[d] in ("tokens", "heads", "dim")]
    if inner != other:
        raise ValueError(
            f"prefill layout {src.name} orders a block as {inner} but decode layout {dst.name} "
            f"as {other}: use the same token/head order on both sides"
        )
    for field in ("num_layers", "k_dim", "v_dim", "itemsize"):
        if getattr(src.spec, field) != getattr(dst.spec, field):
            raise ValueError(
                f"prefill and decode KV caches differ in {field}: "
                f"{getattr(src.spec, field)} vs {getattr(dst.spec, field)}"
            )


def chunk_segments(
    chunks: Iterable[Chunk],
    src: KvLayout,
    src_blocks: Sequence[int],
    dst: KvLayout,
    dst_blocks: Sequence[int],
) -> dict[int, tuple[list[Segment], list[Segment]]]:
    """Per prefill rank: (remote segments to read, local segments to fill), index-aligned
    (segment i of each is the same bytes) and merged where both sides continue."""
    check_compatible(src, dst)
    pairs: dict[int, list[tuple[Segment, Segment]]] = {}
    for c in chunks:
        if c.src_block >= len(src_blocks) or c.dst_block >= len(dst_blocks):
            raise ValueError(
                f"request has {len(src_blocks)} prefill and {len(dst_blocks)} decode blocks, "
                f"but chunk {c} needs block {c.src_block} / {c.dst_block}"
            )
        out = pairs.setdefault(c.prefill_rank, [])
        for which in ("k", "v"):
            w: Which = which  # type: ignore[assignment]
            s_spans = src.spans(
                w, src_blocks[c.src_block], c.src_token, c.tokens, c.src_head, c.heads
            )
            d_spans = dst.spans(
                w, dst_blocks[c.dst_block], c.dst_token, c.tokens, c.dst_head, c.heads
            )
            _pair_up(which, s_spans, d_spans, out)
    return {rank: _merged(p) for rank, p in pairs.items()}


def _pair_up(
    region: str,
    s_spans: list[tuple[int, int]],
    d_spans: list[tuple[int, int]],
    out: list[tuple[Segment, Segment]],
) -> None:
    """Cut both span lists at each other's boundaries so each pair is the same bytes."""
    s_iter, d_iter = iter(s_spans), iter(d_spans)
    s = next(s_iter, None)
    d = next(d_iter, None)
    while s is not None and d is not None:
        n = min(s[1], d[1])
        out.append((Segment(region, s[0], n), Segment(region, d[0], n)))
        s = (s[0] + n, s[1] - n) if s[1] > n else next(s_iter, None)
        d = (d[0] + n, d[1] - n) if d[1] > n else next(d_iter, None)


def _merged(pairs: list[tuple[Segment, Segment]]) -> tuple[list[Segment], list[Segment]]:
    reads: list[Segment] = []
    writes: list[Segment] = []
    for r, w in pairs:
        if (
            reads
            and reads[-1].region == r.region
            and writes[-1].region == w.region
            and reads[-1].offset + reads[-1].length == r.offset
            and writes[-1].offset + writes[-1].length == w.offset
        ):
            reads[-1] = Segment(r.region, reads[-1].offset, reads[-1].length + r.length)
            writes[-1] = Segment(w.region, writes[-1].offset, writes[-1].length + w.length)
        else:
            reads.append(r)
            writes.append(w)
    return reads, writes


def completion_pairs(plans: Sequence[Sequence[Chunk]], prefill_ranks: int) -> set[Pair]:
    """Every (prefill rank, decode rank) that reports done: the readers of each prefill rank;
    a rank nobody reads (an unused replica) is told by decode rank prefill_rank % decode ranks,
    so that every prefill rank frees its blocks without waiting for the timeout."""
    pairs = {(c.prefill_rank, c.decode_rank) for chunks in plans for c in chunks}
    read = {p for p, _ in pairs}
    pairs |= {(p, p % len(plans)) for p in range(prefill_ranks) if p not in read}
    return pairs


@dataclass
class PullOrder:
    """One decode rank's read of one prefill rank's share of a request."""

    request_id: str
    engine_id: str
    rank: int
    """The prefill rank whose regions are read."""
    consumer: int
    """The decode rank reading (reported back in `done`)."""
    expected: set[Pair]
    reads: list[Segment]
    writes: list[Segment]

    @property
    def nbytes(self) -> int:
        return sum(s.length for s in self.reads)


class KvTransport(Protocol):
    """What the decode side needs from a transport (TCP built in, Mooncake optional)."""

    async def read(
        self, endpoint: tuple[str, int], order: PullOrder, local: dict[str, Region]
    ) -> int:
        """Fill `order.writes` of `local` with `order.reads` of the remote rank; bytes moved."""
        ...

    async def done(self, endpoint: tuple[str, int], order: PullOrder) -> bool:
        """Report the pair (order.rank, order.consumer) done; True if that freed the request."""
        ...

    async def abort(self, endpoint: tuple[str, int], request_id: str, engine_id: str) -> None:
        """Tell the prefill side to free a request now (best effort)."""
        ...

    async def close(self) -> None: ...
