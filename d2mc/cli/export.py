"""``d2mc export``: lower a dense or converted model to an ONNX artifact with KV cache, optionally quantized."""

from __future__ import annotations

import click

from d2mc.cli.common import Command, console, json_option, model_argument, print_json, stderr_console
from d2mc.errors import OptionError

FLAVOURS = ("onnxruntime", "tensorrt")  # d2mc.lowering.FLAVOURS, without importing the lowering at start-up
QUANTIZED = ("int4", "int8")  # d2mc.quantize.PRECISIONS


def quantize_options(calibration: bool):
    """The quantization flags of export and compile (compile's calibration text flags are its conversion's)."""
    flags = [
        click.option("--quant-method", type=click.Choice(["rtn", "hqq", "gptq"]),
                     help="int4/int8: round-to-nearest; HQQ (float zero points, onnxruntime format only); or GPTQ "
                          "from calibration text (needs gptqmodel: docs/quantization.md) [default: rtn]."),
        click.option("--block-size", type=click.Choice(["32", "64", "128"]),
                     help="int4/int8: weights per scale along each input [default: 64, or 32 where 64 does not "
                          "divide every input of the model; TensorRT takes int4 in blocks of 64 or 128, and the int8 "
                          "matrices of mixed precision per channel]."),
        click.option("--lm-head-precision", type=click.Choice(["int8", "int4", "float"]),
                     help="int4/int8: the LM head's weights (a tied embedding reads them too) [default: int8; for "
                          "TensorRT float, which it takes with int4]."),
        click.option("--mixed-precision", type=click.Choice(["none", "mixed-layers", "mixed-layers-ends",
                                                              "calibrated"]),
                     help="int4: matrices moved to int8 by layer: mixed-layers, q/k/v and down of the first and last "
                          "eighth of the layers and every third between; mixed-layers-ends, also the other matrices "
                          "of the first and last eighth; or calibrated, those whose int4 error costs the calibration "
                          "loss most per byte (docs/quantization.md) [default: calibrated, which for TensorRT keeps the "
                          "experts of MoE blocks int4; none for --moe-op contrib]."),
        click.option("--accuracy-level", type=click.IntRange(0, 4),
                     help="int4/int8, onnxruntime format: MatMulNBits accuracy level; 4 computes with int8 "
                          "activations, the fast path on CPU [default: 4]."),
    ]
    if calibration:
        flags += [click.option("--calib-data", type=click.Path(),
                               help="Calibration text of GPTQ and --mixed-precision calibrated (.txt or "
                                    ".jsonl); default: the built-in calibration text."),
                  click.option("--calib-sequences", type=int, help="Calibration sequences [default: 16]."),
                  click.option("--calib-length", type=int, help="Tokens per calibration sequence [default: 256].")]

    def decorate(function):
        for flag in reversed(flags):
            function = flag(function)
        return function

    return decorate


def quantize_options_from(precision: str | None, quant_method=None, block_size=None, lm_head_precision=None,
                          mixed_precision=None, accuracy_level=None, calib_data=None, calib_sequences=None,
                          calib_length=None, tensorrt: bool = False, qmoe: bool = False):
    """The :class:`~d2mc.quantize.QuantizeOptions` the flags ask for (None for float weights), refusing quantization
    flags given with a float precision; ``tensorrt``: the weights also lower to TensorRT; ``qmoe``: MoE blocks
    lower to ``com.microsoft::QMoE``."""
    from d2mc.quantize import QuantizeOptions, check_float_precision

    given = {"quant_method": quant_method, "block_size": int(block_size) if block_size else None,
             "lm_head_precision": lm_head_precision, "mixed_precision": mixed_precision,
             "accuracy_level": accuracy_level, "calib_data": calib_data,
             "calib_sequences": calib_sequences, "calib_length": calib_length}
    given = {k: v for k, v in given.items() if v is not None}
    if precision not in QUANTIZED:
        check_float_precision(precision or "the float default", **given)
        return None
    return QuantizeOptions(precision, tensorrt=tensorrt, qmoe=qmoe, **given)


@click.command("export", cls=Command, option_flags={"flavour": "--format"})
@model_argument
@click.option("--format", "flavour", type=click.Choice(FLAVOURS), default="onnxruntime", show_default=True,
              help="onnxruntime: com.microsoft fused ops, runs with ONNX Runtime / onnxruntime-genai; tensorrt: "
                   "standard ops plus one D2mcMoE plugin node per MoE block, for d2mc build.")
@click.option("--target", "legacy_flavour", type=click.Choice(FLAVOURS), hidden=True,
              help="Deprecated spelling of --format (--target names a device profile everywhere else).")
@click.option("--precision", type=click.Choice(["fp32", "fp16", *QUANTIZED]), default="fp32", show_default=True,
              help="Weights. int4/int8: block-wise weight-only quantization (docs/quantization.md); the tensorrt "
                   "format then computes in fp16.")
