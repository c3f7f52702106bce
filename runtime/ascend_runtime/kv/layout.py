"""Where each element of a rank's paged KV cache lives, for per-layer and cross-layer layouts.

A cache is described logically as (blocks, layers, tokens, heads, dim), separately for K and V
(their head sizes differ under MLA: a 512-wide latent and a 64-wide rope part). A layout is the
physical order of those five dimensions:

- cross-layer (``blocks`` outermost): all layers of one block are adjacent, so a block is one
  contiguous segment per K and V to offload or send;
- per-layer (``layers`` then ``blocks``): each layer's cache is contiguous on its own, as vLLM
  allocates by default; a block is one segment per layer.

Inside a block, tokens/heads/dim may come in any order (NHD or HND). Per-layer views of either
layout are strided tensors of shape (blocks, tokens, heads, dim) that kernels write through.
The pure part (offsets, spans) needs no torch; `allocate` does.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

DIMS = ("blocks", "layers", "tokens", "heads", "dim")
LAYOUTS: dict[str, tuple[str, ...]] = {
    "cross_layer": ("blocks", "layers", "tokens", "heads", "dim"),
    "cross_layer_hnd": ("blocks", "layers", "heads", "tokens", "dim"),
    "per_layer": ("layers", "blocks", "tokens", "heads", "dim"),
    "per_layer_hnd": ("layers", "blocks", "heads", "tokens", "dim"),
}
Which = Literal["k", "v"]
# vLLM 0.3x's KVCacheLayout names: the physical order of its logical (L, B, H, N, C) axes.
PAGE_LAYOUTS = ("LBHNC", "LBNHC", "LHBNC", "BLHNC", "BLNHC", "BHLNC")


@dataclass(frozen=True)
class KvSpec:
    """Sizes of one rank's KV cache. MLA: heads=1, k_dim=kv_lora_rank, v_dim=rope dim."""

    num_layers: int
    num_blocks: int
    block_size: int
    heads: int
    k_dim: int
    v_dim: int
    itemsize: int = 2

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_blocks", "block_size", "heads", "k_dim", "itemsize"):
            if getattr(self, name) < 1:
                raise ValueError(f"KvSpec.{name} must be >= 1, got {getattr(self, name)}")
        if self.v_dim < 0:
            raise ValueError(f"KvSpec.v_dim must be >= 0 (0: no V cache), got {self.v_dim}")

    def dim_of(self, which: Which) -> int:
        return self.k_dim if which == "k" else self.v_dim

    def logical_shape(self, which: Which) -> tuple[int, int, int, int, int]:
        """(blocks, layers, tokens, heads, dim) of the K or V cache."""
        return (self.num_blocks, self.num_layers, self.block_size, self.heads, self.dim_of(which))

    def token_bytes(self) -> int:
        """Bytes of one token in one layer, K and V together."""
        return self.heads * (self.k_dim + self.v_dim) * self.itemsize

    def block_bytes(self) -> int:
        """Bytes of one block over every layer, K and V together."""
        return self.num_layers * self.block_size * self.token_bytes()


def heads_major(page_layout: str) -> bool:
    """True when a vLLM KVCacheLayout stores a block's heads outside its tokens (HND)."""
    if page_layout not in PAGE_LAYOUTS:
        raise ValueError(
            f"unknown vLLM KV cache layout {page_layout!r}: expected one of {PAGE_LAYOUTS}"
        )
    return page_layout.index("H") < page_layout.index("N")


def physical_order(layout: str | tuple[str, ...]) -> tuple[int, ...]:
    """Indices into DIMS, outermost first: physical dim i holds logical dim order[i]."""
    names = LAYOUTS.get(layout) if isinstance(layout, str) else tuple(layout)
    if names is None:
        raise ValueError(f"unknown KV layout {layout!r}: use one of {', '.join(LAYOUTS)}")
    if sorted(names) != sorted(DIMS):
        raise ValueError(f"a KV layout orders exactly the dims {DIMS}, got {names}")
    if names[0] != "blocks" and names[:2] != ("layers", "blocks"):
        raise ValueError(
            f"KV layout {names} puts {names[0]!r} outside 'blocks': a block must be contiguous "
            "per layer, so start with 'blocks' (cross-layer) or 'layers', 'blocks' (per-layer)"
        )
    return tuple(DIMS.index(n) for n in names)


def inverse_permutation(order: tuple[int, ...]) -> tuple[int, ...]:
    """inv such that permuting by `order` and then by `inv` is the identity."""
    if sorted(order) != list(range(len(order))):
        raise ValueError(f"{order} is not a permutation of 0..{len(order) - 1}")
    inv = [0] * len(order)
    for position, dim in enumerate(order):
        inv[dim] = position
    return tuple(inv)


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


