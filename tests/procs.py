"""Run `ascend-serve up` (or single components) as real processes on loopback for tests."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from helpers import ROOT


def die_with_parent(argv: list[str], sig: str = "KILL") -> list[str]:
    """`argv` under util-linux's setpriv, so the process gets `sig` if the test process dies
    without cleaning up (where setpriv exists; the fixture's teardown stops them otherwise).
    TERM lets a supervisor such as `ascend-serve up` stop its own children first."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", sig, "--", *argv] if setpriv else argv


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "ascend_operator.cli", *args]


def wait_healthy(url: str, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        time.sleep(0.1)
    raise TimeoutError(f"{url} not healthy after {timeout} s")


@contextlib.contextmanager
def up(
    example: str | Path,
    run_dir: Path,
    *extra: str,
) -> Iterator[tuple[str, subprocess.Popen, Path]]:
    """`ascend-serve up -f examples/<example>` (or a path); yields (router URL, process, its
    output file)."""
    port = free_port()
    spec = example if isinstance(example, Path) else ROOT / "examples" / example
    out = run_dir / "up.out"
    with out.open("wb") as fh:
        proc = subprocess.Popen(
            cli("up", "-f", str(spec), "--port", str(port), "--run-dir", str(run_dir), *extra),
            stdout=fh,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while b"endpoint:" not in out.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"up did not start:\n{out.read_text()}")
            time.sleep(0.1)
        yield url, proc, out
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise


def engine_pids(run_dir: Path) -> dict[str, int]:
    """Process ids of the sim engines of an `up` run, by name (`decode-0-0`), from /proc."""
    pids = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                argv = fh.read().split(b"\0")
        except OSError:
            continue
        text = b" ".join(argv).decode(errors="replace")
        if str(run_dir) in text and " sim " in f" {text} ":
            # the role's config (unified.json), or an instance's own (unified-0.json)
            config = os.path.basename(argv[argv.index(b"--config") + 1].decode())
            role = config.removesuffix(".json").split("-")[0]
            inst = argv[argv.index(b"--instance") + 1].decode()
            worker = argv[argv.index(b"--worker-index") + 1].decode()
            pids[f"{role}-{inst}-{worker}"] = int(entry)
    return pids
