"""Attention in the ONNX graph: ONNX Runtime's fused ``GroupQueryAttention`` (flavour ``onnxruntime``) or standard
ops with an explicit KV cache (flavour ``tensorrt``)."""

from __future__ import annotations

import numpy as np
import torch
from onnx import TensorProto

from d2mc.lowering.builder import MS_DOMAIN, GraphBuilder, matmul, project, rms
from d2mc.quantize import concat_rows

MASKED = -1e9  # additive attention bias of a masked position (fp32 scores: exp() underflows to exactly 0)


class FusedAttention:
    """ONNX Runtime: ``com.microsoft::GroupQueryAttention`` (rotary, KV append and GQA in one kernel)."""

    def __init__(self, g: GraphBuilder, arch):
        self.g, self.arch = g, arch
        # sequence lengths for GroupQueryAttention: seqlens_k = sum(mask) - 1, total = mask width
        one = g.const([1])
        self.seqlens = g.op1("Cast", [g.op1("Sub", [g.op1("ReduceSum", ["attention_mask", one], keepdims=0), one])],
                             to=TensorProto.INT32)
        self.total = g.op1("Cast", [g.op1("Gather", [g.op1("Shape", ["attention_mask"]), g.const(1)], axis=0)],
                           to=TensorProto.INT32)

    def __call__(self, attention, x: str, idx: int, name: str) -> str:
        g, arch = self.g, self.arch
        q, k, v = attention.q_proj, attention.k_proj, attention.v_proj
        if getattr(attention, "q_norm", None) is not None:  # Qwen3 normalises q and k per head before rotary
            query = project(g, x, q, f"{name}.q_proj")
            key = project(g, x, k, f"{name}.k_proj")
            value = project(g, x, v, f"{name}.v_proj")
            query = _head_norm(g, query, attention.q_norm, arch.num_heads, arch, f"{name}.q_norm")
            key = _head_norm(g, key, attention.k_norm, arch.num_kv_heads, arch, f"{name}.k_norm")
            gqa_inputs = [query, key, value]
        else:  # one packed projection: one weight read, one MatMul
            parts = [g.quantized.get(m) for m in (q, k, v)]
            w = concat_rows(parts) if parts[0] is not None else torch.cat([q.weight, k.weight, v.weight], 0)
            packed = matmul(g, x, w, f"{name}.qkv_proj.weight")
            if q.bias is not None:
                bias = torch.cat([q.bias, k.bias, v.bias])
                packed = g.op1("Add", [packed, g.weight(f"{name}.qkv_proj.bias", bias)])
            gqa_inputs = [packed, "", ""]
        out = g.op("GroupQueryAttention",
                   [*gqa_inputs, f"past_key_values.{idx}.key", f"past_key_values.{idx}.value", self.seqlens,
                    self.total, "cos_cache", "sin_cache"],
                   [g.name("attn"), f"present.{idx}.key", f"present.{idx}.value"], MS_DOMAIN,
                   num_heads=arch.num_heads, kv_num_heads=arch.num_kv_heads, do_rotary=1, rotary_interleaved=0,
                   scale=float(attention.scaling), local_window_size=_window(attention))[0]
        return project(g, out, attention.o_proj, f"{name}.o_proj")


