"""``d2mc build``: the TensorRT engine of an artifact for one device profile (built on that device)."""

from __future__ import annotations

import click

from d2mc.cli.common import json_option, print_json


@click.command("build")
@click.argument("artifact", type=click.Path())
@click.option("--target", default="orin-agx", show_default=True, help="Device profile (name or .toml).")
@click.option("--precision",
              help="Engine precision: fp16 or fp32, or int4/int8 weight-only (int codes with block scales, float "
                   "activations); must be in the profile's tensorrt_precisions and be what the ONNX holds "
                   "[default: what the ONNX holds].")
@click.option("--max-input", type=int, help="Longest prompt of one prefill (default min(2048, model context)).")
@click.option("--max-kv", type=int, help="Longest past before a decode step (default model context - 1).")
@click.option("--max-batch", type=int, default=1, show_default=True)
@click.option("--workspace-gb", type=float, help="TensorRT workspace (default a quarter of the device memory, "
                                                 "within what weights and KV cache leave).")
@click.option("--plugin", type=click.Path(exists=True, dir_okay=False),
              help="A built libd2mc_moe_plugin.so (default: compile the shipped sources with CMake).")
@click.option("--no-build", is_flag=True, help="Only plan and write the device-side build script.")
@json_option
def command(artifact, target, precision, max_input, max_kv, max_batch, workspace_gb, plugin, no_build, as_json):
    """Build ARTIFACT's TensorRT engine for a device, or write the script that builds it there.

    Engines are specific to the TensorRT version and GPU that build them: on a machine without TensorRT or
    without the profile's GPU this writes ARTIFACT/engine-<target>/build.sh and says so.
    """
    from d2mc.engine.plan import EngineSettings
    from d2mc.targets.tensorrt import build

    settings = EngineSettings(precision=precision, max_input=max_input, max_kv=max_kv, max_batch=max_batch,
                              workspace_gb=workspace_gb)
    result = build(artifact, target, settings, plugin, build_here=not no_build)
    if as_json:
        print_json(result.to_dict())
        return
    click.echo(result.summary())
