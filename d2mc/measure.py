"""Measured latency on the runtime at hand, next to the roofline's prediction.

A :class:`Measurer` times the two phases the roofline predicts: a prefill of N tokens (last-position logits, as
generation keeps) and one decode step after L cached tokens, with warm-up and repeats, reporting medians; where
the runtime can, it also times each block. Runtimes:

- :class:`TorchMeasurer`: PyTorch eager on a model in memory (CPU, or CUDA when the model is on a GPU). The decode
  step uses a preallocated (static) KV cache of exactly L + 1 positions, as a deployment runtime does: a growing
  cache would copy itself on every step and time the copy rather than the model.
- :class:`OnnxMeasurer`: ONNX Runtime on an exported artifact (no per-block times: the graph is one session). It
  reads how the graph stores each weight matrix (:func:`d2mc.weight_plan.read_weight_plan`: float, or
  ``MatMulNBits`` int4/int8 with their block size, zero points and zero-point residual), which the roofline needs to
  count the bytes the measured model reads.

Other runtimes plug in by implementing :class:`Measurer` (``runtime`` and ``measure``).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from d2mc.errors import OptionError, UserError
from d2mc.modeling import CACHE_ARG
from d2mc.weight_plan import WeightPlan, read_weight_plan

log = logging.getLogger(__name__)


@dataclass
class Measurement:
    """Medians of one runtime's prefill and decode, in seconds; ``blocks`` maps phase -> seconds per block;
    ``weights``: the format of each of the measured graph's weight matrices (None: all float)."""

    runtime: str
    prefill_seconds: float
    decode_seconds: float
    prefill_tokens: int
    context: int
    repeats: int
    batch: int = 1
    warmup: int = 2
    blocks: dict[str, list[float]] = field(default_factory=dict)
    weights: WeightPlan | None = None

    def seconds(self, phase: str) -> float:
        return self.prefill_seconds if phase == "prefill" else self.decode_seconds

    def to_dict(self) -> dict:
        return {**asdict(self), "weights": self.weights.summary() if self.weights else None}


@runtime_checkable
class Measurer(Protocol):
    """Anything that can time a prefill and a decode step of one model."""

    runtime: str

    def measure(self, prefill: int = 128, context: int = 512, batch: int = 1, warmup: int = 2, repeats: int = 5,
                per_block: bool = False) -> Measurement:
        ...


