"""`ascend-serve`: validate, plan and render ModelDeployments; print the CRD."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import yaml

from ascend_runtime.roles import ROUTER_PORT

from . import __version__


class UsageError(Exception):
    """A problem with the command line or the input file (exit code 2)."""


def _load_documents(path: str) -> list[dict[str, Any]]:
    """ModelDeployment documents of a YAML file (`-` for stdin); other kinds are skipped."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise UsageError(
            f"{path} is not UTF-8 text (byte {exc.start} is {exc.object[exc.start]:#04x}); "
            "save it as UTF-8"
        ) from exc
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise UsageError(f"{path} is not valid YAML: {exc}") from exc
    except RecursionError:
        raise UsageError(f"{path} nests too deeply to read; no ModelDeployment does") from None
    found = [d for d in docs if isinstance(d, dict) and d.get("kind") == "ModelDeployment"]
    if not found:
        raise UsageError(f"{path} holds no ModelDeployment (kind: ModelDeployment)")
    return found


def _set_namespace(doc: dict[str, Any], flag: str | None, path: str) -> None:
    """The namespace as kubectl would pick it: the manifest's, else --namespace, else the
    kubeconfig's current namespace, else `default`; a manifest and a flag that disagree are
    an error (as with kubectl)."""
    from .kubeconfig import current_namespace

    meta = doc.get("metadata")
    if not isinstance(meta, dict):
        return  # the planner reports the missing metadata
    own = meta.get("namespace")
    if own and flag and own != flag:
        raise UsageError(
            f"{path}: ModelDeployment {meta.get('name')} names namespace {own!r} but "
            f"--namespace is {flag!r}; drop one of them"
        )
    if not own:
        meta["namespace"] = flag or current_namespace() or "default"


def _local_model_config(doc: Any) -> Any:
    """The config.json of a hostPath model that exists on this machine, else None."""
    try:
        path = Path(doc["spec"]["model"]["source"]["hostPath"]["path"]) / "config.json"
        return json.loads(path.read_text())
    except (KeyError, TypeError, OSError, ValueError, RecursionError):
        return None


def _plans(args: argparse.Namespace, out: TextIO, err: TextIO) -> list[Any] | None:
    from .planner import ClusterInfo, PlanError, plan_manifest
    from .planner.hf_config import with_model_config

    cluster = ClusterInfo(lws_available=args.lws, image_registry=args.image_registry)
    plans, failed = [], False
    for doc in _load_documents(args.file):
        _set_namespace(doc, args.namespace, args.file)
        meta = doc.get("metadata")
        name = meta.get("name", "<unnamed>") if isinstance(meta, dict) else "<unnamed>"
        completed = with_model_config(doc, _local_model_config(doc))
        try:
            plans.append(plan_manifest(completed, cluster))
        except PlanError as exc:
            failed = True
            err.write(
                f"ModelDeployment {name} is invalid ({len(exc.problems)} problem"
                f"{'s' if len(exc.problems) != 1 else ''}):\n{exc}\n"
            )
    return None if failed else plans


