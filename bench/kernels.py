"""Kernel benchmark on an NVIDIA GPU: time, GB/s, fraction of the copy bandwidth measured in the
same run, and the speed ratio to each kernel's torch reference.

Shapes are Qwen3-Next-80B's (conv dim 8192, width 4; 16 key and 32 value heads of dim 128;
hidden 2048, 512 experts, top-10; full-attention layers with 2 KV heads of dim 256) with KV
blocks of 128 tokens.

    python bench/kernels.py [--output bench/results/kernels.json] [--quick]
    python bench/kernels.py --tiny     # toy shapes on the CPU under Triton's interpreter (CI)

Times are medians (CUDA events, L2 flushed between runs by do_bench). Decode kernels (conv
update, GDN decode) are timed replayed from CUDA graphs, as they run in serving.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TINY = "--tiny" in sys.argv
if TINY:  # the interpreter is chosen when Triton decorates the kernels: before they import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "kernels"), str(ROOT / "bench")]

import vllm_ref  # noqa: E402
from _common import write_result  # noqa: E402

from ascend_kernels import block_copy, causal_conv1d, gdn, moe_permute, reshape_and_cache  # noqa: E402

GOAL_FRACTION = 0.70
GOAL_GDN_SPEEDUP = 10.0
BF16 = torch.bfloat16
DEV = "cpu" if TINY else "cuda"


@dataclass(frozen=True)
class Shapes:
    """The shapes of one run: Qwen3-Next-80B's on a GPU, toys in the tiny CPU mode."""

    conv_dim: int
    conv_prefill: tuple[tuple[int, ...], ...]
    """Sequence lengths of each prefill batch."""
    conv_update: tuple[tuple[int, int], ...]
    """(batch, tokens per sequence) of each update."""
    gdn_heads: tuple[int, int, int]
    """Key heads, value heads, head dim."""
    gdn_prefill: tuple[tuple[int, ...], ...]
    gdn_decode: tuple[int, ...]
    cache: tuple[tuple[str, int, int, int, int, int], ...]
    """label, KV heads, K size, V size, layers of the cross-layer buffer, tokens per step."""
    cache_blocks: int
    copy: tuple[int, int, int, int, int]
    """layers, KV heads, head size, block pairs, blocks: Qwen3-Next's full-attention layers."""
    moe: tuple[int, int, int, tuple[int, ...]]
    """hidden, experts, top-k, token counts."""
    copy_bytes: int


FULL = Shapes(
    conv_dim=8192,
    conv_prefill=((512,) * 16, (2048,) * 4, (8192,) * 4),
    conv_update=((1, 1), (8, 1), (64, 1), (256, 1), (1024, 1), (256, 4)),
    gdn_heads=(16, 32, 128),
    gdn_prefill=((1024,) * 8, (8192,), (8192,) * 4),
    gdn_decode=(1, 64, 256),
    cache=(
        ("gqa 2x256", 2, 256, 256, 12, 8192),
        ("mla 512+64", 1, 512, 64, 61, 8192),
        ("gqa 2x256", 2, 256, 256, 12, 32768),
    ),
    cache_blocks=1024,
    copy=(12, 2, 256, 512, 2048),
    moe=(2048, 512, 10, (4096, 16384)),
    copy_bytes=2**30,
)
TOY = Shapes(
    conv_dim=64,
    conv_prefill=((8, 5),),
    conv_update=((2, 1),),
    gdn_heads=(2, 4, 16),
    gdn_prefill=((16, 9),),
    gdn_decode=(2,),
    cache=(("gqa 2x16", 2, 16, 16, 2, 16),),
    cache_blocks=8,
    copy=(2, 2, 16, 4, 16),
    moe=(32, 8, 2, (16,)),
    copy_bytes=2**20,
)
SHAPES = TOY if TINY else FULL
CACHE_SHAPES = SHAPES.cache


VLLM: dict[str, Any] = {}
"""vLLM's kernels (bench/vllm_ref.py), when --vllm names where they were copied."""


