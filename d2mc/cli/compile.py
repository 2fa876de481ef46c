"""``d2mc compile``: dense checkpoint in, converted model, ONNX artifact and report out."""

from __future__ import annotations

import click

from d2mc.cli.common import console, json_option, model_argument, print_json, quiet_option, stderr_console
from d2mc.cli.convert import convert_options_from, plan_options
from d2mc.cli.export import QUANTIZED, quantize_options, quantize_options_from
from d2mc.cli.recover import pipeline_recovery_options, pop_recovery_options


def default_method(plan: dict) -> str | None:
    """compile's method from its plan options: the one given (or the recipe's: None), else auto, or lfuc when an
    option fixes the plan's shape."""
    if plan["method"] is not None or plan["recipe"] is not None:
        return plan["method"]
    fixed_shape = (plan["remove_attention"] is not None or plan["plan_text"] is not None or plan["top_k"] != 1
                   or plan["shared_expert"] or plan["no_normalize"])
    return "lfuc" if fixed_shape else "auto"


@click.command("compile")
@model_argument
@click.option("--target", default="orin-agx", show_default=True, help="Device profile (name or .toml).")
@plan_options
@click.option("--eval-tokens", type=int, default=4096, show_default=True,
              help="Held-out tokens for perplexity before and after (0 to skip).")
@click.option("--prefill", type=int, default=128, show_default=True, help="Prompt tokens of the prefill phase.")
@click.option("--context", type=int, default=512, show_default=True, help="Context length of the decode phase.")
@click.option("--precision", type=click.Choice(QUANTIZED),
              help="Quantize the converted model's weights (docs/quantization.md); GPTQ and --mixed-precision "
                   "calibrated calibrate on the conversion's --calib-data [default: the profile's float format].")
@quantize_options(calibration=False)
@click.option("--no-measure", is_flag=True, help="Skip timing the artifact on this machine.")
@click.option("--tasks", help="lm-evaluation-harness tasks scored on the final model, comma-separated (e.g. "
                              "hellaswag,arc_easy; pip install 'd2mc[eval]').")
@click.option("--include-path", type=click.Path(), help="A directory of your own task YAML files (--tasks).")
@click.option("--task-limit", type=int, help="Score at most this many documents per task (--tasks).")
@click.option("--host-profile", default=None, metavar="auto|measure|shipped|FILE",
              help="The profile of this machine the measurement is judged on: auto takes the one measured here "
                   "before, else measures the machine once (a few minutes) and caches it; measure measures again; "
                   "shipped takes d2mc's own; or a .toml file. Default: $D2MC_HOST_PROFILE, else auto.")
