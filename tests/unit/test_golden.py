"""Golden files lock the rendered output of every example (LeaderWorkerSet and, for the
multi-pod examples, the StatefulSet fallback). Regenerate with `make golden` and review the
diff like code."""

from __future__ import annotations

import os
import pathlib

import pytest

from ascend_operator.cli import main
from helpers import ROOT, example_paths

GOLDEN = ROOT / "tests" / "golden"
CASES = [(p, True) for p in example_paths()] + [
    (ROOT / "examples" / name, False)
    for name in ("qwen3-235b-multi-node.yaml", "qwen3-235b-pd.yaml")
]


def _render(path: pathlib.Path, lws: bool) -> str:
    import io

    out, err = io.StringIO(), io.StringIO()
    code = main(["render", "-f", str(path), "--lws" if lws else "--no-lws"], out, err)
    assert code == 0, err.getvalue()
    return out.getvalue()


@pytest.mark.parametrize(
    ("path", "lws"), CASES, ids=[f"{p.stem}{'' if lws else '-statefulset'}" for p, lws in CASES]
)
def test_golden(path, lws):
    golden = GOLDEN / f"{path.stem}{'' if lws else '.statefulset'}.yaml"
    rendered = _render(path, lws)
    if os.environ.get("UPDATE_GOLDEN"):
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(rendered)
    assert golden.exists(), f"{golden.name} missing: run `make golden`"
    assert rendered == golden.read_text(), f"{golden.name} differs: review, then `make golden`"
