"""Build the ONNX graph of a dense or converted model from its weights.

Two flavours share the I/O contract (``input_ids``, ``attention_mask``, ``position_ids``,
``past_key_values.{i}.key/value`` in; ``logits``, ``present.{i}.key/value`` out; dynamic batch, sequence and past;
one graph for prefill and decode) and differ in operators.

Flavour ``onnxruntime``: the graph follows what ONNX Runtime runs fastest on CPU: RMSNorm as ``SimplifiedLayerNormalization`` and
``SkipSimplifiedLayerNormalization`` (residual add fused in), attention as ``com.microsoft::GroupQueryAttention``
with packed QKV, rotary applied inside it from cos/sin caches, and the KV cache as graph inputs/outputs
(``past_key_values.{i}.key/value`` -> ``present.{i}.key/value``, ``i`` counting only blocks that keep attention).

MoE blocks (see :mod:`d2mc.modeling`) lower to a router ``MatMul`` on the post-attention hidden state and an
expert dispatch. Each expert's own post-attention norm weight is folded into its gate and up projections, so the
block normalises once (``rms(h)``) and every expert reads that. Two dispatch forms:
- ``dispatch`` (default): standard ops; TopK (or ArgMax for top-1), then per expert Equal, NonZero, GatherND,
  the SwiGLU MLP on the selected rows only, and ScatterND(add). A token costs only the experts it picked.
- ``contrib``: ONNX Runtime's ``com.microsoft::MoE`` op (swiglu, interleaved fc1), kept for comparison: it is
  slower than dispatch on CPU (benchmarks/onnx_export.py).

Flavour ``tensorrt``: only operators TensorRT's ONNX parser imports natively (opset 18, no ``com.microsoft``):
RMSNorm as ``Pow, ReduceMean, Add, Sqrt, Div`` in fp32 then the weight; rotary from cos/sin tables gathered by
``position_ids``; the new keys and values concatenated to the past (``Concat`` on the sequence axis gives
``present``); grouped-query attention as broadcast ``MatMul`` over ``[B, kv_heads, group, S, T]`` with a causal
(and sliding-window) mask built from ``attention_mask``, softmax in fp32. Each MoE block is one ``d2mc::D2mcMoE``
plugin node whose inputs and attributes follow :mod:`d2mc.ops.moe` (docs/tensorrt-plugin.md):
``D2mcMoE(rms(h), router(h), fc1, fc2)``, gate/up rows interleaved, shared experts first, each expert's norm weight
folded into fc1. ONNX Runtime cannot run the plugin: :func:`d2mc.lowering.plugin_reference.expand_plugin_nodes`
rewrites it into standard ops so that the flavour is verified against PyTorch like the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from d2mc.errors import UserError
from d2mc.ops.moe import folded_gate_up, moe_plugin_node, normalize_mode, pack_experts, plugin_attributes

OPSET = {"onnxruntime": 21, "tensorrt": 18}
MS_DOMAIN = "com.microsoft"
PRECISIONS = {"fp32": (np.float32, TensorProto.FLOAT), "fp16": (np.float16, TensorProto.FLOAT16)}
MOE_OPS = ("dispatch", "contrib")
FLAVOURS = ("onnxruntime", "tensorrt")
MASKED = -1e9  # additive attention bias of a masked position (fp32 scores: exp() underflows to exactly 0)


@dataclass(frozen=True)
class LoweringOptions:
    """What to emit: ``flavour`` (onnxruntime | tensorrt), weight ``precision`` (fp32 | fp16) and, for the
    onnxruntime flavour, the MoE form ``moe_op`` (dispatch | contrib; the tensorrt flavour always uses the plugin)."""

    precision: str = "fp32"
    moe_op: str = "dispatch"
    flavour: str = "onnxruntime"

    def __post_init__(self):
        if self.flavour not in FLAVOURS:
            raise UserError(f"unknown ONNX flavour '{self.flavour}': choose one of {', '.join(FLAVOURS)}")
        if self.precision not in PRECISIONS:
            raise UserError(f"unknown precision '{self.precision}' for ONNX: choose fp32 or fp16")
        if self.moe_op not in MOE_OPS:
            raise UserError(f"unknown MoE lowering '{self.moe_op}': choose one of {', '.join(MOE_OPS)}")


class _GraphBuilder:
    """Accumulates nodes and initializers with unique names."""

    def __init__(self, np_dtype, onnx_dtype):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.np_dtype, self.onnx_dtype = np_dtype, onnx_dtype
        self.trt = False  # emit only operators TensorRT parses natively
        self._count = 0
        self._consts: dict[tuple, str] = {}

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def weight(self, name: str, tensor, dtype=None) -> str:
        array = tensor.detach().float().cpu().numpy() if isinstance(tensor, torch.Tensor) else np.asarray(tensor)
        self.initializers.append(numpy_helper.from_array(array.astype(dtype or self.np_dtype), name))
        return name

    def const(self, values, dtype=np.int64) -> str:
        key = (tuple(np.asarray(values).ravel().tolist()), np.asarray(values).shape, np.dtype(dtype).str)
        if key not in self._consts:
            self._consts[key] = self.weight(self.name("const"), np.asarray(values, dtype=dtype), dtype)
        return self._consts[key]

    def op(self, op_type: str, inputs: list[str], outputs: int | list[str] = 1, domain: str = "", **attrs) -> list[str]:
        names = outputs if isinstance(outputs, list) else [self.name(op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, name=self.name(op_type), domain=domain, **attrs))
        return names

    def op1(self, op_type: str, inputs: list[str], domain: str = "", **attrs) -> str:
        return self.op(op_type, inputs, 1, domain, **attrs)[0]


def lower_to_onnx(model, out_dir: str | Path, options: LoweringOptions | None = None, *, flavour: str | None = None,
                  precision: str | None = None, moe_op: str | None = None) -> Path:
    """Write ``model.onnx`` (+ ``model.onnx.data``) for a dense or converted model into ``out_dir``.

    ``options`` or the keywords ``flavour``, ``precision``, ``moe_op`` (keywords win) choose what is emitted.
    Returns the path of ``model.onnx``.
    """
    from d2mc.arch import ModelArch

    options = options or LoweringOptions()
    overrides = {k: v for k, v in (("flavour", flavour), ("precision", precision), ("moe_op", moe_op)) if v}
    if overrides:
        options = LoweringOptions(**{**options.__dict__, **overrides})
    trt = options.flavour == "tensorrt"
    arch = ModelArch.from_config(model.config)
    np_dtype, onnx_dtype = PRECISIONS[options.precision]
    g = _GraphBuilder(np_dtype, onnx_dtype)
    g.trt = trt
    blocks = _blocks_of(model)
    base = model.config.base_config if model.config.model_type == "d2mc_moe" else model.config
    eps = float(base.rms_norm_eps)
    head_dim = arch.head_dim
    n_attention = len(arch.attention_blocks)

    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                            ["batch_size", "total_sequence_length"]),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"])]
    outputs = [helper.make_tensor_value_info("logits", onnx_dtype, ["batch_size", "sequence_length", arch.vocab_size])]
    for i in range(n_attention):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", onnx_dtype,
                                                        ["batch_size", arch.num_kv_heads, "past_sequence_length",
                                                         head_dim]))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", onnx_dtype,
                                                         ["batch_size", arch.num_kv_heads,
                                                          "total_sequence_length", head_dim]))

    if n_attention:
        cos, sin = _rotary_caches(model, arch)
        g.weight("cos_cache", cos)
        g.weight("sin_cache", sin)
    if trt:
        attend = _StandardAttention(g, arch)
    else:
        attend = _FusedAttention(g, arch)

    embed = g.weight("embed_tokens", model.model.embed_tokens.weight)
    residual = g.op1("Gather", [embed, "input_ids"])
    delta = None
    attention_idx = 0
    for b, block in enumerate(blocks):
        if block["attention"] is not None:
            normed, residual = _norm(g, residual, delta, block["input_norm"], eps, f"blocks.{b}.input_norm")
            delta = attend(block["attention"], normed, attention_idx, f"blocks.{b}")
            attention_idx += 1
        delta, residual = _experts(g, block, residual, delta, arch, eps, options, f"blocks.{b}")
    normed, _ = _norm(g, residual, delta, model.model.norm.weight, eps, "final_norm")
    lm_weight = model.lm_head.weight
    logits_w = g.weight("lm_head.weight_t", lm_weight.T)
    g.op("MatMul", [normed, logits_w], ["logits"])

    graph = helper.make_graph(g.nodes, f"d2mc_{arch.family}_{options.flavour}", inputs, outputs, g.initializers)
    domains = {n.domain for n in g.nodes} - {""}
    opsets = [helper.make_opsetid("", OPSET[options.flavour])] + [helper.make_opsetid(d, 1) for d in sorted(domains)]
    onnx_model = helper.make_model(graph, opset_imports=opsets, producer_name="d2mc")
    onnx_model.ir_version = 10
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "model.onnx"
    onnx.save_model(onnx_model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=1024)
    return path


def _blocks_of(model) -> list[dict]:
    """Each block's modules, the same shape for a dense model and a converted one."""
    if model.config.model_type == "d2mc_moe":
        out = []
        for block in model.model.layers:
            out.append({"attention": block.self_attn, "input_norm": getattr(block.input_layernorm, "weight", None),
                        "experts": list(block.experts), "shared": block.shared_experts, "router": block.router,
                        "top_k": block.top_k, "normalize": block.normalize_topk,
                        "ones": block.routing_weights == "ones"})
        return out
    return [{"attention": layer.self_attn, "input_norm": layer.input_layernorm.weight,
             "experts": [_DenseExpert(layer)], "shared": 1, "router": None, "top_k": 1, "normalize": True,
             "ones": False} for layer in model.model.layers]


