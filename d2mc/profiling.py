"""The API behind ``d2mc profile``: roofline prediction, optionally measured on the runtime at hand."""

from __future__ import annotations

from pathlib import Path

from d2mc.errors import UserError
from d2mc.loading import load_model
from d2mc.profiles import load_profile
from d2mc.roofline import RooflineSettings, analyze


def is_artifact(spec: str | Path) -> bool:
    """An exported ONNX artifact directory (``d2mc export`` or ``d2mc compile`` output)."""
    from d2mc.targets.tensorrt import ONNX_PLACES

    path = Path(spec).expanduser()
    return path.is_dir() and any((path / place / "model.onnx").exists() for place in ONNX_PLACES)


def _artifact_config(spec: str) -> str:
    """The config an artifact was exported from, for the roofline (ONNX files hold no architecture summary)."""
    for candidate in (Path(spec) / "config.json", Path(spec) / "model" / "config.json"):
        if candidate.exists():
            return str(candidate)
    return spec


def profile_model(spec: str, target: str, *, prefill: int = 128, context: int = 512, batch: int = 1,
                  precision: str | None = None, kv_precision: str | None = None, block_size: int = 128,
                  lm_head_precision: str | None = None, config_only: bool = False, measure: bool = False,
                  repeats: int = 5, engine: bool = False) -> dict:
    """Predicted cost per phase, block and operator of ``spec`` on ``target``; measured here too when asked.

    The result is plain JSON: the roofline report (:meth:`d2mc.roofline.RooflineReport.to_dict`) plus, with
    ``measure``, ``measured`` (seconds per phase and per block) and ``error`` ((predicted - measured) / measured).
    A measurement runs on this machine, so it is compared with a prediction on the ``host-cpu`` profile unless
    ``target`` is a CPU profile already. With ``engine``, the artifact's TensorRT engine for ``target`` is timed
    instead (on the device it was built for), next to the prediction on ``target``.
    """
    profile = load_profile(target)
    precision = precision or ("fp16" if profile.kind == "gpu" else "fp32")
    settings = RooflineSettings(prefill=prefill, context=context, batch=batch, precision=precision,
                                kv_precision=kv_precision, block_size=block_size, lm_head_precision=lm_head_precision)
    artifact = is_artifact(spec)
    if measure and config_only and not artifact:
        raise UserError("--measure runs the model: drop --config-only")
    loaded = load_model(_artifact_config(spec) if artifact else spec, config_only=config_only or artifact,
                        tokenizer=False)
    report = analyze(loaded.arch, profile, settings)
    result = {"model": spec, "artifact": artifact, **report.to_dict()}
    if engine and not (measure and artifact):
        raise UserError("--engine times an artifact's TensorRT engine: give an ARTIFACT and --measure")
    if engine:
        from d2mc.targets import tensorrt

        result["measured"] = {**tensorrt.measure(spec, target, prefill, context, repeats), "repeats": repeats,
                              "warmup": 2}
    elif measure:
        result.update(_measure(spec, loaded, artifact, profile, settings, repeats))
    return result


def _measure(spec, loaded, artifact: bool, profile, settings: RooflineSettings, repeats: int) -> dict:
    from d2mc.measure import OnnxMeasurer, TorchMeasurer

    if artifact:
        from d2mc.targets.tensorrt import find_onnx

        measurer = OnnxMeasurer(find_onnx(spec, "onnxruntime"), vocab=loaded.arch.vocab_size)
        precision = "fp32"
    else:
        measurer = TorchMeasurer(loaded.model)
        precision = str(next(loaded.model.parameters()).dtype).removeprefix("torch.").replace("float", "fp")
        precision = {"fp32": "fp32", "fp16": "fp16", "bfp16": "bf16"}.get(precision, "fp32")
    here = profile
    if measurer.runtime.endswith("cpu") and profile.kind != "cpu":
        here = load_profile("host-cpu")
    here = here.for_runtime(measurer.runtime)
    here_settings = RooflineSettings(prefill=settings.prefill, context=settings.context, batch=settings.batch,
                                     precision=precision, all_logits=measurer.all_logits)
    predicted = analyze(loaded.arch, here, here_settings)
    m = measurer.measure(settings.prefill, settings.context, settings.batch, repeats=repeats, per_block=True)
    phases = {}
    for phase, cost in predicted.phases.items():
        entry = {"predicted_s": cost.seconds, "measured_s": m.seconds(phase),
                 "error": (cost.seconds - m.seconds(phase)) / m.seconds(phase)}
        measured_blocks = m.blocks.get(phase)
        if measured_blocks:
            block_costs = [b for b in cost.blocks() if b.block >= 0]
            entry["blocks"] = [{"block": b.block, "predicted_s": b.seconds, "measured_s": s,
                                "error": (b.seconds - s) / s} for b, s in zip(block_costs, measured_blocks, strict=True)]
        phases[phase] = entry
    return {"measured": {"runtime": m.runtime, "profile": here.name, "profile_runtime": here.runtime,
                         "precision": precision, "repeats": m.repeats,
                         "warmup": m.warmup, "phases": phases}}
