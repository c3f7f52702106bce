"""`ascend-serve tune`: search tensor/data/expert layouts and prefill/decode splits for a model
on N devices of a hardware profile, simulate each candidate (`simulate`'s virtual clock), and
print the best as ready ModelDeployments with their predicted numbers."""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TextIO

import yaml

from ascend_runtime.sim.virtual import Workload

from .planner import PlanError, plan_manifest
from .planner.architectures import PRESETS
from .planner.hardware import PROFILES
from .simulate import add_efficiency_argument, check_efficiency, simulate_plan

PD_DECODE_BATCHED_TOKENS = 256
"""Decode instances' maxNumBatchedTokens, as vllm-ascend's published PD layout sets it."""
BATCHED_TOKENS = 16384
"""Prefill and unified maxNumBatchedTokens, as vllm-ascend's published layouts set it."""


@dataclass(frozen=True)
class Slo:
    ttft_ms: float = math.inf
    tpot_ms: float = math.inf

    @classmethod
    def parse(cls, text: str) -> Slo:
        """`ttft=2000,tpot=50` (milliseconds, either may be left out)."""
        values: dict[str, float] = {}
        for part in filter(None, text.split(",")):
            key, _, value = part.partition("=")
            if key not in ("ttft", "tpot"):
                raise ValueError(f"{part!r}: use ttft=MS and/or tpot=MS")
            try:
                values[f"{key}_ms"] = float(value)
            except ValueError:
                raise ValueError(f"{part!r}: {value!r} is not a number of milliseconds") from None
            if not values[f"{key}_ms"] > 0:
                raise ValueError(f"{part!r}: must be above 0")
        return cls(**values)

    def met(self, result: dict[str, Any]) -> bool:
        return result["mean_ttft_ms"] <= self.ttft_ms and result["mean_tpot_ms"] <= self.tpot_ms


def _tensor_sizes(preset: str, devices_per_node: int) -> list[int]:
    arch = PRESETS[preset]
    heads, kv = arch.num_attention_heads, None if arch.mla else arch.num_kv_heads
    sizes = []
    for tp in (1, 2, 4, 8, 16, 32):
        if tp > devices_per_node or (heads and heads % tp):
            continue
        if kv and (tp % kv if tp >= kv else kv % tp):
            continue
        sizes.append(tp)
    return sizes


def _role(name: str, tp: int, dp: int, node: int, **extra: Any) -> dict[str, Any]:
    local = max(d for d in range(1, dp + 1) if dp % d == 0 and d * tp <= node)
    return {"name": name, "parallelism": {"tensor": tp, "data": dp, "dataLocal": local,
                                           "expert": True}, **extra}  # fmt: skip


def candidates(
    preset: str, devices: int, profile: str, concurrency: int
) -> Iterator[tuple[str, list[dict[str, Any]], int]]:
    """(label, roles, unified/decode instance count) for every layout of `devices`."""
    node = PROFILES[profile].devices_per_node
    sizes = _tensor_sizes(preset, node)
    for tp in sizes:
        for dp in range(1, devices // tp + 1):
            if devices % (tp * dp):
                continue
            instances = devices // (tp * dp)
            seqs = max(8, math.ceil(concurrency / (dp * instances)))
            role = _role("unified", tp, dp, node, maxNumSeqs=seqs)
            yield f"unified TP{tp} x DP{dp} x {instances}", [role], instances
    nodes = devices // node
    for prefill_nodes in range(1, nodes):
        decode_devices = devices - prefill_nodes * node
        for ptp in sizes:
            for dtp in (t for t in sizes if t <= ptp and decode_devices % t == 0):
                pdp, ddp = node // ptp, decode_devices // dtp
                prefill = _role(
                    "prefill", ptp, pdp, node, replicas=prefill_nodes, graphMode="eager",
                    maxNumSeqs=max(8, math.ceil(concurrency / (pdp * prefill_nodes) / 4)),
                )  # fmt: skip
                decode = _role(
                    "decode", dtp, ddp, node, maxNumSeqs=max(8, math.ceil(concurrency / ddp)),
                    maxNumBatchedTokens=PD_DECODE_BATCHED_TOKENS,
                )  # fmt: skip
                label = (
                    f"PD: prefill {prefill_nodes} x (TP{ptp} x DP{pdp}), decode TP{dtp} x DP{ddp}"
                )
                yield label, [prefill, decode], 1


def manifest(
    name: str, args: argparse.Namespace, roles: list[dict[str, Any]], replicas: int
) -> dict[str, Any]:
    """A ModelDeployment of one candidate layout."""
    preset = args.model
    return {
        "apiVersion": "ascendserve.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name},
        "spec": {
            "model": {
                "name": preset,
                "source": {"pvc": {"claimName": "models", "path": preset}},
                "quantization": args.quantization,
                "maxModelLen": args.max_model_len,
                "architecture": {"preset": preset},
            },
            "runtime": {"maxNumBatchedTokens": BATCHED_TOKENS, "prefixCaching": False},
            "hardware": {"profile": args.hardware},
            "roles": roles,
            "replicas": replicas,
        },
    }


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "tune", help="search layouts for a model on N devices and print the best ModelDeployments"
    )
    p.add_argument("--model", required=True, help=f"a preset: {', '.join(PRESETS)}")
    p.add_argument("--devices", type=int, required=True, help="NPU devices to use")
    p.add_argument("--hardware", default="A3", choices=sorted(PROFILES))
    p.add_argument("--quantization", default="w8a8", choices=["none", "w8a8", "w8a8-dynamic"])
    p.add_argument("--max-model-len", type=int, default=40960)
    p.add_argument("--workload", default="random:3584:1536")
    p.add_argument("--concurrency", type=int, default=144)
    p.add_argument("--requests", type=int, help="per candidate (default: 2 x concurrency)")
    p.add_argument("--slo", default="", help="mean targets, e.g. ttft=2000,tpot=50 (ms)")
    p.add_argument("--top", type=int, default=3)
    add_efficiency_argument(p)
    p.set_defaults(func=cmd_tune)