def against_vllm(
    r: dict[str, Any], ours_ms: float, pair: Any, ours_out: Any, graphed: bool = False
) -> dict[str, Any]:
    """Time vLLM's kernel on the same data, the same way as ours (`graphed`: from a CUDA
    graph), and compare its output with ours (in `r`)."""
    if not pair:  # no vLLM kernels loaded, or none to compare with
        return r
    run, to_ours = pair
    theirs = to_ours(run()).clone()  # before timing: in-place kernels reuse their buffers
    t = ms_graph(run) if graphed else ms(run)
    diff = float((ours_out.float() - theirs.float()).abs().max())
    top = float(ours_out.float().abs().max())
    r.update(vllm_ms=round(t, 4), speed_vs_vllm=round(t / ours_ms, 3),
             max_abs_diff_vs_vllm=diff, max_abs_output=top)  # fmt: skip
    print(f"{'':28s} vLLM {t:9.4f} ms   ours/vLLM speed x{t / ours_ms:5.2f}   "
          f"max |ours - vLLM| {diff:.2e} (outputs up to {top:.3g})", flush=True)  # fmt: skip
    return r


def ms(fn: Callable[[], Any], rep: int = 200, untimed: int = 20) -> float:
    """Median milliseconds of one call."""
    if DEV == "cpu":  # the interpreter: a few wall-clock runs (the figures mean little)
        fn()
        runs = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - start)
        return 1000 * statistics.median(runs)
    # Untimed calls first: on an H100, the first few hundred microseconds of work on freshly
    # allocated multi-GB caches ran up to 3x slower than later calls, beyond do_bench's warmup.
    for _ in range(untimed):
        fn()
    torch.cuda.synchronize()
    return float(do_bench(fn, warmup=25, rep=rep, return_mode="median"))


def ms_graph(fn: Callable[[], Any], calls: int = 50, replays: int = 21) -> float:
    """Median milliseconds of one call replayed from a CUDA graph, as decode kernels run in
    serving (vLLM's CUDA graphs, vllm-ascend's ACLGraph): no host launch time, which at a few
    microseconds per kernel would otherwise dominate and jitter. Each call follows an L2 flush;
    the flushes are timed alone in a second graph and subtracted."""
    if DEV == "cpu":
        return ms(fn)
    flush = torch.empty(256 << 20, dtype=torch.uint8, device=DEV)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (and compile) off the capture
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graphs = []
    for with_fn in (True, False):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                flush.zero_()
                if with_fn:
                    fn()
        graphs.append(graph)
    samples = []
    for _ in range(replays):
        times = []
        for graph in graphs:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        samples.append((times[0] - times[1]) / calls)
    return max(statistics.median(samples), 1e-4)