def time_samples(fn: Callable[[], object], warmup: int, repeats: int,
                 sync: Callable[[], None] = lambda: None) -> list[float]:
    """Wall times of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    sync()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - start)
    return samples


def median_seconds(fn: Callable[[], object], warmup: int, repeats: int, sync: Callable[[], None] = lambda: None) -> float:
    """Median wall time of ``fn`` over ``repeats`` calls after ``warmup`` untimed calls."""
    return statistics.median(time_samples(fn, warmup, repeats, sync))


def quantile(samples: list[float], q: float) -> float:
    """The ``q`` quantile of ``samples`` (linear interpolation; 0.5 is the median)."""
    return float(np.quantile(np.asarray(samples), q))


class OtherLoad:
    """How much CPU other processes used while a block ran, in cores (Linux ``/proc/stat``; 0 elsewhere).

    Timings on a shared machine are only as good as its quiet moments: a caller can re-measure when others
    took a noticeable share of the cores (``with OtherLoad() as load: ...; load.cores``).
    """

    def __enter__(self):
        self.cores = 0.0
        self._start = self._sample()
        return self

    def __exit__(self, *exc):
        end = self._sample()
        if self._start and end:
            busy = (end[0] - self._start[0]) / self._ticks
            own = end[1] - self._start[1]
            self.cores = max(0.0, busy - own) / max(end[2] - self._start[2], 1e-9)
        return False

    _ticks = 100

    def _sample(self):
        import os

        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
            self._ticks = os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields[:8]) - idle, time.process_time(), time.perf_counter()


def measure_quietly(fn: Callable[[], object], max_other_cores: float = 0.2, attempts: int = 4,
                    wait_s: float = 10.0) -> tuple[object, float]:
    """Run the timing ``fn`` until other processes used at most ``max_other_cores`` during it (up to ``attempts``
    tries, ``wait_s`` apart); return its result from the quietest try and the cores others used then."""
    best = None
    for attempt in range(attempts):
        with OtherLoad() as load:
            result = fn()
        if best is None or load.cores < best[1]:
            best = (result, load.cores)
        if load.cores <= max_other_cores:
            break
        log.info("other processes used %.2f cores while timing; trying again", load.cores)
        if attempt + 1 < attempts:
            time.sleep(wait_s)
    return best


def _check_lengths(prefill: int, context: int, batch: int, warmup: int, repeats: int) -> None:
    for name, value in (("prefill", prefill), ("context", context), ("batch", batch), ("repeats", repeats)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise OptionError(f"{{{name}}} must be a positive whole number, not {value}")
    if warmup < 0:
        raise UserError(f"warm-up must be zero or more, not {warmup}")


class TorchMeasurer:
    """PyTorch eager timing of a causal LM (dense or converted) on the device its parameters live on."""

    def __init__(self, model):
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.runtime = f"pytorch-{self.device.type}"
        self.all_logits = False  # prefill keeps the last position's logits, as generate() does
        self._sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)

    def _blocks(self):
        return self.model.model.layers

    def _ids(self, batch: int, length: int, seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return torch.randint(0, self.model.config.vocab_size, (batch, length), generator=generator).to(self.device)

    def _decode_step(self, context: int, batch: int) -> Callable[[], object]:
        """One decode step at a fixed ``context``, repeatable: the cache is rewound after each step."""
        from transformers import StaticCache

        cache = StaticCache(config=self.model.config, max_cache_len=context + 1)
        self.model(self._ids(batch, context, 1), use_cache=True, **{CACHE_ARG: cache})
        token = self._ids(batch, 1, 2)
        position = torch.full((batch, 1), context, device=self.device)

        def step():
            out = self.model(token, use_cache=True, position_ids=position, **{CACHE_ARG: cache})
            for layer in cache.layers:  # the step wrote position `context`; write it again next time
                layer.cumulative_length.sub_(1)
            return out

        return step

    @torch.no_grad()
    def measure(self, prefill: int = 128, context: int = 512, batch: int = 1, warmup: int = 2, repeats: int = 5,
                per_block: bool = False) -> Measurement:
        """Median prefill and decode seconds; per-block medians too when ``per_block`` (timed in separate runs,
        so the hooks that time blocks do not slow the totals)."""
        _check_lengths(prefill, context, batch, warmup, repeats)
        prefill_s, prefill_blocks = self.time_prefill(prefill, batch, warmup, repeats, per_block)
        decode_s, decode_blocks = self.time_decode(context, batch, warmup, repeats, per_block)
        blocks = {"prefill": prefill_blocks, "decode": decode_blocks} if per_block else {}
        return Measurement(self.runtime, prefill_s, decode_s, prefill, context, repeats, batch, warmup, blocks)

    @torch.no_grad()
    def time_prefill(self, prefill: int, batch: int = 1, warmup: int = 2, repeats: int = 5,
                     per_block: bool = False) -> tuple[float, list[float] | None]:
        """Median seconds of a prefill of ``prefill`` tokens (and per block, when asked)."""
        run_prefill = self._prefill_call(prefill, batch)
        seconds = median_seconds(run_prefill, warmup, repeats, self._sync)
        return seconds, self._time_blocks(run_prefill, warmup, repeats) if per_block else None

    def _prefill_call(self, prefill: int, batch: int) -> Callable[[], object]:
        ids = self._ids(batch, prefill, 0)
        return lambda: self.model(ids, use_cache=True, logits_to_keep=1)

    @torch.no_grad()
    def samples(self, phase: str, length: int, batch: int = 1, warmup: int = 2, repeats: int = 5) -> list[float]:
        """Raw wall times of ``repeats`` prefills of ``length`` tokens or decode steps at context ``length``."""
        return time_samples(self.phase_call(phase, length, batch), warmup, repeats, self._sync)

    @torch.no_grad()
    def phase_call(self, phase: str, length: int, batch: int = 1) -> Callable[[], object]:
        """One prefill of ``length`` tokens or one decode step at context ``length``, repeatable (the set-up, such
        as filling the cache, is done once here), synchronised with the device."""
        fn = self._prefill_call(length, batch) if phase == "prefill" else self._decode_step(length, batch)

        @torch.no_grad()
        def call():
            out = fn()
            self._sync()
            return out

        return call

    @torch.no_grad()
    def time_decode(self, context: int, batch: int = 1, warmup: int = 2, repeats: int = 5,
                    per_block: bool = False) -> tuple[float, list[float] | None]:
        """Median seconds of one decode step after ``context`` cached tokens (and per block, when asked).

        A step is short and noisier than a prefill: it warms up longer and takes four times the samples."""
        decode = self._decode_step(context, batch)
        seconds = median_seconds(decode, warmup * 4, repeats * 4, self._sync)
        return seconds, self._time_blocks(decode, warmup * 4, repeats * 4) if per_block else None

    def _time_blocks(self, fn, warmup: int, repeats: int) -> list[float]:
        """Median seconds of each block over ``repeats`` runs of ``fn``, from forward pre/post hooks."""
        blocks = self._blocks()
        started: dict[int, float] = {}
        samples: list[list[float]] = [[] for _ in blocks]

        def before(i):
            def hook(module, args, kwargs):
                self._sync()
                started[i] = time.perf_counter()
            return hook

        def after(i):
            def hook(module, args, kwargs, output):
                self._sync()
                samples[i].append(time.perf_counter() - started[i])
            return hook

        handles = []
        try:
            for i, block in enumerate(blocks):
                handles.append(block.register_forward_pre_hook(before(i), with_kwargs=True))
                handles.append(block.register_forward_hook(after(i), with_kwargs=True))
            for _ in range(warmup):
                fn()
            for s in samples:
                s.clear()
            for _ in range(repeats):
                fn()
        finally:
            for h in handles:
                h.remove()
        return [statistics.median(s) for s in samples]


class OnnxMeasurer:
    """ONNX Runtime (CPU) timing of an exported artifact through its KV-cache inputs and outputs."""

    runtime = "onnxruntime-cpu"

    def __init__(self, onnx_path: str | Path, vocab: int):
        from d2mc.onnx_session import OrtDecoder

        self.decoder = OrtDecoder(onnx_path)
        self.vocab = vocab
        self.all_logits = True  # the graph's prefill computes logits at every position
        self.weights = read_weight_plan(onnx_path)

    def measure(self, prefill: int = 128, context: int = 512, batch: int = 1, warmup: int = 2, repeats: int = 5,
                per_block: bool = False) -> Measurement:
        _check_lengths(prefill, context, batch, warmup, repeats)
        if per_block:
            log.info("ONNX Runtime runs the graph as one session: no per-block times")
        prefill_s = statistics.median(self.samples("prefill", prefill, batch, warmup, repeats))
        decode_s = statistics.median(self.samples("decode", context, batch, warmup * 4, repeats * 4))
        return Measurement(self.runtime, prefill_s, decode_s, prefill, context, repeats, batch, warmup,
                           weights=self.weights)

    def samples(self, phase: str, length: int, batch: int = 1, warmup: int = 2, repeats: int = 5) -> list[float]:
        """Raw wall times of ``repeats`` prefills of ``length`` tokens or decode steps at context ``length``."""
        return time_samples(self.phase_call(phase, length, batch), warmup, repeats)

    def phase_call(self, phase: str, length: int, batch: int = 1) -> Callable[[], object]:
        """One prefill of ``length`` tokens or one decode step at context ``length``, repeatable (the cache of the
        decode step is filled once, here)."""
        decoder = self.decoder
        rng = np.random.default_rng(0)
        if phase == "prefill":
            ids = rng.integers(0, self.vocab, (batch, length))
            return lambda: decoder.step(ids, decoder.empty_cache(batch), 0)
        _, cache = decoder.step(rng.integers(0, self.vocab, (batch, length)), decoder.empty_cache(batch), 0)
        token = rng.integers(0, self.vocab, (batch, 1))
        return lambda: decoder.step(token, cache, length)


def measure_torch(model, prefill: int = 128, context: int = 512, batch: int = 1, warmup: int = 2,
                  repeats: int = 5, per_block: bool = False) -> Measurement:
    """PyTorch eager: prefill of ``prefill`` tokens (last-position logits) and one decode step at ``context``."""
    return TorchMeasurer(model).measure(prefill, context, batch, warmup, repeats, per_block)


def measure_onnx(onnx_path, prefill: int = 128, context: int = 512, warmup: int = 2, repeats: int = 5,
                 vocab: int = 1000) -> Measurement:
    """ONNX Runtime (CPU): the same two phases through the artifact's KV-cache inputs."""
    return OnnxMeasurer(onnx_path, vocab).measure(prefill, context, 1, warmup, repeats)
