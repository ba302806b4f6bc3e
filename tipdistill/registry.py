"""One registry type for selectors, losses, rollout engines, tasks and loggers.

Each pluggable stage keeps a `Registry` of name -> implementation; configs name the implementation
with a plain string (`selector.name=type_aware`), and an unknown name fails at start-up with the list
of valid ones.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from tipdistill.config import ConfigError


class Registry(dict):
    """name -> object. Values may be "module:attr" strings, imported on first use (keeps vLLM lazy)."""

    def __init__(self, what: str, key: str):
        super().__init__()
        self.what, self.key = what, key

    def register(self, name: str) -> Callable[[Any], Any]:
        def deco(obj: Any) -> Any:
            if name in self:
                raise KeyError(f"{self.what} '{name}' registered twice")
            self[name] = obj
            return obj

        return deco

    def check(self, name: str) -> None:
        if name not in self:
            raise ConfigError(f"unknown {self.what} '{name}'; valid: {', '.join(sorted(self))} (set {self.key}=<one of them>)")

    def get(self, name: str) -> Any:  # type: ignore[override]
        self.check(name)
        obj = self[name]
        if isinstance(obj, str):
            module, attr = obj.split(":")
            obj = getattr(importlib.import_module(module), attr)
        return obj


def check_names(cfg: Any) -> None:
    """Fail fast on an unknown selector, loss, rollout engine, task or logger name."""
    from tipdistill import losses, selectors, sinks, tasks
    from tipdistill.rollout import ENGINES

    selectors.SELECTORS.check(cfg.selector.name)
    losses.DIVERGENCES.check(cfg.loss.name)
    ENGINES.check(cfg.rollout.engine)
    tasks.TASKS.check(cfg.task.name)
    sinks.SINKS.check(cfg.logger.name)
