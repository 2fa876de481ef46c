"""Passes and the manager that runs them in a checked order.

A pass declares what it ``requires`` and ``provides`` (keys of :class:`~d2mc.context.Context`), whether
it changes the model and whether it consumes it, and implements ``run(ctx)``. :class:`PassManager` checks the
order (and that each key has one provider) before anything runs, times each pass, shows progress, checks each
pass kept its promises, and names the failing pass and the ones before it.
Passes are registered by kebab-case name with :func:`register_pass`; a pipeline comes from a list of names
(CLI flags) or a TOML recipe (:func:`load_recipe`).
"""

from __future__ import annotations

import logging
import re
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from d2mc.context import Context
from d2mc.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class PassResult:
    """What a pass did: ``modified`` is true when the model changed; ``summary`` goes to the report."""

    modified: bool = False
    summary: dict[str, Any] = field(default_factory=dict)


class Pass:
    """Base class of every pass. Subclasses set ``name``, ``requires``, ``provides`` and implement ``run``.

    An analysis pass (``transforms_model = False``) must not change the model; a transform pass says in
    its result what it changed. A pass changes the model in place (``ctx.model`` stays the same object) unless it
    declares ``consumes_model``: then it builds a new model from the modules of its input (moving them, as
    :func:`d2mc.restructure.restructure` does) and sets ``ctx.model`` to it; the input model is left unusable.
    A pass writes ``ctx.results`` only under the keys it provides. Options are constructor arguments. Passes log;
    they never print.
    """

    name: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = ()
    provides: ClassVar[tuple[str, ...]] = ()
    transforms_model: ClassVar[bool] = False
    consumes_model: ClassVar[bool] = False

    def run(self, ctx: Context) -> PassResult:
        raise NotImplementedError

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{self.name}({options})"


class PassError(RuntimeError):
    """A bug inside a pass, wrapped with the pass name and the passes that ran before it."""


_REGISTRY: dict[str, type[Pass]] = {}
_NAME = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available by its kebab-case ``name``."""
    if not _NAME.match(cls.name):
        raise ValueError(f"pass name {cls.name!r} is not kebab-case")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"pass {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def registered_passes() -> dict[str, type[Pass]]:
    """Every registered pass by name (importing :mod:`d2mc.passes` registers the built-in ones)."""
    import d2mc.passes  # noqa: F401

    return dict(sorted(_REGISTRY.items()))


def create_pass(name: str, **options) -> Pass:
    """Instantiate a registered pass, refusing unknown names and options with one line."""
    passes = registered_passes()
    if name not in passes:
        raise UserError(f"unknown pass '{name}': choose one of {', '.join(passes)}")
    try:
        return passes[name](**options)
    except TypeError as exc:
        raise UserError(f"bad options for pass '{name}': {exc}") from None


class PassManager:
    """Runs passes in order over one context."""

    def __init__(self, passes: Sequence[Pass], *, progress: Callable[[str], Any] | None = None):
        self.passes = list(passes)
        self.progress = progress
        self.timings: dict[str, float] = {}

    def validate(self, available: set[str]) -> None:
        """Check, before anything runs, that every requirement is provided by the context or an earlier pass, and
        that no two passes provide the same key."""
        have = set(available)
        providers: dict[str, str] = {}
        for p in self.passes:
            for key in p.provides:
                if providers.setdefault(key, p.name) != p.name:
                    raise UserError(f"passes '{providers[key]}' and '{p.name}' both provide '{key}': a result has "
                                    "one pass that writes it")
        for i, p in enumerate(self.passes):
            for key in p.requires:
                if key in have:
                    continue
                later = providers.get(key)
                hint = (f" (expected '{later}' before '{p.name}')" if later and later != p.name
                        else " and no pass in the pipeline provides it")
                raise UserError(f"pass '{p.name}' (step {i + 1}) requires '{key}', which is not available{hint}")
            have.update(p.provides)

    def run(self, ctx: Context) -> Context:
        self.validate(ctx.available())
        done: list[str] = []
        for i, p in enumerate(self.passes):
            if self.progress:
                self.progress(f"[{i + 1}/{len(self.passes)}] {p.name}")
            start = time.perf_counter()
            model, results = ctx.model, dict(ctx.results)
            try:
                result = p.run(ctx)
            except UserError as exc:
                raise UserError(f"{p.name}: {exc}") from exc
            except Exception as exc:
                ran = ", ".join(done) or "none"
                raise PassError(f"pass '{p.name}' failed (passes run before it: {ran}): {exc}") from exc
            elapsed = time.perf_counter() - start
            self.timings[p.name] = elapsed
            if result is None:
                result = PassResult()
            if result.modified and not p.transforms_model:
                raise PassError(f"analysis pass '{p.name}' reported changing the model")
            missing = [k for k in p.provides if k not in ctx.available()]
            if missing:
                raise PassError(f"pass '{p.name}' did not provide {', '.join(missing)}")
            written = [k for k, v in ctx.results.items()
                       if k not in p.provides and (k not in results or results[k] is not v)]
            if written:
                raise PassError(f"pass '{p.name}' wrote {', '.join(written)}, which it does not provide")
            _check_model_handover(p, model, ctx.model)
            if p.transforms_model and ctx.model is not None:
                from d2mc.arch import ModelArch

                ctx.arch = ModelArch.from_config(ctx.model.config)
            ctx.report.setdefault("passes", []).append(
                {"name": p.name, "seconds": round(elapsed, 3), "modified": result.modified, **result.summary})
            log.info("%s took %.2f s", p.name, elapsed)
            done.append(p.name)
        return ctx


def _check_model_handover(p: Pass, before, after) -> None:
    """A pass that consumes its input model must leave a new one, and the input fails loudly if used again; any
    other pass leaves the model object it found."""
    if not p.consumes_model:
        if after is not before:
            raise PassError(f"pass '{p.name}' replaced the model but does not declare consumes_model")
        return
    if after is before or after is None:
        raise PassError(f"pass '{p.name}' declares consumes_model but did not leave a new model")
    retire_model(before, after, f"pass '{p.name}'")


def retire_model(model, successor, by: str) -> None:
    """Make calling ``model``, or any of its modules that ``successor`` did not take over, raise: ``by`` moved its
    other modules into ``successor``, so what is left would compute with weights that are no longer its own."""
    from torch import nn

    if not isinstance(model, nn.Module):
        return
    kept = set(successor.modules()) if isinstance(successor, nn.Module) else set()
    message = f"this model was consumed by {by}, which moved its modules into a new model: use that model"

    def refuse(module, args, kwargs):
        raise RuntimeError(message)

    for module in model.modules():
        if module not in kept:
            module.register_forward_pre_hook(refuse, with_kwargs=True)


def load_recipe(path: str | Path) -> list[Pass]:
    """A pipeline from a TOML recipe::

        passes = ["roofline", "analyze-redundancy", "plan-fusion"]
        [options.plan-fusion]
        remove_attention = 6
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"recipe '{path}' does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"recipe '{path}': not valid TOML ({exc})") from None
    unknown = set(data) - {"passes", "options"}
    if unknown:
        raise UserError(f"recipe '{path}': unknown key '{sorted(unknown)[0]}' (expected 'passes' and 'options')")
    names = data.get("passes")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise UserError(f"recipe '{path}': 'passes' must be a list of pass names")
    options = data.get("options", {})
    for name in options:
        if name not in names:
            raise UserError(f"recipe '{path}': options given for '{name}', which is not in 'passes'")
    return [create_pass(n, **options.get(n, {})) for n in names]
