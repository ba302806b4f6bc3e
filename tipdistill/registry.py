"""One registry type for selectors, losses, rollout engines, tasks and loggers.

Each pluggable stage keeps a `Registry` of name -> implementation; configs name the implementation
with a plain string (`selector.name=type_aware`). This module imports nothing from the project, so
any stage can own a registry without an import cycle; unknown names are rejected where the config
is validated (`config.TrainConfig`), with the message `unknown()` builds.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable


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

    def unknown(self, name: str) -> str:
        """The one-line message for a name that is not registered: what, the valid names, the key to set."""
        return f"unknown {self.what} '{name}'; valid: {', '.join(sorted(self))} (set {self.key}=<one of them>)"

    def get(self, name: str) -> Any:  # type: ignore[override]
        if name not in self:
            raise LookupError(self.unknown(name))  # config validation reports it as a ConfigError first
        obj = self[name]
        if isinstance(obj, str):
            module, attr = obj.split(":")
            obj = getattr(importlib.import_module(module), attr)
        return obj
