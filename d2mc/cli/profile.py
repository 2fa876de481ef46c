"""``d2mc profile``: the roofline prediction per block and operator, optionally next to a measurement."""

from __future__ import annotations

import dataclasses
import json

import click

from d2mc.cli.common import (
    config_only_option,
    console,
    human_bytes,
    json_option,
    placement_options,
    print_json,
    stderr_console,
    table,
)


@click.command("profile")
@click.argument("model", required=False, metavar="MODEL|ARTIFACT")
@click.option("--target", default="orin-agx", show_default=True, help="Device profile (name or .toml).")
@click.option("--prefill", type=int, default=128, show_default=True, help="Prompt tokens of the prefill phase.")
@click.option("--context", type=int, default=512, show_default=True, help="Cached tokens before the decode step.")
@click.option("--batch", type=int, default=1, show_default=True, help="Sequences decoded together.")
@click.option("--precision", default=None, help="Weight precision (fp32, fp16, bf16, fp8, int8, int4); default fp16 "
                                                "on GPU profiles, fp32 on CPU ones.")
@click.option("--kv-precision", default=None, help="KV-cache precision; default the weight precision if it is a float "
                                                   "format, else fp16 on GPU profiles and fp32 on CPU ones.")
@click.option("--block-size", type=int, default=128, show_default=True,
              help="Elements per scale of int4/int8 weights, along each matrix's input (32, 64, 128).")
@click.option("--lm-head-precision", default=None, help="LM-head precision; default the weight precision.")
@config_only_option
@click.option("--measure", is_flag=True, help="Also run the model here (PyTorch, or ONNX Runtime for an artifact) "
                                              "and print measured next to predicted, per phase and per block.")
@click.option("--engine", is_flag=True, help="With --measure on an ARTIFACT: time its TensorRT engine for --target "
                                             "(d2mc build), on the device, instead of ONNX Runtime here.")
@click.option("--repeats", type=int, default=5, show_default=True, help="Timed repeats per phase with --measure "
                                                                        "(decode takes four times as many).")
@click.option("--host-profile", default=None, metavar="auto|measure|shipped|FILE",
              help="The profile of this machine a measurement here is judged on (and --target host-cpu predicts "
                   "with): auto takes the one measured here before, else measures the machine once (a few "
                   "minutes) and caches it; measure measures again; shipped takes d2mc's own; or a .toml file. "
                   "Default: $D2MC_HOST_PROFILE, else auto.")
@click.option("--measure-host", is_flag=True, help="Measure this machine and write its device profile TOML (also "
                                                   "cached as this machine's profile).")
@click.option("--calibrate", "legacy_measure_host", is_flag=True, hidden=True,
              help="Deprecated spelling of --measure-host (calibration names the text analysis runs on).")