class StandardAttention:
    """TensorRT: attention in standard ops with the KV cache concatenated explicitly.

    Queries are viewed as ``[B, kv_heads, group, S, D]`` and keys/values as ``[B, kv_heads, 1, T, D]`` so that
    grouped-query attention is a broadcast MatMul, with no copy of the shared keys and values.
    """

    def __init__(self, g: GraphBuilder, arch):
        self.g, self.arch = g, arch
        # cos/sin [B, S, D/2] -> [B, 1, S, D/2]: broadcast over heads
        self.cos = g.op1("Unsqueeze", [g.op1("Gather", ["cos_cache", "position_ids"]), g.const([1])])
        self.sin = g.op1("Unsqueeze", [g.op1("Gather", ["sin_cache", "position_ids"]), g.const([1])])
        # absolute positions: keys 0..T-1, the new queries T-S..T-1 (T from the mask, S from the input ids)
        total = g.op1("Gather", [g.op1("Shape", ["attention_mask"]), g.const(1)], axis=0)
        new = g.op1("Gather", [g.op1("Shape", ["input_ids"]), g.const(1)], axis=0)
        self.keys = g.op1("Range", [g.const(0), total, g.const(1)])  # [T]
        self.queries = g.op1("Unsqueeze", [g.op1("Range", [g.op1("Sub", [total, new]), total, g.const(1)]),
                                           g.const([1])])  # [S, 1]
        self.padding = g.op1("Cast", [g.op1("Unsqueeze", ["attention_mask", g.const([1, 2, 3])])],
                             to=TensorProto.BOOL)  # [B, 1, 1, 1, T]
        self._masks: dict[int, str] = {}

    def mask(self, window: int) -> str:
        """Additive fp32 bias ``[B, 1, 1, S, T]``: 0 where a query may attend a key, MASKED elsewhere."""
        if window not in self._masks:
            g = self.g
            allowed = g.op1("LessOrEqual", [self.keys, self.queries])  # causal, [S, T]
            if window > 0:  # sliding window: a key at most window - 1 positions back
                allowed = g.op1("And", [allowed, g.op1("Greater", [self.keys, g.op1(
                    "Sub", [self.queries, g.const(window)])])])
            allowed = g.op1("And", [allowed, self.padding])
            self._masks[window] = g.op1("Where", [allowed, g.const(0.0, np.float32),
                                                  g.const(MASKED, np.float32)])
        return self._masks[window]

    def _heads(self, x: str, heads: int) -> str:
        """``[B, S, heads * D]`` -> ``[B, heads, S, D]``."""
        shaped = self.g.op1("Reshape", [x, self.g.const([0, 0, heads, self.arch.head_dim])])
        return self.g.op1("Transpose", [shaped], perm=[0, 2, 1, 3])

    def _rotate(self, x: str) -> str:
        """Rotary embedding, halves layout (rotate_half): ``[x1 cos - x2 sin, x2 cos + x1 sin]``."""
        g, half = self.g, self.arch.head_dim // 2
        x1 = g.op1("Slice", [x, g.const([0]), g.const([half]), g.const([-1])])
        x2 = g.op1("Slice", [x, g.const([half]), g.const([2 * half]), g.const([-1])])
        first = g.op1("Sub", [g.op1("Mul", [x1, self.cos]), g.op1("Mul", [x2, self.sin])])
        second = g.op1("Add", [g.op1("Mul", [x2, self.cos]), g.op1("Mul", [x1, self.sin])])
        return g.op1("Concat", [first, second], axis=-1)

    def __call__(self, attention, x: str, idx: int, name: str) -> str:
        g, arch = self.g, self.arch
        heads, kv_heads, dim = arch.num_heads, arch.num_kv_heads, arch.head_dim
        query = project(g, x, attention.q_proj, f"{name}.q_proj")
        key = project(g, x, attention.k_proj, f"{name}.k_proj")
        value = project(g, x, attention.v_proj, f"{name}.v_proj")
        query, key, value = self._heads(query, heads), self._heads(key, kv_heads), self._heads(value, kv_heads)
        if getattr(attention, "q_norm", None) is not None:  # Qwen3: per-head RMSNorm before rotary
            query = g.op1("Mul", [rms(g, query, float(attention.q_norm.variance_epsilon)),
                                  g.weight(f"{name}.q_norm.weight", attention.q_norm.weight)])
            key = g.op1("Mul", [rms(g, key, float(attention.k_norm.variance_epsilon)),
                                g.weight(f"{name}.k_norm.weight", attention.k_norm.weight)])
        query = g.op1("Mul", [self._rotate(query), g.const(float(attention.scaling), g.np_dtype)])
        key = self._rotate(key)
        present_key = g.op("Concat", [f"past_key_values.{idx}.key", key], [f"present.{idx}.key"], axis=2)[0]
        present_value = g.op("Concat", [f"past_key_values.{idx}.value", value], [f"present.{idx}.value"], axis=2)[0]
        grouped = g.op1("Reshape", [query, g.const([0, kv_heads, heads // kv_heads, -1, dim])])
        keys_t = g.op1("Transpose", [g.op1("Unsqueeze", [present_key, g.const([2])])], perm=[0, 1, 2, 4, 3])
        scores = g.op1("MatMul", [grouped, keys_t])  # [B, kv_heads, group, S, T]
        if g.onnx_dtype != TensorProto.FLOAT:
            scores = g.op1("Cast", [scores], to=TensorProto.FLOAT)
        probs = g.op1("Softmax", [g.op1("Add", [scores, self.mask(_window(attention))])], axis=-1)
        if g.onnx_dtype != TensorProto.FLOAT:
            probs = g.op1("Cast", [probs], to=g.onnx_dtype)
        context = g.op1("MatMul", [probs, g.op1("Unsqueeze", [present_value, g.const([2])])])
        context = g.op1("Reshape", [context, g.const([0, heads, -1, dim])])
        context = g.op1("Reshape", [g.op1("Transpose", [context], perm=[0, 2, 1, 3]), g.const([0, 0, heads * dim])])
        return project(g, context, attention.o_proj, f"{name}.o_proj")


def _window(attention) -> int:
    """The sliding window of an attention module (keys at most ``window - 1`` positions back), or -1."""
    window = getattr(attention, "sliding_window", None)
    config = getattr(attention, "config", None)
    if window is None and getattr(config, "model_type", "") == "mistral":  # Mistral keeps it on the config only
        window = getattr(config, "sliding_window", None)
    return int(window) if window else -1


def _head_norm(g, x: str, norm, heads: int, arch, name: str) -> str:
    shaped = g.op1("Reshape", [x, g.const([0, 0, heads, arch.head_dim])])
    normed = g.op1("SimplifiedLayerNormalization", [shaped, g.weight(f"{name}.weight", norm.weight)], axis=-1,
                   epsilon=float(norm.variance_epsilon), stash_type=1)
    return g.op1("Reshape", [normed, g.const([0, 0, heads * arch.head_dim])])
