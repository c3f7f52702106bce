"""ascend-serve operator side: API models, planner, renderer, CLI (and later the kopf operator)."""

__version__ = "0.1.0"
