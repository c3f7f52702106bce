"""Tile and launch sweep for the memory-bound kernels on an NVIDIA GPU.

Each configuration is checked against the kernel's torch reference before it is timed, so a
fast but wrong tile never wins. Prints GB/s and the fraction of the 1 GiB device-to-device
copy measured in the same run; writes every row to JSON. The winners become the modules'
CUDA constants (PREFILL_*_CUDA, UPDATE_*_CUDA, MAX_TILE_TOKENS_CUDA, ...).

    python bench/kernel_tiles.py [--output bench/results/kernel_tiles.json] [--only conv_prefill]
    python bench/kernel_tiles.py --tiny   # one configuration per sweep, toy shapes, CPU (CI)
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

TINY = "--tiny" in sys.argv
if TINY:  # before Triton decorates any kernel
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "kernels"), str(ROOT / "bench")]

import vllm_ref  # noqa: E402
from _common import write_result  # noqa: E402

from ascend_kernels import causal_conv1d, device, gdn, gdn_prefill, reshape_and_cache  # noqa: E402
from kernels import (  # noqa: E402
    BF16,
    CACHE_SHAPES,
    DEV,
    SHAPES,
    copy_bandwidth,
    device_line,
    gdn_prefill_inputs,
    ms,
    ms_graph,
)


def configs(sweep: list[Any]) -> list[Any]:
    """Every configuration of a sweep, or its first one in the tiny mode."""
    return sweep[:1] if TINY else sweep


@contextlib.contextmanager
def patched(module: Any, **values: Any) -> Iterator[None]:
    """Set module constants for the duration of one configuration."""
    old = {k: getattr(module, k) for k in values}
    for k, v in values.items():
        setattr(module, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(module, k, v)


def close(got: torch.Tensor, want: torch.Tensor) -> bool:
    return torch.allclose(got.float(), want.float(), atol=3e-2, rtol=3e-2)


def measure(
    name: str,
    config: dict[str, Any],
    case: tuple[Callable[[], Any], Callable[[], bool]],
    nbytes: int,
    copy_bw: float,
    *,
    timer: Callable[[Callable[[], Any]], float] | None = None,
) -> dict[str, Any]:
    """Check one configuration against the reference, then time it (`timer`: kernels.ms)."""
    run, check = case
    ok = check()
    t = (timer or ms)(run) if ok else float("nan")
    gbps = nbytes / t / 1e6 if ok else 0.0
    print(f"{name:34s} {config!s:70s} {t:8.4f} ms {gbps:7.0f} GB/s {gbps / copy_bw:6.1%}"
          + ("" if ok else "  WRONG"), flush=True)  # fmt: skip
    return {"kernel": name, "config": config, "ms": round(t, 4), "gb_per_s": round(gbps, 1),
            "fraction_of_d2d_copy": round(gbps / copy_bw, 3), "correct": ok}  # fmt: skip


def conv_prefill_inputs(lens: list[int]) -> dict[str, Any]:
    dim, width = SHAPES.conv_dim, 4
    tokens = sum(lens)
    slots = len(lens)
    return {
        "x": torch.randn(tokens, dim, device=DEV, dtype=BF16),
        "w": torch.randn(dim, width, device=DEV, dtype=BF16),
        "b": torch.randn(dim, device=DEV, dtype=BF16),
        "cu": torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=DEV),
        "states": torch.randn(slots, width - 1, dim, device=DEV, dtype=BF16).transpose(1, 2),
        "idx": torch.arange(slots, dtype=torch.int32, device=DEV),
        "init": torch.ones(slots, dtype=torch.bool, device=DEV),
    }


def sweep_conv_prefill(copy_bw: float) -> list[dict[str, Any]]:
    rows = []
    sweep = [
        {"PREFILL_TILE_CUDA": tile, "warps": warps, "programs_per_sm": per_sm}
        for tile, warps, per_sm in itertools.product(
            ((16, 128), (32, 128), (64, 128), (16, 256), (32, 256), (8, 512), (16, 512)),
            (4, 8),
            (8, 16),
        )
    ]
    for lens in map(list, SHAPES.conv_prefill[:2]):
        a = conv_prefill_inputs(lens)
        ref_states = a["states"].clone()
        want = causal_conv1d.causal_conv1d_prefill_ref(
            a["x"], a["w"], a["cu"], bias=a["b"], conv_states=ref_states,
            cache_indices=a["idx"], has_initial_state=a["init"], activation="silu",
        )  # fmt: skip
        out = torch.empty_like(a["x"])
        nbytes = 2 * a["x"].numel() * 2 + 2 * a["states"].numel() * 2

        def run(a=a, out=out, states=None) -> None:
            states = a["states"] if states is None else states
            causal_conv1d.causal_conv1d_prefill(
                a["x"], a["w"], a["cu"], bias=a["b"], conv_states=states,
                cache_indices=a["idx"], has_initial_state=a["init"], activation="silu",
                out=out,
            )  # fmt: skip

        # Timed runs advance a["states"] in place: checks start from a pristine copy.
        pristine = a["states"].clone()

        def check(out=out, expected=(want, ref_states), pristine=pristine) -> bool:
            states = pristine.clone()
            run(states=states)
            return close(out, expected[0]) and torch.equal(states, expected[1])

        for cfg in configs(sweep):
            with (
                patched(
                    causal_conv1d,
                    PREFILL_TILE_CUDA=cfg["PREFILL_TILE_CUDA"],
                    PREFILL_LAUNCH={"num_warps": cfg["warps"]},
                ),
                patched(device, GPU_PROGRAMS_PER_SM=cfg["programs_per_sm"]),
            ):
                r = measure(f"conv_prefill {len(lens)}x{lens[0]}", cfg, (run, check), nbytes,
                            copy_bw)  # fmt: skip
            rows.append(r)
    return rows


def sweep_conv_update(copy_bw: float, vllm_dir: Path | None = None) -> list[dict[str, Any]]:
    """Timed as bench/kernels.py times decode kernels (replayed from a CUDA graph after an L2
    flush), on its inputs (slot 0 the null block); vLLM's kernel beside it when `vllm_dir`
    holds it. programs_per_sm 128 gives every (channel tile, sequence) its own program up to
    batch 1024 at 512 channels: vLLM's grid."""
    mods = vllm_ref.load(vllm_dir) if vllm_dir else None
    rows = []
    dim, width = SHAPES.conv_dim, 4
    for batch, steps in SHAPES.conv_update:
        x = torch.randn(batch, steps, dim, device=DEV, dtype=BF16)
        w = torch.randn(dim, width, device=DEV, dtype=BF16)
        states = torch.randn(batch + 1, width - 1, dim, device=DEV, dtype=BF16).transpose(1, 2)
        idx = torch.arange(1, batch + 1, dtype=torch.int32, device=DEV)
        ref_states = states.clone()
        want = causal_conv1d.causal_conv1d_update_ref(x, ref_states, w, idx, activation="silu")
        out = torch.empty_like(x)
        nbytes = 2 * x.numel() * 2 + 2 * batch * dim * (width - 1) * 2
        name = f"conv_update b{batch} t{steps}"
        vllm_ms = None
        if mods is not None:
            run_vllm, _ = vllm_ref.conv_update(mods, x=x, states=states.clone(), w=w, idx=idx)
            vllm_ms = ms_graph(run_vllm)
            print(f"{name:34s} vLLM {vllm_ms * 1000:8.2f} us", flush=True)
            rows.append({"kernel": name, "config": "vllm", "ms": round(vllm_ms, 5)})

        def run(args=(x, w, idx, out), states=states) -> None:
            x, w, idx, out = args
            causal_conv1d.causal_conv1d_update(x, states, w, idx, activation="silu", out=out)

        pristine = states.clone()

        def check(out=out, expected=(want, ref_states), pristine=pristine) -> bool:
            s = pristine.clone()
            run(states=s)
            return close(out, expected[0]) and torch.equal(s, expected[1])

        for block_d, warps, per_sm in configs(
            list(itertools.product((1024, 512, 256, 128), (8, 4, 2, 1), (8, 32, 128)))
        ):
            cfg = {"UPDATE_TILE_CUDA": block_d, "warps": warps, "programs_per_sm": per_sm}

            with (
                patched(
                    causal_conv1d, UPDATE_TILE_CUDA=block_d, UPDATE_LAUNCH={"num_warps": warps}
                ),  # fmt: skip
                patched(device, GPU_PROGRAMS_PER_SM=per_sm),
            ):
                r = measure(name, cfg, (run, check), nbytes, copy_bw, timer=ms_graph)
            if vllm_ms and r["correct"]:
                r["speed_vs_vllm"] = round(vllm_ms / r["ms"], 3)
            rows.append(r)
    return rows


