"""``d2mc compile``: the whole pipeline, from a dense checkpoint to a deployable artifact and its report.

import -> roofline (dense) -> analyze-redundancy -> plan-fusion -> transform -> lower (ONNX) -> verify ->
engine (device-side step) -> measure (here) -> report. Everything is written into a temporary directory that is
renamed to the output only when every step succeeded.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from d2mc.convert import ConvertOptions, convert, method_lines, recovers
from d2mc.loading import load_model
from d2mc.outputs import atomic_output_dir, check_output_path
from d2mc.profiles import load_profile
from d2mc.roofline import RooflineSettings, estimate
from d2mc.targets.tensorrt import TENSORRT_ONNX_DIR, engine_dir


@dataclass
class CompileOptions:
    model: str
    output: str
    target: str = "orin-agx"
    conversion: ConvertOptions = field(default_factory=lambda: ConvertOptions(speedup=1.2))
    eval_tokens: int = 4096
    measure: bool = True
    prefill: int = 128
    context: int = 512
    overwrite: bool = False


def compile_model(options: CompileOptions, progress: Callable[[str], None] | None = None) -> dict:
    """Run every step and return the report (also written as ``report.json`` and ``report.md``)."""
    say = progress or (lambda text: None)
    profile = load_profile(options.target)
    # the artifacts' prefill computes logits at every prompt position: predict what they compute
    settings = RooflineSettings(prefill=options.prefill, context=options.context,
                                precision="fp16" if profile.kind == "gpu" else "fp32", all_logits=True)
    conversion = dataclasses.replace(options.conversion, target=options.conversion.target or options.target,
                                     context=options.context, precision=settings.precision)
    timings: dict[str, float] = {}

    def step(name: str):
        say(f"{name}...")
        timings[name] = time.perf_counter()

    def done(name: str):
        timings[name] = time.perf_counter() - timings[name]

    with atomic_output_dir(options.output, overwrite=options.overwrite) as out:
        step("import")
        loaded = load_model(options.model)
        dense_arch = loaded.arch
        done("import")

        dense_cost = estimate(dense_arch, profile, settings)
        eval_windows = None
        dense_ppl = None
        if options.eval_tokens:
            from d2mc.data import heldout_windows, perplexity

            step("held-out perplexity (dense)")
            eval_windows = heldout_windows(loaded.tokenizer, window=512, max_tokens=options.eval_tokens)
            dense_ppl = perplexity(loaded.model, eval_windows)
            done("held-out perplexity (dense)")

        step("convert")
        ctx = convert(loaded, conversion, progress=lambda text: say(f"  {text}"), recover=False)
        done("convert")
        arch = ctx.arch
        converted_cost = estimate(arch, profile, settings)
        converted_ppl = None
        if eval_windows is not None:
            from d2mc.data import perplexity

            step("held-out perplexity (converted)")
            converted_ppl = perplexity(ctx.model, eval_windows)
            done("held-out perplexity (converted)")
        recovery, recovered_ppl = _recovery_step(ctx, conversion, eval_windows, step, done, say, out)

        step("save model")
        ctx.model.save_pretrained(out / "model")
        ctx.tokenizer.save_pretrained(out / "model")
        (out / "model" / "d2mc_plan.json").write_text(json.dumps(ctx.report["conversion"], indent=2, default=str) + "\n")
        done("save model")

        from d2mc.targets.onnxruntime import export_onnx

        step("lower to ONNX and verify")
        exported = export_onnx(ctx.model, ctx.tokenizer, out / "onnx", source=loaded.reference)
        done("lower to ONNX and verify")

        measured = None
        if options.measure:
            from d2mc.measure import measure_onnx

            step("measure (ONNX Runtime, this machine)")
            m = measure_onnx(out / "onnx" / "model.onnx", options.prefill, options.context, vocab=arch.vocab_size)
            host = load_profile("host-cpu").for_runtime(m.runtime)
            host_settings = dataclasses.replace(settings, precision="fp32")
            predicted_host = estimate(arch, host, host_settings)
            measured = {"runtime": m.runtime, "profile": host.name,
                        **{phase: {"predicted_s": predicted_host[phase].seconds, "measured_s": value,
                                   "error": (predicted_host[phase].seconds - value) / value}
                           for phase, value in (("prefill", m.prefill_seconds), ("decode", m.decode_seconds))}}
            done("measure (ONNX Runtime, this machine)")

        engine = _engine_step(ctx.model, profile, out, Path(options.output), step, done)
        from d2mc.plots import plot_redundancy

        if "redundancy" in ctx.results:
            plot_redundancy(ctx.results["redundancy"], out / "redundancy.png", title=options.model)
        report = _report(options, profile, settings, loaded, ctx, dense_arch, dense_cost, converted_cost,
                         dense_ppl, converted_ppl, exported, measured, engine, timings, out)
        _add_recovery(report, recovery, recovered_ppl, options.eval_tokens)
        from d2mc.report import write_report

        write_report(report, out)
    if recovery:
        from d2mc.recovery import remove_checkpoints

        remove_checkpoints(conversion.recovery)
    return report


def _recovery_step(ctx, conversion: ConvertOptions, eval_windows, step, done, say, out: Path):
    """Recovery training when the options ask for it; its summary and the held-out perplexity after it. A
    recipe's own ``recover`` pass has already run inside the conversion (its perplexity is the converted one)."""
    from d2mc.recovery import brief, write_recovery_outputs

    if "recovery" in ctx.results:
        write_recovery_outputs(ctx.results["recovery"], out)
        return ctx.results["recovery"], None
    if not recovers(conversion):
        return None, None
    from d2mc.pipeline import PassManager, create_pass

    step("recovery training")
    PassManager([create_pass("recover", options=conversion.recovery, progress=lambda text: say(f"  {text}"))]
                ).run(ctx)
    done("recovery training")
    summary = ctx.results["recovery"]
    ctx.report["conversion"]["recovery"] = brief(summary)
    write_recovery_outputs(summary, out)
    recovered_ppl = None
    if eval_windows is not None:
        from d2mc.data import perplexity

        step("held-out perplexity (after recovery)")
        recovered_ppl = perplexity(ctx.model, eval_windows)
        done("held-out perplexity (after recovery)")
    return summary, recovered_ppl


