"""tipdistill: on-policy distillation with token-importance-aware token selection (TIP)."""

__version__ = "0.1.0"