class _DenseExpert:
    def __init__(self, layer):
        self.post_attention_layernorm = layer.post_attention_layernorm
        self.mlp = layer.mlp


def _rotary_caches(model, arch) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin tables ``[max_positions, head_dim / 2]`` from the model's own rotary module (scaling included)."""
    rotary = model.model.rotary_emb
    positions = torch.arange(arch.max_position_embeddings).unsqueeze(0)
    probe = torch.zeros(1, dtype=torch.float32)
    with torch.no_grad():
        cos, sin = rotary(probe, positions)
    half = arch.head_dim // 2
    return cos[0, :, :half].float().numpy(), sin[0, :, :half].float().numpy()


def _norm(g: _GraphBuilder, residual: str, delta: str | None, weight, eps: float, name: str,
          hidden: int = 0) -> tuple[str, str]:
    """RMSNorm of ``residual + delta`` (weight None: no scale); returns (normalised, new residual)."""
    if g.trt:
        summed = residual if delta is None else g.op1("Add", [residual, delta])
        normed = _rms(g, summed, eps)
        return (g.op1("Mul", [normed, g.weight(f"{name}.weight", weight)]) if weight is not None else normed), summed
    gamma = g.weight(f"{name}.weight", weight if weight is not None else torch.ones(hidden))
    if delta is None:
        return g.op1("SimplifiedLayerNormalization", [residual, gamma], axis=-1, epsilon=eps, stash_type=1), residual
    normed, _, _, summed = g.op("SkipSimplifiedLayerNormalization", [residual, delta, gamma], 4, MS_DOMAIN,
                                epsilon=eps)
    return normed, summed


