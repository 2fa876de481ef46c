"""The device profile of the machine d2mc runs on: measured here, cached per machine, and chosen for judging.

A measurement made here (``d2mc profile --measure``, ``d2mc compile``) is judged on a profile of this machine. The
shipped ``host-cpu`` profile was measured on one machine and does not transfer to another, even of the same kind,
so by default (:func:`host_profile`, choice ``auto``) d2mc measures the machine on first use and keeps the result in
``$D2MC_CACHE/host-profiles/`` under a key of the CPU model, cores, memory and runtime versions
(:func:`machine_key`); ``measure`` measures again, ``shipped`` takes the shipped profile, and a ``.toml`` path takes
that file. ``--host-profile`` on ``profile`` and ``compile`` chooses, else the ``D2MC_HOST_PROFILE`` environment
variable, else ``auto``.

What :func:`measure_host` measures (a few minutes on a 2-core machine), each figure the way the roofline uses it:

- memory bandwidth: the faster of a plain streaming read and the rate at which matrix-vector products stream weight
  matrices of decoder shapes, over a working set far larger than the caches;
- matrix throughput: torch matrix products of prefill shapes per float precision, and ONNX Runtime's
  ``MatMulNBits`` products with int8 weights at accuracy level 4 (int8 activations) for ``int8``;
- per runtime (ONNX Runtime, which runs d2mc's artifacts here, and PyTorch eager): the efficiencies and the
  per-kernel overhead, fitted to decode steps and prefills of three random "fit models" shaped like the models
  d2mc judges (one of SmolLM2-135M's block shape, one with larger blocks, and a tiny one whose decode step is nearly
  all overhead), at lengths the accuracy benchmark does not judge. On ONNX Runtime the same models are measured
  with int4 and int8 weights too (``MatMulNBits``: round-to-nearest, symmetric, blocks of 32, accuracy level 4, the
  form d2mc exports), which gives the profile its ``[precisions.int4]`` and ``[precisions.int8]`` tables.

Every timing is the 20th percentile of samples taken in interleaved rounds (each round visits every model,
precision and length in turn), so a burst of load from other processes slows every point a little rather than
some points a lot, and the low percentile is the machine undisturbed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import json
import logging
import os
import platform
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from d2mc.errors import OptionError, UserError
from d2mc.measure import median_seconds, quantile
from d2mc.profiles import DeviceProfile, load_profile, load_profile_file

log = logging.getLogger(__name__)

HOST_PROFILE = "host-cpu"  # the shipped profile of a machine like the one d2mc was developed on
HOST_PROFILE_ENV = "D2MC_HOST_PROFILE"
HOST_PROFILE_CHOICES = ("auto", "measure", "shipped")  # or the path of a profile .toml
# what is measured and how it is fitted: a cached profile of another version is measured again
MEASUREMENT_VERSION = 2

# (out, in) of the MLP projections of small decoders, hidden 512 to 2048, both orientations (up and down)
GEMV_SHAPES = ((1536, 512), (512, 1536), (2816, 1024), (1024, 2816), (5632, 2048), (2048, 5632))
# (tokens, in, out): prompts of 128 and 512 tokens against the same projections
GEMM_SHAPES = tuple((t, i, o) for t in (128, 512) for o, i in GEMV_SHAPES[:4])
# fit models: SmolLM2-135M's block shape, larger blocks, and one whose decode step is nearly all overhead; the first
# two read over 70 MB per decode step even with int4 weights, more than twice a large CPU cache, as the models d2mc
# judges do (a model that fits the cache decodes several times faster than one that streams from memory)
FIT_MODELS = {
    "h576x8": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=9,
                   num_key_value_heads=3, vocab_size=49152),
    "h1536x4": dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=4, num_attention_heads=12,
                    num_key_value_heads=4, vocab_size=16000),
    "h64x16": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=16, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=16000),
}
# what each is measured at: decode steps at two contexts (which separate the KV-cache reads) and prefills; the
# accuracy benchmark judges other lengths (decode at 128, 512, 2048; prefill of 128, 512)
FIT_POINTS = {"h576x8": (("decode", 64), ("decode", 1024), ("prefill", 64), ("prefill", 192)),
              "h1536x4": (("decode", 64), ("decode", 1024), ("prefill", 64)),
              "h64x16": (("decode", 64), ("decode", 1024))}
RUNTIMES = ("onnxruntime-cpu", "pytorch-cpu")  # the first is the one the profile's own figures describe
# weight precisions fitted per runtime: the quantized ones become [precisions.NAME] tables
FIT_PRECISIONS = {"onnxruntime-cpu": ("fp32", "int4", "int8"), "pytorch-cpu": ("fp32",)}
QUANTIZED_BLOCK = 32  # MatMulNBits as d2mc exports it: blocks of 32, symmetric, int8 activations
ACCURACY_LEVEL = 4
QUANTIZED_COMPUTE = "int8"  # what MatMulNBits at accuracy level 4 computes in
# fit on the 20th percentile of step times: on a shared host, neighbours' bursts slow some steps by a third; the
# low percentile is the machine undisturbed, and it is stable from run to run where the median is not
QUIET_QUANTILE = 0.2
FIT_ROUNDS = 6
FIT_ERROR_WARNING = 0.10  # a fit that misses its own points by more describes the load more than the machine
DECODE_STEPS_PER_ROUND = 3
MEASURED_PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class PrecisionFit:
    """What kernels with weights at one quantized precision reach on one runtime: bandwidth while decoding,
    throughput while prefilling (at :data:`QUANTIZED_COMPUTE`), and their cost per kernel."""

    bandwidth_gbps: float
    tflops: float
    overhead_us: float


@dataclass(frozen=True)
class RuntimeFit:
    """What one runtime reaches on this machine: achievable bandwidth and fp32 throughput, per-kernel overhead, the
    attention kernel's fraction of the bandwidth, and per quantized weight precision its own figures."""

    runtime: str
    bandwidth_gbps: float
    tflops: float
    overhead_us: float
    attention_fraction: float = 1.0
    precisions: dict[str, PrecisionFit] = field(default_factory=dict)


