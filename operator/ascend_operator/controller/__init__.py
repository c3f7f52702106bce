"""The kopf operator: handlers (events), reconcile (one pass), status and rollout (pure)."""
