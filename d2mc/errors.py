"""The two kinds of failure d2mc knows.

A :class:`UserError` is the user's mistake (a bad path, an unsupported model, a bad device profile, an
impossible plan). The CLI prints its message as one line and exits with code 1. Anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in what the user asked for; the message says what to do about it."""


class MissingDependencyError(UserError):
    """An optional package is needed for what the user asked."""

    def __init__(self, package: str, purpose: str, install: str | None = None):
        self.package = package
        super().__init__(f"{purpose} needs the package '{package}': pip install {install or package}")


def require_module(module: str, purpose: str, install: str | None = None):
    """Import ``module`` lazily, turning a missing package into a one-line :class:`MissingDependencyError`."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(module.split(".")[0], purpose, install) from exc
