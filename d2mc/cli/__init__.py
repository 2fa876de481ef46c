"""The ``d2mc`` command line: thin click commands over the Python API, one module per command."""

from __future__ import annotations

import importlib
import logging
import sys

import click

from d2mc import __version__
from d2mc.cli.common import option_flags_of
from d2mc.errors import OptionError, UserError

COMMAND_MODULES = ("inspect", "targets", "profile", "analyze", "convert", "recover", "export", "run", "compile", "build",
                   "verify", "eval")


class Commands(click.Group):
    """The d2mc group: an :class:`OptionError` from the library is reworded with the flags of the command that ran,
    so that a message names what the user typed (``--max-kv``; ``max_kv`` in Python and recipes)."""

    def resolve_command(self, ctx, args):
        name, command, rest = super().resolve_command(ctx, args)
        ctx.meta["d2mc.command"] = command
        return name, command, rest

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except OptionError as exc:
            command = ctx.meta.get("d2mc.command")
            raise UserError(exc.naming(option_flags_of(command) if command else {})) from None


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="d2mc")
@click.option("-v", "--verbose", is_flag=True, help="Log what each step does.")
def cli(verbose: bool) -> None:
    """d2mc: compile a dense LLM into a Mixture-of-Experts model and an engine for an edge device."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        _quiet_libraries()


def _quiet_libraries() -> None:
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")


for _name in COMMAND_MODULES:
    _module = importlib.import_module(f"d2mc.cli.{_name}")
    cli.add_command(_module.command)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: a :class:`UserError` is one line on stderr and exit code 1."""
    from d2mc.outputs import interrupt_status, termination_as_interrupt

    try:
        with termination_as_interrupt():  # SIGTERM and SIGHUP clean up as Ctrl-C does
            cli.main(args=argv, prog_name="d2mc", standalone_mode=False)
    except UserError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except click.exceptions.Abort as exc:
        click.echo("aborted", err=True)
        sys.exit(interrupt_status(exc))
    except click.UsageError as exc:  # a bad option value is the user's mistake too: one line, exit code 1
        command = exc.ctx.command_path if exc.ctx else "d2mc"
        click.echo(f"error: {exc.format_message()} (see {command} --help)", err=True)
        sys.exit(1)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
