"""``d2mc verify``: an artifact against its reference, on ONNX Runtime (here) or TensorRT (on the device)."""

from __future__ import annotations

import click

from d2mc.cli.common import console, json_option, print_json


@click.command("verify")
@click.argument("artifact", type=click.Path())
@click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime", show_default=True,
              help="onnxruntime: the ONNX against PyTorch; tensorrt: the engine against ONNX Runtime (Polygraphy).")
@click.option("--target", default="orin-agx", show_default=True, help="Device profile of the engine (tensorrt).")
@click.option("--model", help="The PyTorch model to compare with (onnxruntime; default: the artifact's source).")
@click.option("--measure", is_flag=True, help="Also time the engine per phase next to the roofline (tensorrt).")
@click.option("--prefill", type=int, default=16, show_default=True)
@click.option("--context", type=int, default=64, show_default=True)
@json_option
def command(artifact, backend, target, model, measure, prefill, context, as_json):
    """Check ARTIFACT: max |logit difference| per phase against the reference, within the stated tolerance."""
    if backend == "tensorrt":
        from d2mc.targets import tensorrt

        result = {"verify": tensorrt.verify(artifact, target, prefill, context)}
        if measure:
            result["measured"] = tensorrt.measure(artifact, target, prefill, context).to_dict()
    else:
        from d2mc.targets import onnxruntime

        result = {"verify": onnxruntime.verify(artifact, model, prefill)}
    if as_json:
        print_json(result)
        return
    _print(result, backend)


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
    out.print(f"{verdict}: max |logit diff| ONNX Runtime vs PyTorch {v['max_abs_diff']:.3g} (tolerance "
              f"{v['tolerance']:g}, {v['precision']}), greedy agreement {v['greedy_agreement'] * 100:.0f}%")
