"""``d2mc profile``: the roofline prediction per block and operator, optionally next to a measurement."""

from __future__ import annotations

import json
from pathlib import Path

import click

from d2mc.cli.common import config_only_option, console, human_bytes, json_option, print_json, table


@click.command("profile")
@click.argument("model", required=False, metavar="MODEL|ARTIFACT")
@click.option("--target", default="orin-agx", show_default=True, help="Device profile (name or .toml).")
@click.option("--prefill", type=int, default=128, show_default=True, help="Prompt tokens of the prefill phase.")
@click.option("--context", type=int, default=512, show_default=True, help="Context length of the decode step.")
@click.option("--batch", type=int, default=1, show_default=True)
@click.option("--precision", default=None, help="Weight precision (fp32, fp16, int8, int4); default fp16 on GPUs, "
                                                "fp32 on CPUs.")
@config_only_option
@click.option("--measure", is_flag=True, help="Also run the model here (PyTorch, or ONNX Runtime for an "
                                              "artifact) and print measured next to predicted.")
@click.option("--calibrate", is_flag=True, help="Measure this machine and write a device profile TOML.")
@click.option("-o", "--output", type=click.Path(), help="Directory for roofline.json and roofline.png; with "
                                                        "--calibrate, the TOML file to write.")
@json_option
def command(model, target, prefill, context, batch, precision, config_only, measure, calibrate, output, as_json):
    """Predict prefill and decode latency of MODEL on a device from its roofline."""
    from d2mc.errors import UserError

    if calibrate:
        from d2mc.calibrate import calibrate_host, write_profile

        path = write_profile(calibrate_host(), output or "host-cpu.toml")
        console().print(f"wrote {path}:\n{path.read_text()}")
        return
    if model is None:
        raise UserError("give a MODEL (or --calibrate)")
    from d2mc.profiling import profile_model

    result = profile_model(model, target, prefill=prefill, context=context, batch=batch, precision=precision,
                           config_only=config_only, measure=measure)
    if output:
        out_dir = Path(output)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "roofline.json").write_text(json.dumps(result, indent=2) + "\n")
        from d2mc.plots import plot_roofline

        plot_roofline(result, out_dir / "roofline.png")
    if as_json:
        print_json(result)
        return
    _print(result, output)


def _print(result: dict, output) -> None:
    out = console()
    s = result["settings"]
    out.print(f"{result['model']} on {result['profile']['name']} ({result['profile']['description']}), "
              f"{s['precision']} weights, {s['kv']} KV cache, batch {s['batch']}")
    for phase in ("prefill", "decode"):
        p = result["phases"][phase]
        label = f"prefill of {s['prefill']} tokens" if phase == "prefill" else f"decode at context {s['context']}"
        rows = []
        for block, agg in p["blocks"].items():
            rows.append([block, f"{agg['seconds'] * 1e3:.4f}", human_bytes(agg["bytes"]), f"{agg['flops'] / 1e9:.3f}",
                         f"{agg['flops'] / agg['bytes']:.1f}" if agg["bytes"] else "-", agg["bound"]])
        rows.append(["total", f"{p['seconds'] * 1e3:.4f}", human_bytes(p["bytes"]), f"{p['flops'] / 1e9:.3f}",
                     f"{p['flops'] / p['bytes']:.1f}", ""])
        out.print()
        out.print(table(label, ["block", "ms", "bytes", "GFLOP", "FLOP/B", "bound"], rows))
    m = result.get("measured")
    if m:
        out.print()
        rows = [[phase, f"{result['phases'][phase]['seconds'] * 1e3:.3f}", f"{m[phase] * 1e3:.3f}",
                 f"{result['error'][phase] * 100:+.1f}%"] for phase in ("prefill", "decode")]
        out.print(table(f"measured on {m['runtime']} (median of {m['repeats']})",
                        ["phase", "predicted ms", "measured ms", "error"], rows))
    if output:
        out.print(f"\nwrote {output}/roofline.json and {output}/roofline.png")