@dataclass(frozen=True)
class KvLayout:
    """A KvSpec laid out in one physical order; K and V are separate buffers."""

    spec: KvSpec
    name: str = "cross_layer"

    def __post_init__(self) -> None:
        self.order  # noqa: B018 (an unknown or unusable layout fails here, naming the fix)

    @functools.cached_property
    def order(self) -> tuple[int, ...]:
        return physical_order(self.name)

    @property
    def cross_layer(self) -> bool:
        return DIMS[self.order[0]] == "blocks"

    def physical_shape(self, which: Which) -> tuple[int, ...]:
        logical = self.spec.logical_shape(which)
        return tuple(logical[d] for d in self.order)

    def strides(self, which: Which) -> tuple[int, ...]:
        """Element strides of the logical (blocks, layers, tokens, heads, dim) view."""
        return self._strides[which]

    @functools.cached_property
    def _strides(self) -> dict[str, tuple[int, ...]]:
        # offsets and spans are computed per token on hot paths: derive the strides once
        inv = inverse_permutation(self.order)
        out = {}
        for which in ("k", "v"):
            physical = contiguous_strides(self.physical_shape(which))  # type: ignore[arg-type]
            out[which] = tuple(physical[inv[d]] for d in range(len(DIMS)))
        return out

    def buffer_bytes(self, which: Which) -> int:
        size = 1
        for n in self.spec.logical_shape(which):
            size *= n
        return size * self.spec.itemsize

    def offset(self, which: Which, block: int, layer: int, token: int, head: int) -> int:
        """Byte offset of element 0 of (block, layer, token, head) in the K or V buffer."""
        s = self.strides(which)
        return (block * s[0] + layer * s[1] + token * s[2] + head * s[3]) * self.spec.itemsize

    def block_segments(self, which: Which, block: int) -> list[tuple[int, int]]:
        """(byte offset, length) runs holding one block: one if cross-layer, else one per layer."""
        if self.spec.dim_of(which) == 0:
            return []
        return self.spans(which, block, 0, self.spec.block_size, 0, self.spec.heads)

    def spans(  # noqa: PLR0917 (a token range and a head range)
        self, which: Which, block: int, token: int, tokens: int, head: int, heads: int
    ) -> list[tuple[int, int]]:
        """Merged (byte offset, length) runs of tokens [token, token+tokens) x heads
        [head, head+heads) of one block, every layer, in increasing offset order."""
        spec = self.spec
        if spec.dim_of(which) == 0 or tokens == 0 or heads == 0:
            return []
        if token < 0 or token + tokens > spec.block_size:
            raise ValueError(
                f"tokens [{token}, {token + tokens}) outside a {spec.block_size} block"
            )
        if head < 0 or head + heads > spec.heads:
            raise ValueError(f"heads [{head}, {head + heads}) outside the {spec.heads} held")
        logical = spec.logical_shape(which)
        ranges = {1: (0, spec.num_layers), 2: (token, tokens), 3: (head, heads), 4: (0, logical[4])}
        strides = self.strides(which)
        inner = [d for d in self.order if d != 0]  # physical order, the block index left out
        # From the innermost dim outwards, a dim whose stride equals the run so far extends the
        # run: wholly when selected whole, by its range when partial (which ends the run).
        run, base = 1, block * strides[0]
        outer = list(inner)
        while outer and strides[outer[-1]] == run:
            d = outer.pop()
            start, count = ranges[d]
            run *= count
            base += start * strides[d]
            if count != logical[d]:
                break
        out: list[tuple[int, int]] = []
        item = spec.itemsize
        for idx in itertools.product(*(range(ranges[d][0], sum(ranges[d])) for d in outer)):
            off = (base + sum(i * strides[d] for i, d in zip(idx, outer, strict=True))) * item
            if out and out[-1][0] + out[-1][1] == off:
                out[-1] = (out[-1][0], out[-1][1] + run * item)
            else:
                out.append((off, run * item))
        out.sort()
        return _merge(out)


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for off, length in spans:
        if merged and merged[-1][0] + merged[-1][1] == off:
            merged[-1] = (merged[-1][0], merged[-1][1] + length)
        else:
            merged.append((off, length))
    return merged


@dataclass
class KvBuffers:
    """Allocated K and V buffers of one layout: `k`/`v` are the logical 5-D views of the raw
    (physically ordered, contiguous) tensors `k_raw`/`v_raw`."""

    layout: KvLayout
    k_raw: torch.Tensor
    v_raw: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer`'s (blocks, tokens, heads, dim) K and V views (strided if cross-layer)."""
        return self.k[:, layer], self.v[:, layer]

    def layer_views(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [self.layer(i) for i in range(self.layout.spec.num_layers)]

    def block_tensors(self, which: Which) -> list[torch.Tensor]:
        """Tensors indexed by block whose blocks are contiguous: the raw buffer when
        cross-layer, one raw slice per layer when per-layer. Copies and sends use these."""
        raw = self.k_raw if which == "k" else self.v_raw
        return [raw] if self.layout.cross_layer else list(raw.unbind(0))


def allocate(
    layout: KvLayout, dtype: torch.dtype, device: str | torch.device = "cpu", pin: bool = False
) -> KvBuffers:
    """Zeroed K and V buffers in `layout`'s physical order, with logical views on top."""
    import torch

    if torch.empty((), dtype=dtype).element_size() != layout.spec.itemsize:
        raise ValueError(
            f"dtype {dtype} has {torch.empty((), dtype=dtype).element_size()} bytes per element "
            f"but the KvSpec says itemsize={layout.spec.itemsize}"
        )
    inv = inverse_permutation(layout.order)
    raws = []
    for which in ("k", "v"):
        raw = torch.zeros(layout.physical_shape(which), dtype=dtype, device=device)
        raws.append(raw.pin_memory() if pin else raw)
    k_raw, v_raw = raws
    return KvBuffers(layout, k_raw, v_raw, k_raw.permute(inv), v_raw.permute(inv))
