"""Run a built engine: compare it with ONNX Runtime through Polygraphy, and time it per phase.

Both need TensorRT and a GPU of the engine's SM; without them :func:`require_engine_machine` gives the reason
in one line. Inputs follow the lowering's contract (``input_ids``, ``attention_mask``, ``position_ids``,
``past_key_values.{i}.key/value``); profile 0 runs prefills, profile 1 decode steps.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from d2mc.engine.device import why_not_here
from d2mc.engine.manifest import read_manifest
from d2mc.errors import UserError, require_module
from d2mc.measure import Measurement

# max |logit difference| TensorRT may show against ONNX Runtime on the same inputs (fp16 kernels on both sides
# of a softmax/top-k router can flip a near-tie, so this is looser than the PyTorch vs ONNX Runtime check)
TOLERANCE = {"fp32": 1e-2, "fp16": 1e-1}
PROFILE_INDEX = {"prefill": 0, "decode": 1}


def require_engine_machine(engine_dir: str | Path, what: str) -> None:
    """A one-line refusal unless this machine has TensorRT and a GPU of the engine's SM."""
    manifest = read_manifest(engine_dir)
    reason = why_not_here(manifest.sm)
    if reason:
        raise UserError(f"{what} runs the engine on its device ({manifest.device}, SM {manifest.sm}): {reason}")


def make_feeds(profile: dict, new_tokens: int, past: int, vocab: int, dtype, batch: int = 1,
               seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for ``new_tokens`` after ``past`` cached tokens (random ids, a random but fixed KV cache)."""
    rng = np.random.default_rng(seed)
    feeds = {"input_ids": rng.integers(0, vocab, (batch, new_tokens), dtype=np.int64),
             "attention_mask": np.ones((batch, past + new_tokens), np.int64),
             "position_ids": np.repeat(np.arange(past, past + new_tokens, dtype=np.int64)[None, :], batch, 0)}
    for name, shape in profile.items():
        if name.startswith("past_key_values."):
            dims = list(shape["max"])
            dims[0], dims[2] = batch, past
            feeds[name] = (0.5 * rng.standard_normal(dims)).astype(dtype)
    return feeds


@dataclass
class EngineVerifyResult:
    phases: dict  # phase -> {"max_abs_diff", "passed"}
    tolerance: float
    precision: str

    @property
    def passed(self) -> bool:
        return all(p["passed"] for p in self.phases.values())

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def verify_engine(engine_dir: str | Path, ort_onnx: str | Path, vocab: int, prefill: int = 16,
                  context: int = 64) -> EngineVerifyResult:
    """TensorRT (this engine) against ONNX Runtime (the onnxruntime-flavoured ONNX of the same model)."""
    require_engine_machine(engine_dir, "verify --backend tensorrt")
    require_module("polygraphy", "verify --backend tensorrt")
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.backend.trt import TrtRunner
    from polygraphy.comparator import Comparator, CompareFunc

    from d2mc.engine.graph import read_graph
    from d2mc.engine.manifest import load_engine

    engine, manifest = load_engine(engine_dir)
    ort_precision = read_graph(ort_onnx).precision
    if ort_precision != manifest.precision:
        raise UserError(f"the engine is {manifest.precision} but '{ort_onnx}' is {ort_precision}: both runners get the "
                        f"same inputs, so export the onnxruntime flavour with --precision {manifest.precision}")
    dtype = np.float16 if manifest.precision == "fp16" else np.float32
    tolerance = TOLERANCE[manifest.precision]
    phases = {}
    for phase, (new, past) in (("prefill", (min(prefill, manifest.max_input), 0)),
                               ("decode", (1, min(context, manifest.max_kv)))):
        feeds = [make_feeds(manifest.profiles[phase], new, past, vocab, dtype)]
        runners = [TrtRunner(engine, name="tensorrt", optimization_profile=PROFILE_INDEX[phase]),
                   OnnxrtRunner(SessionFromOnnx(str(ort_onnx), providers=["cpu"]), name="onnxruntime")]
        results = Comparator.run(runners, data_loader=feeds)
        compare = CompareFunc.simple(atol=tolerance, rtol=0.0, check_error_stat="max")
        accuracy = Comparator.compare_accuracy(results, compare_func=compare)
        (_, trt_out), (_, ort_out) = results
        worst = float(np.abs(trt_out[0]["logits"].astype(np.float32) - ort_out[0]["logits"].astype(np.float32)).max())
        phases[phase] = {"max_abs_diff": worst, "passed": bool(accuracy), "new_tokens": new, "past": past}
    return EngineVerifyResult(phases, tolerance, manifest.precision)


class TrtMeasurer:
    """TensorRT timing of a built engine (the :class:`d2mc.measure.Measurer` protocol)."""

    runtime = "tensorrt"
    all_logits = True  # the engine's prefill computes logits at every position, as its ONNX does

    def __init__(self, engine_dir: str | Path, vocab: int):
        require_engine_machine(engine_dir, "measuring the engine")
        from d2mc.engine.manifest import load_engine

        self.engine, self.manifest = load_engine(engine_dir)
        self.vocab = vocab

    def _time(self, phase: str, new: int, past: int, batch: int, warmup: int, repeats: int) -> float:
        from polygraphy.backend.trt import TrtRunner

        dtype = np.float16 if self.manifest.precision == "fp16" else np.float32
        feeds = make_feeds(self.manifest.profiles[phase], new, past, self.vocab, dtype, batch)
        with TrtRunner(self.engine, optimization_profile=PROFILE_INDEX[phase]) as runner:
            for _ in range(warmup):
                runner.infer(feeds)
            samples = []
            for _ in range(repeats):
                runner.infer(feeds)
                samples.append(runner.last_inference_time())  # device-synchronised, host copies excluded
        return statistics.median(samples)

    def measure(self, prefill: int = 128, context: int = 512, batch: int = 1, warmup: int = 2, repeats: int = 5,
                per_block: bool = False) -> Measurement:
        if prefill > self.manifest.max_input or context > self.manifest.max_kv or batch > self.manifest.max_batch:
            raise UserError(f"the engine was built for prefill <= {self.manifest.max_input}, context <= "
                            f"{self.manifest.max_kv}, batch <= {self.manifest.max_batch}: rebuild it with larger "
                            "--max-input/--max-kv/--max-batch")
        prefill_s = self._time("prefill", prefill, 0, batch, warmup, repeats)
        decode_s = self._time("decode", 1, context, batch, warmup, 4 * repeats)
        return Measurement(self.runtime, prefill_s, decode_s, prefill, context, repeats, batch, warmup)
