"""Build the ONNX graph of a dense or converted model from its weights.

The graph follows what ONNX Runtime runs fastest on CPU: RMSNorm as ``SimplifiedLayerNormalization`` and
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
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from d2mc.errors import UserError

OPSET = 21
MS_DOMAIN = "com.microsoft"
PRECISIONS = {"fp32": (np.float32, TensorProto.FLOAT), "fp16": (np.float16, TensorProto.FLOAT16)}
MOE_OPS = ("dispatch", "contrib")


@dataclass(frozen=True)
class LoweringOptions:
    precision: str = "fp32"
    moe_op: str = "dispatch"

    def __post_init__(self):
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


def lower_to_onnx(model, out_dir: str | Path, options: LoweringOptions | None = None) -> Path:
    """Write ``model.onnx`` (+ ``model.onnx.data``) for a dense or converted model into ``out_dir``."""
    from d2mc.arch import ModelArch

    options = options or LoweringOptions()
    arch = ModelArch.from_config(model.config)
    np_dtype, onnx_dtype = PRECISIONS[options.precision]
    g = _GraphBuilder(np_dtype, onnx_dtype)
    blocks = _blocks_of(model)
    base = model.config.base_config if model.config.model_type == "d2mc_moe" else model.config
    eps = float(base.rms_norm_eps)
    _h, head_dim = arch.hidden_size, arch.head_dim
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

    # sequence lengths for GroupQueryAttention: seqlens_k = sum(mask) - 1, total = mask width
    one = g.const([1])
    seqlens = g.op1("Cast", [g.op1("Sub", [g.op1("ReduceSum", ["attention_mask", one], keepdims=0), one])],
                    to=TensorProto.INT32)
    total = g.op1("Cast", [g.op1("Gather", [g.op1("Shape", ["attention_mask"]), g.const(1)], axis=0)],
                  to=TensorProto.INT32)
    if n_attention:
        cos, sin = _rotary_caches(model, arch)
        g.weight("cos_cache", cos)
        g.weight("sin_cache", sin)

    embed = g.weight("embed_tokens", model.model.embed_tokens.weight)
    residual = g.op1("Gather", [embed, "input_ids"])
    delta = None
    attention_idx = 0
    for b, block in enumerate(blocks):
        if block["attention"] is not None:
            normed, residual = _norm(g, residual, delta, block["input_norm"], eps, f"blocks.{b}.input_norm")
            delta = _attention(g, block["attention"], normed, arch, attention_idx, seqlens, total, f"blocks.{b}")
            attention_idx += 1
        delta, residual = _experts(g, block, residual, delta, arch, eps, options, f"blocks.{b}")
    normed, _ = _norm(g, residual, delta, model.model.norm.weight, eps, "final_norm")
    lm_weight = model.lm_head.weight
    logits_w = g.weight("lm_head.weight_t", lm_weight.T)
    g.op("MatMul", [normed, logits_w], ["logits"])

    graph = helper.make_graph(g.nodes, f"d2mc_{arch.family}", inputs, outputs, g.initializers)
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                         helper.make_opsetid(MS_DOMAIN, 1)])
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
                        "top_k": block.top_k, "normalize": block.normalize_topk})
        return out
    return [{"attention": layer.self_attn, "input_norm": layer.input_layernorm.weight,
             "experts": [_DenseExpert(layer)], "shared": 1, "router": None, "top_k": 1, "normalize": True}
            for layer in model.model.layers]


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
    gamma = g.weight(f"{name}.weight", weight if weight is not None else torch.ones(hidden))
    if delta is None:
        return g.op1("SimplifiedLayerNormalization", [residual, gamma], axis=-1, epsilon=eps, stash_type=1), residual
    normed, _, _, summed = g.op("SkipSimplifiedLayerNormalization", [residual, delta, gamma], 4, MS_DOMAIN,
                                epsilon=eps)
    return normed, summed


def _linear_t(module) -> torch.Tensor:
    return module.weight.T


def _attention(g, attention, x: str, arch, idx: int, seqlens: str, total: str, name: str) -> str:
    q, k, v = attention.q_proj, attention.k_proj, attention.v_proj
    qkv_dim = (arch.num_heads + 2 * arch.num_kv_heads) * arch.head_dim
    qk_norm = getattr(attention, "q_norm", None) is not None
    if qk_norm:  # Qwen3 normalises q and k per head before rotary: project separately
        query = _project(g, x, q, f"{name}.q_proj")
        key = _project(g, x, k, f"{name}.k_proj")
        value = _project(g, x, v, f"{name}.v_proj")
        query = _head_norm(g, query, attention.q_norm, arch.num_heads, arch, f"{name}.q_norm")
        key = _head_norm(g, key, attention.k_norm, arch.num_kv_heads, arch, f"{name}.k_norm")
        gqa_inputs = [query, key, value]
    else:
        w = torch.cat([q.weight, k.weight, v.weight], 0)
        packed = g.op1("MatMul", [x, g.weight(f"{name}.qkv_proj.weight_t", w.T)])
        if q.bias is not None:
            bias = torch.cat([q.bias, k.bias, v.bias])
            packed = g.op1("Add", [packed, g.weight(f"{name}.qkv_proj.bias", bias)])
        assert packed and qkv_dim
        gqa_inputs = [packed, "", ""]
    out = g.op("GroupQueryAttention",
               [*gqa_inputs, f"past_key_values.{idx}.key", f"past_key_values.{idx}.value", seqlens, total,
                "cos_cache", "sin_cache"],
               [g.name("attn"), f"present.{idx}.key", f"present.{idx}.value"], MS_DOMAIN,
               num_heads=arch.num_heads, kv_num_heads=arch.num_kv_heads, do_rotary=1, rotary_interleaved=0,
               scale=float(attention.scaling), local_window_size=_window(attention))[0]
    return _project(g, out, attention.o_proj, f"{name}.o_proj")


def _window(attention) -> int:
    window = getattr(attention, "sliding_window", None)
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


def _folded(mlp, gamma) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate and up weights ``[in, out]`` with the expert's norm weight folded into their input columns."""
    gate, up = mlp.gate_proj.weight, mlp.up_proj.weight
    if gamma is not None:
        gate, up = gate * gamma[None, :], up * gamma[None, :]
    return gate.T, up.T


