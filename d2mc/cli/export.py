"""``d2mc export``: lower a dense or converted model to an ONNX artifact with KV cache."""

from __future__ import annotations

import click

from d2mc.cli.common import Command, console, json_option, model_argument, print_json, stderr_console

FLAVOURS = ("onnxruntime", "tensorrt")  # d2mc.lowering.FLAVOURS, without importing the lowering at start-up


@click.command("export", cls=Command, option_flags={"flavour": "--format"})
@model_argument
@click.option("--format", "flavour", type=click.Choice(FLAVOURS), default="onnxruntime", show_default=True,
              help="onnxruntime: com.microsoft fused ops, runs with ONNX Runtime / onnxruntime-genai; tensorrt: "
                   "standard ops plus one D2mcMoE plugin node per MoE block, for d2mc build.")
@click.option("--target", "legacy_flavour", type=click.Choice(FLAVOURS), hidden=True,
              help="Deprecated spelling of --format (--target names a device profile everywhere else).")
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True)
@click.option("--moe-op", type=click.Choice(["dispatch", "contrib"]), default="dispatch", show_default=True,
              help="onnxruntime format: expert dispatch through standard ops, or the com.microsoft::MoE op.")
@click.option("--no-verify", is_flag=True, help="Skip the PyTorch vs ONNX Runtime comparison.")
@click.option("--polygraphy", is_flag=True, help="Also compare through Polygraphy (pip install polygraphy).")
@click.option("-o", "--output", required=True, type=click.Path())
@click.option("--overwrite", is_flag=True)
@json_option
def command(model, flavour, legacy_flavour, precision, moe_op, no_verify, polygraphy, output, overwrite, as_json):
    """Export MODEL (a dense model or a d2mc convert output) to an ONNX artifact with KV cache."""
    from d2mc.loading import load_model
    from d2mc.outputs import check_output_path
    from d2mc.targets.onnxruntime import export_onnx

    if legacy_flavour:
        stderr_console().print(f"export --target is deprecated: use --format {legacy_flavour}")
        flavour = legacy_flavour
    check_output_path(output, overwrite)
    loaded = load_model(model)
    result = export_onnx(loaded.model, loaded.tokenizer, output, precision=precision, moe_op=moe_op, flavour=flavour,
                         verify=not no_verify, polygraphy=polygraphy, overwrite=overwrite,
                         source=loaded.reference)
    if as_json:
        print_json({"path": str(result.path), "flavour": flavour, "export_seconds": result.seconds,
                    "verify": result.verify})
        return
    out = console()
    form = f"MoE: {moe_op}" if flavour == "onnxruntime" else "MoE: D2mcMoE plugin"
    out.print(f"exported {model} to {result.path} in {result.seconds:.1f} s ({flavour}, {precision}, {form})")
    if result.verify and "max_abs_diff" in result.verify:
        v = result.verify
        out.print(f"verified against PyTorch: max |logit diff| {v['max_abs_diff']:.3g} over a {v['prefill_tokens']}"
                  f"-token prefill and {v['decode_steps']} decode steps (tolerance {v.get('tolerance_rule') or v['tolerance']})")
    if result.verify and "polygraphy" in result.verify:
        p = result.verify["polygraphy"]
        out.print(f"Polygraphy ({' vs '.join(p['runners'])}): max |logit diff| {p['max_abs_diff']:.3g} "
                  f"(tolerance {p['tolerance']:.3g}) {'PASSED' if p['passed'] else 'FAILED'}")