@click.option("-o", "--output", type=click.Path(), help="Directory for roofline.json and roofline.png; with "
                                                        "--measure-host, the TOML file to write (default "
                                                        "host-cpu.toml).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@placement_options
@json_option
def command(model, target, prefill, context, batch, precision, kv_precision, block_size, lm_head_precision, config_only,
            measure, engine, repeats, host_profile, measure_host, legacy_measure_host, output, overwrite, device, dtype,
            as_json):
    """Predict prefill and decode latency of MODEL on a device from its roofline."""
    from d2mc.artifact import is_artifact
    from d2mc.errors import UserError
    from d2mc.placement import check_no_placement, resolve_placement

    placement = resolve_placement(device, dtype)
    if not measure or engine or measure_host or legacy_measure_host or (model and is_artifact(model)):
        check_no_placement(device, dtype, "only {measure} runs one here, on a MODEL (an artifact runs in ONNX "
                                          "Runtime on the CPU)")

    if legacy_measure_host:
        stderr_console().print("profile --calibrate is deprecated: use --measure-host")
    if measure_host or legacy_measure_host:
        import d2mc.host_profile as machine
        from d2mc.checks import is_profile_file
        from d2mc.outputs import check_output_file

        check_output_file(output or "host-cpu.toml", (".toml",), overwrite=overwrite, owned=is_profile_file)
        status = stderr_console()
        measured = machine.measure_host(progress=lambda text: status.print(f"measuring {text}..."))
        path = machine.write_profile(measured, output or "host-cpu.toml")
        machine.write_profile(measured, machine.cached_profile_path())
        if as_json:
            print_json({"path": str(path), **dataclasses.asdict(measured)})
        else:
            console().print(f"wrote {path}:\n{path.read_text()}", markup=False)
        return
    if model is None:
        raise UserError("give a MODEL (or --measure-host)")
    if output:
        from d2mc.outputs import check_output_path

        check_output_path(output, overwrite)
    from d2mc.latency import profile_model

    status = stderr_console()
    result = profile_model(model, target, prefill=prefill, context=context, batch=batch, precision=precision,
                           kv_precision=kv_precision, block_size=block_size, lm_head_precision=lm_head_precision,
                           config_only=config_only, measure=measure, repeats=repeats, engine=engine, host=host_profile,
                           progress=lambda text: status.print(f"{text}..."), placement=placement)
    if output:
        from d2mc.outputs import atomic_output_dir
        from d2mc.plots import plot_roofline

        with atomic_output_dir(output, overwrite=overwrite) as out_dir:
            (out_dir / "roofline.json").write_text(json.dumps(result, indent=2) + "\n")
            plot_roofline(result, out_dir / "roofline.png")
    if as_json:
        print_json(result)
        return
    _print(result, output)


def _print(result: dict, output) -> None:
    out = console()
    s, p = result["settings"], result["profile"]
    out.print(f"{result['model']} on {p['name']} ({p['description']}): {p['achievable_bandwidth_gbps']:.1f} GB/s, "
              f"{p['achievable_tflops']:.3g} TFLOP/s achievable; {s['precision']} weights"
              + (f" (blocks of {s['block_size']})" if "block_size" in s else "")
              + (f", {s['lm_head']} LM head" if s["lm_head"] != s["precision"] else "")
              + f", {s['kv']} KV cache, batch {s['batch']}")
    if "origin" in p:
        out.print(f"profile: {p['origin']}", markup=False)
    out.print(f"MoE accounting: {result['moe_accounting']}", markup=False)
    for phase in ("prefill", "decode"):
        cost = result["phases"][phase]
        label = f"prefill of {s['prefill']} tokens" if phase == "prefill" else f"decode at context {s['context']}"
        rows = [[b["label"], f"{b['seconds'] * 1e3:.4f}", human_bytes(b["bytes"]), f"{b['flops'] / 1e9:.4f}",
                 f"{b['intensity']:.1f}", b["bound"]] for b in cost["blocks"]]
        rows.append(["total", f"{cost['seconds'] * 1e3:.4f}", human_bytes(cost["bytes"]), f"{cost['flops'] / 1e9:.4f}",
                     f"{cost['intensity']:.1f}", cost["bound"]])
        out.print()
        out.print(table(f"{label} (predicted)", ["block", "ms", "bytes", "GFLOP", "FLOP/B", "bound"], rows))
    measured = result.get("measured")
    if measured:
        _print_measured(out, measured)
    if output:
        out.print(f"\nwrote {output}/roofline.json and {output}/roofline.png")


def _print_measured(out, measured: dict) -> None:
    phases = measured["phases"]
    title = (f"measured on {measured['runtime']} ({measured['precision']}, median of {measured['repeats']} after "
             f"{measured['warmup']} warm-up) next to the roofline of {measured['profile_origin']}")
    rows = [[phase, f"{v['predicted_s'] * 1e3:.3f}", f"{v['measured_s'] * 1e3:.3f}", f"{v['error'] * 100:+.1f}%"]
            for phase, v in phases.items()]
    out.print()
    out.print(table(title, ["phase", "predicted ms", "measured ms", "error"], rows))
    if all("blocks" in v for v in phases.values()):
        rows = []
        for pre, dec in zip(phases["prefill"]["blocks"], phases["decode"]["blocks"], strict=True):
            rows.append([pre["block"], f"{pre['predicted_s'] * 1e3:.3f}", f"{pre['measured_s'] * 1e3:.3f}",
                         f"{pre['error'] * 100:+.1f}%", f"{dec['predicted_s'] * 1e3:.3f}",
                         f"{dec['measured_s'] * 1e3:.3f}", f"{dec['error'] * 100:+.1f}%"])
        out.print()
        out.print(table("per block (measured with forward hooks, which add their own small cost)",
                        ["block", "prefill pred ms", "meas ms", "error", "decode pred ms", "meas ms", "error"], rows))
