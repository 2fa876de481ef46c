"""Predicted latency against measured latency, and the API behind ``d2mc profile``.

A measurement is judged against the roofline of the profile that describes where it ran
(:func:`judging_profile`), by one comparison (:func:`compare_latency`) with one result type
(:class:`LatencyComparison`); ``d2mc compile``, ``d2mc profile --measure`` and the tensorrt target's
``measure`` all use them, and turn the result into JSON only where they write it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from d2mc.arch import ModelArch
from d2mc.artifact import find_config, find_onnx, is_artifact
from d2mc.errors import OptionError
from d2mc.host_profile import HOST_PROFILE, HostProfile, host_profile
from d2mc.loading import load_model
from d2mc.measure import Measurement
from d2mc.profiles import DeviceProfile, builtin_profiles, load_profile
from d2mc.roofline import RooflineSettings, analyze
from d2mc.weight_plan import WeightPlan


@dataclass(frozen=True)
class Comparison:
    """Predicted and measured seconds of one phase (or of one block of it, ``block``)."""

    predicted_s: float
    measured_s: float
    block: int | None = None

    @property
    def error(self) -> float:
        """``(predicted - measured) / measured``: positive when the roofline is pessimistic."""
        return (self.predicted_s - self.measured_s) / self.measured_s

    def to_dict(self) -> dict:
        entry = {"block": self.block} if self.block is not None else {}
        return {**entry, "predicted_s": self.predicted_s, "measured_s": self.measured_s, "error": self.error}


@dataclass(frozen=True)
class LatencyComparison:
    """A measurement next to the roofline of the profile it is judged on, per phase (and per block where the
    runtime timed blocks)."""

    runtime: str
    profile: str  # the name of the profile the prediction used
    profile_runtime: str  # the runtime whose efficiencies the prediction used
    precision: str
    repeats: int
    warmup: int
    phases: dict[str, Comparison]
    blocks: dict[str, tuple[Comparison, ...]] = field(default_factory=dict)
    profile_origin: str = ""  # which profile, measured where and when (HostProfile.describe)

    def to_dict(self) -> dict:
        phases = {}
        for phase, comparison in self.phases.items():
            phases[phase] = comparison.to_dict()
            if self.blocks.get(phase):
                phases[phase]["blocks"] = [b.to_dict() for b in self.blocks[phase]]
        return {"runtime": self.runtime, "profile": self.profile, "profile_origin": self.profile_origin,
                "profile_runtime": self.profile_runtime, "precision": self.precision, "repeats": self.repeats,
                "warmup": self.warmup, "phases": phases}


def is_host_profile(profile: DeviceProfile) -> bool:
    """Whether ``profile`` is the shipped ``host-cpu``, which stands for "this machine" wherever d2mc runs."""
    return profile.name == HOST_PROFILE and profile in builtin_profiles()


def judging_profile(target: DeviceProfile, runtime: str, host: str | HostProfile | None = None,
                    progress: Callable[[str], None] | None = None) -> tuple[DeviceProfile, str]:
    """The profile a measurement on ``runtime`` is judged on, as that runtime sees it
    (:meth:`~d2mc.profiles.DeviceProfile.for_runtime`), and a phrase saying where its figures come from.

    A CPU runtime runs on this machine: it is judged on this machine's profile, chosen by ``host``
    (:func:`d2mc.host_profile.host_profile`; ``auto`` measures the machine on first use), unless ``target`` is a CPU
    profile of the user's own, which is taken as it is (or the profile ``host`` chose already). Any other runtime
    is judged on ``target``."""
    if not runtime.endswith("cpu"):
        return target.for_runtime(runtime), f"{target.name} (the target's profile)"
    if target.kind != "cpu" or is_host_profile(target) or (isinstance(host, HostProfile) and host.profile == target):
        chosen = host_profile(host, progress=progress)
    else:
        chosen = HostProfile(target, "file")
    return chosen.profile.for_runtime(runtime), chosen.describe()


def measured_settings(weights: WeightPlan | None, **fields) -> RooflineSettings:
    """The roofline settings of a measured graph: ``fields`` (lengths, batch, ``precision``, ...) with the format of
    each weight matrix the graph stores (``weights``, :func:`d2mc.weight_plan.read_weight_plan`) where its matrices
    are quantized; ``precision``, the LM head's, the block size and zero points then name the plan's."""
    if weights is not None:
        fields.update(precision=weights.precision, lm_head_precision=weights.lm_head.precision,
                      block_size=weights.block_size or fields.get("block_size", 128),
                      zero_points=weights.zero_points, weights=weights)
    return RooflineSettings(**fields)


def compare_latency(arch: ModelArch, target: DeviceProfile, measurement: Measurement, precision: str,
                    all_logits: bool, *, block_size: int = 128, lm_head_precision: str | None = None,
                    host: str | HostProfile | None = None,
                    progress: Callable[[str], None] | None = None) -> LatencyComparison:
    """``measurement`` of ``arch`` next to the roofline's prediction for the same phases, lengths and batch, on the
    profile that describes where it ran (:func:`judging_profile`, with ``host`` choosing this machine's), with
    weights in ``precision`` (int4/int8 in blocks of ``block_size``, the LM head at ``lm_head_precision``; as the
    measured graph stores them where it says, ``measurement.weights``) and, with ``all_logits``, a prefill that
    computes logits at every position (as exported graphs do)."""
    profile, origin = judging_profile(target, measurement.runtime, host, progress)
    settings = measured_settings(measurement.weights, precision=precision, block_size=block_size,
                                 lm_head_precision=lm_head_precision, prefill=measurement.prefill_tokens,
                                 context=measurement.context, batch=measurement.batch, all_logits=all_logits)
    predicted = analyze(arch, profile, settings)
    phases, blocks = {}, {}
    for phase, cost in predicted.phases.items():
        phases[phase] = Comparison(cost.seconds, measurement.seconds(phase))
        if measurement.blocks.get(phase):
            block_costs = [b for b in cost.blocks() if b.block >= 0]
            blocks[phase] = tuple(Comparison(b.seconds, s, b.block)
                                  for b, s in zip(block_costs, measurement.blocks[phase], strict=True))
    return LatencyComparison(measurement.runtime, profile.name, profile.runtime, settings.precision,
                             measurement.repeats, measurement.warmup, phases, blocks, origin)


def profile_model(spec: str, target: str, *, prefill: int = 128, context: int = 512, batch: int = 1,
                  precision: str | None = None, kv_precision: str | None = None, block_size: int = 128,
                  lm_head_precision: str | None = None, config_only: bool = False, measure: bool = False,
                  repeats: int = 5, engine: bool = False, host: str | None = None,
                  progress: Callable[[str], None] | None = None, placement=None) -> dict:
    """Predicted cost per phase, block and operator of ``spec`` on ``target``; measured here too when asked.

    The result is plain JSON: the roofline report (:meth:`d2mc.roofline.RooflineReport.to_dict`) plus, with
    ``measure``, ``measured`` (:meth:`LatencyComparison.to_dict`: seconds per phase and per block, and the error
    ``(predicted - measured) / measured``). A measurement runs on this machine and is judged on the profile
    :func:`judging_profile` picks (``host`` chooses this machine's; ``progress`` hears of a measurement of the
    machine). The shipped ``host-cpu`` target stands for this machine: its prediction uses this machine's profile,
    measured first only when ``measure`` asks to run the model here. With ``engine``, the artifact's TensorRT
    engine for ``target`` is timed instead (on the device it was built for), next to the prediction on ``target``.
    A model measured here runs where ``placement`` (a :class:`~d2mc.placement.Placement`) says, by default on the
    CPU in fp32.
    """
    profile = load_profile(target)
    chosen = None
    if is_host_profile(profile):
        chosen = host_profile(host, measure_missing=measure, progress=progress)
        profile, host = chosen.profile, chosen
    precision = precision or ("fp16" if profile.kind == "gpu" else "fp32")
    settings = RooflineSettings(prefill=prefill, context=context, batch=batch, precision=precision,
                                kv_precision=kv_precision, block_size=block_size, lm_head_precision=lm_head_precision)
    artifact = is_artifact(spec)
    if measure and config_only and not artifact:
        raise OptionError("{measure} runs the model: drop {config_only}")
    loaded = load_model(str(find_config(spec)) if artifact else spec, config_only=config_only or artifact,
                        tokenizer=False, placement=placement if measure and not artifact else None)
    report = analyze(loaded.arch, profile, settings)
    result = {"model": spec, "artifact": artifact, **report.to_dict()}
    if chosen:
        result["profile"]["origin"] = chosen.describe()
    if engine and not (measure and artifact):
        raise OptionError("{engine} times an artifact's TensorRT engine: give an ARTIFACT and {measure}")
    if engine:
        from d2mc.targets import tensorrt

        result["measured"] = tensorrt.measure(spec, target, prefill, context, repeats).to_dict()
    elif measure:
        result["measured"] = _measure_here(spec, loaded, artifact, profile, settings, repeats, host,
                                           progress).to_dict()
    return result


def _measure_here(spec, loaded, artifact: bool, profile: DeviceProfile, settings: RooflineSettings,
                  repeats: int, host: str | HostProfile | None, progress) -> LatencyComparison:
    from d2mc.measure import OnnxMeasurer, TorchMeasurer

    if artifact:
        measurer = OnnxMeasurer(find_onnx(spec, "onnxruntime"), vocab=loaded.arch.vocab_size)
        precision = "fp32"  # unless the graph's weights are quantized: the measurement says
    else:
        measurer = TorchMeasurer(loaded.model)
        precision = str(next(loaded.model.parameters()).dtype).removeprefix("torch.").replace("float", "fp")
        precision = {"fp32": "fp32", "fp16": "fp16", "bfp16": "bf16"}.get(precision, "fp32")
    measurement = measurer.measure(settings.prefill, settings.context, settings.batch, repeats=repeats,
                                   per_block=True)
    return compare_latency(loaded.arch, profile, measurement, precision, measurer.all_logits, host=host,
                           progress=progress)