def _swiglu(g, x: str, mlp, gamma, name: str) -> str:
    gate_w, up_w = _folded(mlp, gamma)
    gate = g.op1("MatMul", [x, g.weight(f"{name}.gate_proj.weight_t", gate_w)])
    up = g.op1("MatMul", [x, g.weight(f"{name}.up_proj.weight_t", up_w)])
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
    if top_k == 1 and block["normalize"]:
        indices = g.op1("ArgMax", [logits], axis=-1, keepdims=1)  # [T, 1], weight 1
    else:
        probs = g.op1("Softmax", [logits], axis=-1)
        weights, indices = g.op("TopK", [probs, g.const([top_k])], 2, axis=-1)
        if block["normalize"]:
            weights = g.op1("Div", [weights, g.op1("ReduceSum", [weights, g.const([-1])], keepdims=1)])
    accumulated = g.op1("Mul", [flat_x, g.const(np.zeros(1), g.np_dtype)])  # zeros shaped like the tokens
    for e, expert in enumerate(routed):
        chosen = g.op1("Equal", [indices, g.const([e])])  # [T, k]
        where = g.op1("Transpose", [g.op1("NonZero", [chosen])], perm=[1, 0])  # [n, 2]: token, slot
        token = g.op1("Slice", [where, g.const([0]), g.const([1]), g.const([1])])  # [n, 1]
        rows = g.op1("GatherND", [flat_x, token])
        out = _swiglu(g, rows, expert.mlp, expert.post_attention_layernorm.weight, f"{name}.expert{first + e}")
        if weights is not None:
            picked = g.op1("Unsqueeze", [g.op1("GatherND", [weights, where]), g.const([1])])  # [n, 1]
            out = g.op1("Mul", [out, picked])
        accumulated = g.op1("ScatterND", [accumulated, token, out], reduction="add")
    return g.op1("Reshape", [accumulated, g.op1("Shape", [residual])])


def _moe_contrib(g, block, routed, normed: str, residual: str, arch, name: str) -> str:
    """ONNX Runtime's fused MoE op (CPU form: swiglu with interleaved gate/up rows, no fc3)."""
    _, logits = _router_logits(g, block, residual, arch, name)
    flat_x = g.op1("Reshape", [normed, g.const([-1, arch.hidden_size])])
    fc1, fc2 = [], []
    for expert in routed:
        gate_w, up_w = _folded(expert.mlp, expert.post_attention_layernorm.weight)  # [H, I]
        interleaved = torch.stack([gate_w.T, up_w.T], dim=1).reshape(-1, arch.hidden_size)  # [2I, H]
        fc1.append(interleaved)
        fc2.append(expert.mlp.down_proj.weight)  # [H, I]
    out = g.op1("MoE", [flat_x, logits, g.weight(f"{name}.moe.fc1", torch.stack(fc1)), "",
                        g.weight(f"{name}.moe.fc2", torch.stack(fc2))], MS_DOMAIN,
                k=block["top_k"], activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0,
                activation_beta=0.0, swiglu_limit=1e9, normalize_routing_weights=int(block["normalize"]))
    return g.op1("Reshape", [out, g.op1("Shape", [residual])])