def copy_bandwidth(dev: str) -> float:
    """Device-to-device copy GB/s (bytes read + written) of one 1 GiB buffer."""
    src = torch.empty(SHAPES.copy_bytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    return 2 * src.numel() / ms(lambda: dst.copy_(src)) / 1e6


def pinned_bandwidth(dev: str) -> float:
    """Device-to-pinned-host GB/s of one 1 GiB copy (bytes moved once)."""
    src = torch.empty(2**30, dtype=torch.uint8, device=dev)
    dst = torch.empty(2**30, dtype=torch.uint8).pin_memory()
    return src.numel() / ms(lambda: dst.copy_(src, non_blocking=True), rep=100) / 1e6


def same_size_copy_gbps(nbytes: int) -> float:
    """GB/s of a device-to-device copy moving the same bytes (half read, half written): small
    kernels pay launch and tail latency that a 1 GiB copy hides."""
    src = torch.empty(max(1, nbytes // 2), dtype=torch.uint8, device=DEV)
    dst = torch.empty_like(src)
    return nbytes / ms(lambda: dst.copy_(src)) / 1e6


def row(
    name: str,
    shape: str,
    t_ms: float,
    nbytes: int,
    limit: float,
    ref_ms: float | None,
    memory_bound: bool = True,
    limit_name: str = "d2d copy",
) -> dict[str, Any]:
    gbps = nbytes / t_ms / 1e6
    same = same_size_copy_gbps(nbytes) if limit_name == "d2d copy" and nbytes else None
    out = {
        "kernel": name,
        "shape": shape,
        "ms": round(t_ms, 4),
        "gb_per_s": round(gbps, 1),
        "fraction_of_" + limit_name.replace(" ", "_"): round(gbps / limit, 3),
        "reference_ms": round(ref_ms, 3) if ref_ms is not None else None,
        "speedup_vs_reference": round(ref_ms / t_ms, 1) if ref_ms is not None else None,
        "memory_bound": memory_bound,
    }
    if same is not None:
        out["fraction_of_same_size_copy"] = round(gbps / same, 3)
        # How far a plain copy of these bytes gets: below the goal, the shape is too small for
        # any kernel to reach it (launch and tail latency).
        out["same_size_copy_fraction_of_d2d"] = round(same / limit, 3)
    if memory_bound:
        out["meets_goal"] = gbps / limit >= GOAL_FRACTION
    print(
        f"{name:28s} {shape:44s} {t_ms:9.4f} ms {gbps:8.1f} GB/s  "
        f"{gbps / limit:6.1%} of {limit_name}"
        + (f" ({gbps / same:6.1%} of a same-size copy)" if same is not None else "")
        + (f"  ref {ref_ms:9.3f} ms  x{ref_ms / t_ms:8.1f}" if ref_ms is not None else ""),
        flush=True,
    )
    return out


def bench_conv(dev: str, copy_bw: float, quick: bool) -> list[dict[str, Any]]:
    rows = []
    dim, width = SHAPES.conv_dim, 4
    for lens, with_bias in [(list(n), b) for n in SHAPES.conv_prefill for b in (True, False)]:
        tokens = sum(lens)
        x = torch.randn(tokens, dim, device=dev, dtype=BF16)
        w = torch.randn(dim, width, device=dev, dtype=BF16)
        b = torch.randn(dim, device=dev, dtype=BF16)
        cu = torch.tensor(
            [0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=dev
        )
        slots = len(lens)
        # slot 0 is vLLM's null block (its kernels skip it): sequences use slots 1..
        states = torch.randn(slots + 1, width - 1, dim, device=dev, dtype=BF16).transpose(1, 2)
        idx = torch.arange(1, slots + 1, dtype=torch.int32, device=dev)
        init = torch.ones(slots, dtype=torch.bool, device=dev)
        out = torch.empty_like(x)
        pristine = states.clone()
        kw = {
            "bias": b if with_bias else None,
            "conv_states": states,
            "cache_indices": idx,
            "has_initial_state": init,
            "activation": "silu",
        }
        t = ms(lambda: causal_conv1d.causal_conv1d_prefill(x, w, cu, out=out, **kw))
        ref = ms(
            lambda: causal_conv1d.causal_conv1d_prefill_ref(
                x, w, cu, **{**kw, "conv_states": states.clone()}
            ),
            rep=50,
        )
        nbytes = 2 * x.numel() * 2 + 2 * states.numel() * 2
        r = row(
            "causal_conv1d_prefill",
            f"{len(lens)}x{lens[0]} tok, dim {dim}, w {width}, "
            + ("bias" if with_bias else "no bias"),
            t,
            nbytes,
            copy_bw,
            ref,
        )
        ours = causal_conv1d.causal_conv1d_prefill(
            x, w, cu, **{**kw, "conv_states": pristine.clone()}
        )
        pair = VLLM and vllm_ref.conv_prefill(
            VLLM, x=x, w=w, bias=kw["bias"], cu=cu, states=pristine.clone(), idx=idx, init=init
        )
        rows.append(against_vllm(r, t, pair, ours))
    for batch, steps in SHAPES.conv_update:
        x = torch.randn(batch, steps, dim, device=dev, dtype=BF16)
        w = torch.randn(dim, width, device=dev, dtype=BF16)
        states = torch.randn(batch + 1, width - 1, dim, device=dev, dtype=BF16).transpose(1, 2)
        idx = torch.arange(1, batch + 1, dtype=torch.int32, device=dev)  # slot 0: null block
        out = torch.empty_like(x)
        pristine = states.clone()
        t = ms_graph(
            lambda: causal_conv1d.causal_conv1d_update(
                x, states, w, idx, activation="silu", out=out
            )
        )
        ref = (
            ms(
                lambda: causal_conv1d.causal_conv1d_update_ref(
                    x, states.clone(), w, idx, activation="silu"
                ),
                rep=20,
            )
            if not quick and batch <= 256
            else None
        )
        nbytes = 2 * x.numel() * 2 + 2 * states.numel() * 2
        r = row(
            "causal_conv1d_update",
            f"batch {batch}, {steps} tok, dim {dim}, w {width}",
            t,
            nbytes,
            copy_bw,
            ref,
        )
        ours = causal_conv1d.causal_conv1d_update(x, pristine.clone(), w, idx, activation="silu")
        pair = VLLM and vllm_ref.conv_update(VLLM, x=x, states=pristine.clone(), w=w, idx=idx)
        rows.append(against_vllm(r, t, pair, ours, graphed=True))
    return rows


def gdn_prefill_inputs(lens: list[int], dev: str) -> tuple[Any, ...]:
    """(q, k, v, g, beta, cu, h0, metadata) of one GDN prefill batch at SHAPES' heads, bf16
    q, k, v with unit-norm keys, zero initial states."""
    hk, hv, d = SHAPES.gdn_heads
    tokens = sum(lens)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=dev)
    q = F.normalize(torch.randn(tokens, hk, d, device=dev), dim=-1).to(BF16)
    k = F.normalize(torch.randn(tokens, hk, d, device=dev), dim=-1).to(BF16)
    v = torch.randn(tokens, hv, d, device=dev, dtype=BF16)
    g = F.logsigmoid(torch.randn(tokens, hv, device=dev))
    beta = torch.rand(tokens, hv, device=dev)
    h0 = torch.zeros(len(lens), hv, d, d, device=dev)
    return q, k, v, g, beta, cu, h0, gdn.chunk_metadata(cu.cpu(), dev)


def bench_gdn(dev: str, copy_bw: float, quick: bool) -> list[dict[str, Any]]:
    rows = []
    hk, hv, d = SHAPES.gdn_heads
    for lens in map(list, SHAPES.gdn_prefill):
        tokens = sum(lens)
        q, k, v, g, beta, cu, h0, meta = gdn_prefill_inputs(lens, dev)
        t = ms(
            lambda: gdn.chunk_gated_delta_rule(
                q, k, v, g, beta, cu, initial_state=h0, metadata=meta
            )
        )
        ref = (
            ms(
                lambda: gdn.gated_delta_rule_ref(q, k, v, g, beta, cu, initial_state=h0),
                rep=1,
                untimed=0,
            )
            if not quick or tokens <= 8192
            else None
        )
        o, _ = gdn.chunk_gated_delta_rule(q, k, v, g, beta, cu, initial_state=h0, metadata=meta)
        o_ref, _ = gdn.gated_delta_rule_ref(q, k, v, g, beta, cu, initial_state=h0)
        err = float((o.float() - o_ref.float()).abs().max())
        nbytes = (q.numel() + k.numel() + 2 * v.numel()) * 2 + 2 * h0.numel() * 4
        r = row(
            "gdn_chunk_prefill",
            f"{len(lens)}x{lens[0]} tok, Hk {hk} Hv {hv} d {d}",
            t,
            nbytes,
            copy_bw,
            ref,
            memory_bound=False,
        )
        r["max_abs_error_vs_reference"] = err
        r["meets_goal"] = ref is not None and ref / t >= GOAL_GDN_SPEEDUP
        pair = VLLM and vllm_ref.gdn_prefill(VLLM, q=q, k=k, v=v, g=g, beta=beta, cu=cu, h0=h0)
        rows.append(against_vllm(r, t, pair, o))
    for batch in SHAPES.gdn_decode:
        q = F.normalize(torch.randn(batch, hk, d, device=dev), dim=-1).to(BF16)
        k = F.normalize(torch.randn(batch, hk, d, device=dev), dim=-1).to(BF16)
        v = torch.randn(batch, hv, d, device=dev, dtype=BF16)
        g = F.logsigmoid(torch.randn(batch, hv, device=dev))
        beta = torch.rand(batch, hv, device=dev)
        states = torch.randn(batch + 1, hv, d, d, device=dev) * 0.01
        idx = torch.arange(1, batch + 1, dtype=torch.int32, device=dev)  # slot 0: null block
        cu = torch.arange(batch + 1, dtype=torch.int32, device=dev)
        pristine = states.clone()
        t = ms_graph(lambda: gdn.gated_delta_rule_decode(q, k, v, g, beta, states, idx))
        ref = (
            ms(
                lambda: gdn.gated_delta_rule_ref(q, k, v, g, beta, cu, initial_state=states[1:]),
                rep=1,
                untimed=0,
            )
            if batch <= 64 and not quick
            else None
        )
        nbytes = 2 * states.numel() * 4 + (q.numel() + k.numel() + 2 * v.numel()) * 2
        r = row("gdn_decode", f"batch {batch}, Hk {hk} Hv {hv} d {d}", t, nbytes, copy_bw, ref)
        ours = gdn.gated_delta_rule_decode(q, k, v, g, beta, pristine.clone(), idx)
        pair = VLLM and vllm_ref.gdn_decode(
            VLLM, q=q, k=k, v=v, g=g, beta=beta, states=pristine.clone(), idx=idx
        )
        rows.append(against_vllm(r, t, pair, ours, graphed=True))
    return rows


def bench_cache(dev: str, copy_bw: float, pinned_bw: float) -> list[dict[str, Any]]:
    rows = []
    block = 128
    for label, heads, ks, vs, layers, tokens in CACHE_SHAPES:
        num_blocks = SHAPES.cache_blocks
        kbuf = torch.zeros(num_blocks, layers, block, heads, ks, device=dev, dtype=BF16)
        vbuf = torch.zeros(num_blocks, layers, block, heads, vs, device=dev, dtype=BF16)
        key = torch.randn(tokens, heads, ks, device=dev, dtype=BF16)
        value = torch.randn(tokens, heads, vs, device=dev, dtype=BF16)
        slots = torch.randperm(num_blocks * block, device=dev)[:tokens]
        kc, vc = kbuf[:, min(3, layers - 1)], vbuf[:, min(3, layers - 1)]
        t = ms(lambda: reshape_and_cache.reshape_and_cache(key, value, kc, vc, slots))
        ref = ms(lambda: reshape_and_cache.reshape_and_cache_ref(key, value, kc, vc, slots))
        nbytes = 2 * (key.numel() + value.numel()) * 2
        r = row(
            "reshape_and_cache",
            f"{tokens} tok, {label}, cross-layer view",
            t,
            nbytes,
            copy_bw,
            ref,
        )
        pair = None
        if VLLM and ks == vs:  # vLLM's own layout: one contiguous cache per layer (MLA caches
            # go through another vLLM op, concat_and_cache_mla, which is CUDA C++)
            theirs_k, theirs_v = torch.zeros_like(kc), torch.zeros_like(vc)
            run = vllm_ref.reshape_and_cache(
                VLLM, key=key, value=value, key_cache=theirs_k, value_cache=theirs_v, slots=slots
            )
            pair = (run, lambda _: torch.cat([theirs_k.flatten(), theirs_v.flatten()]))
        rows.append(against_vllm(r, t, pair, torch.cat([kc.flatten(), vc.flatten()])))
        del kbuf, vbuf
    # Block copies: Qwen3-Next's 12 full-attention layers, 2 KV heads x 256, 128-token blocks.
    layers, heads, d, pairs, blocks = SHAPES.copy
    cross = torch.randn(blocks, layers, block, heads, d, device=dev, dtype=BF16)
    dst = torch.zeros_like(cross)
    src_ids = torch.randperm(blocks, device=dev)[:pairs]
    dst_ids = torch.randperm(blocks, device=dev)[:pairs]
    block_bytes = cross[0].numel() * 2
    t = ms(lambda: block_copy.copy_blocks(cross, dst, src_ids, dst_ids))
    ref = ms(lambda: block_copy.copy_blocks_ref(cross, dst, src_ids, dst_ids))
    rows.append(
        row(
            "copy_blocks d2d",
            f"{pairs} cross-layer blocks of {block_bytes >> 10} KiB",
            t,
            2 * pairs * block_bytes,
            copy_bw,
            ref,
        )
    )

    # vLLM's default layout: one cache tensor per layer, all moved in one launch.
    per_layer_src = [
        torch.randn(blocks, block, heads, d, device=dev, dtype=BF16) for _ in range(layers)
    ]
    per_layer_dst = [torch.zeros_like(t) for t in per_layer_src]
    t = ms(lambda: block_copy.copy_blocks_layers(per_layer_src, per_layer_dst, src_ids, dst_ids))
    ref = ms(
        lambda: [
            block_copy.copy_blocks_ref(a, b, src_ids, dst_ids)
            for a, b in zip(per_layer_src, per_layer_dst, strict=True)
        ]
    )
    rows.append(
        row(
            "copy_blocks_layers d2d",
            f"{pairs} blocks x {layers} per-layer caches",
            t,
            2 * pairs * block_bytes,
            copy_bw,
            ref,
        )
    )
    if dev != "cuda":  # pinned host memory needs CUDA
        return rows
    host = torch.zeros(pairs, layers, block, heads, d, dtype=BF16).pin_memory()
    host_ids = torch.arange(pairs, device=dev)
    t = ms(lambda: block_copy.copy_blocks(cross, host, src_ids, host_ids), rep=100)
    ref = ms(
        lambda: block_copy.copy_block_runs(cross, host, src_ids.cpu(), host_ids.cpu()), rep=100
    )
    rows.append(
        row(
            "copy_blocks d2h pinned",
            f"{pairs} cross-layer blocks",
            t,
            pairs * block_bytes,
            pinned_bw,
            ref,
            limit_name="pinned copy",
        )
    )
    t = ms(lambda: block_copy.copy_blocks(host, dst, host_ids, src_ids), rep=100)
    rows.append(
        row(
            "copy_blocks h2d pinned",
            f"{pairs} cross-layer blocks",
            t,
            pairs * block_bytes,
            pinned_bw,
            None,
            limit_name="pinned copy",
        )
    )
    return rows


def bench_moe(dev: str, copy_bw: float) -> list[dict[str, Any]]:
    """Routing (sort and offsets, launch-bound bookkeeping) apart from the row movement."""
    rows = []
    hidden, experts, top_k, token_counts = SHAPES.moe
    for tokens in token_counts:
        x = torch.randn(tokens, hidden, device=dev, dtype=BF16)
        ids = torch.topk(torch.randn(tokens, experts, device=dev), top_k).indices
        w = torch.rand(tokens, top_k, device=dev)
        shape = f"{tokens} tok, hidden {hidden}, E {experts}, top {top_k}"
        nbytes = (x.numel() + x.numel() * top_k) * 2
        unit = moe_permute.align_rows(hidden, x.element_size())
        t = ms(lambda: moe_permute.route(ids, experts, unit))
        ref = ms(lambda: torch.argsort(ids.flatten(), stable=True))
        rows.append(row("moe_route", shape, t, 0, copy_bw, ref, memory_bound=False))
        routing = moe_permute.route(ids, experts, unit)
        t = ms(lambda: moe_permute.moe_permute(x, ids, experts, routing))
        ref = ms(lambda: x.repeat_interleave(top_k, 0)[torch.argsort(ids.flatten(), stable=True)])
        rows.append(row("moe_permute (rows)", shape, t, nbytes, copy_bw, ref))
        t = ms(lambda: moe_permute.moe_permute(x, ids, experts))
        rows.append(row("moe_permute (with route)", shape, t, nbytes, copy_bw, ref))
        p = moe_permute.moe_permute(x, ids, experts, routing)
        t = ms(lambda: moe_permute.moe_unpermute(p.rows, p.row_of, w))
        ref = ms(lambda: (p.rows[p.row_of].float() * w[..., None]).sum(1).to(BF16))
        rows.append(row("moe_unpermute", shape, t, nbytes, copy_bw, ref))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "kernels.json"))
    parser.add_argument("--quick", action="store_true", help="skip the slowest references")
    parser.add_argument(
        "--tiny", action="store_true", help="toy shapes on the CPU (Triton's interpreter), for CI"
    )
    parser.add_argument(
        "--vllm", type=Path, help="vLLM's kernels copied by bench/vllm_ref.py: time them too"
    )
    parser.add_argument("--only", help="comma-separated groups: conv,gdn,cache,moe (default all)")
    args = parser.parse_args()
    if args.vllm:
        VLLM.update(vllm_ref.load(args.vllm))
    if not TINY and not torch.cuda.is_available():
        print(
            "bench/kernels.py needs an NVIDIA GPU (run it through the device tool), "
            "or --tiny for the CPU",
            file=sys.stderr,
        )
        return 2
    dev = DEV
    torch.manual_seed(0)
    copy_bw = copy_bandwidth(dev)
    pinned_bw = pinned_bandwidth(dev) if dev == "cuda" else 0.0
    name = torch.cuda.get_device_name() if dev == "cuda" else "CPU (Triton interpreter)"
    print(f"{name}: d2d copy {copy_bw:.0f} GB/s, d2h pinned {pinned_bw:.1f} GB/s", flush=True)
    groups = {
        "conv": lambda: bench_conv(dev, copy_bw, args.quick),
        "gdn": lambda: bench_gdn(dev, copy_bw, args.quick),
        "cache": lambda: bench_cache(dev, copy_bw, pinned_bw),
        "moe": lambda: bench_moe(dev, copy_bw),
    }
    only = args.only.split(",") if args.only else list(groups)
    unknown = set(only) - set(groups)
    if unknown:
        print(f"--only: unknown groups {sorted(unknown)}; use {','.join(groups)}", file=sys.stderr)
        return 2
    rows = [r for name in only for r in groups[name]()]
    summary = goal_summary(rows)
    write_result(
        args.output,
        {
            "benchmark": "kernels",
            "device": device_line(),
            "tiny": TINY,
            "vllm": vllm_ref.version_of(args.vllm) if args.vllm else None,
            "copy_gb_per_s": round(copy_bw, 1),
            "pinned_d2h_gb_per_s": round(pinned_bw, 1),
            "goals": (
                f"memory-bound kernels >= {GOAL_FRACTION:.0%} of the d2d copy bandwidth; "
                f"gdn prefill >= {GOAL_GDN_SPEEDUP:.0f}x its reference at 8k tokens"
            ),
            "goal_summary": summary,
            "results": rows,
        },
    )
    return 0


def device_line() -> str:
    """The device a run measured, with torch and Triton versions."""
    versions = f"torch {torch.__version__}, triton {triton.__version__}"
    if DEV == "cpu":
        return f"CPU only, Triton interpreter (tiny shapes; timings mean nothing), {versions}"
    props = torch.cuda.get_device_properties(0)
    return f"{props.name} ({props.multi_processor_count} SMs), {versions}, {platform.node()}"


def goal_summary(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per memory-bound kernel: its best fraction of the copy bandwidth over the shapes, and
    the shapes too small for even a plain copy of their bytes to reach the goal."""
    summary: dict[str, dict[str, Any]] = {}
    for r in rows:
        if not r["memory_bound"] or "(with route)" in r["kernel"]:
            continue
        frac = r.get("fraction_of_d2d_copy", r.get("fraction_of_pinned_copy", 0.0))
        s = summary.setdefault(r["kernel"], {"best_fraction": 0.0, "copy_limited_shapes": []})
        s["best_fraction"] = max(s["best_fraction"], frac)
        if r.get("same_size_copy_fraction_of_d2d", 1.0) < GOAL_FRACTION:
            s["copy_limited_shapes"].append(r["shape"])
    for name, s in summary.items():
        s["meets_goal"] = s["best_fraction"] >= GOAL_FRACTION
        verdict = "met" if s["meets_goal"] else "NOT met"
        limited = ", ".join(s["copy_limited_shapes"])
        print(f"{name:28s} best {s['best_fraction']:6.1%}  goal {verdict}"
              + (f"  (copy-limited: {limited})" if limited else ""))  # fmt: skip
    return summary


if __name__ == "__main__":
    sys.exit(main())