@quantize_options(calibration=True)
@click.option("--moe-op", type=click.Choice(["dispatch", "contrib"]),
              default="dispatch", show_default=True,
              help="onnxruntime format: expert dispatch through standard ops, or the com.microsoft::MoE op "
                   "(com.microsoft::QMoE for int4/int8).")
@click.option("--no-verify", is_flag=True, help="Skip the PyTorch vs ONNX Runtime comparison.")
@click.option("--polygraphy", is_flag=True, help="Also compare through Polygraphy (pip install polygraphy).")
@click.option("-o", "--output", required=True, type=click.Path())
@click.option("--overwrite", is_flag=True)
@json_option
def command(model, flavour, legacy_flavour, precision, moe_op, no_verify, polygraphy, output, overwrite, as_json,
            **quantization):
    """Export MODEL (a dense model or a d2mc convert output) to an ONNX artifact with KV cache."""
    from d2mc.loading import load_model
    from d2mc.outputs import check_output_path
    from d2mc.targets.onnxruntime import export_onnx

    if legacy_flavour:
        stderr_console().print(f"export --target is deprecated: use --format {legacy_flavour}")
        flavour = legacy_flavour
    if flavour == "tensorrt" and quantization["accuracy_level"] is not None:
        raise OptionError("{accuracy_level} sets ONNX Runtime's MatMulNBits compute: the tensorrt format dequantizes "
                          "to fp16 instead; drop it, or use --format onnxruntime")
    options = quantize_options_from(precision, **quantization, tensorrt=flavour == "tensorrt",
                                    qmoe=flavour == "onnxruntime" and moe_op == "contrib")
    check_output_path(output, overwrite)
    if options is not None:
        options.check_installed()
        options.check_divides(load_model(model, config_only=True, tokenizer=False).arch)
    loaded = load_model(model, work="export")
    quantized = None
    if options is not None:
        from d2mc.quantize import quantize_model

        quantized = quantize_model(loaded.model, options, loaded.tokenizer)
        precision = "fp16" if flavour == "tensorrt" else "fp32"
    result = export_onnx(loaded.model, loaded.tokenizer, output, precision=precision, moe_op=moe_op, flavour=flavour,
                         verify=not no_verify, polygraphy=polygraphy, overwrite=overwrite,
                         source=loaded.reference, quantized=quantized, release_model=True)
    if as_json:
        print_json({"path": str(result.path), "flavour": flavour, "export_seconds": result.seconds,
                    "quantization": quantized.to_dict() if quantized else None, "verify": result.verify})
        return
    out = console()
    form = f"MoE: {moe_op}" if flavour == "onnxruntime" else "MoE: D2mcMoE plugin"
    weights = precision
    if options:
        options = quantized.options  # the block size fitted to the model, the int8 matrices chosen
        mixed = f" ({options.mixed_precision} at int8{' per channel' if options.tensorrt else ''})" if options.mixed else ""
        weights = f"{options.precision} {options.quant_method} block {options.block_size}{mixed}, LM head " \
                  f"{options.lm_head_precision}, {precision} activations"
    out.print(f"exported {model} to {result.path} in {result.seconds:.1f} s ({flavour}, {weights}, {form})")
    if quantized:
        out.print(f"quantized {len(quantized.linears)} matrices in {quantized.seconds:.1f} s"
                  + (f" from {quantized.calibration}" if quantized.calibration else ""))
    if result.verify and "max_abs_diff" in result.verify:
        v = result.verify
        out.print(f"verified against PyTorch{' with the same quantized weights' if quantized else ''}: max |logit diff| "
                  f"{v['max_abs_diff']:.3g} over a {v['prefill_tokens']}-token prefill and {v['decode_steps']} decode "
                  f"steps (tolerance {v.get('tolerance_rule') or v['tolerance']})")
    if result.verify and "unquantized" in result.verify:
        for key, what in (("shipped", f"as shipped (accuracy level {options.accuracy_level})"),
                          ("unquantized", "against the unquantized model")):
            if key not in result.verify:  # the tensorrt format ships what was verified
                continue
            d = result.verify[key]
            out.print(f"{what}: max |logit diff| {d['max_abs_diff']:.3g} (largest |logit| {d['logit_scale']:.3g}), "
                      f"greedy agreement {d['greedy_agreement'] * 100:.0f}% over {d['decode_steps'] + 1} steps")
    if result.verify and "polygraphy" in result.verify:
        p = result.verify["polygraphy"]
        out.print(f"Polygraphy ({' vs '.join(p['runners'])}): max |logit diff| {p['max_abs_diff']:.3g} "
                  f"(tolerance {p['tolerance']:.3g}) {'PASSED' if p['passed'] else 'FAILED'}")