def _add_recovery(report: dict, summary: dict | None, recovered_ppl: float | None, eval_tokens: int) -> None:
    """The recovery figures in the report, and perplexity after recovery beside dense and converted."""
    report["perplexity"]["recovered"] = recovered_ppl
    report["recovery"] = None
    if summary is None:
        return
    from d2mc.recovery import brief

    report["recovery"] = brief(summary)
    sections = report["sections"]
    ppl = next((s for s in sections if s["title"] == "Held-out perplexity"), None)
    if ppl is not None:
        ppl["text"] = ppl["text"].replace("No recovery training was run.", "Recovery training as below.")
        if recovered_ppl is not None:
            ppl["values"]["after recovery"] = f"{recovered_ppl:.2f}"
    final = ", ".join(f"{k} {v:.4f}" for k, v in summary["final"].items())
    at = next((i for i, s in enumerate(sections) if s["title"] == "Verification"), len(sections))
    sections.insert(at, {
        "title": "Recovery training",
        "text": (f"Distillation from the dense parent: {summary['steps']} steps, {summary['tokens']:,} tokens, "
                 f"{summary['seconds']:.0f} s; trained {summary['trained']} ({summary['trainable_parameters']:,} "
                 f"parameters) on {summary['data']['source']}, teacher {summary['teacher']}."),
        "values": {"final loss": final or "-", "tokens per second": f"{summary['tokens'] / summary['seconds']:.0f}"
                   if summary["seconds"] else "-"},
        "image": "recovery_curve.png"})


