"""The engine's KV cache tensors, as the connector sees them, and their host staging copy.

Engines hand the connector their caches in backend-specific shapes; `describe_caches` turns
them into per-layer (K, V) tensors indexed by block, (blocks, tokens, heads, dim) each, and the
`KvSpec` they share. vLLM 0.3x states its layout instead of leaving it to guesses: every layer
is a logical (blocks, heads, tokens, content) page view whose strides follow the resolved
`KVCacheLayout`, and the content packs K and V as the attention backend likes (the CPU backend
keeps a head's keys, then its values). Such caches are described as one "K" tensor whose dim is
the whole content and no V; only whole blocks of them mean anything.

Transfers read and write a pinned host staging buffer in the connector's
layout (`HostStage`): device caches are not host memory, so a prefill rank copies a request's
blocks out before serving them and a decode rank copies them in after pulling, just as vLLM's
NIXL connector does with a host buffer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..layout import KvBuffers, KvLayout, KvSpec, allocate, heads_major
from ..offload import BlockCopier
from ..transfer import Region, region_of_tensor


@dataclass
class DeviceKv:
    """Per-layer K and V caches of one rank, each (blocks, tokens, heads, dim), any strides.
    MLA engines without a separate V cache have `v` empty (v_dim 0)."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    spec: KvSpec
    packed: bool = False
    """K and V packed inside a block by the backend (vLLM's page views): whole blocks only."""

    @property
    def device(self) -> torch.device:
        return self.k[0].device

    @property
    def heads_outside_tokens(self) -> bool:
        """True when a block is stored heads-major (HND), False for tokens-major (NHD)."""
        k = self.k[0]
        return k.shape[1] > 1 and k.shape[2] > 1 and k.stride(2) > k.stride(1)


def _as_4d(t: torch.Tensor, name: str) -> torch.Tensor:
    if t.dim() == 3:  # (blocks, tokens, dim): one latent head
        return t.unsqueeze(2)
    if t.dim() != 4:
        raise ValueError(
            f"KV cache of {name} has shape {tuple(t.shape)}: expected (blocks, block_size, "
            "heads, head_size) or (blocks, block_size, head_size)"
        )
    return t


