"""``d2mc targets``: the device profiles d2mc knows, each figure with its source."""

from __future__ import annotations

import dataclasses

import click

from d2mc.cli.common import console, json_option, print_json, table
from d2mc.profiles import builtin_profiles, load_profile


@click.command("targets")
@click.argument("profile", required=False)
@json_option
def command(profile: str | None, as_json: bool) -> None:
    """List the device profiles, or show one PROFILE (a name or a .toml file) with its sources."""
    profiles = [load_profile(profile)] if profile else builtin_profiles()
    if as_json:
        print_json([{k: v for k, v in dataclasses.asdict(p).items() if k != "path"} for p in profiles])
        return
    out = console()
    rows = [[p.name, p.kind, p.sm or "-", f"{p.memory_bandwidth_gbps:g}", f"{p.memory_gb:g}",
             " ".join(f"{k}={v:g}" for k, v in p.peak_tflops.items()), ",".join(p.tensorrt_precisions) or "-"]
            for p in profiles]
    out.print(table(None, ["profile", "kind", "SM", "GB/s", "GB", "peak TFLOP/s (dense)", "TensorRT precisions"],
                    rows, right_from=3))
    out.print()
    for p in profiles:
        out.print(f"[bold]{p.name}[/bold] ({', '.join(p.aliases) or 'no aliases'}): {p.description}")
        for key, text in p.source.items():
            value = _figure(getattr(p, key, None))
            out.print(f"  {key}" + (f" = {value}" if value else "") + f": {text}", markup=False)


def _figure(value) -> str:
    """A profile figure in one line: a table as ``key=value`` pairs, a table of tables as ``name: key=value, ...``."""
    if isinstance(value, dict):
        nested = any(isinstance(v, dict) for v in value.values())
        return ("; " if nested else ", ").join(f"{k}: {_figure(v)}" if isinstance(v, dict) else f"{k}={_figure(v)}"
                                               for k, v in value.items())
    if isinstance(value, tuple):
        return ",".join(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:g}"
    return str(value or "")
