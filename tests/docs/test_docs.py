"""Every YAML block in the docs parses, and every ModelDeployment in them plans; every shell
block marked runnable runs, against `ascend-serve up` with the sim engine where the page starts
one. A tutorial whose YAML or commands drift from the product fails CI.

Markers, an HTML comment on the line before a fenced block:
- `<!-- docs-test: up -->`: the block is `ascend-serve up -f FILE ...`; it is started (on a free
  port, sim engine) and serves the page's later `run` blocks.
- `<!-- docs-test: run -->`: the block runs with bash (-euo pipefail) in the repository root;
  `localhost:8000` / `127.0.0.1:8000` point at the page's running `up`.
- `<!-- docs-test: invalid -->`: a YAML block that must be refused by the planner, and every
  problem path it reports must appear in the page (troubleshooting sections).
- `<!-- docs-test: warns -->`: a YAML block that plans with at least one warning, and every
  warning's path must appear in the page.
A YAML block whose first line is `# examples/<file>` must equal that example.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from ascend_operator.planner import PlanError, plan_manifest
from procs import ROOT, up

DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
FENCE = re.compile(
    r"(?:<!--\s*docs-test:\s*(?P<marker>[\w-]+)\s*-->\s*\n)?```(?P<lang>[\w-]*)\n(?P<body>.*?)```",
    re.S,
)


@dataclass
class Block:
    page: Path
    line: int
    lang: str
    marker: str | None
    body: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    text = page.read_text()
    return [
        Block(page, text[: m.start()].count("\n") + 1, m["lang"], m["marker"], m["body"])
        for m in FENCE.finditer(text)
    ]


ALL = [b for page in DOCS for b in blocks(page)]
YAML = [b for b in ALL if b.lang in ("yaml", "yml")]
PAGES_WITH_RUNS = sorted({b.page for b in ALL if b.marker in ("up", "run")})


def test_markers_are_known_and_on_the_right_blocks():
    for b in ALL:
        if b.marker is None:
            continue
        assert b.marker in ("up", "run", "invalid", "warns"), f"{b.where}: unknown {b.marker}"
        wanted = "yaml" if b.marker in ("invalid", "warns") else "bash"
        assert b.lang == wanted, f"{b.where}: docs-test: {b.marker} goes on a {wanted} block"


@pytest.mark.parametrize("block", YAML, ids=[b.where for b in YAML])
def test_yaml_block_parses_and_plans(block: Block):
    docs = [d for d in yaml.safe_load_all(block.body) if d is not None]
    assert docs, f"{block.where}: empty YAML block"
    deployments = [d for d in docs if isinstance(d, dict) and d.get("kind") == "ModelDeployment"]
    for doc in deployments:
        if block.marker == "invalid":
            with pytest.raises(PlanError) as refused:
                plan_manifest(doc)
            text = block.page.read_text()
            for problem in refused.value.problems:
                assert problem.path in text, (
                    f"{block.where}: the planner reports {problem.path} ({problem.message}); "
                    "the page must explain it"
                )
        else:
            try:
                planned = plan_manifest(doc)
            except PlanError as exc:
                pytest.fail(f"{block.where}: this ModelDeployment does not plan:\n{exc}")
            if block.marker == "warns":
                assert planned.warnings, f"{block.where}: docs-test: warns, but it plans clean"
                text = block.page.read_text()
                for warning in planned.warnings:
                    assert warning.path in text, f"{block.where}: explain {warning}"
    if block.marker in ("invalid", "warns"):
        assert deployments, f"{block.where}: docs-test: {block.marker} needs a ModelDeployment"
    first = block.body.splitlines()[0]
    if first.startswith("# examples/"):  # a copy of an example must stay one
        example = ROOT / first[2:].strip()
        assert example.is_file(), f"{block.where}: {example.name} does not exist"
        assert docs == list(yaml.safe_load_all(example.read_text())), (
            f"{block.where}: this block no longer matches {first[2:].strip()}"
        )


def _up_args(block: Block) -> list[str]:
    lines = [ln for ln in block.body.splitlines() if ln.strip() and not ln.startswith("#")]
    assert len(lines) == 1, f"{block.where}: an `up` block holds one command"
    argv = shlex.split(lines[0].split("#")[0])
    assert argv[:2] == ["ascend-serve", "up"], f"{block.where}: expected `ascend-serve up ...`"
    assert "--port" not in argv, f"{block.where}: the test picks the port; leave --port out"
    return argv[2:]


def _run(block: Block, port: int | None, tmp: Path) -> None:
    script = block.body
    if port is not None:
        script = re.sub(r"(localhost|127\.0\.0\.1):8000", rf"\g<1>:{port}", script)
    env = {**os.environ, "PATH": f"{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}"}
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, (
        f"{block.where}: exit {done.returncode}\n--- script\n{script}\n--- stdout\n"
        f"{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}"
    )


@pytest.mark.parametrize(
    "page", PAGES_WITH_RUNS, ids=[str(p.relative_to(ROOT)) for p in PAGES_WITH_RUNS]
)
def test_runnable_blocks_run(page: Path, tmp_path: Path):
    """The page's blocks in order: each `up` replaces the previous one."""
    runnable = [b for b in blocks(page) if b.marker in ("up", "run")]
    stack: list = []
    port: int | None = None
    try:
        for i, block in enumerate(runnable):
            if block.marker == "up":
                while stack:
                    stack.pop().__exit__(None, None, None)
                args = _up_args(block)
                spec = Path(args[args.index("-f") + 1])
                rest = [
                    a
                    for j, a in enumerate(args)
                    if j not in (args.index("-f"), args.index("-f") + 1)
                ]
                run_dir = tmp_path / f"up{i}"
                run_dir.mkdir()
                ctx = up(ROOT / spec, run_dir, *rest)
                url, _, _ = ctx.__enter__()
                stack.append(ctx)
                port = int(url.rsplit(":", 1)[1])
            else:
                _run(block, port, tmp_path)
    finally:
        while stack:
            stack.pop().__exit__(None, None, None)