def _rms(g: _GraphBuilder, x: str, eps: float) -> str:
    """``x / sqrt(mean(x^2) + eps)`` over the last axis in fp32, in standard ops (the pattern TensorRT fuses)."""
    fp16 = g.onnx_dtype == TensorProto.FLOAT16
    x32 = g.op1("Cast", [x], to=TensorProto.FLOAT) if fp16 else x
    mean = g.op1("ReduceMean", [g.op1("Pow", [x32, g.const(2.0, np.float32)]), g.const([-1])], keepdims=1)
    normed = g.op1("Div", [x32, g.op1("Sqrt", [g.op1("Add", [mean, g.const(eps, np.float32)])])])
    return g.op1("Cast", [normed], to=g.onnx_dtype) if fp16 else normed


def _linear_t(module) -> torch.Tensor:
    return module.weight.T


class _FusedAttention:
    """ONNX Runtime: ``com.microsoft::GroupQueryAttention`` (rotary, KV append and GQA in one kernel)."""

    def __init__(self, g: _GraphBuilder, arch):
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
            query = _project(g, x, q, f"{name}.q_proj")
            key = _project(g, x, k, f"{name}.k_proj")
            value = _project(g, x, v, f"{name}.v_proj")
            query = _head_norm(g, query, attention.q_norm, arch.num_heads, arch, f"{name}.q_norm")
            key = _head_norm(g, key, attention.k_norm, arch.num_kv_heads, arch, f"{name}.k_norm")
            gqa_inputs = [query, key, value]
        else:  # one packed projection: one weight read, one MatMul
            w = torch.cat([q.weight, k.weight, v.weight], 0)
            packed = g.op1("MatMul", [x, g.weight(f"{name}.qkv_proj.weight_t", w.T)])
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
        return _project(g, out, attention.o_proj, f"{name}.o_proj")


