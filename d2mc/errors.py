"""The two kinds of failure d2mc knows.

A :class:`UserError` is the user's mistake (a bad path, an unsupported model, a bad device profile, an
impossible plan). The CLI prints its message as one line and exits with code 1. Anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import re
from collections.abc import Mapping


class UserError(Exception):
    """A mistake in what the user asked for; the message says what to do about it."""


class OptionError(UserError):
    """A bad option value, named by its option key (``precision``, ``max_kv``: a keyword argument, a recipe key).

    The message is written with each key in braces (``"{max_kv} must be at least 1"``). In Python it reads with the
    keys themselves; the command line names the flags that set them instead (:meth:`naming`), so a recipe user and
    a command-line user each read the name they typed.
    """

    def __init__(self, template: str):
        self.template = template
        self.keys = tuple(re.findall(r"\{(\w+)\}", template))
        super().__init__(self.naming({}))

    def naming(self, names: Mapping[str, str]) -> str:
        """The message with each key replaced by ``names[key]`` (the key itself where ``names`` has none)."""
        return re.sub(r"\{(\w+)\}", lambda m: names.get(m[1], m[1]), self.template)


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


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (at most 200 characters), to quote inside a one-line error."""
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
