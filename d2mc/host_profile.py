"""Measure the machine d2mc runs on and write its device profile (``d2mc profile --measure-host``).

Figures, each measured the way the roofline uses it:

- memory bandwidth: the faster of a plain streaming read and the rate at which matrix-vector products stream
  weight matrices of decoder shapes (what a batch-1 decode step does), over a working set far larger than the
  caches;
- matrix throughput per precision: matrix products of prefill shapes (a few hundred tokens against decoder
  weights);
- per runtime (ONNX Runtime, which runs d2mc's artifacts here, and PyTorch eager): the efficiencies and the
  per-operator overhead, fitted to runs of three random "fit models" (one whose decode step is nearly all
  runtime overhead, two whose steps are nearly all weight reads): the fraction of the memory bandwidth and of the
  matrix throughput that a whole model reaches on that runtime, and its cost per modeled kernel. The models the
  roofline is judged on (``benchmarks/roofline_accuracy.py``) are not among them.

The profile's own figures describe the first runtime of :data:`RUNTIMES`; the others become ``[runtimes.NAME]``
tables (:meth:`d2mc.profiles.DeviceProfile.for_runtime`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import tempfile
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from d2mc.measure import median_seconds

log = logging.getLogger(__name__)

# (out, in) of the MLP projections of small decoders, hidden 512 to 2048, both orientations (up and down)
GEMV_SHAPES = ((1536, 512), (512, 1536), (2816, 1024), (1024, 2816), (5632, 2048), (2048, 5632))
# (tokens, in, out): prompts of 128 and 512 tokens against the same projections
GEMM_SHAPES = tuple((t, i, o) for t in (128, 512) for o, i in GEMV_SHAPES[:4])
# fit models: one whose decode step is nearly all overhead, two whose steps are nearly all weight reads
FIT_MODELS = {
    "h64x16": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=16, num_attention_heads=4,
                   num_key_value_heads=2),
    "h640x10": dict(hidden_size=640, intermediate_size=1728, num_hidden_layers=10, num_attention_heads=10,
                    num_key_value_heads=2),
    "h1280x6": dict(hidden_size=1280, intermediate_size=3456, num_hidden_layers=6, num_attention_heads=10,
                    num_key_value_heads=2),
}
FIT_POINTS = {"h64x16": (("decode", 64),),
              "h640x10": (("decode", 64), ("decode", 1024), ("decode", 2048), ("prefill", 256)),
              "h1280x6": (("decode", 256), ("decode", 1536), ("prefill", 256))}
# fit on the 20th percentile of step times: on a shared host, neighbours' bursts of memory traffic slow some steps
# by a third; the low percentile is the machine undisturbed, and it is stable from run to run where the median is not
QUIET_QUANTILE = 0.2
MEASURED_PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
RUNTIMES = ("onnxruntime-cpu", "pytorch-cpu")  # the first is the one the profile's own figures describe


@dataclass
class RuntimeFit:
    """What one runtime reaches on this machine: achievable bandwidth and fp32 throughput, per-kernel overhead, and
    the attention kernel's fraction of the bandwidth, with the points they were fitted on."""

    runtime: str
    bandwidth_gbps: float
    tflops: float
    overhead_us: float
    attention_fraction: float = 1.0
    points: list = field(default_factory=list)