@click.option("-o", "--output", type=click.Path(), help="Output directory (default: out/<model>-<target>).")
@click.option("--overwrite", is_flag=True)
@pipeline_recovery_options
@quiet_option
@json_option
def command(model, target, eval_tokens, prefill, context, precision, quant_method, block_size, lm_head_precision,
            mixed_precision, accuracy_level, no_measure, tasks, include_path, task_limit, host_profile, output,
            overwrite, quiet, as_json, **plan):
    """Compile MODEL for a device: Dense2MoE conversion, ONNX with KV cache, verification, report.

    The method is auto (a mixed plan chosen per layer, docs/planning.md) unless --method, --recipe, or an option
    of a fixed plan shape (--remove-attention, --plan, --top-k, --shared-expert, --no-normalize; then lfuc) says
    otherwise. Without --remove-attention, --budget-ms, --speedup or --plan, the plan of a method that removes
    layers targets a 1.2x predicted decode speed-up on the device.
    """
    import time
    from pathlib import Path

    from d2mc.checks import check_compile_inputs
    from d2mc.compile import CompileOptions, check_output_free, compile_model
    from d2mc.convert import method_lines
    from d2mc.plan import PLANNED_METHODS
    from d2mc.profiles import load_profile

    plan["method"] = default_method(plan)
    if plan["recipe"] is None and plan["method"] in (*PLANNED_METHODS, "auto") and not any(
            plan[k] is not None for k in ("remove_attention", "budget_ms", "speedup", "plan_text")):
        plan["speedup"] = 1.2

    def quantize_with(*calibration):
        # the quantized weights also lower to TensorRT when the target has it (the engine step)
        return quantize_options_from(precision, quant_method, block_size, lm_head_precision, mixed_precision,
                                     accuracy_level, *calibration,
                                     tensorrt=precision in QUANTIZED and bool(load_profile(target).tensorrt_precisions))

    quantize = quantize_with(None, None, None)
    if quantize is not None and quantize.calibrated:  # GPTQ and calibrated mixed precision read the conversion's text
        quantize = quantize_with(plan["calib_data"], plan["calib_sequences"], plan["calib_length"])
    output = output or str(Path("out") / f"{Path(model).name}-{Path(target).stem}")
    check_output_free(output, overwrite)
    recovery = pop_recovery_options(plan, output)
    options = CompileOptions(model=model, output=output, target=target, eval_tokens=eval_tokens,
                             measure=not no_measure, host_profile=host_profile, prefill=prefill, context=context,
                             overwrite=overwrite, conversion=convert_options_from(None, **plan), quantize=quantize,
                             tasks=tuple(tasks.split(",")) if tasks is not None else (),
                             include_path=include_path, task_limit=task_limit)
    options.conversion.recovery = recovery
    check_compile_inputs(options)
    err = stderr_console()
    start = time.perf_counter()
    progress = None if quiet or as_json else (lambda text: err.print(f"[{time.perf_counter() - start:6.1f}s] {text}"))
    report = compile_model(options, progress)
    if as_json:
        print_json({k: v for k, v in report.items() if k != "sections"})
        return
    out = console()
    p = report["predicted"]["decode"]
    for line in method_lines(report):
        out.print(line)
    out.print(f"parameters: {report['parameters']['total']:,} total, {report['parameters']['active_per_token']:,} "
              f"active per token (dense {report['parameters']['dense_total']:,})")
    out.print(f"predicted decode on {report['target']}: {p['dense_s'] * 1e3:.3f} ms dense -> "
              f"{p['converted_s'] * 1e3:.3f} ms ({p['speedup']:.2f}x)")
    if report["measured"]:
        m = report["measured"]["decode"]
        out.print(f"measured decode here ({report['measured']['runtime']}): {m['measured_s'] * 1e3:.2f} ms, "
                  f"{report['measured']['profile']} roofline {m['predicted_s'] * 1e3:.2f} ms ({m['error'] * 100:+.1f}%; "
                  f"profile: {report['measured']['profile_origin']})", markup=False)
    ppl = report["perplexity"]
    if ppl["dense"] is not None:
        after = (f" -> after recovery {ppl['recovered']:.2f}" if ppl["recovered"] is not None
                 else " (no recovery training)")
        out.print(f"held-out perplexity ({ppl['tokens']} tokens): dense {ppl['dense']:.2f} -> converted "
                  f"{ppl['converted']:.2f}{after}")
    for task in (report["tasks"] or {}).get("tasks", []):
        out.print(f"task {task['task']}: " + ", ".join(f"{m['name']} {m['value']:.4f}" for m in task["metrics"]))
    if report["recovery"]:
        r = report["recovery"]
        out.print(f"recovery: {r['steps']} steps, {r['tokens']:,} tokens in {r['seconds']:.0f} s, final "
                  + ", ".join(f"{k} {v:.4f}" for k, v in r["final"].items()))
    if report["quantization"]:
        q = report["quantization"]
        mixed = ""
        if q["mixed_precision"] != "none":
            count = f"{len(q['int8_matrices'])} matrices " if q.get("int8_matrices") else ""
            mixed = f" ({q['mixed_precision']}: {count}at int8{' per channel' if q['tensorrt'] else ''})"
        out.print(f"quantized: {q['precision']} {q['quant_method']} block {q['block_size']}{mixed}, LM head "
                  f"{q['lm_head_precision']}, {q['quantized_linears']} matrices in {q['seconds']:.1f} s")
        if ppl["quantized"] is not None:
            out.print(f"held-out perplexity quantized (PyTorch, same weights as the artifact): {ppl['quantized']:.2f}")
    if ppl["artifact"] is not None:
        out.print(f"held-out perplexity of the shipped artifact (ONNX Runtime): {ppl['artifact']:.2f}")
    out.print(f"verified: max |logit diff| {report['verify']['max_abs_diff']:.3g} "
              f"(tolerance {report['verify']['tolerance']:g})")
    out.print(f"engine: {report['engine']['summary']}")
    out.print(f"wrote {output}/ ({', '.join(sorted({a.split('/')[0] for a in report['artifacts']} | {'report.md', 'report.json'}))})  "
              f"[{time.perf_counter() - start:.0f} s]")
