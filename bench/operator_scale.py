"""Operator at scale: N ModelDeployments created at once against KMock's API server.

Measures, in one run and against the same API server process:
- time until every child of every ModelDeployment exists and every status says
  Reconciled=True;
- the operator's object writes per second vs a plain async client writing the same objects
  (the ratio is the operator's efficiency against the API server's own limit here);
- the operator's peak RSS.

    python bench/operator_scale.py [--counts 50 200]

KMock is an in-memory emulator, far slower than a real API server per request; the ratio
compares like with like, the absolute times do not transfer to a cluster. Its request log is
bounded here (tests keep it whole): unbounded, KMock scans every past request on each new one.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "operator"), str(ROOT / "runtime"), str(ROOT / "tests")]

from _common import cpu_device, write_result  # noqa: E402

from ascend_operator.planner import ClusterInfo, plan_manifest  # noqa: E402
from ascend_operator.render import render  # noqa: E402
from helpers import load_example  # noqa: E402
from kmock_server import write_kubeconfig  # noqa: E402
from operator_harness import MD_PATH, PATHS  # noqa: E402
from procs import free_port  # noqa: E402

SERVER = """
import asyncio, sys
sys.path[:0] = [{tests!r}]
from kmock_server import kmock_api
import time
with kmock_api(history=64) as (url, _):
    print(url, flush=True)
    while True:
        time.sleep(3600)
"""


def deployment(index: int, namespace: str) -> dict:
    doc = copy.deepcopy(load_example("tiny-sim.yaml"))
    doc["metadata"].update(
        name=f"m{index:03d}",
        namespace=namespace,
        generation=1,
        resourceVersion="1",
        uid=f"uid-{namespace}-{index}",
    )
    return doc


async def plain_writes(url: str, docs: list[dict], concurrency: int = 16) -> tuple[int, float]:
    """Write every rendered child with a plain client; (objects, seconds)."""
    objects = []
    for doc in docs:
        plan = plan_manifest(doc, ClusterInfo(lws_available=False))
        objects += render(plan)
    queue: asyncio.Queue[dict] = asyncio.Queue()
    for obj in objects:
        queue.put_nowait(obj)
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:

        async def worker() -> None:
            while not queue.empty():
                obj = queue.get_nowait()
                path = PATHS[obj["kind"]].format(ns=obj["metadata"]["namespace"])
                (await client.post(path, json=obj)).raise_for_status()

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return len(objects), time.perf_counter() - start


def metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def all_reconciled(client: httpx.Client, namespace: str, count: int) -> bool:
    """Every status says Reconciled=True (set only once every child was applied). Polls the
    ModelDeployments alone: listing every child kind would load the emulator more than the
    operator does."""
    mds = client.get(MD_PATH.format(ns=namespace)).json().get("items", [])
    if len(mds) < count:
        return False
    for md in mds:
        conditions = (md.get("status") or {}).get("conditions") or []
        if not any(c["type"] == "Reconciled" and c["status"] == "True" for c in conditions):
            return False
    return True


def children(client: httpx.Client, namespace: str) -> int:
    kinds = (
        "ConfigMap",
        "Service",
        "ServiceAccount",
        "Deployment",
        "StatefulSet",
        "PodDisruptionBudget",
        "Role",
        "RoleBinding",
    )
    return sum(
        len(client.get(PATHS[k].format(ns=namespace)).json().get("items", [])) for k in kinds
    )


def start_server() -> tuple[subprocess.Popen, str]:
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER.format(tests=str(ROOT / "tests"))],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None
    return server, server.stdout.readline().strip()


def peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def run_point(count: int, workdir: Path) -> dict:
    # The plain client gets a fresh server of its own, so neither run pays for the other's
    # objects (KMock slows down as its store grows).
    server, url = start_server()
    try:
        docs = [deployment(i, "baseline") for i in range(count)]
        plain_objects, plain_seconds = asyncio.run(plain_writes(url, docs))
    finally:
        server.terminate()
        server.wait(10)
    per_md = plain_objects // count
    server, url = start_server()
    client = httpx.Client(base_url=url, timeout=120)
    metrics_port = free_port()
    operator: subprocess.Popen | None = None
    try:
        with (workdir / f"operator-{count}.log").open("wb") as log:
            operator = subprocess.Popen(
                # KMock cannot serve /api/v1/namespaces, which kopf lists in namespaced mode.
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
                    "WARNING",
                ],
                env={**os.environ, "KUBECONFIG": str(write_kubeconfig(workdir / "kc", url))},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        time.sleep(3.0)  # let it list and open its watches
        start = time.perf_counter()
        for i in range(count):
            client.post(MD_PATH.format(ns="bench"), json=deployment(i, "bench"))
        rss = 0
        while not all_reconciled(client, "bench", count):
            if operator.poll() is not None:
                raise RuntimeError(f"the operator exited; see {workdir}/operator-{count}.log")
            rss = max(rss, peak_rss(operator.pid))
            if time.perf_counter() - start > 1800:
                raise TimeoutError(f"{count} deployments did not converge in 1800 s")
            time.sleep(1.0)
        elapsed = time.perf_counter() - start
        rss = max(rss, peak_rss(operator.pid))
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
        applies = metric(text, 'ascend_serve_operator_writes_total{verb="apply"}')
        present = children(client, "bench")
        if present < count * per_md:
            raise AssertionError(
                f"Reconciled everywhere but only {present} of {count * per_md} children exist"
            )
        operator.terminate()
        operator.wait(30)
    finally:
        if operator is not None and operator.poll() is None:
            operator.kill()
        server.terminate()
        server.wait(10)
    plain_rate = plain_objects / plain_seconds
    operator_rate = applies / elapsed
    return {
        "deployments": count,
        "objects_per_deployment": per_md,
        "seconds_to_converge": elapsed,
        "operator_object_writes": applies,
        "operator_writes_per_second": operator_rate,
        "plain_client_writes_per_second": plain_rate,
        "ratio": operator_rate / plain_rate,
        "operator_peak_rss_mb": rss / 2**20,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[50, 200])
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "operator_scale.json"))
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-operator-"))
    rows = []
    for count in args.counts:
        row = run_point(count, workdir)
        rows.append(row)
        print(
            f"{count:4d} deployments: converged in {row['seconds_to_converge']:6.1f} s, "
            f"operator {row['operator_writes_per_second']:7.1f} writes/s vs plain "
            f"{row['plain_client_writes_per_second']:7.1f} (ratio {row['ratio']:.2f}), "
            f"peak RSS {row['operator_peak_rss_mb']:.0f} MB",
            flush=True,
        )
    result = {
        "benchmark": "operator_scale",
        "device": cpu_device("API server: KMock 0.8 (in-memory emulator)"),
        "goal": "ratio >= 0.5; peak RSS < 200 MB at 200 deployments",
        "api_server": (
            "KMock with its request log bounded to the 64 latest requests plus those in flight "
            "(unbounded, its per-request cost grows with every request ever served)"
        ),
        "results": rows,
    }
    write_result(args.output, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
