"""Verification: the lowered model against its PyTorch source on the same inputs, through the KV cache.

:func:`verify_onnx` feeds both models the same tokens and compares their logits at every step, in three parts
chosen so that a damage anywhere in what the artifact claims to support shows:

- **the first positions**: a prefill of random tokens, then greedy decode steps through the cache (both sides are
  fed PyTorch's greedy choices, so one divergent pick cannot hide a later difference);
- **every position up to the end of the context**, sampled: decode steps placed at positions spread evenly up to
  ``max_position_embeddings - 1`` (the last one always), each after a past of that many tokens. The past is the
  cache of the first part repeated to that length, fed to both sides as the same tensors: a rotary table, a
  position-dependent mask or a sliding window that is wrong far from the start changes these logits. The last
  sample feeds a few tokens at once, the path of a prompt that continues a conversation. A context whose past
  would take more than :data:`MAX_PAST_BYTES` is sampled up to where it does not;
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
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from d2mc.errors import UserError, first_line
from d2mc.faults import fault_point
from d2mc.modeling import CACHE_ARG
from d2mc.onnx_session import OrtDecoder, runnable_proto

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
FORCING_BIAS = 1e4  # added to a router logit to force its expert (fp16 holds it; no trained router reaches it)


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
    """
    if precision not in TOLERANCE:
        raise UserError(f"unknown precision '{precision}': choose one of {', '.join(TOLERANCE)}")
    if prefill < 1 or decode_steps < 0 or positions < 0:
        raise UserError("verification needs a prefill of at least one token and no negative step counts")
    fault_point("verify")
    path = Path(onnx_path)
    comparison = _Comparison(model, precision)
    if prefill + decode_steps > comparison.arch.max_position_embeddings:
        raise UserError(f"a prefill of {prefill} and {decode_steps} decode steps do not fit the model's "
                        f"{comparison.arch.max_position_embeddings} positions: lower --prefill")
    plain, _ = runnable_proto(path, force_experts=False, float_matmuls=True)
    decoder = OrtDecoder(path, proto=plain)
    comparison.check_shapes(decoder)
    tables = compare_lookup_tables(model, path)
    vocab = min(vocab_limit or model.config.vocab_size, model.config.vocab_size)
    generator = torch.Generator().manual_seed(seed)
    cache = comparison.first_positions(decoder, torch.randint(0, vocab, (1, prefill), generator=generator),
                                       decode_steps)
    last = comparison.arch.max_position_embeddings - 1
    arch = comparison.arch
    per_position = 2 * len(arch.attention_blocks) * arch.num_kv_heads * arch.head_dim * 4
    reachable = min(last, MAX_PAST_BYTES // max(per_position, 1))
    sampled = sample_positions(prefill + decode_steps, reachable, positions)
    for p in sampled:
        chunk = min(CHUNK_TOKENS, p) if p == sampled[-1] else 1
        comparison.at_position(decoder, cache, p - chunk + 1, torch.randint(0, vocab, (1, chunk),
                                                                             generator=generator))
    del decoder
    forced = {}
    if force_experts:
        proto, forced = runnable_proto(path, force_experts=True, float_matmuls=True)
        expected = {b: block.router.out_features for b, block in enumerate(_blocks(model))
                    if getattr(block, "router", None) is not None}
        if forced != expected:
            raise UserError(f"the routers of the ONNX model (blocks {sorted(forced)}) do not match the PyTorch "
                            f"model's (blocks {sorted(expected)}): compare an artifact with the model it was "
                            "exported from")
        if forced:
            decoder = OrtDecoder(path, proto=proto)
            for r in range(max(forced.values())):
                comparison.forcing(decoder, forced, r, torch.randint(0, vocab, (1, prefill), generator=generator))
    result = comparison.result(prefill, decode_steps, sampled, last, forced)
    result.tables_max_abs_diff = {name: diff for name, (diff, _) in tables.items()}
    result.tables_tolerance = {name: TABLE_TOLERANCE[precision] * scale for name, (_, scale) in tables.items()}
    return result


def source_difference(model, onnx_path: str | Path, prefill: int = 16, decode_steps: int = 8, seed: int = 0) -> dict:
    """The largest |logit difference| between the ONNX at ``onnx_path`` and ``model`` (the unquantized source of a
    quantized artifact, say) over a prefill and greedy decode steps, and how often both pick the same next token.
    The graph runs as it ships, its plugin nodes (if any) expanded."""
    comparison = _Comparison(model, "fp32")
    ids = torch.randint(0, model.config.vocab_size, (1, prefill), generator=torch.Generator().manual_seed(seed))
    path = Path(onnx_path)
    comparison.first_positions(OrtDecoder(path, proto=runnable_proto(path, force_experts=False)[0]), ids,
                               decode_steps)
    return {"max_abs_diff": comparison.worst, "logit_scale": comparison.scale, "greedy_agreement": comparison.agreement,
            "prefill_tokens": prefill, "decode_steps": decode_steps}


def compare_lookup_tables(model, onnx_path: Path) -> dict[str, tuple[float, float]]:
    """``{table: (max |difference|, max |entry| of the model's)}`` for the token embedding (the LM head's table when
    the two are tied) and the rotary tables of the graph at ``onnx_path``, each against the one the PyTorch model
    computes with, over every row."""
    import onnx
    from onnx import numpy_helper
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    from d2mc.arch import ModelArch
    from d2mc.lowering.onnx_graph import LM_HEAD_TABLE, embedding_is_tied

    arch = ModelArch.from_config(model.config)
    embedding = model.model.embed_tokens.weight.detach().float().numpy()
    expected = {LM_HEAD_TABLE: embedding.T} if embedding_is_tied(model) else {"embed_tokens": embedding}
    if arch.attention_blocks:
        with torch.no_grad():
            cos, sin = model.model.rotary_emb(torch.zeros(1), torch.arange(arch.max_position_embeddings)[None])
        half = arch.head_dim // 2
        expected.update(cos_cache=cos[0, :, :half].float().numpy(), sin_cache=sin[0, :, :half].float().numpy())
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    found = {}
    for tensor in graph.initializer:
        if tensor.name not in expected:
            continue
        try:
            if uses_external_data(tensor):
                load_external_data_for_tensor(tensor, str(onnx_path.parent))
            actual = numpy_helper.to_array(tensor)
        except Exception as exc:  # a truncated or unreadable data file
            raise UserError(f"cannot read '{tensor.name}' of '{onnx_path}' ({first_line(exc)}): the artifact is "
                            "corrupt or incomplete; export it again") from None
        reference = expected[tensor.name]
        if actual.shape != reference.shape:
            raise UserError(f"'{tensor.name}' of '{onnx_path}' has shape {list(actual.shape)}, the model's "
                            f"{list(reference.shape)}: compare an artifact with the model it was exported from")
        found[tensor.name] = (_max_diff(actual, reference), float(np.abs(reference).max(initial=0.0)))
    return found


def _blocks(model) -> list:
    return list(model.model.layers)


class _Comparison:
    """The running worst differences of one verification."""

    def __init__(self, model, precision: str):
        from d2mc.arch import ModelArch

        self.model, self.precision = model, precision
        self.arch = ModelArch.from_config(model.config)
        self.worst, self.where, self.scale = 0.0, "", 0.0
        self.kv_worst = [0.0] * len(self.arch.attention_blocks)
        self.kv_scale = [0.0] * len(self.arch.attention_blocks)
        self.agreement = 0.0

    def check_shapes(self, decoder: OrtDecoder) -> None:
        expected = 2 * len(self.arch.attention_blocks)
        logits = decoder.session.get_outputs()[0]
        onnx_vocab = logits.shape[-1] if logits.name == "logits" else None
        if len(decoder.kv_names) != expected or onnx_vocab not in (self.arch.vocab_size, None) or (
                decoder.kv_names and decoder.kv_heads != self.arch.num_kv_heads):
            raise UserError(f"the ONNX model does not match the PyTorch model ({len(decoder.kv_names)} KV inputs, "
                            f"vocab {onnx_vocab}; the model has {expected} KV tensors, vocab {self.arch.vocab_size}): "
                            "compare an artifact with the model it was exported from")

    def step(self, decoder: OrtDecoder, tokens: torch.Tensor, torch_cache, ort_cache: dict, past: int, where: str,
             extra: dict | None = None, new_rows_only: bool = False) -> tuple:
        """One step on both sides, recording the differences; returns PyTorch's output, ONNX Runtime's logits and
        ONNX Runtime's new cache. With ``new_rows_only`` only the cache rows of ``tokens`` are compared (the past
        was fed to both sides as the same tensors)."""
        with torch.no_grad():
            out = self.model(tokens, use_cache=True, **{CACHE_ARG: torch_cache})
        ref = out.logits.float().numpy()
        got, new_cache = decoder.step(tokens.numpy(), ort_cache, past, extra)
        self.scale = max(self.scale, float(np.abs(ref).max()))
        diff = _max_diff(got, ref)
        if not diff <= self.worst:
            self.worst, self.where = diff, where
        for i, layer in enumerate(getattr(out, CACHE_ARG).layers):
            for kind, expected in (("key", layer.keys), ("value", layer.values)):
                actual = new_cache[f"past_key_values.{i}.{kind}"]
                n = min(actual.shape[2], expected.shape[2])  # a sliding-window layer keeps only its window
                n = min(n, tokens.shape[1]) if new_rows_only else n
                reference = expected[:, :, expected.shape[2] - n:].float().numpy()
                self.kv_scale[i] = max(self.kv_scale[i], float(np.abs(reference).max(initial=0.0)))
                self.kv_worst[i] = max(self.kv_worst[i], _max_diff(actual[:, :, actual.shape[2] - n:], reference))
        return out, got, new_cache

    def first_positions(self, decoder: OrtDecoder, ids: torch.Tensor, decode_steps: int) -> dict:
        """A prefill and greedy decode steps from position 0; returns ONNX Runtime's cache after them."""
        cache, past, torch_cache, tokens, agree = decoder.empty_cache(1), 0, None, ids, 0
        for step in range(decode_steps + 1):
            where = "prefill" if step == 0 else f"decode at position {past}"
            out, got, cache = self.step(decoder, tokens, torch_cache, cache, past, where)
            torch_cache = getattr(out, CACHE_ARG)
            past += tokens.shape[1]
            tokens = out.logits[:, -1:].argmax(-1)
            agree += int(got[0, -1].argmax() == int(tokens[0, 0]))
        self.agreement = agree / (decode_steps + 1)
        return cache

    def at_position(self, decoder: OrtDecoder, cache: dict, past: int, tokens: torch.Tensor) -> None:
        """``tokens`` after a past of ``past`` tokens: ``cache`` repeated to that length, the same on both sides."""
        from transformers.cache_utils import DynamicCache

        length = next(iter(cache.values())).shape[2] if cache else 0
        index = np.arange(past) % max(length, 1)
        ort_past = {name: np.ascontiguousarray(value[:, :, index]) for name, value in cache.items()}
        torch_cache = DynamicCache(config=self.model.config)
        for i in range(len(self.arch.attention_blocks)):
            torch_cache.update(*(torch.from_numpy(ort_past[f"past_key_values.{i}.{kind}"].astype(np.float32, copy=False))
                                 for kind in ("key", "value")), i)
        last = past + tokens.shape[1] - 1
        where = f"position {last}" if tokens.shape[1] == 1 else f"{tokens.shape[1]} tokens at positions {past}-{last}"
        self.step(decoder, tokens, torch_cache, ort_past, past, where, new_rows_only=True)

    def forcing(self, decoder: OrtDecoder, experts: dict[int, int], round_: int, ids: torch.Tensor) -> None:
        """A prefill and one decode step with expert ``round_`` (modulo its count) forced first in every MoE block,
        and the next ``top_k - 1`` experts after it, in order: the bias decides every choice, so no near tie of the
        router's logits (which reduced precision may break the other way) decides one."""
        layers = _blocks(self.model)
        biases = {}
        for block, count in experts.items():
            bias = np.zeros(count, np.float32)
            top_k = layers[block].top_k
            for j in range(top_k):
                bias[(round_ + j) % count] = FORCING_BIAS * (top_k - j) / top_k
            biases[block] = bias
        feeds = {f"d2mc_router_bias.{b}": bias.astype(decoder.dtype) for b, bias in biases.items()}
        hooks = [layers[b].router.register_forward_hook(_adding(torch.from_numpy(bias))) for b, bias in biases.items()]
        try:
            where = f"expert {round_} forced"
            out, _, cache = self.step(decoder, ids, None, decoder.empty_cache(1), 0, f"prefill, {where}", feeds)
            self.step(decoder, out.logits[:, -1:].argmax(-1), getattr(out, CACHE_ARG), cache, ids.shape[1],
                      f"decode, {where}", feeds)
        finally:
            for hook in hooks:
                hook.remove()

    def result(self, prefill: int, decode_steps: int, sampled: list[int], last: int,
               forced: dict[int, int]) -> VerifyResult:
        bound = TOLERANCE[self.precision]
        if self.precision in RELATIVE:
            rule = f"{bound:g} x max |logit| ({self.scale:.3g})"
            tolerance, kv_tolerance = bound * self.scale, [bound * s for s in self.kv_scale]
        else:
            rule, tolerance, kv_tolerance = f"{bound:g} absolute", bound, [bound] * len(self.kv_scale)
        return VerifyResult(self.worst, tolerance, self.precision, prefill, decode_steps, self.agreement, self.scale,
                            rule, sampled, last, forced, self.where, self.kv_worst, kv_tolerance)


def _adding(bias: torch.Tensor):
    """A forward hook that adds ``bias`` to a module's output."""
    return lambda _module, _inputs, output: output + bias.to(output.dtype)


def _max_diff(actual: np.ndarray, expected: np.ndarray) -> float:
    """Largest absolute difference; infinite when either side holds NaN or infinity (so it never passes)."""
    if actual.size == 0:
        return 0.0
    diff = np.abs(actual.astype(np.float32) - expected.astype(np.float32))
    return float(diff.max()) if np.isfinite(diff).all() else float("inf")