def _engine_step(model, profile, out: Path, final: Path, step, done) -> dict:
    """The TensorRT step: the TensorRT-flavoured ONNX (verified) and the engine for the profile, built here when
    this machine has TensorRT and the profile's GPU, else the device-side build script (``engine-<profile>/``)."""
    if not profile.tensorrt_precisions:
        return {"built": False, "reason": f"{profile.name} has no TensorRT", "summary": "no TensorRT on the target"}
    from d2mc.engine.build import prepare_engine_build
    from d2mc.engine.plan import EngineSettings
    from d2mc.targets.onnxruntime import export_onnx

    precision = "fp16" if "fp16" in profile.tensorrt_precisions else "fp32"
    step("lower to ONNX (TensorRT flavour) and verify")
    exported = export_onnx(model, None, out / TENSORRT_ONNX_DIR, flavour="tensorrt", precision=precision)
    done("lower to ONNX (TensorRT flavour) and verify")
    step(f"engine for {profile.name}")
    result = prepare_engine_build(out / TENSORRT_ONNX_DIR, profile, engine_dir(out, profile.name),
                                  EngineSettings(precision=precision), artifact=out)
    done(f"engine for {profile.name}")
    script = engine_dir(final, profile.name) / result.script_path.name
    summary = (f"built {engine_dir(final, profile.name)} in {result.seconds:.0f} s" if result.built else
               f"not built here ({result.reason}); on the {profile.name} run: bash {script}")
    return {**result.to_dict(), "summary": summary, "script": str(script), "precision": precision,
            "onnx_verify": exported.verify}


def _report(options, profile, settings, loaded, ctx, dense_arch, dense_cost, converted_cost, dense_ppl,
            converted_ppl, exported, measured, engine, timings, out: Path) -> dict:
    conversion = ctx.report["conversion"]
    plan = conversion["plan"]
    decode_share = converted_cost["decode"].per_block()
    total_decode = converted_cost["decode"].seconds
    blocks = []
    for i, block in enumerate(ctx.model.config.blocks):
        blocks.append({"block": i, "attention_layer": block["attention_layer"], "experts": block["expert_layers"],
                       "top_k": block["top_k"] if len(block["expert_layers"]) > 1 else None,
                       "decode_share": decode_share.get(i, 0.0) / total_decode})
    artifacts = {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}
    phases = {}
    for phase in ("prefill", "decode"):
        phases[phase] = {"dense_s": dense_cost[phase].seconds, "converted_s": converted_cost[phase].seconds,
                         "speedup": dense_cost[phase].seconds / converted_cost[phase].seconds}
    return {
        "title": f"d2mc compile {options.model} --target {profile.name}",
        "model": options.model,
        "target": profile.name,
        "settings": dataclasses.asdict(settings),
        "options": {**dataclasses.asdict(options.conversion), "eval_tokens": options.eval_tokens},
        "plan": plan,
        "split": conversion.get("split"),
        "upcycle": conversion.get("upcycle"),
        "redundancy": conversion["redundancy"],
        "routers": conversion["routers"],
        "blocks": blocks,
        "parameters": {"dense_total": dense_arch.total_params, "total": conversion["parameters"]["total"],
                       "active_per_token": conversion["parameters"]["active_per_token"],
                       "attention_blocks": conversion["attention_blocks"], "blocks": conversion["blocks"]},
        "predicted": phases,
        "measured": measured,
        "perplexity": {"dense": dense_ppl, "converted": converted_ppl, "tokens": options.eval_tokens,
                       "text": "held-out part of the built-in corpus, never used for calibration or training"},
        "verify": exported.verify,
        "engine": engine,
        "artifacts": artifacts,
        "step_seconds": timings,
        "sections": _sections(profile, settings, plan, blocks, dense_arch, conversion, phases, measured,
                              dense_ppl, converted_ppl, exported.verify, engine, artifacts, options),
    }


