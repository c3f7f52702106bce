"""What every benchmark records: the machine it ran on, and its JSON under bench/results/."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any


def cpu_device(detail: str) -> str:
    """The device line of a CPU-only benchmark."""
    return (
        f"CPU only: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
        f"{'; ' + detail if detail else ''}"
    )


def write_result(path: str, result: dict[str, Any]) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**result, "python": platform.python_version()}, indent=2) + "\n")
    print(f"wrote {out}")