def cmd_tune(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from .cli import UsageError

    if args.model not in PRESETS or not PRESETS[args.model].total_params_b:
        raise UsageError(f"--model: {args.model!r} is not a preset with sizes; see `presets`")
    node = PROFILES[args.hardware].devices_per_node
    if args.devices < 1 or (args.devices > node and args.devices % node):
        raise UsageError(f"--devices: use up to {node} or a multiple of {node} ({args.hardware})")
    if args.concurrency < 1 or args.top < 1 or (args.requests is not None and args.requests < 1):
        raise UsageError("--concurrency, --requests and --top must be at least 1")
    try:
        workload, slo = Workload.parse(args.workload), Slo.parse(args.slo)
    except ValueError as exc:
        raise UsageError(f"--workload/--slo: {exc}") from None
    check_efficiency(args.compute_efficiency)
    requests = args.requests or 2 * args.concurrency
    scored = []
    for i, (label, roles, replicas) in enumerate(
        candidates(args.model, args.devices, args.hardware, args.concurrency)
    ):
        doc = manifest(f"{args.model}-{i}", args, roles, replicas)
        try:
            plan = plan_manifest({**doc, "metadata": {"name": doc["metadata"]["name"],
                                                      "namespace": "default"}})  # fmt: skip
        except PlanError as exc:
            err.write(f"skip {label}: {exc.problems[0].message}\n")
            continue
        try:
            result = simulate_plan(
                plan, workload, requests, args.concurrency,
                compute_efficiency=args.compute_efficiency,
            )  # fmt: skip
        except RuntimeError as exc:
            err.write(f"skip {label}: {exc}\n")
            continue
        err.write(
            f"{label}: {result['output_throughput']:.0f} tok/s, TTFT "
            f"{result['mean_ttft_ms']:.0f} ms, TPOT {result['mean_tpot_ms']:.1f} ms\n"
        )
        scored.append((slo.met(result), result["output_throughput"], label, doc, result))
    if not scored:
        err.write("no layout of these devices plans (see the reasons above)\n")
        return 1
    scored.sort(key=lambda s: (s[0], s[1]), reverse=True)
    for met, _, label, doc, result in scored[: args.top]:
        out.write(
            f"# {label}: predicted {result['output_throughput']:.0f} output tok/s, mean TTFT "
            f"{result['mean_ttft_ms']:.0f} ms, mean TPOT {result['mean_tpot_ms']:.1f} ms at "
            f"concurrency {args.concurrency} ({'meets' if met else 'misses'} the SLO; "
            "sim predictions, docs/sim.md)\n"
        )
        out.write(yaml.safe_dump(doc, sort_keys=False) + "---\n")
    return 0