@dataclass(frozen=True)
class FitPoint:
    """One measured phase of a fit model: ``tokens`` is the prefill length or the decode step's context."""

    model: str
    runtime: str
    precision: str
    phase: str
    tokens: int
    measured_s: float


@dataclass
class HostMeasurement:
    """What :func:`measure_host` measured: the machine's raw figures, one fit per runtime (``fits``, in the order of
    :data:`RUNTIMES`: the first becomes the profile's own figures), the points they were fitted on, and the machine
    (:func:`machine_key`) with the time of the measurement."""

    bandwidth_gbps: float
    tflops: dict[str, float]
    memory_gb: float
    threads: int
    stream_gbps: float  # a plain reduction over a large buffer
    fits: list[RuntimeFit] = field(default_factory=list)
    points: list[FitPoint] = field(default_factory=list)
    machine: dict = field(default_factory=dict)
    seconds: float = 0.0
    other_cores: float = 0.0  # CPU other processes used while it ran, in cores

    def _efficiencies(self, fit: RuntimeFit) -> dict[str, float]:
        return {"bandwidth_efficiency": min(1.0, fit.bandwidth_gbps / self.bandwidth_gbps),
                "compute_efficiency": min(1.0, fit.tflops / self.tflops["fp32"]),
                "kernel_overhead_us": fit.overhead_us, "attention": fit.attention_fraction}

    def _precision_tables(self, fit: RuntimeFit, prefix: str) -> str:
        tables = ""
        for precision, q in fit.precisions.items():
            tables += (f"\n[{prefix}{precision}]\n"
                       f"bandwidth_efficiency = {min(1.0, q.bandwidth_gbps / self.bandwidth_gbps):.4f}\n"
                       f"compute_efficiency = {min(1.0, q.tflops / self.tflops[QUANTIZED_COMPUTE]):.4f}\n"
                       f"kernel_overhead_us = {q.overhead_us:.2f}\n"
                       f'compute_precision = "{QUANTIZED_COMPUTE}"\n')
        return tables

    def to_toml(self, name: str = HOST_PROFILE) -> str:
        peaks = "\n".join(f"{p} = {v:.4f}" for p, v in self.tflops.items())
        shapes = ", ".join(f"{o}x{i}" for o, i in GEMV_SHAPES)
        main, others = self.fits[0], self.fits[1:]
        e = self._efficiencies(main)
        tables = self._precision_tables(main, "precisions.")
        for fit in others:
            o = self._efficiencies(fit)
            tables += (f"\n[runtimes.{fit.runtime}]\nbandwidth_efficiency = {o['bandwidth_efficiency']:.4f}\n"
                       f"compute_efficiency = {o['compute_efficiency']:.4f}\n"
                       f"kernel_overhead_us = {o['kernel_overhead_us']:.2f}\n"
                       f"op_bandwidth_efficiency = {{ attention = {o['attention']:.4f} }}\n")
            tables += self._precision_tables(fit, f"runtimes.{fit.runtime}.precisions.")
        machine = "".join(f"{k} = {json.dumps(v)}\n" for k, v in self.machine.items())
        fits = ("decode steps and prefills of random fit models (hidden x layers: not the models the roofline is "
                "judged on): " + "; ".join(f"{m} at " + ", ".join(f"{phase} {n}" for phase, n in points)
                                            for m, points in FIT_POINTS.items())
                + f"; {QUIET_QUANTILE * 100:.0f}th percentile of {FIT_ROUNDS} interleaved rounds")
        quantized = (f"MatMulNBits weights (round-to-nearest, symmetric, blocks of {QUANTIZED_BLOCK}, accuracy level "
                     f"{ACCURACY_LEVEL}: {QUANTIZED_COMPUTE} products)")
        fit_source = ("fit = \"the fitted figures reproduce their own fit points within "
                      + ", ".join(f"{fit_error(f, self.points) * 100:.1f}% ({f.runtime})" for f in self.fits)
                      + '"\n') if self.points else ""
        runtimes_source = (f'runtimes = "fitted like the figures above, on {", ".join(f.runtime for f in others)} '
                           f'runs of the same models"\n') if others else ""
        precisions_source = (f'precisions = "fitted with the figures above on {main.runtime} runs of the same models '
                             f'with {", ".join(main.precisions)} {quantized}: bandwidth and per-kernel overhead of the '
                             f'kernels that read them from decode steps, their throughput from prefills"\n'
                             if main.precisions else "")
        return f'''name = "{name}"
aliases = ["cpu"]
description = "{platform.machine()} host ({self.machine.get("cpu", "CPU")}, {os.cpu_count()} cores), measured by d2mc on {self.machine.get("measured", "")} ({self.threads} threads)"
kind = "cpu"
runtime = "{main.runtime}"
memory_bandwidth_gbps = {self.bandwidth_gbps:.2f}
memory_gb = {self.memory_gb:.0f}
tensorrt_precisions = []
bandwidth_efficiency = {e['bandwidth_efficiency']:.4f}
compute_efficiency = {e['compute_efficiency']:.4f}
kernel_overhead_us = {e['kernel_overhead_us']:.2f}

[peak_tflops]
{peaks}

[op_bandwidth_efficiency]
attention = {e['attention']:.4f}
{tables}
[machine]
{machine}
[source]
runtime = "the runtime d2mc's artifacts run on here; the efficiencies and the overhead above are its own"
machine = "the machine the figures were measured on, in {self.seconds:.0f} s while other processes used {self.other_cores:.1f} of its {os.cpu_count()} cores"
{fit_source}memory_bandwidth_gbps = "measured: the faster of a plain reduction over 512 MB ({self.stream_gbps:.1f} GB/s) and fp32 matrix-vector products streaming 256 MB of {shapes} weights, medians, {self.threads} threads"
memory_gb = "measured: physical memory reported by the operating system"
tensorrt_precisions = "TensorRT does not run on CPUs"
peak_tflops = "measured: torch matrix products of 128 and 512 tokens against 512-2816 wide MLP weights (int8: ONNX Runtime MatMulNBits with int8 weights at accuracy level {ACCURACY_LEVEL}), {self.threads} threads, median; raised to a runtime's fitted throughput where that is higher"
bandwidth_efficiency = "fitted: least squares over {main.runtime} fp32 {fits}"
compute_efficiency = "fitted: {main.runtime} fp32 prefills of the same models, median"
kernel_overhead_us = "fitted with bandwidth_efficiency (per modeled kernel)"
op_bandwidth_efficiency = "fitted with bandwidth_efficiency: decode steps at two contexts separate the KV-cache reads of the attention kernel"
{precisions_source}{runtimes_source}'''