@dataclass
class HostMeasurement:
    """What :func:`measure_host` measured: the machine's raw figures and one fit per runtime (``fits``, in the order
    of :data:`RUNTIMES`: the first becomes the profile's own efficiencies)."""

    bandwidth_gbps: float
    tflops: dict[str, float]
    memory_gb: float
    threads: int
    stream_gbps: float  # a plain reduction over a large buffer
    fits: list[RuntimeFit] = field(default_factory=list)

    def _efficiencies(self, fit: RuntimeFit) -> dict[str, float]:
        return {"bandwidth_efficiency": min(1.0, fit.bandwidth_gbps / self.bandwidth_gbps),
                "compute_efficiency": min(1.0, fit.tflops / self.tflops["fp32"]),
                "kernel_overhead_us": fit.overhead_us, "attention": fit.attention_fraction}

    def to_toml(self, name: str = "host-cpu") -> str:
        peaks = "\n".join(f"{p} = {v:.4f}" for p, v in self.tflops.items())
        shapes = ", ".join(f"{o}x{i}" for o, i in GEMV_SHAPES)
        fit_names = ", ".join(FIT_MODELS)
        main, others = self.fits[0], self.fits[1:]
        e = self._efficiencies(main)
        tables = ""
        for fit in others:
            o = self._efficiencies(fit)
            tables += (f"\n[runtimes.{fit.runtime}]\nbandwidth_efficiency = {o['bandwidth_efficiency']:.3f}\n"
                       f"compute_efficiency = {o['compute_efficiency']:.3f}\n"
                       f"kernel_overhead_us = {o['kernel_overhead_us']:.1f}\n"
                       f"op_bandwidth_efficiency = {{ attention = {o['attention']:.3f} }}\n")
        runtimes_source = (f'runtimes = "fitted like the figures above, on {", ".join(f.runtime for f in others)} '
                           f'runs of the same models"\n') if others else ""
        return f'''name = "{name}"
aliases = ["cpu"]
description = "{platform.machine()} host, {os.cpu_count()} cores, measured by d2mc profile --measure-host ({self.threads} threads)"
kind = "cpu"
runtime = "{main.runtime}"
memory_bandwidth_gbps = {self.bandwidth_gbps:.2f}
memory_gb = {self.memory_gb:.0f}
tensorrt_precisions = []
bandwidth_efficiency = {e['bandwidth_efficiency']:.3f}
compute_efficiency = {e['compute_efficiency']:.3f}
kernel_overhead_us = {e['kernel_overhead_us']:.1f}

[peak_tflops]
{peaks}

[op_bandwidth_efficiency]
attention = {e['attention']:.3f}
{tables}
[source]
runtime = "the runtime d2mc's artifacts run on here; the efficiencies and the overhead above are its own"
memory_bandwidth_gbps = "measured: the faster of a plain reduction over 512 MB ({self.stream_gbps:.1f} GB/s) and fp32 matrix-vector products streaming 256 MB of {shapes} weights, medians, {self.threads} threads"
memory_gb = "measured: physical memory reported by the operating system"
tensorrt_precisions = "TensorRT does not run on CPUs"
peak_tflops = "measured: torch matrix products of 128 and 512 tokens against 512-2816 wide MLP weights, {self.threads} threads, median"
bandwidth_efficiency = "fitted: least squares over {main.runtime} decode steps (20th percentile of 40) of {fit_names} (random weights; not the models the roofline is judged on)"
compute_efficiency = "fitted: {main.runtime} prefills of the same models, median"
kernel_overhead_us = "fitted with bandwidth_efficiency (per modeled kernel)"
op_bandwidth_efficiency = "fitted with bandwidth_efficiency: decode steps of the same models at contexts 64 to 2048 separate the KV-cache reads of the attention kernel"
{runtimes_source}'''


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


def measure_matmul_tflops(dtype=torch.float32) -> float:
    """Matrix throughput in TFLOP/s at ``dtype`` on prefill shapes (the median over the shapes)."""
    rates = []
    for tokens, in_features, out_features in GEMM_SHAPES:
        a = torch.randn(tokens, in_features).to(dtype)
        b = torch.randn(out_features, in_features).to(dtype)
        seconds = median_seconds(lambda a=a, b=b: F.linear(a, b), 1, 5)
        rates.append(2 * tokens * in_features * out_features / seconds / 1e12)
    return sorted(rates)[len(rates) // 2]


@dataclass(frozen=True)
class FitPoint:
    """One model and phase the efficiency factors are fitted on, with its measured seconds."""

    model: str
    phase: str
    tokens: int
    bytes: float
    flops: float
    kernels: int
    measured_s: float
    attention_bytes: float = 0.0  # KV-cache reads and writes, part of ``bytes``
    all_logits: bool = False  # the runtime's prefill computes logits at every position


def _fit_models():
    """Random Llama models for fitting: none of them is a model the roofline is judged on in the benchmark."""
    from transformers import LlamaConfig, LlamaForCausalLM

    for name, dims in FIT_MODELS.items():
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=16000, tie_word_embeddings=True, max_position_embeddings=4096, **dims)
        yield name, LlamaForCausalLM(config).eval()


