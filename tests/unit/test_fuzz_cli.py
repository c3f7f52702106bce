"""Hostile and broken input never gives a traceback: every example, mutated at random (a field
dropped, a value of another type, junk nested anywhere, the document itself replaced), goes
through the CLI's validate, plan and render; each ends with exit 0, or 1 with problems that
name a field, or 2 with one usage line."""

from __future__ import annotations

import copy
import io
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ascend_operator import cli
from helpers import example_paths

EXAMPLES = [yaml.safe_load(p.read_text()) for p in example_paths()]

JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=8), st.integers(), max_size=3),
    st.just("\ud800"),
    st.just("64Gi"),
    st.just({"preset": "nope"}),
)


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            out += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += _paths(value, (*prefix, i))
    return out


def _set(doc: Any, path: tuple, value: Any, drop: bool) -> Any:
    if not path:
        return value
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    if drop and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return doc


@st.composite
def mutated(draw) -> Any:
    doc = copy.deepcopy(draw(st.sampled_from(EXAMPLES)))
    for _ in range(draw(st.integers(1, 4))):
        paths = _paths(doc)
        path = draw(st.sampled_from(paths))
        if path[:1] == ("kind",):
            continue  # a document of another kind is skipped, not planned
        doc = _set(doc, path, copy.deepcopy(draw(JUNK)), drop=draw(st.booleans()))
        if not isinstance(doc, dict):
            break
    return doc


def _run(command: str, text: str) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    import sys

    stdin, sys.stdin = sys.stdin, io.StringIO(text)
    try:
        code = cli.main([command, "-f", "-"], out, err)
    finally:
        sys.stdin = stdin
    return code, err.getvalue()


@settings(
    max_examples=int(__import__("os").environ.get("FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(mutated(), st.sampled_from(["validate", "plan", "render"]))
def test_mutated_examples_never_crash_the_cli(doc, command):
    if isinstance(doc, dict):
        doc.setdefault("kind", "ModelDeployment")
    text = yaml.safe_dump(doc, allow_unicode=True)
    code, err = _run(command, text)  # an exception here is the failure this test looks for
    assert code in (0, 1, 2), (code, err)
    if code == 1:
        assert "is invalid" in err and ". Fix: " in err, err
    if code == 2:
        assert err.startswith("error: ") and err.count("\n") >= 1, err


@pytest.mark.parametrize(
    "text",
    [
        "kind: ModelDeployment\nmetadata: x\nspec: {}\n",
        "kind: ModelDeployment\nmetadata: {name: [1]}\nspec: 3\n",
        "kind: ModelDeployment\nmetadata: {name: '" + "a" * 5000 + "'}\nspec: {}\n",
        "kind: ModelDeployment\nspec: {roles: " + "[" * 3000 + "]" * 3000 + "}\n",
        "a: [\n",
    ],
    ids=["metadata-string", "spec-number", "long-name", "deep-nesting", "broken-yaml"],
)
def test_broken_documents_get_a_message_not_a_traceback(text):
    for command in ("validate", "plan", "render"):
        code, err = _run(command, text)
        assert code in (1, 2) and "Traceback" not in err, err


def test_a_file_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"kind: ModelDeployment\nmetadata: {name: caf\xe9}\n")
    err = io.StringIO()
    assert cli.main(["validate", "-f", str(path)], io.StringIO(), err) == 2
    assert "is not UTF-8" in err.getvalue() and "0xe9" in err.getvalue()
