"""Verification: the lowered model against its PyTorch source on the same inputs, through the KV cache."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from d2mc.errors import UserError, require_module
from d2mc.modeling import CACHE_ARG

# max |logit difference| accepted against the fp32 PyTorch model: absolute in fp32; in fp16 relative to the largest
# |logit| of the reference (fp16 weights and an fp16 residual stream round at about 1e-3 relative per step:
# SmolLM2-135M measures 0.09 absolute at logits up to 33.5, i.e. 0.27%)
TOLERANCE = {"fp32": 1e-3, "fp16": 1e-2}
RELATIVE = {"fp16"}


@dataclass
class VerifyResult:
    """The comparison's worst logit difference and the bound it had to stay under (``tolerance``, absolute)."""

    max_abs_diff: float
    tolerance: float  # the absolute bound applied (for a relative rule: the rule times logit_scale)
    precision: str
    prefill_tokens: int
    decode_steps: int
    greedy_agreement: float  # fraction of steps where both pick the same next token
    logit_scale: float = 0.0  # the largest |logit| PyTorch produced
    tolerance_rule: str = ""

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


class OrtDecoder:
    """Runs a lowered model step by step with an explicit KV cache (what any ONNX Runtime caller does)."""

    def __init__(self, onnx_path: str | Path, threads: int | None = None):
        import onnxruntime as ort

        path = Path(onnx_path)
        if not path.exists():
            raise UserError(f"no ONNX model at '{path}': export one with d2mc export")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        # ONNX Runtime would turn DequantizeLinear + MatMul (the tensorrt flavour's quantized weights) into
        # MatMulNBits computing with int8 activations (accuracy level 4): keep fp32 activations, as TensorRT does
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own exception types for corrupt files
            if "D2mcMoE" in str(exc):
                raise UserError(f"'{path}' is the TensorRT flavour (D2mcMoE plugin nodes), which ONNX Runtime cannot "
                                "run: verify it with d2mc.verify.verify_onnx or export --format onnxruntime") from None
            raise UserError(f"ONNX Runtime cannot load '{path}' ({str(exc).splitlines()[0][:200]}): the artifact "
                            "is corrupt or incomplete; export it again") from None
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.input_names = set(inputs)
        self.kv_names = sorted(n for n in inputs if n.startswith("past_key_values."))
        first = inputs[self.kv_names[0]] if self.kv_names else None
        self.kv_heads, self.head_dim = _kv_dims(path, first.shape) if first else (1, 1)
        self.dtype = np.float16 if first is not None and "float16" in first.type else np.float32

    def empty_cache(self, batch: int) -> dict[str, np.ndarray]:
        return {n: np.zeros((batch, self.kv_heads, 0, self.head_dim), self.dtype) for n in self.kv_names}

    def step(self, ids: np.ndarray, cache: dict[str, np.ndarray], past: int) -> tuple[np.ndarray, dict]:
        """Feed ``ids`` [B, S] after ``past`` cached tokens; return logits and the new cache."""
        batch, length = ids.shape
        feeds = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones((batch, past + length), np.int64),
                 "position_ids": np.broadcast_to(np.arange(past, past + length), (batch, length)).astype(np.int64),
                 **cache}
        outputs = self.session.run(None, {k: v for k, v in feeds.items() if k in self.input_names})
        names = [o.name for o in self.session.get_outputs()]
        result = dict(zip(names, outputs, strict=False))
        new_cache = {n: result[n.replace("past_key_values", "present")] for n in self.kv_names}
        return result["logits"], new_cache


def _kv_dims(path: Path, shape: list) -> tuple[int, int]:
    """KV heads and head size of a ``past_key_values`` input ``[B, heads, past, head_dim]``; graphs from other
    exporters may leave them symbolic, in which case the ``genai_config.json`` beside the model says."""
    heads, head_dim = shape[1], shape[3]
    if isinstance(heads, int) and isinstance(head_dim, int):
        return heads, head_dim
    config = path.with_name("genai_config.json")
    if not config.is_file():
        raise UserError(f"'{path}' leaves its KV-cache dimensions symbolic and has no genai_config.json beside it")
    decoder = json.loads(config.read_text())["model"]["decoder"]
    return decoder["num_key_value_heads"], decoder["head_size"]