@contextlib.contextmanager
def runtime_measurer(runtime: str, model):
    """A measurer of ``model`` on ``runtime``: PyTorch eager as it is, ONNX Runtime through d2mc's own lowering
    (written to a temporary directory for the measurer's lifetime)."""
    from d2mc.measure import OnnxMeasurer, TorchMeasurer

    if runtime == "pytorch-cpu":
        yield TorchMeasurer(model)
    elif runtime == "onnxruntime-cpu":
        from d2mc.lowering import lower_to_onnx

        with tempfile.TemporaryDirectory(prefix="d2mc-host-") as tmp:
            yield OnnxMeasurer(lower_to_onnx(model, tmp), model.config.vocab_size)
    else:
        raise ValueError(f"no measurer for runtime {runtime!r} (known: {', '.join(RUNTIMES)})")


def measure_fit_points(say=log.info, runtime: str = RUNTIMES[0]) -> list[FitPoint]:
    """Decode and prefill times of the fit models on ``runtime``, with their roofline bytes, FLOPs and kernels."""
    from d2mc.arch import ModelArch
    from d2mc.measure import measure_quietly, quantile
    from d2mc.roofline import RooflineSettings, estimate_phase

    unit = _unit_profile()
    points = []
    for name, model in _fit_models():
        say(f"fit model {name} on {runtime}")
        arch = ModelArch.from_config(model.config)
        with runtime_measurer(runtime, model) as measurer:
            for phase, length in FIT_POINTS[name]:
                settings = RooflineSettings(prefill=length, context=length, precision="fp32",
                                            all_logits=measurer.all_logits)
                cost = estimate_phase(arch, unit, phase, settings)
                repeats = 40 if phase == "decode" else 7
                samples, _ = measure_quietly(partial(measurer.samples, phase, length, warmup=4, repeats=repeats))
                seconds = quantile(samples, QUIET_QUANTILE)
                points.append(FitPoint(name, phase, length, cost.bytes, cost.flops, sum(o.kernels for o in cost.ops),
                                       seconds, sum(o.bytes for o in cost.ops if o.op == "attention"),
                                       measurer.all_logits))
    return points


def _unit_profile(bandwidth_gbps: float = 1.0, tflops: float = 1.0, overhead_us: float = 0.0,
                  attention_fraction: float = 1.0):
    from d2mc.profiles import DeviceProfile

    return DeviceProfile(name="fit", description="", kind="cpu", memory_bandwidth_gbps=bandwidth_gbps, memory_gb=1,
                         peak_tflops={"fp32": tflops}, bandwidth_efficiency=1.0, compute_efficiency=1.0,
                         kernel_overhead_us=overhead_us, source={},
                         op_bandwidth_efficiency={"attention": attention_fraction})