def _sections(profile, settings, plan, blocks, dense_arch, conversion, phases, measured, dense_ppl, converted_ppl,
              verify, engine, artifacts, options) -> list[dict]:
    redundancy = conversion["redundancy"]
    sections = []
    if plan:
        sections.append(
            {"title": "Plan", "text": f"{plan['reason']}. Groups (first layer keeps its attention, every MLP becomes "
                                      f"an expert): {plan['groups']}; top-{plan['top_k']} routing"
                                      f"{', kept MLP shared' if plan['shared_expert'] else ''}.",
             "columns": ["layer", "block influence", "attention influence", "mlp influence"],
             "rows": [[i, f"{b:.4f}", f"{a:.4f}", f"{m:.4f}"] for i, (b, a, m) in
                      enumerate(zip(redundancy["block"], redundancy["attention"], redundancy["mlp"], strict=False))],
             "image": "redundancy.png"})
    split_lines = method_lines({"split": conversion.get("split"), "upcycle": conversion.get("upcycle")})
    if split_lines:
        sections.append({"title": "Experts cut from MLPs", "text": " ".join(f"{line}." for line in split_lines)})
    sections += [
        {"title": f"Blocks and their share of predicted decode time on {profile.name}",
         "columns": ["block", "attention of layer", "experts (layers)", "top-k", "decode share"],
         "rows": [[b["block"], b["attention_layer"] if b["attention_layer"] is not None else "-", b["experts"],
                   b["top_k"] or "-", f"{b['decode_share'] * 100:.1f}%"] for b in blocks]},
        {"title": "Parameters",
         "values": {"dense parent": f"{dense_arch.total_params:,}",
                    "converted, total": f"{conversion['parameters']['total']:,}",
                    "converted, active per token": f"{conversion['parameters']['active_per_token']:,}",
                    "blocks with attention": f"{conversion['attention_blocks']} of {conversion['blocks']}"}},
        {"title": f"Predicted latency on {profile.name} (roofline, {settings.precision} weights)",
         "text": "Derived from the device profile's datasheet figures (see `d2mc targets " + profile.name + "`).",
         "columns": ["phase", "dense ms", "converted ms", "speed-up"],
         "rows": [[f"prefill {settings.prefill}" if p == "prefill" else f"decode at {settings.context}",
                   f"{v['dense_s'] * 1e3:.3f}", f"{v['converted_s'] * 1e3:.3f}", f"{v['speedup']:.3f}x"]
                  for p, v in phases.items()]},
    ]
    if measured:
        sections.append({
            "title": f"Measured on this machine ({measured['runtime']}) next to the {measured['profile']} roofline",
            "columns": ["phase", "predicted ms", "measured ms", "error"],
            "rows": [[p, f"{measured[p]['predicted_s'] * 1e3:.2f}", f"{measured[p]['measured_s'] * 1e3:.2f}",
                      f"{measured[p]['error'] * 100:+.1f}%"] for p in ("prefill", "decode")]})
    if dense_ppl is not None:
        sections.append({"title": "Held-out perplexity", "text": (
            f"{options.eval_tokens} tokens of the held-out text in 512-token windows (never used for calibration or "
            "training). "
            f"No recovery training was run."),
            "values": {"dense": f"{dense_ppl:.2f}", "converted": f"{converted_ppl:.2f}"}})
    sections.append({"title": "Verification", "text": (
        f"ONNX Runtime against PyTorch on the same tokens, a {verify['prefill_tokens']}-token prefill and "
        f"{verify['decode_steps']} decode steps through the KV cache: max |logit difference| "
        f"{verify['max_abs_diff']:.3g} (tolerance {verify['tolerance']:g}, {verify['precision']}), greedy "
        f"agreement {verify['greedy_agreement'] * 100:.0f}%.")})
    engine_text = f"TensorRT engine for {profile.name}: {engine['summary']}."
    if engine.get("onnx_verify"):
        v = engine["onnx_verify"]
        engine_text += (f" Its ONNX (`{TENSORRT_ONNX_DIR}/`, {engine['precision']}, one D2mcMoE plugin node per MoE "
                        f"block) was verified against PyTorch with the plugin nodes expanded into standard ops: max "
                        f"|logit difference| {v['max_abs_diff']:.3g} (tolerance {v['tolerance']:.3g}).")
    sections.append({"title": "Engine", "text": engine_text})
    sections.append({"title": "Artifacts", "columns": ["file", "bytes"],
                     "rows": [[name, f"{size:,}"] for name, size in artifacts.items()]})
    return sections


def check_output_free(path: str, overwrite: bool) -> None:
    check_output_path(path, overwrite)
