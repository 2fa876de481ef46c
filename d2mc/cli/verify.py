"""``d2mc verify``: an artifact against its reference, on ONNX Runtime (here) or TensorRT (on the device).

The command exits with status 1 when the verification FAILED, so scripts and CI can rely on it.
"""

from __future__ import annotations

import sys

import click

from d2mc.cli.common import console, json_option, placement_options, print_json
from d2mc.verify import POSITION_SAMPLES


@click.command("verify")
@click.argument("artifact", type=click.Path())
@click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime", show_default=True,
              help="onnxruntime: the ONNX against PyTorch; tensorrt: the engine against ONNX Runtime (Polygraphy).")
@click.option("--target", default="orin-agx", show_default=True, help="Device profile of the engine (tensorrt).")
@click.option("--model", help="The PyTorch model to compare with (onnxruntime; default: the artifact's source).")
@click.option("--measure", is_flag=True, help="Also time the engine per phase next to the roofline (tensorrt).")
@click.option("--prefill", type=int, default=16, show_default=True, help="Tokens of the first prefill.")
@click.option("--positions", type=int, default=POSITION_SAMPLES, show_default=True,
              help="onnxruntime: decode steps at positions spread up to the end of the model's context.")
@click.option("--context", type=int, default=64, show_default=True,
              help="Past tokens of the decode phase (tensorrt).")
@placement_options
@json_option
def command(artifact, backend, target, model, measure, prefill, positions, context, device, dtype, as_json):
    """Check ARTIFACT: max |logit difference| against the reference, within the stated tolerance.

    On ONNX Runtime the inputs cover the first positions, positions sampled up to the end of the context, every
    block and every routed expert (each forced once); see d2mc/verify.py. Exit status 1 when it FAILED.
    """
    from d2mc.checks import check_number
    from d2mc.placement import check_no_placement, resolve_placement

    check_number(prefill, "--prefill", minimum=1)
    check_number(positions, "--positions", minimum=0)
    check_number(context, "--context", minimum=1)
    placement = resolve_placement(device, dtype)
    if backend == "tensorrt":
        from d2mc.targets import tensorrt

        check_no_placement(device, dtype, "the tensorrt backend compares the engine with ONNX Runtime")
        result = {"verify": tensorrt.verify(artifact, target, prefill, context)}
        if measure:
            result["measured"] = tensorrt.measure(artifact, target, prefill, context).to_dict()
    else:
        from d2mc.targets import onnxruntime

        result = {"verify": onnxruntime.verify(artifact, model, prefill, positions, placement)}
    if as_json:
        print_json(result)
    else:
        _print(result, backend)
    if not result["verify"]["passed"]:
        sys.exit(1)


def _print(result: dict, backend: str) -> None:
    out = console()
    v = result["verify"]
    verdict = "PASSED" if v["passed"] else "FAILED"
    if backend == "tensorrt":
        for phase, p in v["phases"].items():
            out.print(f"{phase} ({p['new_tokens']} new, {p['past']} past): max |logit diff| TensorRT vs ONNX Runtime "
                      f"{p['max_abs_diff']:.3g}")
        out.print(f"{verdict} (tolerance {v['tolerance']:g}, {v['precision']})")
        if "measured" in result:
            m = result["measured"]
            for phase, p in m["phases"].items():
                out.print(f"{phase}: measured {p['measured_s'] * 1e3:.3f} ms, {m['profile']} roofline "
                          f"{p['predicted_s'] * 1e3:.3f} ms ({p['error'] * 100:+.1f}%)")
        return
    for line in coverage_lines(v):
        out.print(line)
    out.print(f"{verdict}: max |logit diff| ONNX Runtime vs PyTorch {v['max_abs_diff']:.3g} at {v['worst']} (tolerance "
              f"{v['tolerance']:.3g}, {v['precision']}), greedy agreement {v['greedy_agreement'] * 100:.0f}%")
    if v["failing_table"] is not None:
        name = v["failing_table"]
        out.print(f"the table {name} differs from the model's by {v['tables_max_abs_diff'][name]:.3g} (tolerance "
                  f"{v['tables_tolerance'][name]:.3g})")
    if v["failing_block"] is not None:
        i = v["failing_block"]
        out.print(f"the KV cache of attention block {i} differs by {v['kv_max_abs_diff'][i]:.3g} (tolerance "
                  f"{v['kv_tolerance'][i]:.3g})")


def coverage_lines(v: dict) -> list[str]:
    """What a verification's inputs covered and what it compared."""
    first = v["prefill_tokens"] + v["decode_steps"]
    inputs = f"inputs: positions 0-{first - 1}"
    if v["positions"]:
        inputs += f" and {len(v['positions'])} more up to {v['positions'][-1]}"
    inputs += f" (context {v['max_position'] + 1}"
    if v["positions"] and v["positions"][-1] < v["max_position"]:
        inputs += "; a longer past would exceed the memory bound"
    inputs += ")"
    forced = v["experts_forced"]
    if forced:
        blocks = f"{len(forced)} MoE block{'s' if len(forced) != 1 else ''}"
        inputs += f"; each of the {sum(forced.values())} routed experts of {blocks} forced once"
    compared = f"compared: logits, the caches of {len(v['kv_max_abs_diff'])} attention blocks"
    if v["tables_max_abs_diff"]:
        compared += f", every row of {', '.join(v['tables_max_abs_diff'])}"
    return [inputs, compared]
