"""The engine plan: shapes of the two optimisation profiles, precision, memory limits, all from the ONNX and
the device profile, decided before TensorRT is imported.

Precision: a strongly typed network computes in the ONNX's own types, so the asked precision must be what the ONNX
holds. ``fp16``/``fp32``: float weights and activations of that type. ``int4``/``int8``: weight-only, the weights
stored as codes with block scales (``DequantizeLinear`` before the dense MatMuls, the plugin's quantized experts)
and the activations in the ONNX's float type; the device profile's ``tensorrt_precisions`` must list it.

Profile 0, prefill: ``sequence_length`` 1..max_input with no past (``past_sequence_length`` 0).
Profile 1, decode: one token after a past of 0..max_kv tokens.
An engine built with both serves a whole generation: prefill the prompt on profile 0, decode on profile 1.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from d2mc.arch import BYTES_PER_ELEMENT
from d2mc.checks import check_number
from d2mc.engine.graph import GraphSummary, TensorSpec
from d2mc.errors import OptionError, UserError
from d2mc.profiles import DeviceProfile

PHASES = ("prefill", "decode")
# what d2mc's exports contain; a strongly typed engine computes in the ONNX's own types
ENGINE_PRECISIONS = ("fp16", "fp32", "int8", "int4")
WEIGHT_ONLY_BITS = {"int4": 4, "int8": 8}  # weight-only precisions: the width of the narrowest quantized weights
# what TensorRT's DequantizeLinear takes for weights: int4 only in blocks of these sizes, int8 only per channel or per
# tensor (the plugin's experts dequantize themselves and take any block size it documents)
TENSORRT_INT4_BLOCKS = (64, 128)
TENSORRT_DEQUANTIZE_SOURCE = ("TensorRT documentation, Quantization Schemes: INT4 requires per-block scales of block "
                              "size 64 or 128; NvInfer.h (IDequantizeLayer): block dequantization is INT4 only")
DYNAMIC_DIMS = ("batch_size", "sequence_length", "past_sequence_length", "total_sequence_length")
MEMORY_HEADROOM = 0.9  # a Jetson shares its memory with the OS and the application: plan within 90%
DEFAULT_WORKSPACE_SHARE = 0.25
MIN_WORKSPACE = 64 << 20
GIB = 1 << 30


@dataclass(frozen=True)
class EngineSettings:
    """What the user may choose; ``None`` means derive it from the model and the device profile."""

    precision: str | None = None  # default: what the ONNX holds (held_precision)
    max_input: int | None = None  # longest prompt of one prefill; default min(2048, model context)
    max_kv: int | None = None  # longest past before a decode step; default the model context - 1
    max_batch: int = 1
    opt_input: int = 128
    opt_kv: int = 512
    workspace_gb: float | None = None  # default a quarter of the device memory, within what is left

    def __post_init__(self):
        for name in ("max_input", "max_kv"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise OptionError(f"{{{name}}} must be at least 1, not {value}")
        if self.max_batch < 1:
            raise OptionError(f"{{max_batch}} must be at least 1, not {self.max_batch}")
        check_number(self.workspace_gb, "{workspace_gb}", above=0)


@dataclass(frozen=True)
class ShapeRange:
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def to_dict(self) -> dict:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


@dataclass
class EnginePlan:
    """Everything the builder needs, as plain data (printed, tested and written before any build)."""

    graph: GraphSummary
    profile: DeviceProfile
    precision: str
    max_input: int
    max_kv: int
    max_batch: int
    shapes: dict[str, dict[str, ShapeRange]]  # phase -> input name -> range
    workspace_bytes: int
    weight_bytes: int
    kv_bytes: int  # past in + present out at the longest decode
    notes: list[str] = field(default_factory=list)

    def polygraphy_profiles(self) -> list:
        """The two optimisation profiles as Polygraphy ``Profile`` objects (prefill first)."""
        from polygraphy.backend.trt import Profile

        profiles = []
        for phase in PHASES:
            profile = Profile()
            for name, shape in self.shapes[phase].items():
                profile.add(name, shape.min, shape.opt, shape.max)
            profiles.append(profile)
        return profiles

    def quantization(self) -> dict | None:
        """The quantized weights and the float type the engine computes in, as plan.json and the manifest record
        them; None for a float engine."""
        if self.graph.quantization is None:
            return None
        return {**self.graph.quantization.to_dict(), "weight_only": True, "activations": self.graph.precision}

    def to_dict(self) -> dict:
        return {
            "onnx": str(self.graph.path), "device": self.profile.name, "sm": self.profile.sm,
            "precision": self.precision, "quantization": self.quantization(), "max_input": self.max_input,
            "max_kv": self.max_kv, "max_batch": self.max_batch, "workspace_bytes": self.workspace_bytes,
            "weight_bytes": self.weight_bytes, "kv_bytes": self.kv_bytes,
            "profiles": {phase: {n: s.to_dict() for n, s in shapes.items()} for phase, shapes in self.shapes.items()},
            "moe_nodes": [{"name": n.name, **dataclasses.asdict(n.attributes)} for n in self.graph.moe_nodes],
            "notes": self.notes,
        }


def check_precision(profile: DeviceProfile, precision: str) -> None:
    """Refuse a precision the device's TensorRT lacks, or one d2mc's exports do not carry, saying why."""
    if not profile.tensorrt_precisions:
        raise UserError(f"device profile '{profile.name}' has no TensorRT (kind {profile.kind}): choose a GPU "
                        "profile such as orin-agx")
    if precision not in profile.tensorrt_precisions:
        raise UserError(f"{profile.name} (SM {profile.sm}) has no TensorRT {precision}: it supports "
                        f"{', '.join(profile.tensorrt_precisions)} (source: "
                        f"{profile.source.get('tensorrt_precisions', 'its profile')})")
    if precision not in ENGINE_PRECISIONS:
        raise UserError(f"{precision} engines need a {precision} ONNX, which d2mc does not export: choose one of "
                        f"{', '.join(ENGINE_PRECISIONS)}")


def held_precision(graph: GraphSummary) -> str:
    """The precision the ONNX holds: ``int4``/``int8`` by its narrowest quantized weights, else its float type."""
    return f"int{graph.quantization.narrowest}" if graph.quantization is not None else graph.precision


def check_graph_precision(graph: GraphSummary, precision: str) -> None:
    """Refuse a precision the ONNX does not hold: a strongly typed engine takes its types from the ONNX."""
    quantization = graph.quantization
    bits = WEIGHT_ONLY_BITS.get(precision)
    if bits is None:
        if quantization is not None:
            held = f"int{quantization.narrowest}"
            raise UserError(f"the ONNX at '{graph.path}' holds {held} weights (weight-only, {graph.precision} "
                            f"activations) but {precision} was asked: build it with --precision {held}")
        if graph.precision != precision:
            raise UserError(f"the ONNX at '{graph.path}' computes in {graph.precision} but {precision} was asked: a "
                            f"strongly typed engine takes its types from the ONNX, so export it with --precision "
                            f"{precision}")
        return
    if quantization is None or quantization.narrowest != bits:
        held = "float weights" if quantization is None else f"int{quantization.narrowest} weights"
        raise UserError(f"{precision} engines are weight-only {precision}, and the ONNX at '{graph.path}' holds "
                        f"{held}: export it with --precision {precision}")
    if quantization.unsigned:
        raise UserError(f"the ONNX at '{graph.path}' holds unsigned codes with zero points; TensorRT dequantizes "
                        "symmetric weights only (signed codes, zero point 0): quantize symmetrically")
    for width, block in quantization.dequantize_formats:
        if width == 4 and block not in TENSORRT_INT4_BLOCKS:
            given = f"blocks of {block}" if block else "one scale per channel"
            raise UserError(f"the ONNX at '{graph.path}' dequantizes int4 weights in {given}; TensorRT takes int4 "
                            f"in blocks of {' or '.join(map(str, TENSORRT_INT4_BLOCKS))} ({TENSORRT_DEQUANTIZE_SOURCE}):"
                            f" export it with --block-size {TENSORRT_INT4_BLOCKS[0]} or {TENSORRT_INT4_BLOCKS[1]}")
        if width == 8 and block:
            raise UserError(f"the ONNX at '{graph.path}' dequantizes int8 weights in blocks of {block}; TensorRT takes "
                            f"int8 weights with one scale per channel ({TENSORRT_DEQUANTIZE_SOURCE}): quantize them "
                            "per channel")


def plan_engine(graph: GraphSummary, profile: DeviceProfile, settings: EngineSettings | None = None,
                max_positions: int | None = None) -> EnginePlan:
    """Decide shapes, precision and memory of the engine for ``profile``; every refusal is one line."""
    settings = settings or EngineSettings()
    precision = settings.precision or held_precision(graph)
    check_precision(profile, precision)
    check_graph_precision(graph, precision)
    notes = []
    context = max_positions or 4096
    max_input = settings.max_input or min(2048, context)
    max_kv = settings.max_kv or context - 1
    if max_input > context or max_kv + 1 > context:
        raise UserError(f"max input {max_input} / max KV {max_kv} exceed the model's context of {context} tokens")
    shapes = {phase: {} for phase in PHASES}
    lengths = {
        # name: (prefill min, opt, max), (decode min, opt, max)
        "batch_size": ((1, 1, settings.max_batch), (1, 1, settings.max_batch)),
        "sequence_length": ((1, min(settings.opt_input, max_input), max_input), (1, 1, 1)),
        "past_sequence_length": ((0, 0, 0), (0, min(settings.opt_kv, max_kv), max_kv)),
        "total_sequence_length": ((1, min(settings.opt_input, max_input), max_input),
                                  (1, min(settings.opt_kv, max_kv) + 1, max_kv + 1)),
    }
    for tensor in graph.inputs:
        for p, phase in enumerate(PHASES):
            shapes[phase][tensor.name] = _range(tensor, lengths, p)
    kv_bytes = _kv_bytes(graph.kv_inputs, settings.max_batch, max_kv + 1)
    weight_bytes = graph.weight_bytes
    usable = profile.memory_gb * 1e9 * MEMORY_HEADROOM
    left = usable - weight_bytes - kv_bytes
    if left < MIN_WORKSPACE:
        raise OptionError(f"{profile.name} has {profile.memory_gb:g} GB; weights ({weight_bytes / 1e9:.2f} GB) and "
                          f"the KV cache at {max_kv} past tokens, batch {settings.max_batch} "
                          f"({kv_bytes / 1e9:.2f} GB) leave no room for TensorRT's workspace: lower {{max_kv}} or "
                          f"{{max_batch}}")
    wanted = settings.workspace_gb * GIB if settings.workspace_gb else profile.memory_gb * 1e9 * DEFAULT_WORKSPACE_SHARE
    workspace = int(min(wanted, left))
    if workspace < wanted:
        notes.append(f"workspace capped at {workspace / GIB:.2f} GiB by {profile.name}'s {profile.memory_gb:g} GB")
    return EnginePlan(graph, profile, precision, max_input, max_kv, settings.max_batch, shapes, workspace,
                      weight_bytes, kv_bytes, notes)


def _range(tensor: TensorSpec, lengths: dict, phase: int) -> ShapeRange:
    lows, opts, highs = [], [], []
    for dim in tensor.dims:
        if isinstance(dim, str):
            if dim not in lengths:
                raise UserError(f"input '{tensor.name}' has a dynamic dimension '{dim}' the engine builder does not "
                                f"know (known: {', '.join(DYNAMIC_DIMS)})")
            low, opt, high = lengths[dim][phase]
        elif dim <= 0:
            raise UserError(f"input '{tensor.name}' has an unnamed dynamic dimension: name it ({', '.join(DYNAMIC_DIMS)})")
        else:
            low = opt = high = dim
        lows.append(low)
        opts.append(opt)
        highs.append(high)
    return ShapeRange(tuple(lows), tuple(opts), tuple(highs))


def _kv_bytes(kv_inputs: list[TensorSpec], batch: int, total: int) -> int:
    per_token = 0
    for tensor in kv_inputs:
        fixed = 1
        for dim in tensor.dims:
            fixed *= dim if isinstance(dim, int) else 1
        per_token += fixed * BYTES_PER_ELEMENT.get(tensor.dtype, 4)
    return int(2 * per_token * batch * total)  # the past goes in, the present (one longer) comes out