@contextlib.contextmanager
def runnable_onnx(onnx_path: str | Path) -> Iterator[Path]:
    """``onnx_path``, or for a TensorRT-flavoured graph with ``D2mcMoE`` plugin nodes a copy beside it (sharing its
    external weights) whose plugin nodes are expanded into standard ops that ONNX Runtime runs."""
    import onnx

    from d2mc.lowering.plugin_reference import expand_plugin_nodes

    path = Path(onnx_path)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # unreadable: let ONNX Runtime name the problem in OrtDecoder
        yield path
        return
    if not expand_plugin_nodes(proto):
        yield path
        return
    reference = path.with_name(f".{path.stem}.reference.onnx")
    onnx.save(proto, reference)
    try:
        yield reference
    finally:
        reference.unlink(missing_ok=True)


def verify_onnx(model, onnx_path: str | Path, precision: str = "fp32", prefill: int = 16, decode_steps: int = 8,
                vocab_limit: int | None = None, seed: int = 0) -> VerifyResult:
    """Compare PyTorch and ONNX Runtime logits over a prefill and ``decode_steps`` greedy steps through the cache.

    Both sides are fed the same tokens (PyTorch's greedy choices), so one divergent pick cannot hide a later
    difference. Returns the largest absolute logit difference over every step. A TensorRT-flavoured graph runs
    with its plugin nodes expanded (:func:`runnable_onnx`).
    """
    if precision not in TOLERANCE:
        raise UserError(f"unknown precision '{precision}': choose one of {', '.join(TOLERANCE)}")
    with runnable_onnx(onnx_path) as path:
        decoder = OrtDecoder(path)
        return _compare(model, decoder, precision, prefill, decode_steps, vocab_limit, seed)


def _compare(model, decoder: OrtDecoder, precision: str, prefill: int, decode_steps: int, vocab_limit: int | None,
             seed: int) -> VerifyResult:
    from d2mc.arch import ModelArch

    arch = ModelArch.from_config(model.config)
    expected = 2 * len(arch.attention_blocks)
    logits = decoder.session.get_outputs()[0]
    onnx_vocab = logits.shape[-1] if logits.name == "logits" else None
    if len(decoder.kv_names) != expected or onnx_vocab not in (arch.vocab_size, None) or (
            decoder.kv_names and decoder.kv_heads != arch.num_kv_heads):
        raise UserError(f"the ONNX model does not match the PyTorch model ({len(decoder.kv_names)} KV inputs, vocab "
                        f"{onnx_vocab}; the model has {expected} KV tensors, vocab {arch.vocab_size}): compare an "
                        "artifact with the model it was exported from")
    generator = torch.Generator().manual_seed(seed)
    vocab = vocab_limit or model.config.vocab_size
    ids = torch.randint(0, vocab, (1, prefill), generator=generator)
    worst, agree, scale = 0.0, 0, 0.0
    cache, past_ort = decoder.empty_cache(1), 0
    past_torch = None
    tokens = ids
    with torch.no_grad():
        for _step in range(decode_steps + 1):
            out = model(tokens, use_cache=True, **{CACHE_ARG: past_torch})
            past_torch = getattr(out, CACHE_ARG)
            ref = out.logits.float().numpy()
            scale = max(scale, float(np.abs(ref).max()))
            got, cache = decoder.step(tokens.numpy(), cache, past_ort)
            past_ort += tokens.shape[1]
            worst = max(worst, float(np.abs(got.astype(np.float32) - ref).max()))
            agree += int(got[0, -1].argmax() == ref[0, -1].argmax())
            tokens = out.logits[:, -1:].argmax(-1)
    bound = TOLERANCE[precision]
    if precision in RELATIVE:
        rule, bound = f"{bound:g} x max |logit| ({scale:.3g})", bound * scale
    else:
        rule = f"{bound:g} absolute"
    return VerifyResult(worst, bound, precision, prefill, decode_steps, agree / (decode_steps + 1), scale, rule)


