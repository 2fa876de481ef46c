"""How the roofline figures of this machine are fitted to measured runs of the fit models.

The fit models are random decoders shaped like the models d2mc judges (:data:`FIT_MODELS`: SmolLM2-135M's block
shape, larger blocks, and a tiny one whose decode step is nearly all overhead), measured at :data:`FIT_POINTS` (lengths
the accuracy benchmark does not judge) on each runtime at each of its :data:`FIT_PRECISIONS`. Per runtime
(:func:`fit_runtime`): fp32 decode steps give the achievable bandwidth, the per-kernel overhead and the attention
kernel's fraction of the bandwidth (least squares on relative error); fp32 prefills the achievable throughput; and
per quantized precision, its decode steps and prefills the figures of the kernels that read those weights, the
fp32 figures holding for the rest. :func:`fit_error` says how well the figures reproduce their own points.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field

import numpy as np

from d2mc.profiles import DeviceProfile

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


def fit_config(name: str):
    """The transformers config of the fit model ``name``."""
    from transformers import LlamaConfig

    return LlamaConfig(tie_word_embeddings=True, max_position_embeddings=4096, **FIT_MODELS[name])


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

    return ModelArch.from_config(fit_config(name))


def predict_point(point: FitPoint, profile: DeviceProfile) -> float:
    """Seconds the roofline of ``profile`` predicts for ``point`` (what the fits make equal to its measured time)."""
    return _point_cost(point, profile).seconds


def _point_cost(point: FitPoint, profile: DeviceProfile):
    """The roofline of ``point`` on ``profile``."""
    from d2mc.roofline import RooflineSettings, estimate_phase

    settings = RooflineSettings(prefill=point.tokens, context=point.tokens, precision=point.precision,
                                block_size=QUANTIZED_BLOCK, all_logits=point.runtime == "onnxruntime-cpu")
    return estimate_phase(_fit_arch(point.model), profile, point.phase, settings)


def _quantized_ops(point: FitPoint, cost) -> tuple[list, list]:
    """The operators of ``cost`` whose weights are at the point's quantized precision, and the others."""
    mine = [o for o in cost.ops if o.weights == point.precision]
    return mine, [o for o in cost.ops if o.weights != point.precision]


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
        cost = _point_cost(p, unit)
        if base is None:
            attention = sum(o.bytes for o in cost.ops if o.op == "attention")
            rows.append([(cost.bytes - attention) / 1e9, sum(o.kernels for o in cost.ops) / 1e6, attention / 1e9])
            targets.append(p.measured_s)
        else:
            mine, _ = _quantized_ops(p, cost)
            fitted = _point_cost(p, fitted_profile(base))
            _, others = _quantized_ops(p, fitted)
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
