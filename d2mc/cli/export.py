"""``d2mc export``: lower a dense or converted model to an ONNX artifact with KV cache."""

from __future__ import annotations

import click

from d2mc.cli.common import console, json_option, model_argument, print_json


@click.command("export")
@model_argument
@click.option("--target", type=click.Choice(["onnxruntime"]), default="onnxruntime", show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True)
@click.option("--moe-op", type=click.Choice(["dispatch", "contrib"]), default="dispatch", show_default=True,
              help="Expert dispatch through standard ops, or ONNX Runtime's com.microsoft::MoE op.")
@click.option("--no-verify", is_flag=True, help="Skip the PyTorch vs ONNX Runtime comparison.")
@click.option("-o", "--output", required=True, type=click.Path())
@click.option("--overwrite", is_flag=True)
@json_option
def command(model, target, precision, moe_op, no_verify, output, overwrite, as_json):
    """Export MODEL (a dense model or a d2mc convert output) to ONNX for ONNX Runtime / onnxruntime-genai."""
    from d2mc.loading import load_model
    from d2mc.targets.onnxruntime import export_onnx

    loaded = load_model(model)
    result = export_onnx(loaded.model, loaded.tokenizer, output, precision=precision, moe_op=moe_op,
                         verify=not no_verify, overwrite=overwrite, source=model)
    if as_json:
        print_json({"path": str(result.path), "export_seconds": result.seconds, "verify": result.verify})
        return
    out = console()
    out.print(f"exported {model} to {result.path} in {result.seconds:.1f} s ({precision}, MoE: {moe_op})")
    if result.verify:
        v = result.verify
        out.print(f"verified against PyTorch: max |logit diff| {v['max_abs_diff']:.3g} over a {v['prefill_tokens']}"
                  f"-token prefill and {v['decode_steps']} decode steps (tolerance {v['tolerance']:g})")