class _StandardAttention:
    """TensorRT: attention in standard ops with the KV cache concatenated explicitly.

    Queries are viewed as ``[B, kv_heads, group, S, D]`` and keys/values as ``[B, kv_heads, 1, T, D]`` so that
    grouped-query attention is a broadcast MatMul, with no copy of the shared keys and values.
    """

    def __init__(self, g: _GraphBuilder, arch):
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
        query = _project(g, x, attention.q_proj, f"{name}.q_proj")
        key = _project(g, x, attention.k_proj, f"{name}.k_proj")
        value = _project(g, x, attention.v_proj, f"{name}.v_proj")
        query, key, value = self._heads(query, heads), self._heads(key, kv_heads), self._heads(value, kv_heads)
        if getattr(attention, "q_norm", None) is not None:  # Qwen3: per-head RMSNorm before rotary
            query = g.op1("Mul", [_rms(g, query, float(attention.q_norm.variance_epsilon)),
                                  g.weight(f"{name}.q_norm.weight", attention.q_norm.weight)])
            key = g.op1("Mul", [_rms(g, key, float(attention.k_norm.variance_epsilon)),
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
        return _project(g, context, attention.o_proj, f"{name}.o_proj")


def _window(attention) -> int:
    """The sliding window of an attention module (keys at most ``window - 1`` positions back), or -1."""
    window = getattr(attention, "sliding_window", None)
    config = getattr(attention, "config", None)
    if window is None and getattr(config, "model_type", "") == "mistral":  # Mistral keeps it on the config only
        window = getattr(config, "sliding_window", None)
    return int(window) if window else -1


def _project(g, x: str, linear, name: str) -> str:
    out = g.op1("MatMul", [x, g.weight(f"{name}.weight_t", _linear_t(linear))])
    if getattr(linear, "bias", None) is not None:
        out = g.op1("Add", [out, g.weight(f"{name}.bias", linear.bias)])
    return out


def _head_norm(g, x: str, norm, heads: int, arch, name: str) -> str:
    shaped = g.op1("Reshape", [x, g.const([0, 0, heads, arch.head_dim])])
    normed = g.op1("SimplifiedLayerNormalization", [shaped, g.weight(f"{name}.weight", norm.weight)], axis=-1,
                   epsilon=float(norm.variance_epsilon), stash_type=1)
    return g.op1("Reshape", [normed, g.const([0, 0, heads * arch.head_dim])])


def _experts(g, block: dict, residual: str, delta: str | None, arch, eps: float, options: LoweringOptions,
             name: str) -> tuple[str, str]:
    """The block's expert part; returns (its delta to the residual stream, the residual it adds to)."""
    experts = block["experts"]
    if len(experts) == 1:  # a plain MLP: its norm can keep its own weight
        expert = experts[0]
        normed, residual = _norm(g, residual, delta, expert.post_attention_layernorm.weight, eps, f"{name}.norm")
        return _swiglu(g, normed, expert.mlp, None, f"{name}.mlp"), residual
    normed, residual = _norm(g, residual, delta, None, eps, f"{name}.norm", arch.hidden_size)  # gammas folded
    if block["router"] is not None and g.trt:
        return _moe_plugin(g, block, experts, normed, residual, name), residual
    shared, routed = experts[: block["shared"]], experts[block["shared"]:]
    parts = [_swiglu(g, normed, e.mlp, e.post_attention_layernorm.weight, f"{name}.expert{i}")
             for i, e in enumerate(shared)]
    if block["router"] is None:
        parts += [_swiglu(g, normed, e.mlp, e.post_attention_layernorm.weight, f"{name}.expert{len(shared) + i}")
                  for i, e in enumerate(routed)]
    elif options.moe_op == "contrib":
        parts.append(_moe_contrib(g, block, routed, normed, residual, arch, name))
    else:
        parts.append(_moe_dispatch(g, block, routed, normed, residual, arch, name, first=len(shared)))
    total = parts[0]
    for part in parts[1:]:
        total = g.op1("Add", [total, part])
    return total, residual


def _swiglu(g, x: str, mlp, gamma, name: str) -> str:
    gate_w, up_w = folded_gate_up(mlp, gamma)
    gate = g.op1("MatMul", [x, g.weight(f"{name}.gate_proj.weight_t", gate_w.T)])
    up = g.op1("MatMul", [x, g.weight(f"{name}.up_proj.weight_t", up_w.T)])
    act = g.op1("Mul", [g.op1("Mul", [gate, g.op1("Sigmoid", [gate])]), up])
    return g.op1("MatMul", [act, g.weight(f"{name}.down_proj.weight_t", mlp.down_proj.weight.T)])


def _router_logits(g, block, residual: str, arch, name: str) -> tuple[str, str]:
    flat_h = g.op1("Reshape", [residual, g.const([-1, arch.hidden_size])])
    logits = g.op1("MatMul", [flat_h, g.weight(f"{name}.router.weight_t", block["router"].weight.T)])
    return flat_h, logits


def _moe_dispatch(g, block, routed, normed: str, residual: str, arch, name: str, first: int = 0) -> str:
    """Route with standard ops; each expert runs only on the rows that chose it."""
    _, logits = _router_logits(g, block, residual, arch, name)
    flat_x = g.op1("Reshape", [normed, g.const([-1, arch.hidden_size])])
    top_k = block["top_k"]
    weights = None
    if top_k == 1 and (block["normalize"] or block["ones"]):
        indices = g.op1("ArgMax", [logits], axis=-1, keepdims=1)  # [T, 1], weight 1
    else:  # chosen on the logits, as in PyTorch: saturated probabilities can tie
        indices = g.op("TopK", [logits, g.const([top_k])], 2, axis=-1)[1]
        if not block["ones"]:  # "ones": every chosen expert with weight 1, nothing to multiply
            weights = g.op1("GatherElements", [g.op1("Softmax", [logits], axis=-1), indices], axis=-1)
            if block["normalize"]:
                weights = g.op1("Div", [weights, g.op1("ReduceSum", [weights, g.const([-1])], keepdims=1)])
    # ONNX Runtime's CPU ScatterND adds only in fp32: an fp16 graph accumulates the experts' outputs in fp32
    fp16 = g.onnx_dtype == TensorProto.FLOAT16
    accumulated = g.op1("Mul", [flat_x, g.const(np.zeros(1), g.np_dtype)])  # zeros shaped like the tokens
    if fp16:
        accumulated = g.op1("Cast", [accumulated], to=TensorProto.FLOAT)
    for e, expert in enumerate(routed):
        chosen = g.op1("Equal", [indices, g.const([e])])  # [T, k]
        where = g.op1("Transpose", [g.op1("NonZero", [chosen])], perm=[1, 0])  # [n, 2]: token, slot
        token = g.op1("Slice", [where, g.const([0]), g.const([1]), g.const([1])])  # [n, 1]
        rows = g.op1("GatherND", [flat_x, token])
        out = _swiglu(g, rows, expert.mlp, expert.post_attention_layernorm.weight, f"{name}.expert{first + e}")
        if weights is not None:
            picked = g.op1("Unsqueeze", [g.op1("GatherND", [weights, where]), g.const([1])])  # [n, 1]
            out = g.op1("Mul", [out, picked])
        if fp16:
            out = g.op1("Cast", [out], to=TensorProto.FLOAT)
        accumulated = g.op1("ScatterND", [accumulated, token, out], reduction="add")
    if fp16:
        accumulated = g.op1("Cast", [accumulated], to=g.onnx_dtype)
    return g.op1("Reshape", [accumulated, g.op1("Shape", [residual])])


def _moe_plugin(g, block, experts, normed: str, residual: str, name: str) -> str:
    """One ``d2mc::D2mcMoE`` node for the whole block (shared and routed experts), as the plugin contract says."""
    fc1, fc2 = pack_experts(experts)
    attributes = plugin_attributes(experts, block["shared"], block["top_k"],
                                   normalize_mode(block["normalize"], block["ones"]))
    logits = g.op1("MatMul", [residual, g.weight(f"{name}.router.weight_t", block["router"].weight.T)])
    out = g.name("moe")
    g.nodes.append(moe_plugin_node(g.name(f"{name}.moe"), normed, logits, g.weight(f"{name}.moe.fc1", fc1),
                                   g.weight(f"{name}.moe.fc2", fc2), out, attributes))
    return out


def _chosen_only(g, logits: str, top_k: int) -> str:
    """ONNX Runtime's MoE op knows only softmax weights. For a block whose chosen experts count with weight 1 it
    gets logits that keep the router's top-k choice and make the chosen experts equally likely: 0 for the chosen,
    ``-1e4`` (``exp`` underflows to 0 in fp32, and fp16 holds it) elsewhere, so each gets ``1 / k`` after
    normalisation, and the experts' down projections carry a factor ``k``. The choice is the top-k of the
    logits, as PyTorch makes it."""
    _, indices = g.op("TopK", [logits, g.const([top_k])], 2, axis=-1)
    masked = g.op1("Add", [g.op1("Mul", [logits, g.const(np.zeros(1), g.np_dtype)]), g.const(-1e4, g.np_dtype)])
    zeros = g.op1("Mul", [g.op1("Cast", [indices], to=g.onnx_dtype), g.const(np.zeros(1), g.np_dtype)])
    return g.op1("ScatterElements", [masked, indices, zeros], axis=-1)


def _moe_contrib(g, block, routed, normed: str, residual: str, arch, name: str) -> str:
    """ONNX Runtime's fused MoE op (CPU form: swiglu with interleaved gate/up rows, no fc3)."""
    _, logits = _router_logits(g, block, residual, arch, name)
    if block["ones"]:
        logits = _chosen_only(g, logits, block["top_k"])
    flat_x = g.op1("Reshape", [normed, g.const([-1, arch.hidden_size])])
    fc1, fc2 = pack_experts(routed, routed_scale=float(block["top_k"]) if block["ones"] else 1.0)
    out = g.op1("MoE", [flat_x, logits, g.weight(f"{name}.moe.fc1", fc1), "",
                        g.weight(f"{name}.moe.fc2", fc2)], MS_DOMAIN,
                k=block["top_k"], activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0,
                activation_beta=0.0, swiglu_limit=1e9,
                normalize_routing_weights=int(block["normalize"] or block["ones"]))
    return g.op1("Reshape", [out, g.op1("Shape", [residual])])