def cmd_validate(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    plans = _plans(args, out, err)
    if plans is None:
        return 1
    for p in plans:
        devices = (
            f"{p.total_devices} NPU devices" if p.hardware.resource_name else "no NPUs requested"
        )
        out.write(
            f"ModelDeployment {p.namespace}/{p.name} is valid: {len(p.roles)} role(s), {devices}\n"
        )
        for warning in p.warnings:
            out.write(f"warning: {warning}\n")
    return 0


def cmd_render(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from .render import render, to_yaml

    plans = _plans(args, out, err)
    if plans is None:
        return 1
    for p in plans:
        for warning in p.warnings:  # stderr: the YAML on stdout stays what kubectl applies
            err.write(f"warning: {p.name}: {warning}\n")
        out.write(to_yaml(render(p)))
    return 0


def cmd_plan(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from .plan_table import plan_table

    plans = _plans(args, out, err)
    if plans is None:
        return 1
    out.write("\n".join(plan_table(p) for p in plans))
    return 0


def cmd_crd(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from .api.crd import crd_manifest

    out.write(yaml.safe_dump(crd_manifest(), sort_keys=False, width=100))
    return 0


def cmd_api_reference(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from .api.reference import api_reference

    out.write(api_reference())
    return 0


def cmd_chart_rbac(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from .kinds import chart_rules_template

    out.write(chart_rules_template())
    return 0


def cmd_presets(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from dataclasses import asdict

    from .planner.architectures import PRESETS

    for name, arch in PRESETS.items():
        facts = ", ".join(f"{k}={v}" for k, v in asdict(arch).items() if v is not None)
        out.write(f"{name}: {facts}\n")
    return 0


def cmd_up(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    import shutil

    from .local_run import run_up
    from .local_setup import UpError, vllm_executable

    plans = _plans(args, out, err)
    if plans is None:
        return 1
    if len(plans) != 1:
        raise UsageError(f"{args.file} holds {len(plans)} ModelDeployments; `up` runs one")
    (plan,) = plans
    engine = args.engine
    if engine == "auto":
        has_npu = shutil.which("npu-smi") is not None and shutil.which("vllm") is not None
        engine = plan.spec.runtime.engine if has_npu else "sim"
        if plan.spec.runtime.engine == "vllm" and engine == "sim":
            out.write(
                "ascend-serve up: no NPU or vLLM here; running the sim engine "
                "(--engine vllm to insist)\n"
            )
    try:
        if engine == "vllm":
            vllm_executable()
        return run_up(
            plan,
            engine=engine,
            router_port=args.port,
            run_dir=args.run_dir,
            dry_run=args.dry_run,
            out=out,
            ready_timeout=args.ready_timeout,
        )
    except UpError as exc:
        raise UsageError(str(exc)) from exc


def cmd_launch(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from ascend_runtime.launcher import LaunchError, launch

    try:
        return launch(args.config, dry_run=args.dry_run, out=out)
    except LaunchError as exc:
        err.write(f"ascend-serve launch: {exc}\n")
        return 1


def cmd_probe(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from ascend_runtime.launcher import LaunchError, probe

    try:
        return probe(args.config)
    except LaunchError as exc:
        err.write(f"ascend-serve probe: {exc}\n")
        return 1


def cmd_sim(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from ascend_runtime.sim.run import run_sim

    return run_sim(
        args.config,
        args.instance,
        args.worker_index,
        host=args.host,
        port=args.port,
        kv_port=args.kv_port,
    )


def cmd_router(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from ascend_runtime.router.run import run_router

    return run_router(args.config, args.host, args.port, args.health_interval)


def cmd_operator(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    import os

    from .controller.run import default_scope, run_operator

    namespaces, all_namespaces = args.namespace or [], args.all_namespaces
    if not namespaces and not all_namespaces:
        namespaces, why = default_scope(dict(os.environ))
        all_namespaces = not namespaces
        err.write(f"ascend-serve operator: no scope flag, watching {why}\n")
    return run_operator(
        namespaces=namespaces,
        all_namespaces=all_namespaces,
        standalone=args.standalone,
        peering=args.peering,
        liveness=args.liveness,
        metrics_port=args.metrics_port,
        image_registry=args.image_registry,
        log_level=args.log_level,
        log_format=args.log_format,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ascend-serve",
        description="Deploy LLMs on Ascend NPU clusters from one ModelDeployment.",
    )
    parser.add_argument("--version", action="version", version=f"ascend-serve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_file(p: argparse.ArgumentParser) -> None:
        from .images import DEFAULT_REGISTRY

        p.add_argument("-f", "--file", required=True, help="ModelDeployment YAML (- for stdin)")
        p.add_argument(
            "-n",
            "--namespace",
            help="namespace of ModelDeployments that name none (default: the kubeconfig's "
            "current namespace, as kubectl picks it, else `default`)",
        )
        p.add_argument(
            "--lws",
            action=argparse.BooleanOptionalAction,
            default=True,
            help="whether the LeaderWorkerSet CRD is installed (decides workload kind auto)",
        )
        p.add_argument(
            "--image-registry",
            default=DEFAULT_REGISTRY,
            help="registry of the default ascend-serve images",
        )

    p = sub.add_parser("validate", help="check a spec; exit 1 with every problem found")
    with_file(p)
    p.set_defaults(func=cmd_validate)
    p = sub.add_parser("render", help="print the Kubernetes objects (YAML stream)")
    with_file(p)
    p.set_defaults(func=cmd_render)
    p = sub.add_parser("plan", help="print the planned topology as a table")
    with_file(p)
    p.set_defaults(func=cmd_plan)
    p = sub.add_parser("crd", help="print the ModelDeployment CRD generated from the models")
    p.set_defaults(func=cmd_crd)
    p = sub.add_parser("api-reference", help="print the API reference (Markdown) from the models")
    p.set_defaults(func=cmd_api_reference)
    p = sub.add_parser("chart-rbac", help="print the Helm chart's RBAC rules (_rules.tpl)")
    p.set_defaults(func=cmd_chart_rbac)
    p = sub.add_parser("presets", help="list the known model architectures")
    p.set_defaults(func=cmd_presets)

    from .simulate import add_parser as add_simulate
    from .tune import add_parser as add_tune

    add_simulate(sub, with_file)
    add_tune(sub)

    p = sub.add_parser("up", help="run a deployment on this machine (router on localhost)")
    with_file(p)
    p.add_argument(
        "--engine",
        choices=["auto", "sim", "vllm"],
        default="auto",
        help="auto: the spec's engine where vLLM and NPUs exist, else sim",
    )
    p.add_argument("--port", type=int, default=ROUTER_PORT, help="router port on 127.0.0.1")
    p.add_argument("--run-dir", help="where configs and logs go (default: a new temp dir)")
    p.add_argument(
        "--ready-timeout",
        type=float,
        default=60.0,
        help="seconds to wait for every instance to become healthy",
    )
    p.add_argument("--dry-run", action="store_true", help="print the processes, start none")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("operator", help="run the Kubernetes operator (kopf)")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument(
        "-A",
        "--all-namespaces",
        action="store_true",
        help="watch ModelDeployments in every namespace",
    )
    scope.add_argument(
        "-n",
        "--namespace",
        action="append",
        help="watch this namespace (repeatable). Without either flag: the pod's own namespace "
        "in a pod, every namespace elsewhere",
    )
    peering = p.add_mutually_exclusive_group()
    peering.add_argument(
        "--standalone", action="store_true", help="no peering: the only operator replica"
    )
    peering.add_argument("--peering", help="KopfPeering name: replicas elect one active")
    p.add_argument("--liveness", help="liveness endpoint, e.g. http://0.0.0.0:8081/healthz")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port")
    from .images import DEFAULT_REGISTRY

    p.add_argument(
        "--image-registry",
        default=DEFAULT_REGISTRY,
        help="registry of the default engine/router images",
    )
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument("--log-format", default="text", choices=["text", "json"])
    p.set_defaults(func=cmd_operator)

    p = sub.add_parser("launch", help="(in a pod) resolve this pod's rank and exec the engine")
    p.add_argument("--config", required=True, help="RuntimeConfig JSON")
    p.add_argument("--dry-run", action="store_true", help="print the command and environment")
    p.set_defaults(func=cmd_launch)

    p = sub.add_parser("probe", help="(in a pod) readiness/liveness check of this pod")
    p.add_argument("--config", required=True)
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("sim", help="run the NPU-mocked engine of one pod")
    p.add_argument("--config", required=True)
    p.add_argument("--instance", type=int, default=0)
    p.add_argument("--worker-index", type=int, default=0)
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, help="HTTP port (default: the config's)")
    p.add_argument("--kv-port", type=int, help="KV side-channel port of a prefill instance")
    p.set_defaults(func=cmd_sim)

    p = sub.add_parser("router", help="run the OpenAI router of one deployment")
    p.add_argument("--config", required=True, help="RouterConfig JSON")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int)
    p.add_argument("--health-interval", type=float, default=2.0)
    p.set_defaults(func=cmd_router)
    return parser


def main(
    argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """Entry point of the `ascend-serve` command; returns the exit code."""
    out = out or sys.stdout
    err = err or sys.stderr
    args = build_parser().parse_args(argv)
    if args.command in ("up", "sim", "router", "launch"):
        import logging

        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
    try:
        return int(args.func(args, out, err))
    except UsageError as exc:
        err.write(f"error: {exc}\n")
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
