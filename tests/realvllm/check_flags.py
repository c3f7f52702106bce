"""Check rendered `vllm serve` command lines with the installed vLLM itself: its own CLI parser
(the `serve` subcommand, with its validation) and its own engine-config construction, as far as
this machine's platform allows. Runs inside the real-engine virtual environment:

    python tests/realvllm/check_flags.py CASES.json RESULTS.json

CASES.json: {"cases": [{"name", "argv", "env", "model"}], "excusals": [{"flag", "reason",
"pattern"}]}. `argv` starts with `vllm serve MODEL`; `model` replaces MODEL (a local tiny model
of the same architecture family). When building the config fails with an error that an
excusal's `pattern` matches and its `flag` is on the line, that flag (with its value) is taken
off and the line is checked again, so one excused flag never hides another failure. A parse
error is never excused.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Any


def _strip(argv: list[str], flag: str) -> list[str]:
    """argv without `flag` and its value (flags of ours always take one value or none)."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg == flag:
            nxt = argv[i + 1] if i + 1 < len(argv) else ""
            skip = bool(nxt) and not nxt.startswith("--")
            continue
        if arg.startswith(flag + "="):
            continue
        out.append(arg)
    return out


def _parser() -> Any:
    from vllm.entrypoints.cli import serve
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="vllm")
    sub = parser.add_subparsers(dest="subparser")
    (command,) = serve.cmd_init()
    command.subparser_init(sub)
    return parser, command


def check(argv: list[str]) -> tuple[str, str]:
    """("ok", "") or (stage, error) for one command line (argv without `vllm`)."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.usage.usage_lib import UsageContext

    parser, command = _parser()
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):
            args = parser.parse_args(argv)
        command.validate(args)
    except SystemExit as exc:
        return "parse", f"the parser exited ({exc.code}): {said.getvalue().strip()[-2000:]}"
    except Exception as exc:
        return "parse", f"{type(exc).__name__}: {exc}"
    if getattr(args, "model_tag", None):
        args.model = args.model_tag
    try:
        engine_args = AsyncEngineArgs.from_cli_args(args)
        engine_args.create_engine_config(
            usage_context=UsageContext.OPENAI_API_SERVER, headless=bool(args.headless)
        )
    except Exception as exc:
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        return "config", detail
    return "ok", ""


def run_case(case: dict[str, Any], excusals: list[dict[str, str]]) -> dict[str, Any]:
    argv = list(case["argv"][1:])  # drop "vllm"
    argv[1] = case["model"]
    saved = dict(os.environ)
    os.environ.update(case.get("env", {}))
    try:
        return _run(case["name"], argv, excusals)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _run(name: str, argv: list[str], excusals: list[dict[str, str]]) -> dict[str, Any]:
    excused: list[dict[str, str]] = []
    while True:
        stage, error = check(argv)
        if stage != "config":
            return {"name": name, "stage": stage, "error": error, "excused": excused}
        match = next(
            (
                e
                for e in excusals
                if re.search(e["pattern"], error)
                and any(a == e["flag"] or a.startswith(e["flag"] + "=") for a in argv)
            ),
            None,
        )
        if match is None:
            return {"name": name, "stage": stage, "error": error, "excused": excused}
        excused.append({"flag": match["flag"], "reason": match["reason"], "error": error})
        argv = _strip(argv, match["flag"])


def main() -> int:
    spec = json.loads(Path(sys.argv[1]).read_text())
    results = [run_case(case, spec["excusals"]) for case in spec["cases"]]
    with open(sys.argv[2], "w") as fh:
        json.dump(results, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
