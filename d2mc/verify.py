"""Verification: the lowered model against its PyTorch source on the same inputs, through the KV cache."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from d2mc.errors import UserError

TOLERANCE = {"fp32": 1e-3, "fp16": 5e-2}  # max |logit difference| accepted


@dataclass
class VerifyResult:
    max_abs_diff: float
    tolerance: float
    precision: str
    prefill_tokens: int
    decode_steps: int
    greedy_agreement: float  # fraction of steps where both pick the same next token

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
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own exception types for corrupt files
            raise UserError(f"ONNX Runtime cannot load '{path}' ({str(exc).splitlines()[0][:200]}): the artifact "
                            "is corrupt or incomplete; export it again") from None
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.kv_names = sorted(n for n in inputs if n.startswith("past_key_values."))
        first = inputs[self.kv_names[0]] if self.kv_names else None
        self.kv_heads, self.head_dim = (first.shape[1], first.shape[3]) if first else (1, 1)
        self.dtype = np.float16 if first is not None and "float16" in first.type else np.float32

    def empty_cache(self, batch: int) -> dict[str, np.ndarray]:
        return {n: np.zeros((batch, self.kv_heads, 0, self.head_dim), self.dtype) for n in self.kv_names}

    def step(self, ids: np.ndarray, cache: dict[str, np.ndarray], past: int) -> tuple[np.ndarray, dict]:
        """Feed ``ids`` [B, S] after ``past`` cached tokens; return logits and the new cache."""
        batch, length = ids.shape
        feeds = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones((batch, past + length), np.int64),
                 "position_ids": np.broadcast_to(np.arange(past, past + length), (batch, length)).astype(np.int64),
                 **cache}
        outputs = self.session.run(None, feeds)
        names = [o.name for o in self.session.get_outputs()]
        result = dict(zip(names, outputs, strict=False))
        new_cache = {n: result[n.replace("past_key_values", "present")] for n in self.kv_names}
        return result["logits"], new_cache


def verify_onnx(model, onnx_path: str | Path, precision: str = "fp32", prefill: int = 16, decode_steps: int = 8,
                vocab_limit: int | None = None, seed: int = 0) -> VerifyResult:
    """Compare PyTorch and ONNX Runtime logits over a prefill and ``decode_steps`` greedy steps through the cache.

    Both sides are fed the same tokens (PyTorch's greedy choices), so one divergent pick cannot hide a later
    difference. Returns the largest absolute logit difference over every step.
    """
    decoder = OrtDecoder(onnx_path)
    generator = torch.Generator().manual_seed(seed)
    vocab = vocab_limit or model.config.vocab_size
    ids = torch.randint(0, vocab, (1, prefill), generator=generator)
    worst, agree = 0.0, 0
    cache, past_ort = decoder.empty_cache(1), 0
    past_torch = None
    tokens = ids
    with torch.no_grad():
        for _step in range(decode_steps + 1):
            out = model(tokens, past_key_values=past_torch, use_cache=True)
            past_torch = out.past_key_values
            ref = out.logits.float().numpy()
            got, cache = decoder.step(tokens.numpy(), cache, past_ort)
            past_ort += tokens.shape[1]
            worst = max(worst, float(np.abs(got.astype(np.float32) - ref).max()))
            agree += int(got[0, -1].argmax() == ref[0, -1].argmax())
            tokens = out.logits[:, -1:].argmax(-1)
    return VerifyResult(worst, TOLERANCE[precision], precision, prefill, decode_steps, agree / (decode_steps + 1))