def verify_with_polygraphy(model, onnx_path: str | Path, precision: str = "fp32", prefill: int = 16,
                           seed: int = 0) -> dict:
    """The same comparison through Polygraphy's ``Comparator``: ONNX Runtime against PyTorch on two feeds, a prefill
    of ``prefill`` tokens and one decode step after it (its past is ONNX Runtime's own ``present`` of the prefill;
    PyTorch rebuilds its cache from the same tokens). Returns ``{"passed", "max_abs_diff", "tolerance"}``.
    """
    require_module("polygraphy", "the Polygraphy comparison", "polygraphy")
    from polygraphy.backend.base import BaseRunner
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.common import TensorMetadata
    from polygraphy.comparator import Comparator, CompareFunc
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.ERROR
    generator = torch.Generator().manual_seed(seed)
    prefix = torch.randint(0, model.config.vocab_size, (1, prefill + 1), generator=generator)

    class TorchRunner(BaseRunner):
        """PyTorch on CPU, fed what the ONNX model is fed (Polygraphy's own PyTorch runner assumes CUDA)."""

        def __init__(self):
            super().__init__(name="pytorch-cpu")

        def activate_impl(self):
            pass

        def deactivate_impl(self):
            pass

        def get_input_metadata_impl(self):
            metadata = TensorMetadata()
            for name in ("input_ids", "attention_mask", "position_ids"):
                metadata.add(name, np.int64, (1, -1))
            return metadata

        def infer_impl(self, feed_dict):
            ids = torch.from_numpy(feed_dict["input_ids"])
            past = feed_dict["attention_mask"].shape[1] - ids.shape[1]
            start = time.perf_counter()
            with torch.no_grad():
                cache = getattr(model(prefix[:, :past], use_cache=True), CACHE_ARG) if past else None
                logits = model(ids, use_cache=True, **{CACHE_ARG: cache}).logits
            self.inference_time = time.perf_counter() - start
            return {"logits": logits.float().numpy()}

    with runnable_onnx(onnx_path) as path:
        decoder = OrtDecoder(path)
        _, cache = decoder.step(prefix[:, :prefill].numpy(), decoder.empty_cache(1), 0)
        feeds = []
        for ids, past_cache, past in ((prefix[:, :prefill], decoder.empty_cache(1), 0),
                                      (prefix[:, prefill:], cache, prefill)):
            length = ids.shape[1]
            feeds.append({"input_ids": ids.numpy(), "attention_mask": np.ones((1, past + length), np.int64),
                          "position_ids": np.arange(past, past + length, dtype=np.int64)[None, :], **past_cache})
        ort_runner = OnnxrtRunner(SessionFromOnnx(str(path), providers=["cpu"]))
        results = Comparator.run([ort_runner, TorchRunner()], data_loader=feeds)
    worst = 0.0
    for iteration in range(len(feeds)):
        ort_out, torch_out = results[0][1][iteration]["logits"], results[1][1][iteration]["logits"]
        worst = max(worst, float(np.abs(np.asarray(ort_out, np.float32) - torch_out).max()))
    bound = TOLERANCE[precision]
    if precision in RELATIVE:
        bound *= max(float(np.abs(results[1][1][i]["logits"]).max()) for i in range(len(feeds)))
    accuracy = Comparator.compare_accuracy(results, compare_func=CompareFunc.simple(atol=bound, rtol=0.0))
    return {"passed": bool(accuracy) and worst <= bound, "max_abs_diff": worst, "tolerance": bound,
            "runners": [results[0][0], results[1][0]]}
