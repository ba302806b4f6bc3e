"""The project's error type for bad input, in a module of its own so that every stage can raise it
without importing the config schemas (which would close an import cycle through the registries)."""


class ConfigError(ValueError):
    """A bad config value or input; the message is one line: the problem, then the fix."""
