"""pytest configuration: helpers live in tests/helpers.py (on sys.path via pyproject)."""

from __future__ import annotations

import os

# Keep hypothesis quick and deterministic in CI.
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=400, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
