"""Options and output helpers shared by the commands."""

from __future__ import annotations

import json

import click
from rich.console import Console
from rich.table import Table


class Command(click.Command):
    """A command whose flags are not all spelled like the option keys they set: ``option_flags`` names those
    (``{"flavour": "--format"}``) for :func:`option_flags_of`."""

    def __init__(self, *args, option_flags: dict[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.option_flags = option_flags or {}


def option_flags_of(command: click.Command) -> dict[str, str]:
    """Option key -> the flag of ``command`` that sets it: an option's key is its parameter name (``--max-kv`` sets
    ``max_kv``) unless the command says otherwise (:class:`Command`). The CLI names these flags in the
    :class:`~d2mc.errors.OptionError` messages of the library."""
    flags = {p.name: max(p.opts, key=len) for p in command.params if isinstance(p, click.Option) and not p.hidden}
    return {**flags, **getattr(command, "option_flags", {})}


model_argument = click.argument("model", metavar="MODEL")
config_only_option = click.option(
    "--config-only", is_flag=True,
    help="Read only the config (config.json or the GGUF header); build the model on the meta device.")
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts instead of tables.")


def placement_options(func):
    """``--device`` and ``--dtype``: where the model runs and in which dtype (:func:`d2mc.loading.resolve_placement`)."""
    func = click.option("--dtype", default="fp32", show_default=True, metavar="fp32|bf16|fp16",
                        help="Dtype of the weights in memory (bf16 and fp16 halve it).")(func)
    return click.option("--device", default="auto", show_default=True, metavar="auto|cpu|cuda[:N]",
                        help="Where the model runs: auto is the first GPU when there is one, else the CPU.")(func)
quiet_option = click.option("-q", "--quiet", is_flag=True, help="Print only the result, no progress.")


def console() -> Console:
    return Console(highlight=False, soft_wrap=False, width=160)


def stderr_console() -> Console:
    return Console(stderr=True, highlight=False)


def print_json(data) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def table(title: str | None, columns: list[str], rows: list[list], *, right_from: int = 1) -> Table:
    """A plain table; columns from ``right_from`` on are right-aligned (numbers)."""
    t = Table(title=title, title_justify="left", box=None, pad_edge=False, header_style="bold")
    for i, col in enumerate(columns):
        t.add_column(col, justify="right" if i >= right_from else "left")
    for row in rows:
        t.add_row(*[str(c) for c in row])
    return t


def human_count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n:.0f}"


def human_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def command_line(ctx: click.Context, drop: set[str] = frozenset()) -> list[str]:
    """The arguments that run the command of ``ctx`` again as it was given (every value not left at its default),
    without the parameters named in ``drop``; the group's own options come first."""
    from click.core import ParameterSource

    args: list[str] = []
    for level in (ctx.parent, ctx):
        if level is None:
            continue
        if level is ctx:
            args.append(ctx.info_name)
        for param in level.command.params:
            if param.name in drop or param.name not in level.params:
                continue
            value = level.params[param.name]
            if isinstance(param, click.Argument):
                args.append(str(value))
            elif level.get_parameter_source(param.name) is ParameterSource.DEFAULT:
                continue
            elif isinstance(param, click.Option) and param.is_flag:
                if value:
                    args.append(param.opts[0])
                elif param.secondary_opts:
                    args.append(param.secondary_opts[0])
            else:
                args += [max(param.opts, key=len), str(value)]
    return args