def fit_decode(points: list[FitPoint]) -> tuple[float, float, float]:
    """Achievable bandwidth (GB/s), per-kernel overhead (us) and the attention kernel's fraction of that bandwidth,
    from decode points by least squares on relative error:
    measured = other bytes / bandwidth + attention bytes / (bandwidth * fraction) + kernels * overhead
    (a CPU decode step is memory-bound throughout). Points at several contexts separate the attention term."""
    import numpy as np

    decode = [p for p in points if p.phase == "decode"]
    rows = np.array([[(p.bytes - p.attention_bytes) / p.measured_s, p.kernels / p.measured_s,
                      p.attention_bytes / p.measured_s] for p in decode])
    ones = np.ones(len(decode))
    (inverse_bandwidth, overhead, inverse_attention), *_ = np.linalg.lstsq(rows, ones, rcond=None)
    if inverse_attention <= inverse_bandwidth:  # attention streams as well as the rest: one bandwidth for all
        folded = np.stack([rows[:, 0] + rows[:, 2], rows[:, 1]], axis=1)
        (inverse_bandwidth, overhead), *_ = np.linalg.lstsq(folded, ones, rcond=None)
        inverse_attention = inverse_bandwidth
    if inverse_bandwidth <= 0:
        raise RuntimeError("decode fit gave no positive bandwidth: the measurements are too noisy; measure the host again")
    return 1 / inverse_bandwidth / 1e9, max(0.0, overhead * 1e6), inverse_bandwidth / inverse_attention


def fit_compute(points: list[FitPoint], bandwidth_gbps: float, overhead_us: float,
                attention_fraction: float = 1.0) -> float:
    """Achievable TFLOP/s that makes the roofline match each prefill point (bisection), median over the points."""
    from d2mc.arch import ModelArch
    from d2mc.roofline import RooflineSettings, estimate_phase

    rates = []
    for name, model in _fit_models():
        arch = ModelArch.from_config(model.config)
        for p in points:
            if p.model != name or p.phase != "prefill":
                continue
            low, high = 1e-3, 10.0
            for _ in range(40):
                mid = (low * high) ** 0.5
                cost = estimate_phase(arch, _unit_profile(bandwidth_gbps, mid, overhead_us, attention_fraction),
                                      "prefill",
                                      RooflineSettings(prefill=p.tokens, precision="fp32",
                                                       all_logits=p.all_logits))
                low, high = (mid, high) if cost.seconds > p.measured_s else (low, mid)
            rates.append((low * high) ** 0.5)
    return sorted(rates)[len(rates) // 2]


def measure_host(progress=None, runtimes: tuple[str, ...] = RUNTIMES) -> HostMeasurement:
    """Measure this machine (memory bandwidth, matrix throughput per precision) and fit the roofline's efficiencies
    and per-kernel overhead to runs of the fit models on each runtime."""
    say = progress or log.info
    say("memory bandwidth (matrix-vector products and a streaming read)")
    stream = measure_stream_bandwidth()
    bandwidth = max(measure_gemv_bandwidth(), stream)
    tflops = {}
    for name, dtype in MEASURED_PRECISIONS.items():
        say(f"matrix throughput ({name})")
        tflops[name] = measure_matmul_tflops(dtype)
    fits = []
    for runtime in runtimes:
        points = measure_fit_points(say, runtime)
        achievable_bandwidth, overhead, attention_fraction = fit_decode(points)
        achievable_flops = fit_compute(points, achievable_bandwidth, overhead, attention_fraction)
        fits.append(RuntimeFit(runtime, achievable_bandwidth, achievable_flops, overhead, attention_fraction, points))
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    # the profile keeps the raw figures and each runtime's fraction of them: a fit above a raw figure raises it
    bandwidth = max([bandwidth] + [f.bandwidth_gbps for f in fits])
    tflops["fp32"] = max([tflops["fp32"]] + [f.tflops for f in fits])
    return HostMeasurement(bandwidth, tflops, memory_gb, torch.get_num_threads(), stream, fits)


def write_profile(measurement: HostMeasurement | str, path: str | Path, name: str = "host-cpu") -> Path:
    """Write a measured profile (or its TOML text) and validate it by loading it back."""
    from d2mc.outputs import atomic_output_file
    from d2mc.profiles import load_profile_file

    text = measurement if isinstance(measurement, str) else measurement.to_toml(name)
    path = Path(path)
    with atomic_output_file(path) as tmp:
        tmp.write_text(text)
        load_profile_file(tmp)
    return path
