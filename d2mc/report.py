"""The compile report: ``report.json`` for scripts and ``report.md`` for people, from one dictionary.

:func:`build_report` makes that dictionary from a finished :class:`~d2mc.compile.CompileState`, with one section
builder per phase of the compile (each returns its section, or None when its phase did not run).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from d2mc.artifact import TENSORRT_ONNX_DIR

if TYPE_CHECKING:
    from d2mc.compile import CompileState
    from d2mc.latency import LatencyComparison
    from d2mc.profiles import DeviceProfile
    from d2mc.roofline import RooflineSettings


def write_report(report: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.md`` into ``out_dir``; return their paths."""
    json_path = out_dir / "report.json"
    md_path = out_dir / "report.md"
    json_path.write_text(json.dumps(report, indent=2, default=_jsonable) + "\n")
    md_path.write_text(render_markdown(report))
    return json_path, md_path


def _jsonable(value):
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if hasattr(value, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(value)
    return str(value)


def markdown_table(columns: list[str], rows: list[list[Any]]) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def render_markdown(report: dict[str, Any]) -> str:
    """Each section of the report is a title and either a paragraph, a table (columns + rows) or key/values."""
    parts = [f"# {report.get('title', 'd2mc report')}\n"]
    for section in report.get("sections", []):
        parts.append(f"\n## {section['title']}\n")
        if section.get("text"):
            parts.append(section["text"].rstrip() + "\n")
        if section.get("columns"):
            parts.append("\n" + markdown_table(section["columns"], section["rows"]))
        if section.get("values"):
            parts.append("\n" + markdown_table(["", ""], [[k, v] for k, v in section["values"].items()]))
        if section.get("image"):
            parts.append(f"\n![{section['title']}]({section['image']})\n")
    return "".join(parts)


def build_report(state: CompileState) -> dict[str, Any]:
    """The report of a finished compile: what each phase produced, and a section per phase for ``report.md``."""
    from d2mc.recovery import brief

    options, profile, settings = state.options, state.profile, state.settings
    conversion = state.ctx.report["conversion"]
    fusion_plan = conversion["plan"]
    out = state.out
    artifacts = {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}
    phases = {}
    for phase in ("prefill", "decode"):
        dense, converted = state.dense_cost[phase].seconds, state.converted_cost[phase].seconds
        phases[phase] = {"dense_s": dense, "converted_s": converted, "speedup": dense / converted}
    verify = state.exported.verify
    quantized_ppl = state.quantized_ppl.perplexity if state.quantized_ppl else None
    artifact_ppl = state.artifact_ppl.perplexity if state.artifact_ppl else None
    sections = [
        plan_section(fusion_plan, conversion["redundancy"]),
        plan_search_section(conversion.get("plan_search")),
        split_section(conversion),
        blocks_section(profile, state.blocks),
        parameters_section(state.dense_arch.total_params, conversion),
        prediction_section(profile, settings, phases),
        measured_section(state.latency),
        perplexity_section(options.eval_tokens, state.dense_ppl, state.converted_ppl, state.recovered_ppl,
                           state.recovery is not None, quantized_ppl, artifact_ppl),
        recovery_section(state.recovery),
        tasks_section(state.tasks),
        verification_section(verify),
        engine_section(profile, state.engine),
        artifacts_section(artifacts),
    ]
    return {
        "title": f"d2mc compile {options.model} --target {profile.name}",
        "model": options.model,
        "target": profile.name,
        "settings": dataclasses.asdict(settings),
        "options": {**dataclasses.asdict(options.conversion), "eval_tokens": options.eval_tokens},
        "plan": fusion_plan,
        "plan_search": conversion.get("plan_search"),
        "split": conversion.get("split"),
        "upcycle": conversion.get("upcycle"),
        "redundancy": conversion["redundancy"],
        "routers": conversion["routers"],
        "blocks": state.blocks,
        "parameters": {"dense_total": state.dense_arch.total_params, "total": conversion["parameters"]["total"],
                       "active_per_token": conversion["parameters"]["active_per_token"],
                       "attention_blocks": conversion["attention_blocks"], "blocks": conversion["blocks"]},
        "predicted": phases,
        "measured": measured_entry(state.latency),
        "perplexity": {"dense": state.dense_ppl, "converted": state.converted_ppl, "tokens": options.eval_tokens,
                       "text": "held-out part of the built-in corpus, never used for calibration or training",
                       "recovered": state.recovered_ppl, "quantized": quantized_ppl, "artifact": artifact_ppl},
        "quantization": state.quantized.to_dict() if state.quantized else None,
        "verify": verify,
        "engine": state.engine,
        "artifacts": artifacts,
        "step_seconds": state.timings,
        "sections": [s for s in sections if s is not None],
        "recovery": brief(state.recovery) if state.recovery is not None else None,
        "tasks": state.tasks.to_dict() if state.tasks is not None else None,
    }


def measured_entry(latency: LatencyComparison | None) -> dict | None:
    """The report's ``measured``: the runtime, the profile it was judged on, and each phase's comparison."""
    if latency is None:
        return None
    return {"runtime": latency.runtime, "profile": latency.profile, "profile_origin": latency.profile_origin,
            **{phase: c.to_dict() for phase, c in latency.phases.items()}}


def plan_section(fusion_plan: dict | None, redundancy: dict) -> dict | None:
    """Analysis and planning: the fusion plan and the per-layer influences it was chosen on."""
    if not fusion_plan:
        return None
    return {"title": "Plan",
            "text": f"{fusion_plan['reason']}. Groups (first layer keeps its attention, every MLP becomes "
                    f"an expert): {fusion_plan['groups']}; top-{fusion_plan['top_k']} routing"
                    f"{', kept MLP shared' if fusion_plan['shared_expert'] else ''}.",
            "columns": ["layer", "block influence", "attention influence", "mlp influence"],
            "rows": [[i, f"{b:.4f}", f"{a:.4f}", f"{m:.4f}"] for i, (b, a, m) in
                     enumerate(zip(redundancy["block"], redundancy["attention"], redundancy["mlp"], strict=False))],
            "image": "redundancy.png"}


def plan_search_section(search: dict | None) -> dict | None:
    """``--method auto``: the candidate plans measured whole, with their predicted latency and damage."""
    if not search:
        return None
    steps = search.get("reconstruct_steps")
    after = (f", and with its fused blocks reconstructed ({steps} steps, as the conversion does), which decides"
             if steps else "; the plan of least measured damage is chosen")

    def reconstructed(a: dict) -> str:
        value = a.get("reconstructed_damage")
        return f"{value:.4f}" if value is not None else "-"

    return {"title": "Plan search (auto)",
            "text": (f"Target {search['target_ms']:.3f} ms on {search['profile']} at context {search['context']} "
                     f"(dense {search['dense_ms']:.3f} ms). Damage is the calibration-loss increase in nats per token "
                     f"({search['probe_tokens']} calibration tokens): predicted as the sum of the actions' damages, "
                     f"each measured alone, and measured on the whole plan{after}. Search {search['seconds']:.0f} s "
                     f"({search['cpu_seconds']:.0f} s of CPU time)."),
            "columns": ["search", "plan", "predicted ms", "predicted damage", "measured damage",
                        "after reconstruction", "chosen"],
            "rows": [[a["search"], a["plan"], f"{a['predicted_ms']:.3f}", f"{a['predicted_damage']:.4f}",
                      f"{a['measured_damage']:.4f}", reconstructed(a),
                      "yes" if a["plan"] == search["chosen"]["plan"] else ""]
                     for a in search["alternatives"]]}


def split_section(conversion: dict) -> dict | None:
    """Experts cut from MLPs (split-experts, upcycle), when the conversion made any."""
    from d2mc.convert import method_lines

    lines = method_lines({"split": conversion.get("split"), "upcycle": conversion.get("upcycle")})
    if not lines:
        return None
    return {"title": "Experts cut from MLPs", "text": " ".join(f"{line}." for line in lines)}


def blocks_section(profile: DeviceProfile, blocks: list[dict]) -> dict:
    """The converted model's blocks and their share of the predicted decode time."""
    return {"title": f"Blocks and their share of predicted decode time on {profile.name}",
            "columns": ["block", "attention of layer", "experts (layers)", "top-k", "decode share"],
            "rows": [[b["block"], b["attention_layer"] if b["attention_layer"] is not None else "-", b["experts"],
                      b["top_k"] or "-", f"{b['decode_share'] * 100:.1f}%"] for b in blocks]}


def parameters_section(dense_total: int, conversion: dict) -> dict:
    """Parameters of the dense parent and of the converted model."""
    return {"title": "Parameters",
            "values": {"dense parent": f"{dense_total:,}",
                       "converted, total": f"{conversion['parameters']['total']:,}",
                       "converted, active per token": f"{conversion['parameters']['active_per_token']:,}",
                       "blocks with attention": f"{conversion['attention_blocks']} of {conversion['blocks']}"}}


def prediction_section(profile: DeviceProfile, settings: RooflineSettings, phases: dict) -> dict:
    """The roofline's prediction on the target, dense against converted."""
    return {"title": f"Predicted latency on {profile.name} (roofline, {settings.precision} weights)",
            "text": "Derived from the device profile's datasheet figures (see `d2mc targets " + profile.name + "`).",
            "columns": ["phase", "dense ms", "converted ms", "speed-up"],
            "rows": [[f"prefill {settings.prefill}" if p == "prefill" else f"decode at {settings.context}",
                      f"{v['dense_s'] * 1e3:.3f}", f"{v['converted_s'] * 1e3:.3f}", f"{v['speedup']:.3f}x"]
                     for p, v in phases.items()]}


def measured_section(latency: LatencyComparison | None) -> dict | None:
    """The artifact measured on this machine next to the roofline of this machine."""
    if latency is None:
        return None
    return {"title": f"Measured on this machine ({latency.runtime}) next to the {latency.profile} roofline",
            "text": f"Profile: {latency.profile_origin}.",
            "columns": ["phase", "predicted ms", "measured ms", "error"],
            "rows": [[p, f"{c.predicted_s * 1e3:.2f}", f"{c.measured_s * 1e3:.2f}", f"{c.error * 100:+.1f}%"]
                     for p, c in latency.phases.items()]}


def perplexity_section(eval_tokens: int, dense: float | None, converted: float | None, recovered: float | None,
                       recovery_ran: bool, quantized: float | None = None, artifact: float | None = None) -> dict | None:
    """Held-out perplexity of the dense, converted and (after recovery training) recovered model, of its quantized
    weights, and of the artifact that ships (run by ONNX Runtime)."""
    if dense is None:
        return None
    values = {"dense": f"{dense:.2f}", "converted": f"{converted:.2f}"}
    for name, value in (("after recovery", recovered), ("quantized (PyTorch)", quantized),
                        ("shipped artifact (ONNX Runtime)", artifact)):
        if value is not None:
            values[name] = f"{value:.2f}"
    return {"title": "Held-out perplexity",
            "text": (f"{eval_tokens} tokens of the held-out text in 512-token windows (never used for calibration "
                     "or training). " + ("Recovery training as below." if recovery_ran
                                         else "No recovery training was run.")),
            "values": values}


def recovery_section(summary: dict | None) -> dict | None:
    """Recovery training: its budget, what it trained, and the final losses."""
    if summary is None:
        return None
    final = ", ".join(f"{k} {v:.4f}" for k, v in summary["final"].items())
    return {
        "title": "Recovery training",
        "text": (f"Distillation from the dense parent: {summary['steps']} steps, {summary['tokens']:,} tokens, "
                 f"{summary['seconds']:.0f} s; trained {summary['trained']} ({summary['trainable_parameters']:,} "
                 f"parameters) on {summary['data']['source']}, teacher {summary['teacher']}."),
        "values": {"final loss": final or "-", "tokens per second": f"{summary['tokens'] / summary['seconds']:.0f}"
                   if summary["seconds"] else "-"},
        "image": "recovery_curve.png"}


def tasks_section(scores) -> dict | None:
    """lm-evaluation-harness scores of the final model (``d2mc.tasks.TaskScores``), one row per task and metric."""
    if scores is None:
        return None
    rows = [[t.task if i == 0 else "", t.samples if i == 0 and t.samples is not None else "", m.name,
             f"{m.value:.4f}", f"{m.stderr:.4f}" if m.stderr is not None else "-"]
            for t in scores.tasks for i, m in enumerate(t.metrics)]
    return {"title": "Tasks", "text": f"lm-evaluation-harness {scores.harness} on the final PyTorch model"
                                      + (f", at most {scores.limit} documents per task." if scores.limit else "."),
            "columns": ["task", "documents", "metric", "value", "stderr"], "rows": rows}


def verification_section(verify: dict) -> dict:
    """The ONNX Runtime artifact against PyTorch."""
    return {"title": "Verification", "text": (
        f"ONNX Runtime against PyTorch on the same tokens, a {verify['prefill_tokens']}-token prefill and "
        f"{verify['decode_steps']} decode steps through the KV cache: max |logit difference| "
        f"{verify['max_abs_diff']:.3g} (tolerance {verify['tolerance']:g}, {verify['precision']}), greedy "
        f"agreement {verify['greedy_agreement'] * 100:.0f}%." + "".join(
            f" {what}: max |logit difference| {verify[key]['max_abs_diff']:.3g}, greedy agreement "
            f"{verify[key]['greedy_agreement'] * 100:.0f}%." for key, what in (
                ("shipped", "The quantized artifact as it ships (its accuracy level; verified at level 0)"),
                ("unquantized", "Against the unquantized model")) if key in verify))}


def engine_section(profile: DeviceProfile, engine: dict) -> dict:
    """The TensorRT engine step: built, or what the device runs to build it; its ONNX's verification."""
    text = f"TensorRT engine for {profile.name}: {engine['summary']}."
    if engine.get("onnx_verify"):
        v = engine["onnx_verify"]
        text += (f" Its ONNX (`{TENSORRT_ONNX_DIR}/`, {engine['precision']}, one D2mcMoE plugin node per MoE "
                 f"block) was verified against PyTorch with the plugin nodes expanded into standard ops: max "
                 f"|logit difference| {v['max_abs_diff']:.3g} (tolerance {v['tolerance']:.3g}).")
    return {"title": "Engine", "text": text}


def artifacts_section(artifacts: dict[str, int]) -> dict:
    """Every file the compile wrote, with its size."""
    return {"title": "Artifacts", "columns": ["file", "bytes"],
            "rows": [[name, f"{size:,}"] for name, size in artifacts.items()]}
