"""Measured latency on the runtime at hand, next to the roofline's prediction.

Two runtimes: PyTorch (CPU, or CUDA when a GPU is present) on a model in memory, and ONNX Runtime on an exported
artifact. Each times a prefill of N tokens and one decode step at context L, with warm-up and repeats, and
reports medians.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Measurement:
    runtime: str
    prefill_seconds: float
    decode_seconds: float
    prefill_tokens: int
    context: int
    repeats: int

    def to_dict(self) -> dict:
        return dict(vars(self))


def _median_time(fn, warmup: int, repeats: int, sync=lambda: None) -> float:
    for _ in range(warmup):
        fn()
    sync()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


@torch.no_grad()
def measure_torch(model, prefill: int = 128, context: int = 512, batch: int = 1, warmup: int = 2,
                  repeats: int = 5) -> Measurement:
    """PyTorch eager: prefill of ``prefill`` tokens (last-position logits) and one decode step at ``context``."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, prefill), device=device)
    prefill_s = _median_time(lambda: model(ids, use_cache=True, logits_to_keep=1), warmup, repeats, sync)
    history = torch.randint(0, vocab, (batch, context), device=device)
    cache = model(history, use_cache=True, past_key_values=DynamicCache(config=model.config)).past_key_values
    token = torch.randint(0, vocab, (batch, 1), device=device)

    def decode_step():
        model(token, past_key_values=cache, use_cache=True)
        cache.crop(-token.shape[1])  # drop the new token: the context stays fixed across repeats

    decode_s = _median_time(decode_step, warmup, repeats * 4, sync)
    return Measurement(f"pytorch-{device.type}", prefill_s, decode_s, prefill, context, repeats)


def measure_onnx(onnx_path, prefill: int = 128, context: int = 512, warmup: int = 2, repeats: int = 5,
                 vocab: int = 1000) -> Measurement:
    """ONNX Runtime (CPU): the same two phases through the artifact's KV-cache inputs."""
    from d2mc.verify import OrtDecoder

    decoder = OrtDecoder(onnx_path)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, (1, prefill))
    prefill_s = _median_time(lambda: decoder.step(ids, decoder.empty_cache(1), 0), warmup, repeats)
    _, cache = decoder.step(rng.integers(0, vocab, (1, context)), decoder.empty_cache(1), 0)
    token = rng.integers(0, vocab, (1, 1))
    decode_s = _median_time(lambda: decoder.step(token, cache, context), warmup, repeats * 4)
    return Measurement("onnxruntime-cpu", prefill_s, decode_s, prefill, context, repeats)
