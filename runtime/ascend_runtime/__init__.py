"""ascend-serve runtime: what runs inside a pod (RuntimeConfig, launcher, engines, router)."""

__version__ = "0.1.0"
