"""The API behind ``d2mc profile``: roofline prediction, optionally measured on the runtime at hand."""

from __future__ import annotations

from pathlib import Path

from d2mc.errors import UserError
from d2mc.loading import load_model
from d2mc.profiles import load_profile
from d2mc.roofline import RooflineSettings, estimate


def is_artifact(spec: str) -> bool:
    path = Path(spec).expanduser()
    return path.is_dir() and (path / "model.onnx").exists()


def profile_model(spec: str, target: str, *, prefill: int = 128, context: int = 512, batch: int = 1,
                  precision: str | None = None, config_only: bool = False, measure: bool = False) -> dict:
    """Predicted cost per phase, block and operator of ``spec`` on ``target``; measured too when asked."""
    profile = load_profile(target)
    precision = precision or ("fp16" if profile.kind == "gpu" else "fp32")
    artifact = is_artifact(spec)
    loaded = load_model(spec, config_only=config_only or artifact, tokenizer=False)
    settings = RooflineSettings(prefill=prefill, context=context, batch=batch, precision=precision)
    phases = estimate(loaded.arch, profile, settings)
    result = {
        "model": spec,
        "profile": {"name": profile.name, "description": profile.description,
                    "bandwidth_gbps": profile.memory_bandwidth_gbps,
                    "achievable_bandwidth_gbps": profile.achievable_bandwidth / 1e9,
                    "achievable_tflops": profile.achievable_flops(precision) / 1e12},
        "settings": {"prefill": prefill, "context": context, "batch": batch, "precision": precision,
                     "kv": settings.kv},
        "moe_accounting": ("decode reads the shared experts plus the top-k routed experts per token; for a batch, "
                           "the expected number of distinct experts under uniform routing"),
        "phases": {name: {**cost.to_dict(), "blocks": _per_block(cost)} for name, cost in phases.items()},
    }
    if measure:
        result["measured"], result["error"] = _measure(spec, loaded, artifact, prefill, context, batch, phases)
    return result


def _per_block(cost) -> dict:
    blocks: dict[str, dict] = {}
    for op in cost.ops:
        key = "embed+head" if op.block < 0 else str(op.block)
        agg = blocks.setdefault(key, {"seconds": 0.0, "bytes": 0.0, "flops": 0.0, "memory_s": 0.0, "compute_s": 0.0})
        agg["seconds"] += op.seconds
        agg["bytes"] += op.bytes
        agg["flops"] += op.flops
        agg["memory_s" if op.bound == "memory" else "compute_s"] += op.seconds
    for agg in blocks.values():
        agg["bound"] = "memory" if agg.pop("memory_s") >= agg.pop("compute_s") else "compute"
    return dict(sorted(blocks.items(), key=lambda kv: (kv[0] == "embed+head", int(kv[0]) if kv[0].isdigit() else 0)))


def _measure(spec, loaded, artifact: bool, prefill: int, context: int, batch: int, phases) -> tuple[dict, dict]:
    from d2mc.measure import measure_onnx, measure_torch

    if loaded.config_only and not artifact:
        raise UserError("--measure runs the model: drop --config-only")
    if artifact:
        if batch != 1:
            raise UserError("--measure on an ONNX artifact times batch 1")
        m = measure_onnx(Path(spec) / "model.onnx", prefill, context, vocab=loaded.arch.vocab_size)
    else:
        m = measure_torch(loaded.model, prefill, context, batch)
    measured = {**m.to_dict(), "prefill": m.prefill_seconds, "decode": m.decode_seconds}
    error = {p: (phases[p].seconds - measured[p]) / measured[p] for p in ("prefill", "decode")}
    return measured, error