def sweep_reshape_and_cache(copy_bw: float) -> list[dict[str, Any]]:
    rows = []
    block = 128
    for label, heads, ks, vs, layers, tokens in CACHE_SHAPES:
        num_blocks = max(SHAPES.cache_blocks, 2 * tokens // block)
        kbuf = torch.zeros(num_blocks, layers, block, heads, ks, device=DEV, dtype=BF16)
        vbuf = torch.zeros(num_blocks, layers, block, heads, vs, device=DEV, dtype=BF16)
        key = torch.randn(tokens, heads, ks, device=DEV, dtype=BF16)
        value = torch.randn(tokens, heads, vs, device=DEV, dtype=BF16)
        slots = torch.randperm(num_blocks * block, device=DEV)[:tokens]
        kc, vc = kbuf[:, min(3, layers - 1)], vbuf[:, min(3, layers - 1)]
        kw, vw = kc.clone(), vc.clone()
        reshape_and_cache.reshape_and_cache_ref(key, value, kw, vw, slots)
        nbytes = 2 * (key.numel() + value.numel()) * 2

        def run(args=(key, value, kc, vc, slots)) -> None:
            reshape_and_cache.reshape_and_cache(*args)

        def check(caches=(kc, vc), expected=(kw, vw)) -> bool:
            for c in caches:
                c.zero_()
            run()
            return torch.equal(caches[0], expected[0]) and torch.equal(caches[1], expected[1])

        for block_t, warps, per_sm in configs(
            list(itertools.product((1, 2, 4, 8, 16), (2, 4, 8), (8, 16, 32)))
        ):
            cfg = {"MAX_TILE_TOKENS_CUDA": block_t, "warps": warps, "programs_per_sm": per_sm}

            with (
                patched(
                    reshape_and_cache,
                    MAX_TILE_TOKENS_CUDA=block_t,
                    LAUNCH_CUDA={"num_warps": warps},
                ),  # fmt: skip
                patched(device, GPU_PROGRAMS_PER_SM=per_sm),
            ):
                rows.append(measure(f"reshape_and_cache {tokens} {label}", cfg, (run, check),
                                    nbytes, copy_bw))  # fmt: skip
        del kbuf, vbuf
    return rows


def _launch(warps: int, stages: int) -> dict[str, int]:
    return {"num_warps": warps, "num_stages": stages}


GDN_SWEEP = [
    {"LOW_PRECISION": low, "WY_LAUNCH": _launch(wy, 2), "STATE_LAUNCH": _launch(st, 2),
     "OUTPUT_LAUNCH": _launch(out, 1), "LOW_PRECISION_KKT": False, "STATE_BV_ADAPT": False}
    for low, wy, st, out in itertools.product((False, True), (4, 8), (4, 8), (2, 4))
] + [
    {"LOW_PRECISION": True, "WY_LAUNCH": _launch(4, 2), "STATE_LAUNCH": _launch(4, stages),
     "OUTPUT_LAUNCH": _launch(2, 1), "LOW_PRECISION_KKT": kkt, "STATE_BV_ADAPT": adapt,
     "LOW_PRECISION_SOLVE": solve}
    for kkt, adapt, stages, solve in (
        (True, False, 2, "ieee"), (False, True, 2, "ieee"), (True, True, 2, "ieee"),
        (True, True, 3, "ieee"), (True, True, 2, "tf32"),
    )
]  # fmt: skip
"""gdn_prefill module constants per configuration: precision and each kernel's warps, then
the sequential state kernel's value tile (its parallelism) and pipelining."""


def sweep_gdn_prefill(copy_bw: float, vllm_dir: Path | None = None) -> list[dict[str, Any]]:
    """GDN chunked prefill: fp32 or 16-bit scratch and products (LOW_PRECISION) and each
    kernel's warps, against a reference of the same kernels on fp32 inputs with IEEE products;
    vLLM's FLA kernels beside it when `vllm_dir` holds them (bench/vllm_ref.py)."""
    mods = vllm_ref.load(vllm_dir) if vllm_dir else None
    return [r for lens in map(list, SHAPES.gdn_prefill) for r in _gdn_shape(lens, mods)]


def _gdn_shape(lens: list[int], mods: Any) -> list[dict[str, Any]]:
    q, k, v, g, beta, cu, h0, meta = gdn_prefill_inputs(lens, DEV)
    with patched(gdn_prefill, DOT_PRECISION_CUDA="ieee", LOW_PRECISION=False):
        o_ref, ht_ref = gdn.chunk_gated_delta_rule(
            q.float(), k.float(), v.float(), g, beta, cu, initial_state=h0, metadata=meta
        )
    shape, rows, vllm_ms = f"{len(lens)}x{lens[0]}", [], None
    if mods is not None:
        run_vllm, output = vllm_ref.gdn_prefill(mods, q=q, k=k, v=v, g=g, beta=beta, cu=cu, h0=h0)
        vllm_ms = ms(run_vllm)
        err = float((output(run_vllm()).float() - o_ref).abs().max())
        print(f"gdn_prefill {shape:10s} vLLM {vllm_ms:8.4f} ms  |o| err {err:.2e}", flush=True)
        rows.append({"kernel": f"gdn_prefill {shape}", "config": "vllm", "ms": round(vllm_ms, 4),
                     "max_abs_error_o": err})  # fmt: skip

    def run() -> Any:
        return gdn.chunk_gated_delta_rule(q, k, v, g, beta, cu, initial_state=h0, metadata=meta)

    # tiny: one configuration of each precision
    for cfg in GDN_SWEEP[::8][:2] if TINY else GDN_SWEEP:
        with patched(gdn_prefill, **cfg):
            o, ht = run()
            err_o = float((o.float() - o_ref).abs().max())
            err_h = float((ht - ht_ref).abs().max())
            ok = close(o, o_ref)
            t = ms(run) if ok else float("nan")
        ratio = vllm_ms / t if vllm_ms and ok else None
        print(f"gdn_prefill {shape:10s} {cfg!s:84s} {t:8.4f} ms  |o| err {err_o:.2e} "
              f"|h| err {err_h:.2e}" + (f"  {ratio:.2f}x vLLM" if ratio else "")
              + ("" if ok else "  WRONG"), flush=True)  # fmt: skip
        rows.append({"kernel": f"gdn_prefill {shape}", "config": cfg, "ms": round(t, 4),
                     "max_abs_error_o": err_o, "max_abs_error_state": err_h,
                     "speed_vs_vllm": round(ratio, 3) if ratio else None,
                     "correct": ok})  # fmt: skip
    return rows


SWEEPS = {
    "conv_prefill": sweep_conv_prefill,
    "conv_update": sweep_conv_update,
    "reshape_and_cache": sweep_reshape_and_cache,
    "gdn_prefill": sweep_gdn_prefill,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "kernel_tiles.json"))
    parser.add_argument("--only", choices=sorted(SWEEPS), action="append")
    parser.add_argument("--tiny", action="store_true", help="CPU, toy shapes, one configuration")
    parser.add_argument(
        "--vllm", type=Path, help="vLLM's kernels (bench/vllm_ref.py) beside GDN and conv update"
    )
    args = parser.parse_args()
    if not TINY and not torch.cuda.is_available():
        print("bench/kernel_tiles.py needs an NVIDIA GPU, or --tiny for the CPU", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    copy_bw = copy_bandwidth(DEV)
    print(f"{device_line()}: d2d copy {copy_bw:.0f} GB/s", flush=True)
    rows = []
    for name in args.only or sorted(SWEEPS):
        sweep = SWEEPS[name]
        takes_vllm = sweep in (sweep_gdn_prefill, sweep_conv_update)
        rows += sweep(copy_bw, args.vllm) if takes_vllm else sweep(copy_bw)
    write_result(args.output, {
        "benchmark": "kernel_tiles",
        "device": device_line(),
        "tiny": TINY,
        "copy_gb_per_s": round(copy_bw, 1),
        "results": rows,
    })  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
