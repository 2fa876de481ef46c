"""Verification: the lowered model against its PyTorch source on the same inputs, through the KV cache.

:func:`verify_onnx` feeds both models the same tokens and compares their logits at every step, in three parts
chosen so that a damage anywhere in what the artifact claims to support shows:

- **the first positions**: a prefill of random tokens, then greedy decode steps through the cache (both sides are
  fed PyTorch's greedy choices, so one divergent pick cannot hide a later difference);
- **every position up to the end of the context**, sampled: decode steps placed at positions spread evenly up to
  ``max_position_embeddings - 1`` (the last one always), each after a past of that many tokens. The past is
  PyTorch's cache of the first part (in the graph's KV dtype) repeated to that length, fed to both sides as the
  same tensors: a rotary table, a position-dependent mask or a sliding window that is wrong far from the start
  changes these logits. The last sample feeds a few tokens at once, the path of a prompt that continues a
  conversation. A context whose past would take more than :data:`MAX_PAST_BYTES` is sampled up to where it does
  not;
- **every expert**: a router's choice depends on the text, and a routed expert that the test tokens never pick
  would go unchecked. So each MoE block's router logits get a large bias on one expert, in ONNX (an ``Add`` on
  the router's ``MatMul`` output, fed as a graph input, in a copy of the graph held in memory) and in PyTorch (a
  hook on the router), and a short prefill and decode step run once per expert: round ``r`` forces expert
  ``r`` of every block at once (modulo its number of experts), so ``max experts`` rounds force each expert at
  least once. With top-k above 1 the next experts get smaller biases, so that the bias makes every choice of the
  round.

Every attention block's new keys and values (the ``present`` outputs) are compared as well, which names the first
block whose cache differs. Two tables are read by lookup only, so that sampled inputs would check few of their rows:
the token embedding (a row per token) and the rotary ``cos_cache``/``sin_cache`` (a row per position). They are
compared row for row with the PyTorch model's own, which covers every token and every position exactly. The
result passes only when every logit, cache entry and table entry is within the tolerance of the precision; a NaN
or infinite difference fails.

Memory: PyTorch runs every input first and keeps its logits and the compared cache rows (:func:`record_reference`);
ONNX Runtime then replays them (:func:`replay_reference`), in a session without memory arena or prepacked weights.
So the two frameworks' caches of a long past are never held at once, each side builds the past of a sampled
position when it gets there and lets it go after, and a caller that owns the PyTorch model can free it before the
ONNX Runtime session opens (``d2mc export`` and ``d2mc verify`` do): verification then holds the weights once.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from d2mc.arch import ModelArch
from d2mc.errors import UserError
from d2mc.faults import fault_point
from d2mc.onnx_session import OrtDecoder, runnable_proto
from d2mc.reference import (
    Reference,
    ReferenceRecorder,
    ReferenceStep,
    compare_lookup_tables,
    max_abs_diff,
    repeated_cache,
)

# max |logit difference| accepted against the fp32 PyTorch model: absolute in fp32; in fp16 relative to the largest
# |logit| of the reference (fp16 weights and an fp16 residual stream round at about 1e-3 relative per step:
# SmolLM2-135M measures 0.09 absolute at logits up to 33.5, i.e. 0.27%). The keys and values of the cache are held
# to the same rule (fp16: relative to their own largest magnitude).
TOLERANCE = {"fp32": 1e-3, "fp16": 1e-2}
RELATIVE = {"fp16"}
# a quantized artifact is compared with the PyTorch model carrying the same dequantized weights, its MatMulNBits and
# QMoE nodes run at accuracy_level 0 (onnx_session.runnable_proto); what the shipped accuracy_level 4 adds (int8
# activations) is recorded beside it (source_difference). MatMulNBits accumulates each block's products in its own
# order, and the difference grows with depth and position: on SmolLM2-135M (logits up to 33, positions up to 8,191)
# int4 dense measured 5.4e-4 and int4 LF-UC with 6 MoE blocks 4.9e-3. Relative to the largest |logit| then, as fp16
QUANTIZED_FP32 = "quantized-fp32"
TOLERANCE[QUANTIZED_FP32] = 1e-3
RELATIVE.add(QUANTIZED_FP32)
POSITION_SAMPLES = 4  # decode steps placed at positions spread up to the end of the context
CHUNK_TOKENS = 4  # tokens fed at once at the last sampled position (a continued prompt)
# the largest past (keys and values of every attention block, fp32) a sampled position is given; each side holds a
# few copies of it. SmolLM2-135M reaches its 8,192 positions at 377 MB; a model whose full context would need more
# is sampled up to the position this allows (its rotary tables are still compared in full)
MAX_PAST_BYTES = 1 << 30
# the lookup tables against the model's, relative to their largest entry: copies in fp32, rounded once in fp16
TABLE_TOLERANCE = {"fp32": 1e-6, "fp16": 1e-3, QUANTIZED_FP32: 1e-6}


@dataclass
class VerifyResult:
    """The comparison's worst logit difference, the bound it had to stay under (``tolerance``, absolute), and
    what the inputs covered."""

    max_abs_diff: float
    tolerance: float  # the absolute bound applied (for a relative rule: the rule times logit_scale)
    precision: str
    prefill_tokens: int
    decode_steps: int
    greedy_agreement: float  # fraction of first-part steps where both pick the same next token
    logit_scale: float = 0.0  # the largest |logit| PyTorch produced
    tolerance_rule: str = ""
    positions: list[int] = field(default_factory=list)  # the sampled positions beyond the first part
    max_position: int = 0  # the last position of the context (max_position_embeddings - 1)
    experts_forced: dict[int, int] = field(default_factory=dict)  # MoE block -> routed experts, each forced once
    worst: str = ""  # where the largest logit difference was
    kv_max_abs_diff: list[float] = field(default_factory=list)  # per attention block, over every step
    kv_tolerance: list[float] = field(default_factory=list)
    tables_max_abs_diff: dict[str, float] = field(default_factory=dict)  # lookup tables, every row
    tables_tolerance: dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance and all(
            d <= t for d, t in zip(self.kv_max_abs_diff, self.kv_tolerance, strict=True)) and all(
            d <= self.tables_tolerance[name] for name, d in self.tables_max_abs_diff.items())

    @property
    def failing_table(self) -> str | None:
        """The first lookup table out of tolerance, if any."""
        return next((n for n, d in self.tables_max_abs_diff.items() if not d <= self.tables_tolerance[n]), None)

    @property
    def failing_block(self) -> int | None:
        """The first attention block (counting attention blocks) whose cache is out of tolerance, if any."""
        return next((i for i, (d, t) in enumerate(zip(self.kv_max_abs_diff, self.kv_tolerance, strict=True))
                     if not d <= t), None)

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed, "failing_block": self.failing_block,
                "failing_table": self.failing_table}


def sample_positions(first: int, last: int, count: int = POSITION_SAMPLES) -> list[int]:
    """``count`` positions spread evenly over ``first..last``, the last one included."""
    if count < 1 or last < first:
        return []
    return sorted({round(first + (last - first) * (i + 1) / count) for i in range(count)})


def verify_onnx(model, onnx_path: str | Path, precision: str = "fp32", prefill: int = 16, decode_steps: int = 8,
                vocab_limit: int | None = None, seed: int = 0, positions: int = POSITION_SAMPLES,
                force_experts: bool = True) -> VerifyResult:
    """Compare PyTorch and ONNX Runtime logits (and caches) over the inputs the module docstring describes: a
    prefill and ``decode_steps`` greedy steps, ``positions`` decode steps spread up to the last position of the
    context, and, with ``force_experts``, each routed expert forced in turn. Returns the largest absolute logit
    difference with where it was. A TensorRT-flavoured graph runs with its plugin nodes expanded.

    PyTorch runs first (:func:`record_reference`), then ONNX Runtime (:func:`replay_reference`), so the two
    frameworks' activations and caches are never in memory together; a caller that can let the PyTorch model go in
    between calls the two itself.
    """
    return replay_reference(record_reference(model, onnx_path, precision, prefill, decode_steps, vocab_limit, seed,
                                             positions, force_experts), onnx_path)


def record_reference(model, onnx_path: str | Path, precision: str = "fp32", prefill: int = 16,
                     decode_steps: int = 8, vocab_limit: int | None = None, seed: int = 0,
                     positions: int = POSITION_SAMPLES, force_experts: bool = True,
                     lookup_tables: bool = True) -> Reference:
    """The first phase of :func:`verify_onnx` (same arguments): PyTorch's outputs on every input, the lookup tables
    compared (with ``lookup_tables``), and which routers the graph at ``onnx_path`` has; no ONNX Runtime session is
    opened."""
    if precision not in TOLERANCE:
        raise UserError(f"unknown precision '{precision}': choose one of {', '.join(TOLERANCE)}")
    if prefill < 1 or decode_steps < 0 or positions < 0:
        raise UserError("verification needs a prefill of at least one token and no negative step counts")
    fault_point("verify")
    path = Path(onnx_path)
    arch = ModelArch.from_config(model.config)
    if prefill + decode_steps > arch.max_position_embeddings:
        raise UserError(f"a prefill of {prefill} and {decode_steps} decode steps do not fit the model's "
                        f"{arch.max_position_embeddings} positions: lower --prefill")
    if not path.is_file():
        raise UserError(f"no ONNX model at '{path}': export one with d2mc export")
    forced = {}
    if force_experts:
        _, forced = runnable_proto(path, force_experts=True, float_matmuls=True)
        expected = {b: block.router.out_features for b, block in enumerate(model.model.layers)
                    if getattr(block, "router", None) is not None}
        if forced != expected:
            raise UserError(f"the routers of the ONNX model (blocks {sorted(forced)}) do not match the PyTorch "
                            f"model's (blocks {sorted(expected)}): compare an artifact with the model it was "
                            "exported from")
    tables = compare_lookup_tables(model, path) if lookup_tables else {}
    recorder = ReferenceRecorder(model, arch, np.float16 if precision == "fp16" else np.float32)
    vocab = min(vocab_limit or model.config.vocab_size, model.config.vocab_size)
    generator = torch.Generator().manual_seed(seed)
    recorder.first_positions(torch.randint(0, vocab, (1, prefill), generator=generator), decode_steps)
    last = arch.max_position_embeddings - 1
    per_position = 2 * len(arch.attention_blocks) * arch.num_kv_heads * arch.head_dim * 4
    reachable = min(last, MAX_PAST_BYTES // max(per_position, 1))
    sampled = sample_positions(prefill + decode_steps, reachable, positions)
    for p in sampled:
        chunk = min(CHUNK_TOKENS, p) if p == sampled[-1] else 1
        recorder.at_position(p - chunk + 1, torch.randint(0, vocab, (1, chunk), generator=generator))
    for r in range(max(forced.values(), default=0)):
        recorder.forcing(forced, r, torch.randint(0, vocab, (1, prefill), generator=generator))
    return Reference(arch, precision, prefill, decode_steps, recorder.steps, recorder.first_cache, sampled, last,
                     forced, tables)


def replay_reference(reference: Reference, onnx_path: str | Path, float_matmuls: bool = True) -> VerifyResult:
    """The second phase of :func:`verify_onnx`: the graph at ``onnx_path`` run in ONNX Runtime on the reference's
    inputs and judged against its outputs (``float_matmuls``: quantized matmuls at accuracy level 0, see
    :func:`d2mc.onnx_session.runnable_proto`). The sessions are opened lean (no memory arena, no prepacked weight
    copies): a few steps do not pay for them."""
    path = Path(onnx_path)
    comparison = _Comparison(reference)
    plain_steps = [s for s in reference.steps if not s.biases]
    forced_steps = [s for s in reference.steps if s.biases]
    decoder = OrtDecoder(path, proto=runnable_proto(path, force_experts=False, float_matmuls=float_matmuls)[0],
                         lean=True)
    comparison.check_shapes(decoder)
    comparison.run(decoder, plain_steps)
    del decoder
    if forced_steps:
        proto, _ = runnable_proto(path, force_experts=True, float_matmuls=float_matmuls)
        comparison.run(OrtDecoder(path, proto=proto, lean=True), forced_steps)
    result = comparison.result()
    result.tables_max_abs_diff = {name: diff for name, (diff, _) in reference.tables.items()}
    result.tables_tolerance = {name: TABLE_TOLERANCE[reference.precision] * scale
                               for name, (_, scale) in reference.tables.items()}
    return result


def source_difference(model, onnx_path: str | Path, prefill: int = 16, decode_steps: int = 8, seed: int = 0) -> dict:
    """The largest |logit difference| between the ONNX at ``onnx_path`` and ``model`` (the unquantized source of a
    quantized artifact, say) over a prefill and greedy decode steps, and how often both pick the same next token.
    The graph runs as it ships, its plugin nodes (if any) expanded."""
    reference = record_reference(model, onnx_path, "fp32", prefill, decode_steps, seed=seed, positions=0,
                                 force_experts=False, lookup_tables=False)
    result = replay_reference(reference, onnx_path, float_matmuls=False)
    return {"max_abs_diff": result.max_abs_diff, "logit_scale": result.logit_scale,
            "greedy_agreement": result.greedy_agreement, "prefill_tokens": prefill, "decode_steps": decode_steps}


class _Comparison:
    """ONNX Runtime's side of a verification: the reference's steps replayed, with the running worst differences."""

    def __init__(self, reference: Reference):
        self.reference, self.arch, self.precision = reference, reference.arch, reference.precision
        self.worst, self.where, self.scale = 0.0, "", 0.0
        self.kv_worst = [0.0] * len(self.arch.attention_blocks)
        self.kv_scale = [0.0] * len(self.arch.attention_blocks)
        self.agreeing = self.greedy_steps = 0

    def check_shapes(self, decoder: OrtDecoder) -> None:
        expected = 2 * len(self.arch.attention_blocks)
        logits = decoder.session.get_outputs()[0]
        onnx_vocab = logits.shape[-1] if logits.name == "logits" else None
        if len(decoder.kv_names) != expected or onnx_vocab not in (self.arch.vocab_size, None) or (
                decoder.kv_names and decoder.kv_heads != self.arch.num_kv_heads):
            raise UserError(f"the ONNX model does not match the PyTorch model ({len(decoder.kv_names)} KV inputs, "
                            f"vocab {onnx_vocab}; the model has {expected} KV tensors, vocab {self.arch.vocab_size}): "
                            "compare an artifact with the model it was exported from")

    def run(self, decoder: OrtDecoder, steps: list[ReferenceStep]) -> None:
        """Each step on ONNX Runtime, fed as PyTorch was, its outputs compared with PyTorch's."""
        cache = None
        for step in steps:
            past, cache = cache if step.feed == "previous" else None, None  # a long past is let go before the next
            if step.feed == "empty":
                past = decoder.empty_cache(1)
            elif step.feed == "repeat":
                past = {name: repeated_cache(value, step.past, decoder.dtype)
                        for name, value in self.reference.first_cache.items()}
            extra = {f"d2mc_router_bias.{b}": bias.astype(decoder.dtype) for b, bias in step.biases.items()}
            got, cache = decoder.step(step.tokens, past, step.past, extra)
            del past
            self.compare(step, got, cache)

    def compare(self, step: ReferenceStep, got: np.ndarray, cache: dict) -> None:
        self.scale = max(self.scale, float(np.abs(step.logits).max()))
        diff = max_abs_diff(got, step.logits)
        if not diff <= self.worst:
            self.worst, self.where = diff, step.where
        if step.greedy:
            self.greedy_steps += 1
            self.agreeing += int(got[0, -1].argmax() == step.logits[0, -1].argmax())
        for name, expected in step.cache.items():
            i = int(name.split(".")[1])
            actual = cache[name]
            n = min(actual.shape[2], expected.shape[2])  # a sliding-window layer keeps only its window
            reference = expected[:, :, expected.shape[2] - n:]
            self.kv_scale[i] = max(self.kv_scale[i], float(np.abs(reference).max(initial=0.0)))
            self.kv_worst[i] = max(self.kv_worst[i], max_abs_diff(actual[:, :, actual.shape[2] - n:], reference))

    def result(self) -> VerifyResult:
        r = self.reference
        bound = TOLERANCE[self.precision]
        if self.precision in RELATIVE:
            rule = f"{bound:g} x max |logit| ({self.scale:.3g})"
            tolerance, kv_tolerance = bound * self.scale, [bound * s for s in self.kv_scale]
        else:
            rule, tolerance, kv_tolerance = f"{bound:g} absolute", bound, [bound] * len(self.kv_scale)
        agreement = self.agreeing / max(self.greedy_steps, 1)
        return VerifyResult(self.worst, tolerance, self.precision, r.prefill, r.decode_steps, agreement, self.scale,
                            rule, r.sampled, r.last, r.forced, self.where, self.kv_worst, kv_tolerance)