# ---- the machine's raw figures -------------------------------------------------------------------------------------


def measure_gemv_bandwidth(megabytes: int = 256, dtype=torch.float32) -> float:
    """GB/s at which batch-1 matrix-vector products read weight matrices of decoder shapes (equal bytes of each
    shape, total bytes over total time)."""
    weights, inputs = [], []
    per_shape = megabytes * 1e6 / len(GEMV_SHAPES)
    element = torch.finfo(dtype).bits // 8
    for out_features, in_features in GEMV_SHAPES:
        count = max(1, int(per_shape / (out_features * in_features * element)))
        weights += [torch.randn(out_features, in_features).to(dtype) for _ in range(count)]
        inputs += [torch.randn(1, in_features).to(dtype)] * count
    total = sum(w.numel() for w in weights) * element
    seconds = median_seconds(lambda: [F.linear(x, w) for x, w in zip(inputs, weights, strict=True)], 1, 7)
    return total / seconds / 1e9


def measure_stream_bandwidth(megabytes: int = 512) -> float:
    """GB/s of a reduction over a buffer much larger than the caches."""
    buffer = torch.ones(megabytes * 1024 * 1024 // 4, dtype=torch.float32)
    return buffer.numel() * 4 / median_seconds(buffer.sum, 1, 5) / 1e9


def measure_matmul_tflops(dtype=torch.float32, shapes=GEMM_SHAPES) -> float:
    """Matrix throughput in TFLOP/s at ``dtype`` on prefill ``shapes`` (the median over the shapes)."""
    rates = []
    for tokens, in_features, out_features in shapes:
        a = torch.randn(tokens, in_features).to(dtype)
        b = torch.randn(out_features, in_features).to(dtype)
        seconds = median_seconds(lambda a=a, b=b: F.linear(a, b), 1, 5)
        rates.append(2 * tokens * in_features * out_features / seconds / 1e12)
    return sorted(rates)[len(rates) // 2]


def measure_nbits_tflops(bits: int = 8) -> float:
    """Throughput in TFLOP/s of ONNX Runtime's ``MatMulNBits`` (weights at ``bits``, accuracy level 4: int8
    products) on prefill shapes, the median over the shapes."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rates = []
    rng = np.random.default_rng(0)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    for tokens, in_features, out_features in GEMM_SHAPES:
        weight = numpy_helper.from_array(rng.standard_normal((in_features, out_features), np.float32), "w")
        graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "matmul",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [tokens, in_features])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [tokens, out_features])],
                                  [weight])
        model = quantize_graph(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), bits)
        session = ort.InferenceSession(model.SerializeToString(), options,
                                       providers=["CPUExecutionProvider"])
        x = {"x": rng.standard_normal((tokens, in_features), np.float32)}
        seconds = median_seconds(lambda s=session, x=x: s.run(None, x), 2, 5)
        rates.append(2 * tokens * in_features * out_features / seconds / 1e12)
    return sorted(rates)[len(rates) // 2]


def quantize_graph(model, bits: int):
    """``model`` (an ONNX ``ModelProto`` or path) with every MatMul of a constant weight, the LM head included, as
    ``com.microsoft::MatMulNBits`` at ``bits`` in the form d2mc exports: round-to-nearest, symmetric, blocks of
    :data:`QUANTIZED_BLOCK`, accuracy level :data:`ACCURACY_LEVEL`; done by ONNX Runtime's own quantizer."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    # importing the quantizer configures the root logger at INFO (logging.basicConfig): undo that
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger(nbits.__name__).setLevel(logging.WARNING)
    config = nbits.DefaultWeightOnlyQuantConfig(block_size=QUANTIZED_BLOCK, is_symmetric=True, bits=bits,
                                                accuracy_level=ACCURACY_LEVEL)
    quantizer = nbits.MatMulNBitsQuantizer(model, algo_config=config)
    quantizer.process()
    return quantizer.model.model


def quantize_onnx(onnx_path: str | Path, out_dir: str | Path, precision: str) -> Path:
    """The graph at ``onnx_path`` with int4 or int8 ``MatMulNBits`` weights (:func:`quantize_graph`), written to
    ``out_dir/model.onnx`` (weights beside it); returns that path."""
    import onnx

    model = quantize_graph(onnx.load(str(onnx_path)), {"int4": 4, "int8": 8}[precision])
    out = Path(out_dir) / "model.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, out, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=1024)
    return out


# ---- measuring models ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def measurers(model, variants) -> Iterator[dict]:
    """A measurer of ``model`` per ``(runtime, precision)`` in ``variants``: PyTorch eager as it is (fp32), ONNX
    Runtime through d2mc's own lowering, quantized by :func:`quantize_onnx` for int4/int8 (written to a temporary
    directory for the measurers' lifetime)."""
    from d2mc.measure import OnnxMeasurer, TorchMeasurer

    found = {}
    with tempfile.TemporaryDirectory(prefix="d2mc-host-") as tmp:
        fp32 = None
        for runtime, precision in variants:
            if runtime == "pytorch-cpu" and precision == "fp32":
                found[runtime, precision] = TorchMeasurer(model)
            elif runtime == "onnxruntime-cpu" and precision in ("fp32", "int4", "int8"):
                if fp32 is None:
                    from d2mc.lowering import lower_to_onnx

                    fp32 = lower_to_onnx(model, Path(tmp) / "fp32")
                path = fp32 if precision == "fp32" else quantize_onnx(fp32, Path(tmp) / precision, precision)
                found[runtime, precision] = OnnxMeasurer(path, model.config.vocab_size)
            else:
                raise ValueError(f"no measurer for {precision} weights on {runtime}")
        yield found


def measure_interleaved(calls: dict, rounds: int, repeats: Callable[[object], int],
                        say: Callable[[str], None] = log.info) -> dict[object, list[float]]:
    """Wall times of every call in ``calls`` (key -> zero-argument callable), ``repeats(key)`` per round, in
    ``rounds`` rounds that each visit every call in turn (after one untimed call each)."""
    for fn in calls.values():
        fn()
    samples = {key: [] for key in calls}
    for round_ in range(rounds):
        say(f"round {round_ + 1} of {rounds}")
        for key, fn in calls.items():
            for _ in range(repeats(key)):
                start = time.perf_counter()
                fn()
                samples[key].append(time.perf_counter() - start)
    return samples


def _fit_config(name: str):
    from transformers import LlamaConfig

    return LlamaConfig(tie_word_embeddings=True, max_position_embeddings=4096, **FIT_MODELS[name])


def _fit_model(name: str):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(_fit_config(name)).eval()


def fit_point_calls(stack: contextlib.ExitStack, runtimes: tuple[str, ...] = RUNTIMES,
                    precisions: dict[str, tuple[str, ...]] = FIT_PRECISIONS,
                    say: Callable[[str], None] = log.info) -> dict[FitPoint, Callable[[], object]]:
    """One repeatable call per point of the fit models on each runtime at each of its ``precisions`` (the points'
    ``measured_s`` still 0), their measurers kept open by ``stack``: what :func:`measure_fit_points` times."""
    calls = {}
    for name in FIT_MODELS:
        say(f"fit model {name}")
        variants = [(r, p) for r in runtimes for p in precisions[r]]
        found = stack.enter_context(measurers(_fit_model(name), variants))
        for (runtime, precision), measurer in found.items():
            for phase, tokens in FIT_POINTS[name]:
                calls[FitPoint(name, runtime, precision, phase, tokens, 0.0)] = measurer.phase_call(phase, tokens)
    return calls


def fit_repeats(point: FitPoint) -> int:
    """Timed calls of ``point`` per round: a few decode steps, one prefill."""
    return DECODE_STEPS_PER_ROUND if point.phase == "decode" else 1


def measured_points(samples: dict[FitPoint, list[float]]) -> list[FitPoint]:
    """Each point with its measured time, the :data:`QUIET_QUANTILE` of its samples."""
    return [dataclasses.replace(p, measured_s=quantile(s, QUIET_QUANTILE)) for p, s in samples.items()]


def measure_fit_points(runtimes: tuple[str, ...] = RUNTIMES, say: Callable[[str], None] = log.info,
                       rounds: int = FIT_ROUNDS) -> list[FitPoint]:
    """Decode steps and prefills of the fit models on each runtime at each of its :data:`FIT_PRECISIONS`, measured
    in interleaved rounds (:func:`measure_interleaved`), each the :data:`QUIET_QUANTILE` of its samples."""
    with contextlib.ExitStack() as stack:
        calls = fit_point_calls(stack, runtimes, say=say)
        return measured_points(measure_interleaved(calls, rounds, fit_repeats, say))


# ---- fitting -------------------------------------------------------------------------------------------------------


def fitted_profile(fit: RuntimeFit) -> DeviceProfile:
    """The profile a fit describes, in absolute figures (a peak of 1 TFLOP/s and a bandwidth of 1 GB/s, scaled by
    efficiencies that are the fitted TFLOP/s and GB/s): it predicts what the written profile predicts."""
    precisions = {p: {"bandwidth_efficiency": q.bandwidth_gbps, "compute_efficiency": q.tflops,
                      "kernel_overhead_us": q.overhead_us, "compute_precision": QUANTIZED_COMPUTE}
                  for p, q in fit.precisions.items()}
    return DeviceProfile(name="fit", description="", kind="cpu", memory_bandwidth_gbps=1.0, memory_gb=1,
                         peak_tflops={"fp32": 1.0, QUANTIZED_COMPUTE: 1.0}, bandwidth_efficiency=fit.bandwidth_gbps,
                         compute_efficiency=fit.tflops, kernel_overhead_us=fit.overhead_us, source={},
                         op_bandwidth_efficiency={"attention": fit.attention_fraction}, runtime=fit.runtime,
                         precisions=precisions)


@functools.cache
def _fit_arch(name: str):
    from d2mc.arch import ModelArch

    return ModelArch.from_config(_fit_config(name))


def predict_point(point: FitPoint, profile: DeviceProfile) -> float:
    """Seconds the roofline of ``profile`` predicts for ``point`` (what the fits make equal to its measured time)."""
    return _point_cost(point, profile)[0].seconds


def _point_cost(point: FitPoint, profile: DeviceProfile):
    """The roofline of ``point`` on ``profile``, and the settings it was costed with."""
    from d2mc.roofline import RooflineSettings, estimate_phase

    settings = RooflineSettings(prefill=point.tokens, context=point.tokens, precision=point.precision,
                                block_size=QUANTIZED_BLOCK, all_logits=point.runtime == "onnxruntime-cpu")
    return estimate_phase(_fit_arch(point.model), profile, point.phase, settings), settings


def _quantized_ops(point: FitPoint, cost, settings) -> tuple[list, list]:
    """The operators of ``cost`` whose weights are at the point's quantized precision, and the others."""
    from d2mc.roofline import weight_precision

    mine = [o for o in cost.ops if weight_precision(o.op, settings) == point.precision]
    return mine, [o for o in cost.ops if weight_precision(o.op, settings) != point.precision]


def fit_decode(points: list[FitPoint], base: RuntimeFit | None = None) -> tuple[float, float, float]:
    """Achievable bandwidth (GB/s), per-kernel overhead (us) and the attention kernel's fraction of that bandwidth,
    by least squares on relative error over decode points (a CPU decode step is memory-bound throughout).

    Without ``base`` (fp32 points): measured = other bytes / bandwidth + attention bytes / (bandwidth * fraction) +
    kernels * overhead. With ``base`` (the runtime's fp32 fit) for points of one quantized precision: the operators
    that read those weights get their own bandwidth and overhead, the others are predicted by ``base``; the attention
    fraction returned is then ``base``'s."""
    unit = fitted_profile(RuntimeFit("fit", 1.0, 1e6, 0.0, 1.0))  # seconds = GB read
    decode = [p for p in points if p.phase == "decode"]
    if not decode:
        raise ValueError("no decode points to fit")
    rows, targets = [], []  # per point: [GB, kernels / 1e6, attention GB] and the seconds they take
    for p in decode:
        cost, settings = _point_cost(p, unit)
        if base is None:
            attention = sum(o.bytes for o in cost.ops if o.op == "attention")
            rows.append([(cost.bytes - attention) / 1e9, sum(o.kernels for o in cost.ops) / 1e6, attention / 1e9])
            targets.append(p.measured_s)
        else:
            mine, _ = _quantized_ops(p, cost, settings)
            fitted, _ = _point_cost(p, fitted_profile(base))
            _, others = _quantized_ops(p, fitted, settings)
            rows.append([sum(o.bytes for o in mine) / 1e9, sum(o.kernels for o in mine) / 1e6])
            targets.append(p.measured_s - sum(o.seconds for o in others))
    measured = np.array([p.measured_s for p in decode])  # relative error: every point counts alike
    rows, targets = np.array(rows) / measured[:, None], np.array(targets) / measured
    solution = _least_squares(rows, targets)
    if base is None and solution[2] <= solution[0]:  # attention streams as well as the rest: one bandwidth for all
        folded = np.stack([rows[:, 0] + rows[:, 2], rows[:, 1]], axis=1)
        solution = _least_squares(folded, targets)
        solution.append(solution[0])
    inverse_bandwidth, overhead = solution[0], solution[1]
    if inverse_bandwidth <= 0:
        raise RuntimeError("decode fit gave no positive bandwidth: the measurements are too noisy; measure the host "
                           "again")
    fraction = inverse_bandwidth / solution[2] if base is None else base.attention_fraction
    return float(1 / inverse_bandwidth), float(overhead), float(fraction)


def _least_squares(rows: np.ndarray, targets: np.ndarray) -> list[float]:
    """Non-negative least squares by dropping the per-kernel overhead (column 1) when it comes out negative (noise
    on a machine whose overhead is near zero)."""
    solution, *_ = np.linalg.lstsq(rows, targets, rcond=None)
    if solution[1] >= 0:
        return list(solution)
    kept = [i for i in range(rows.shape[1]) if i != 1]
    partial, *_ = np.linalg.lstsq(rows[:, kept], targets, rcond=None)
    solution = np.zeros(rows.shape[1])
    solution[kept] = partial
    return list(solution)


def fit_compute(points: list[FitPoint], fit: RuntimeFit, precision: str = "fp32") -> float:
    """Achievable TFLOP/s (of the kernels with weights at ``precision``, or of all kernels for fp32) that makes the
    roofline match each prefill point (bisection), the median over the points."""
    rates = []
    for p in points:
        if p.phase != "prefill":
            continue
        low, high = 1e-4, 1e3
        for _ in range(60):
            mid = (low * high) ** 0.5
            if precision == "fp32":
                trial = dataclasses.replace(fit, tflops=mid)
            else:
                q = fit.precisions[precision]
                trial = dataclasses.replace(fit, precisions={**fit.precisions,
                                                             precision: dataclasses.replace(q, tflops=mid)})
            seconds = predict_point(p, fitted_profile(trial))
            low, high = (mid, high) if seconds > p.measured_s else (low, mid)
        rates.append((low * high) ** 0.5)
    if not rates:
        raise ValueError("no prefill points to fit")
    return float(np.median(rates))


def fit_error(fit: RuntimeFit, points: list[FitPoint]) -> float:
    """The largest relative error of ``fit``'s roofline on the points of its runtime it was fitted on: how well any
    figures describe the machine. On a machine whose cores other processes keep busy a step's time is not linear
    in its work (a short step runs in one time slice, a long one waits its turn many times), and no figures
    reproduce both."""
    profile = fitted_profile(fit)
    return max(abs(predict_point(p, profile) / p.measured_s - 1) for p in points if p.runtime == fit.runtime)


def fit_runtime(runtime: str, points: list[FitPoint]) -> RuntimeFit:
    """Every figure of ``runtime`` from its points: fp32 decode (bandwidth, overhead, attention fraction), fp32
    prefill (throughput), then per quantized precision its decode and prefill with the fp32 figures for the rest."""
    mine = [p for p in points if p.runtime == runtime]
    fp32 = [p for p in mine if p.precision == "fp32"]
    bandwidth, overhead, attention = fit_decode(fp32)
    fit = RuntimeFit(runtime, bandwidth, 1.0, overhead, attention)
    fit = dataclasses.replace(fit, tflops=fit_compute(fp32, fit))
    for precision in sorted({p.precision for p in mine} - {"fp32"}):
        quantized = [p for p in mine if p.precision == precision]
        q_bandwidth, q_overhead, _ = fit_decode(quantized, base=fit)
        fit = dataclasses.replace(fit, precisions={**fit.precisions,
                                                   precision: PrecisionFit(q_bandwidth, 1.0, q_overhead)})
        q = dataclasses.replace(fit.precisions[precision], tflops=fit_compute(quantized, fit, precision))
        fit = dataclasses.replace(fit, precisions={**fit.precisions, precision: q})
    return fit


def measure_host(progress=None, runtimes: tuple[str, ...] = RUNTIMES) -> HostMeasurement:
    """Measure this machine (memory bandwidth, matrix throughput per precision) and fit the roofline's efficiencies
    and per-kernel overheads to runs of the fit models on each runtime (see the module text)."""
    from d2mc.measure import OtherLoad

    say = progress or log.info
    start = time.perf_counter()
    with OtherLoad() as load:
        say("memory bandwidth (matrix-vector products and a streaming read)")
        stream = measure_stream_bandwidth()
        bandwidth = max(measure_gemv_bandwidth(), stream)
        tflops = {}
        for name, dtype in MEASURED_PRECISIONS.items():
            say(f"matrix throughput ({name})")
            # half precisions run far slower than fp32 on most CPUs: their shorter prompts are enough
            tflops[name] = measure_matmul_tflops(dtype, GEMM_SHAPES if name == "fp32" else GEMM_SHAPES[:4])
        if "onnxruntime-cpu" in runtimes:
            say(f"matrix throughput ({QUANTIZED_COMPUTE}, MatMulNBits)")
            tflops[QUANTIZED_COMPUTE] = measure_nbits_tflops()
        points = measure_fit_points(runtimes, say)
    cores = os.cpu_count() or 1
    if load.cores > cores / 2:
        log.warning("other processes used %.1f of %d cores while this machine was measured: its profile may be too "
                    "slow; measure again when it is quieter (--host-profile measure)", load.cores, cores)
    fits = [fit_runtime(runtime, points) for runtime in runtimes]
    worst = max(fits, key=lambda f: fit_error(f, points))
    if fit_error(worst, points) > FIT_ERROR_WARNING:
        log.warning("the fitted %s figures miss their own fit points by up to %.0f%%: this machine was too busy to "
                    "describe; measure again when it is quieter (--host-profile measure)", worst.runtime,
                    fit_error(worst, points) * 100)
    # the profile keeps the raw figures and each runtime's fraction of them: a fit above a raw figure raises it
    bandwidth = max([bandwidth] + [f.bandwidth_gbps for f in fits]
                    + [q.bandwidth_gbps for f in fits for q in f.precisions.values()])
    tflops["fp32"] = max([tflops["fp32"]] + [f.tflops for f in fits])
    if QUANTIZED_COMPUTE in tflops:
        tflops[QUANTIZED_COMPUTE] = max([tflops[QUANTIZED_COMPUTE]]
                                        + [q.tflops for f in fits for q in f.precisions.values()])
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    machine = {**machine_key(), "measured": datetime.datetime.now().strftime("%Y-%m-%d %H:%M")}
    return HostMeasurement(bandwidth, tflops, memory_gb, torch.get_num_threads(), stream, fits, points, machine,
                           time.perf_counter() - start, load.cores)


def write_profile(measurement: HostMeasurement | str, path: str | Path, name: str = HOST_PROFILE) -> Path:
    """Write a measured profile (or its TOML text) and validate it by loading it back."""
    from d2mc.outputs import atomic_output_file

    text = measurement if isinstance(measurement, str) else measurement.to_toml(name)
    path = Path(path)
    with atomic_output_file(path) as tmp:
        tmp.write_text(text)
        load_profile_file(tmp)
    return path


# ---- which profile of this machine ---------------------------------------------------------------------------------


def machine_key() -> dict[str, str | int]:
    """What a cached profile must share with this machine to be used here: CPU model, cores, memory (GB), the
    versions of the runtimes it was fitted on, and :data:`MEASUREMENT_VERSION`."""
    import onnxruntime

    return {"cpu": _cpu_model(), "cores": os.cpu_count() or 1,
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9),
            "onnxruntime": onnxruntime.__version__, "torch": torch.__version__.split("+")[0],
            "method": MEASUREMENT_VERSION}


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def cached_profile_path(key: dict | None = None) -> Path:
    """Where the profile measured on a machine with ``key`` (default: this one) is cached."""
    from d2mc.loading import cache_dir

    key = key or machine_key()
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", f"{key['cpu']}-{key['cores']}cores-{key['memory_gb']}gb-"
                                           f"ort{key['onnxruntime']}-torch{key['torch']}-v{key['method']}")
    return cache_dir() / "host-profiles" / f"{slug.strip('-')}.toml"