def _split(name: str, cache: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(cache, (tuple, list)):
        if len(cache) != 2:
            raise ValueError(f"KV cache of {name} is a {len(cache)}-tuple: expected (K, V)")
        return _as_4d(cache[0], name), _as_4d(cache[1], name)
    if cache.dim() == 5 and cache.shape[0] == 2:  # (2, blocks, tokens, heads, dim)
        return cache[0], cache[1]
    return _as_4d(cache, name), None  # MLA latent cache, no V


def describe_pages(kv_caches: Mapping[str, Any], page_layout: str) -> DeviceKv:
    """vLLM 0.3x page views, (blocks, heads, tokens, content) per layer with the strides of
    `page_layout`, as `DeviceKv` of (blocks, tokens, heads, content) views and no V."""
    heads_major(page_layout)  # validates the name
    pages = []
    for name, cache in kv_caches.items():
        if not isinstance(cache, torch.Tensor) or cache.dim() != 4:
            shape = tuple(cache.shape) if isinstance(cache, torch.Tensor) else type(cache)
            raise ValueError(
                f"KV cache of {name} is {shape}: vLLM's {page_layout} layout hands over one "
                "(blocks, heads, tokens, content) view per layer"
            )
        pages.append((name, cache.transpose(1, 2)))
    described = describe_caches(dict(pages))
    return DeviceKv(described.k, [], replace(described.spec, v_dim=0), packed=True)


def describe_caches(kv_caches: Mapping[str, Any]) -> DeviceKv:
    """Per-layer caches (in the engine's layer order) -> `DeviceKv`; layers must agree.
    Shapes as vLLM's per-layer backends before 0.3x hand them over: a (K, V) pair,
    (2, blocks, tokens, heads, dim), or one latent (blocks, tokens, dim) for MLA."""
    if not kv_caches:
        raise ValueError("the engine registered no KV caches")
    ks: list[torch.Tensor] = []
    vs: list[torch.Tensor] = []
    first: tuple[Any, ...] | None = None
    for name, cache in kv_caches.items():
        k, v = _split(name, cache)
        shape = (tuple(k.shape), None if v is None else tuple(v.shape[:3]), k.dtype)
        if first is None:
            first = shape
        elif shape[0] != first[0] or shape[1] != first[1] or shape[2] != first[2]:
            raise ValueError(
                f"KV cache of {name} has shape {shape[0]} but the first layer {first[0]}: "
                "the connector needs uniform layers (hybrid models are not supported)"
            )
        ks.append(k)
        if v is not None:
            if v.shape[:3] != k.shape[:3]:
                raise ValueError(f"K and V caches of {name} differ in blocks, tokens or heads")
            vs.append(v)
    k0 = ks[0]
    blocks, tokens, heads, k_dim = k0.shape
    v_dim = vs[0].shape[3] if vs else 0
    spec = KvSpec(len(ks), blocks, tokens, heads, k_dim, v_dim, k0.element_size())
    return DeviceKv(ks, vs, spec)


def cross_layer_caches(kv_cache: torch.Tensor) -> dict[str, torch.Tensor]:
    """vLLM's cross-layer registration (one tensor, layers first) as per-layer entries."""
    return {f"layer.{i}": kv_cache[i] for i in range(kv_cache.shape[0])}


class HostStage:
    """Host copy of one rank's caches in `layout` (pinned when the caches are on a device), with
    the regions a transport registers: a full-size staging mirror by default, or a pool of
    `num_blocks` host blocks (offload)."""

    def __init__(self, device: DeviceKv, layout_name: str, num_blocks: int | None = None):
        self.device = device
        spec = device.spec if num_blocks is None else replace(device.spec, num_blocks=num_blocks)
        self.layout = KvLayout(spec, layout_name)
        hnd = layout_name.endswith("_hnd")
        single = device.spec.heads == 1 or device.spec.block_size == 1  # either order fits
        if not single and hnd != device.heads_outside_tokens:
            engine = "HND (heads outside tokens)" if device.heads_outside_tokens else "NHD"
            fix = layout_name.removesuffix("_hnd") + ("_hnd" if not hnd else "")
            raise ValueError(
                f"kv_layout {layout_name} orders a block differently from the engine's {engine} "
                f"caches, and blocks are copied byte for byte: use kv_layout {fix}"
            )
        pin = device.device.type != "cpu"
        dtype = device.k[0].dtype
        self.host: KvBuffers = allocate(self.layout, dtype, "cpu", pin=pin)
        self.regions: dict[str, Region] = {
            "k": region_of_tensor("k", self.host.k_raw),
            "v": region_of_tensor("v", self.host.v_raw),
        }

        # Copies see both sides in storage order (heads before tokens when HND), where a
        # block is one run or one strided level of runs.
        def stored(ts: list[torch.Tensor]) -> list[torch.Tensor]:
            return [t.transpose(1, 2) for t in ts] if hnd else ts

        views = self.host.layer_views()
        host_k = stored([k for k, _ in views])
        host_v = stored([v for _, v in views]) if device.v else []
        self.copier = BlockCopier([stored(device.k), stored(device.v)], [host_k, host_v])

    def to_host(self, blocks: Sequence[int]) -> None:
        """Copy `blocks` of the device caches into the same blocks of the mirror (blocking)."""
        self._wait(self.copier.copy(True, blocks, blocks))

    def to_device(self, blocks: Sequence[int]) -> None:
        """Copy `blocks` of the stage into the device caches (blocking)."""
        self._wait(self.copier.copy(False, blocks, blocks))

    @staticmethod
    def _wait(event: Any) -> None:
        if event is not None:
            event.synchronize()
