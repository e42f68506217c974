"""The errors phibuild reports to users: each says what is wrong and what to do, never a bare traceback."""


class PhibuildError(Exception):
    """Base class: the message is meant for the person running doit."""


class ConfigError(PhibuildError):
    """Bad ``[tool.phibuild]`` settings, unknown model, precision or backend, bad parameter."""


class UnsupportedError(PhibuildError):
    """A backend cannot build this architecture, precision or execution provider."""


class SourceError(PhibuildError):
    """Model weights missing, truncated or unreadable, or the hub unreachable."""


class LockError(PhibuildError):
    """``artifacts.lock`` is unreadable (broken TOML, merge conflict) or would change in frozen mode."""


class BuildError(PhibuildError):
    """A backend failed, or its output failed verification."""
