"""Operator at scale: N ModelDeployments created at once, on a real kube-apiserver (etcd,
RBAC, server-side apply; from KUBEBUILDER_ASSETS) and on KMock's in-memory emulator.

Measures, in one run and against the same API server process:
- time until every ModelDeployment's status says Reconciled=True (set only once every child
  was applied), and that every child exists;
- the operator's object writes per second vs a plain async client creating the same objects
  on the same server (the ratio is the operator's efficiency against the API server's own
  limit here);
- the operator's CPU time and peak RSS.

    python bench/operator_scale.py [--counts 1 50 200] [--api-server real kmock]

Each point gets a fresh API server, so neither run pays for the other's objects. On the real
server no controller manager runs: the numbers are the operator's and the API server's alone.
KMock is far slower than a real API server per request and bounded here to its 64 latest
requests (unbounded, it scans every past request on each new one); its absolute times do not
transfer to a cluster.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import os
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "operator"), str(ROOT / "runtime"), str(ROOT / "tests")]

from _common import cpu_device, write_result  # noqa: E402

from ascend_operator.kinds import BY_KIND, CHILDREN, MODEL_DEPLOYMENT  # noqa: E402
from ascend_operator.planner import ClusterInfo, plan_manifest  # noqa: E402
from ascend_operator.render import render  # noqa: E402
from envtest import ControlPlane, assets_dir  # noqa: E402
from helpers import load_example  # noqa: E402
from kmock_server import write_kubeconfig  # noqa: E402
from procs import free_port  # noqa: E402

LOG_LEVEL = os.environ.get("BENCH_OPERATOR_LOG_LEVEL", "WARNING")
KMOCK_SERVER = """
import sys, time
sys.path[:0] = [{tests!r}]
from kmock_server import kmock_api
with kmock_api(history=64) as (url, _):
    print(url, flush=True)
    while True:
        time.sleep(3600)
"""


@dataclass
class Server:
    """One API server for one point: where it is, how to call it, how the operator logs in."""

    name: str
    url: str
    kubeconfig: Path
    client_options: dict[str, Any]
    fake_metadata: bool
    """KMock assigns no uid, generation or resourceVersion: the bench sets them."""
    pids: tuple[int, ...] = ()
    """The server's processes (their CPU time is reported)."""

    def cpu_seconds(self) -> float:
        return sum(process_usage(pid)[1] for pid in self.pids)


@contextmanager
def kmock(workdir: Path) -> Iterator[Server]:
    workdir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-c", KMOCK_SERVER.format(tests=str(ROOT / "tests"))],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    url = proc.stdout.readline().strip()
    try:
        yield Server("kmock", url, write_kubeconfig(workdir / "kc", url), {}, True, (proc.pid,))
    finally:
        proc.terminate()
        proc.wait(10)


@contextmanager
def real(workdir: Path) -> Iterator[Server]:
    assets = assets_dir()
    if assets is None:
        raise SystemExit("--api-server real needs KUBEBUILDER_ASSETS (see tests/envtest.py)")
    plane = ControlPlane(assets, workdir / "envtest", controller_manager=False)
    plane.start()
    try:
        assert plane.pki is not None
        context = ssl.create_default_context(cafile=plane.pki.path("ca.crt"))
        context.load_cert_chain(plane.pki.path("admin.crt"), plane.pki.path("admin.key"))
        with plane.http() as client:
            crd = yaml.safe_load(
                (ROOT / "crds" / "modeldeployments.ascendserve.dev.yaml").read_text()
            )
            client.patch(
                f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{crd['metadata']['name']}",
                params={"fieldManager": "bench", "force": "true"},
                content=yaml.safe_dump(crd),
                headers={"Content-Type": "application/apply-patch+yaml"},
            ).raise_for_status()
            for ns in ("baseline", "bench"):
                client.post(
                    "/api/v1/namespaces",
                    json={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}},
                ).raise_for_status()
            time.sleep(2.0)  # the CRD becomes Established
        pids = tuple(p.pid for p in plane.procs.values())
        yield Server("real", plane.url, plane.dir / "kubeconfig", {"verify": context}, False, pids)
    finally:
        plane.stop()


SERVERS = {"real": real, "kmock": kmock}


def deployment(index: int, namespace: str, fake_metadata: bool) -> dict:
    doc = copy.deepcopy(load_example("tiny-sim.yaml"))
    doc["metadata"].update(name=f"m{index:03d}", namespace=namespace)
    if fake_metadata:
        doc["metadata"].update(generation=1, resourceVersion="1", uid=f"uid-{namespace}-{index}")
    return doc


async def plain_writes(
    server: Server, docs: list[dict], concurrency: int = 16
) -> tuple[int, float]:
    """Create every rendered child with a plain aiohttp client, `concurrency` requests at a
    time (the operator's own connection limit); (objects, seconds)."""
    objects = []
    for doc in docs:
        objects += render(plan_manifest(doc, ClusterInfo(lws_available=False)))
    queue: asyncio.Queue[dict] = asyncio.Queue()
    for obj in objects:
        queue.put_nowait(obj)
    ssl_context = server.client_options.get("verify", False)
    connector = aiohttp.TCPConnector(limit=concurrency, ssl=ssl_context)
    async with aiohttp.ClientSession(base_url=server.url, connector=connector) as session:

        async def worker() -> None:
            while not queue.empty():
                obj = queue.get_nowait()
                path = BY_KIND[obj["kind"]].path(obj["metadata"]["namespace"])
                async with session.post(path, json=obj) as response:
                    response.raise_for_status()
                    await response.read()

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return len(objects), time.perf_counter() - start


def metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def all_reconciled(client: httpx.Client, namespace: str, count: int) -> bool:
    """Every status says Reconciled=True. Polls the ModelDeployments alone: listing every
    child kind would load the server more than the operator does."""
    mds = client.get(MODEL_DEPLOYMENT.path(namespace)).json().get("items", [])
    if len(mds) < count:
        return False
    for md in mds:
        conditions = (md.get("status") or {}).get("conditions") or []
        if not any(c["type"] == "Reconciled" and c["status"] == "True" for c in conditions):
            return False
    return True


def children(client: httpx.Client, namespace: str) -> int:
    kinds = [k for k in CHILDREN if k.kind != "LeaderWorkerSet"]
    return sum(len(client.get(k.path(namespace)).json().get("items", [])) for k in kinds)


def process_usage(pid: int) -> tuple[int, float]:
    """(peak RSS in bytes, CPU seconds user + system) of a live process."""
    rss = 0
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                rss = int(line.split()[1]) * 1024
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return rss, (int(fields[11]) + int(fields[12])) / ticks


def run_point(kind: str, count: int, workdir: Path) -> dict:
    with SERVERS[kind](workdir / f"{kind}-{count}-plain") as server:
        docs = [deployment(i, "baseline", server.fake_metadata) for i in range(count)]
        before = server.cpu_seconds()
        plain_objects, plain_seconds = asyncio.run(plain_writes(server, docs))
        plain_server_cpu = server.cpu_seconds() - before
    per_md = plain_objects // count
    with SERVERS[kind](workdir / f"{kind}-{count}") as server:
        client = httpx.Client(base_url=server.url, timeout=120, **server.client_options)
        metrics_port = free_port()
        operator: subprocess.Popen | None = None
        try:
            with (workdir / f"operator-{kind}-{count}.log").open("wb") as log:
                operator = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "ascend_operator.cli",
                        "operator",
                        "--all-namespaces",
                        "--standalone",
                        "--metrics-port",
                        str(metrics_port),
                        "--log-level",
                        LOG_LEVEL,
                    ],
                    env={**os.environ, "KUBECONFIG": str(server.kubeconfig)},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            time.sleep(3.0)  # let it list and open its watches
            _, idle_cpu = process_usage(operator.pid)
            server_before = server.cpu_seconds()
            start = time.perf_counter()
            for i in range(count):
                client.post(
                    MODEL_DEPLOYMENT.path("bench"),
                    json=deployment(i, "bench", server.fake_metadata),
                ).raise_for_status()
            rss = 0
            while not all_reconciled(client, "bench", count):
                if operator.poll() is not None:
                    raise RuntimeError(f"the operator exited; see {workdir}")
                rss = max(rss, process_usage(operator.pid)[0])
                if time.perf_counter() - start > 1800:
                    raise TimeoutError(f"{count} deployments did not converge in 1800 s")
                time.sleep(0.25 if count < 10 else 1.0)
            elapsed = time.perf_counter() - start
            server_cpu = server.cpu_seconds() - server_before
            peak, cpu = process_usage(operator.pid)
            text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
            applies = metric(text, 'ascend_serve_operator_writes_total{verb="apply"}')
            passes = metric(text, "ascend_serve_operator_reconciles_total{")
            present = children(client, "bench")
            if present < count * per_md:
                raise AssertionError(
                    f"Reconciled everywhere but only {present} of {count * per_md} children exist"
                )
        finally:
            if operator is not None and operator.poll() is None:
                operator.terminate()
                try:
                    operator.wait(30)
                except subprocess.TimeoutExpired:
                    operator.kill()
            client.close()
    plain_rate = plain_objects / plain_seconds
    operator_rate = applies / elapsed
    return {
        "api_server": kind,
        "deployments": count,
        "objects_per_deployment": per_md,
        "seconds_to_converge": elapsed,
        "operator_object_writes": applies,
        "reconcile_passes": passes,
        "operator_writes_per_second": operator_rate,
        "plain_client_writes_per_second": plain_rate,
        "ratio": operator_rate / plain_rate,
        "operator_cpu_seconds": cpu - idle_cpu,
        "api_server_cpu_seconds": server_cpu,
        "api_server_cpu_seconds_plain_client": plain_server_cpu,
        "operator_peak_rss_mb": max(rss, peak) / 2**20,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 50, 200])
    parser.add_argument(
        "--api-server",
        nargs="+",
        choices=sorted(SERVERS),
        default=["real", "kmock"] if assets_dir() else ["kmock"],
        help="real needs KUBEBUILDER_ASSETS (default: both where it is set)",
    )
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "operator_scale.json"))
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-operator-"))
    rows = []
    for kind in args.api_server:
        for count in args.counts:
            row = run_point(kind, count, workdir)
            rows.append(row)
            print(
                f"{kind:5s} {count:4d} deployments: Reconciled in "
                f"{row['seconds_to_converge']:6.1f} s, operator "
                f"{row['operator_writes_per_second']:7.1f} writes/s vs plain "
                f"{row['plain_client_writes_per_second']:7.1f} (ratio {row['ratio']:.2f}), "
                f"{row['reconcile_passes']:.0f} passes, CPU {row['operator_cpu_seconds']:.1f} s "
                f"(API server {row['api_server_cpu_seconds']:.1f} s vs "
                f"{row['api_server_cpu_seconds_plain_client']:.1f} s for the plain client), "
                f"peak RSS {row['operator_peak_rss_mb']:.0f} MB",
                flush=True,
            )
    result = {
        "benchmark": "operator_scale",
        "device": cpu_device(
            "API servers: kube-apiserver v1.36 + etcd 3.4 on loopback (no controller manager), "
            "and KMock 0.8 (in-memory emulator, request log bounded to 64)"
        ),
        "goal": "ratio >= 0.5; peak RSS < 200 MB at 200 deployments",
        "results": rows,
    }
    write_result(args.output, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
