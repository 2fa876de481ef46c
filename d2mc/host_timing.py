"""Timing this machine for its device profile: raw figures (memory bandwidth, matrix throughput) and runs of the
fit models (:mod:`d2mc.host_fit`) on each runtime, in interleaved rounds.

Every timing of a model is the :data:`~d2mc.host_fit.QUIET_QUANTILE` of samples taken in interleaved rounds (each
round visits every model, precision and length in turn), so a burst of load from other processes slows every point
a little rather than some points a lot, and the low percentile is the machine undisturbed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from d2mc.host_fit import (
    ACCURACY_LEVEL,
    FIT_MODELS,
    FIT_POINTS,
    FIT_PRECISIONS,
    QUANTIZED_BLOCK,
    QUIET_QUANTILE,
    RUNTIMES,
    FitPoint,
    fit_config,
)
from d2mc.measure import median_seconds, quantile

log = logging.getLogger(__name__)

# (out, in) of the MLP projections of small decoders, hidden 512 to 2048, both orientations (up and down)
GEMV_SHAPES = ((1536, 512), (512, 1536), (2816, 1024), (1024, 2816), (5632, 2048), (2048, 5632))
# (tokens, in, out): prompts of 128 and 512 tokens against the same projections
GEMM_SHAPES = tuple((t, i, o) for t in (128, 512) for o, i in GEMV_SHAPES[:4])
FIT_ROUNDS = 6
DECODE_STEPS_PER_ROUND = 3
MEASURED_PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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
    ``com.microsoft::MatMulNBits`` at ``bits`` in the form d2mc exports its int4 matrices: round-to-nearest,
    symmetric, blocks of :data:`QUANTIZED_BLOCK`, accuracy level :data:`ACCURACY_LEVEL`; done by ONNX Runtime's own
    quantizer. Every matrix of a fit model is at one precision, so that its points fit that precision's kernels."""
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


def fit_model(name: str):
    """The fit model ``name`` with random weights (the same every time)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(fit_config(name)).eval()


def fit_point_calls(stack: contextlib.ExitStack, runtimes: tuple[str, ...] = RUNTIMES,
                    precisions: dict[str, tuple[str, ...]] = FIT_PRECISIONS,
                    say: Callable[[str], None] = log.info) -> dict[FitPoint, Callable[[], object]]:
    """One repeatable call per point of the fit models on each runtime at each of its ``precisions`` (the points'
    ``measured_s`` still 0), their measurers kept open by ``stack``: what :func:`measure_fit_points` times."""
    calls = {}
    for name in FIT_MODELS:
        say(f"fit model {name}")
        variants = [(r, p) for r in runtimes for p in precisions[r]]
        found = stack.enter_context(measurers(fit_model(name), variants))
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