@dataclass(frozen=True)
class HostProfile:
    """The profile of this machine that measurements here are judged on, and where it comes from: ``measured`` (just
    now, and cached), ``cached`` (measured here before), ``shipped`` (d2mc's own, measured elsewhere) or ``file``."""

    profile: DeviceProfile
    origin: str

    def describe(self) -> str:
        """One phrase for reports: which profile, measured where and when."""
        p = self.profile
        machine = {k: v for k, v in p.machine.items() if k != "measured"}
        when = p.machine.get("measured", "an unknown date")
        if self.origin == "measured":
            return f"{p.name} measured on this machine now ({when}; cached in {p.path})"
        if self.origin == "cached":
            return f"{p.name} measured on this machine on {when} (cached in {p.path})"
        where = "this machine" if machine == machine_key() else (
            f"{machine['cpu']}, {machine['cores']} cores" if "cpu" in machine else "another machine")
        if self.origin == "shipped":
            return f"{p.name} shipped with d2mc (measured on {where}, {when})"
        return f"{p.path} (measured on {where}, {when})"


def host_profile(choice: str | HostProfile | None = None, *, measure_missing: bool = True,
                 progress: Callable[[str], None] | None = None) -> HostProfile:
    """The profile of this machine for ``choice`` (``auto``, ``measure``, ``shipped`` or a ``.toml`` path; default:
    ``$D2MC_HOST_PROFILE``, else ``auto``; a :class:`HostProfile` chosen before is returned as it is). ``auto``
    takes this machine's cached profile, else measures the machine (a few minutes) and caches it, or without
    ``measure_missing`` falls back to the shipped profile."""
    if isinstance(choice, HostProfile):
        return choice
    if choice is None and os.environ.get(HOST_PROFILE_ENV):
        choice = os.environ[HOST_PROFILE_ENV]
        if choice not in HOST_PROFILE_CHOICES and not Path(choice).expanduser().is_file():
            raise UserError(f"{HOST_PROFILE_ENV} must be {', '.join(HOST_PROFILE_CHOICES)} or a device profile .toml "
                            f"file, not '{choice}'")
    choice = choice or "auto"
    if choice == "shipped":
        return HostProfile(load_profile(HOST_PROFILE), "shipped")
    if choice not in HOST_PROFILE_CHOICES:
        if not (choice.endswith(".toml") or Path(choice).expanduser().is_file()):
            raise OptionError(f"{{host_profile}} must be {', '.join(HOST_PROFILE_CHOICES)} or a device profile .toml "
                              f"file, not '{choice}'")
        return HostProfile(load_profile_file(Path(choice).expanduser()), "file")
    path = cached_profile_path()
    if choice == "auto":
        cached = _load_cached(path)
        if cached is not None:
            return HostProfile(cached, "cached")
        if not measure_missing:
            return HostProfile(load_profile(HOST_PROFILE), "shipped")
    say = progress or log.info
    say("measuring this machine for its device profile (once per machine; a few minutes)")
    write_profile(measure_host(progress=say), path)
    return HostProfile(load_profile_file(path), "measured")


def _load_cached(path: Path) -> DeviceProfile | None:
    """The profile cached at ``path`` if it is valid and was measured on this machine, else None."""
    if not path.is_file():
        return None
    try:
        profile = load_profile_file(path)
    except UserError as exc:
        log.warning("ignoring the cached host profile (%s): measuring again", exc)
        return None
    if {k: v for k, v in profile.machine.items() if k != "measured"} != machine_key():
        return None
    return profile
