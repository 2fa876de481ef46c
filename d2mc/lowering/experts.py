"""A block's experts in the ONNX graph: a plain MLP, or an MoE block as expert dispatch in standard ops,
ONNX Runtime's ``com.microsoft::MoE`` op (``com.microsoft::QMoE`` with quantized experts), or one ``d2mc::D2mcMoE``
plugin node (flavour ``tensorrt``), with each expert's post-attention norm weight folded into its gate and up
projections (for quantized experts the quantize step folded it before quantizing)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from onnx import TensorProto

from d2mc.arch import BlockPlan
from d2mc.lowering.builder import MS_DOMAIN, GraphBuilder, matmul, norm
from d2mc.ops.moe import (
    QuantizedExperts,
    folded_gate_up,
    moe_plugin_node,
    normalize_mode,
    pack_experts,
    pack_quantized_experts,
    plugin_attributes,
)


@dataclass(frozen=True)
class LoweredBlock:
    """What the lowering reads of one block: its plan (routing) and its modules, the same for a dense layer and a
    converted block."""

    plan: BlockPlan
    attention: object | None  # the attention module, None when the block has none
    input_norm: object | None  # the input norm's weight
    experts: tuple  # modules with ``post_attention_layernorm`` and ``mlp``, shared ones first
    router: object | None

    @property
    def ones(self) -> bool:
        """Every chosen expert counts with weight 1 (experts cut from an MLP's neurons)."""
        return self.plan.routing_weights == "ones"


def lower_experts(g: GraphBuilder, block: LoweredBlock, residual: str, delta: str | None, arch, eps: float, moe_op: str,
                  name: str) -> tuple[str, str]:
    """The block's expert part (``moe_op``: the onnxruntime flavour's MoE form); returns (its delta to the residual
    stream, the residual it adds to)."""
    experts = block.experts
    if len(experts) == 1:  # a plain MLP: its norm can keep its own weight
        expert = experts[0]
        normed, residual = norm(g, residual, delta, expert.post_attention_layernorm.weight, eps, f"{name}.norm")
        return _swiglu(g, normed, expert.mlp, None, f"{name}.mlp"), residual
    normed, residual = norm(g, residual, delta, None, eps, f"{name}.norm", arch.hidden_size)  # gammas folded
    if block.router is not None and g.trt:
        return _moe_plugin(g, block, experts, normed, residual, name), residual
    shared, routed = experts[: block.plan.shared_experts], experts[block.plan.shared_experts:]
    parts = [_swiglu(g, normed, e.mlp, e.post_attention_layernorm.weight, f"{name}.expert{i}")
             for i, e in enumerate(shared)]
    if block.router is None:
        parts += [_swiglu(g, normed, e.mlp, e.post_attention_layernorm.weight, f"{name}.expert{len(shared) + i}")
                  for i, e in enumerate(routed)]
    elif moe_op == "contrib" and g.quantized:
        parts.append(_qmoe(g, block, routed, normed, residual, name))
    elif moe_op == "contrib":
        parts.append(_moe_contrib(g, block, routed, normed, residual, arch, name))
    else:
        parts.append(_moe_dispatch(g, block, routed, normed, residual, arch, name, first=len(shared)))
    total = parts[0]
    for part in parts[1:]:
        total = g.op1("Add", [total, part])
    return total, residual


def _swiglu(g, x: str, mlp, gamma, name: str) -> str:
    if mlp.gate_proj in g.quantized:  # codes cannot take a norm weight in: it was folded before quantizing
        if gamma is not None and not bool((gamma == 1).all()):
            raise ValueError(f"{name}: a quantized expert's norm weight must be folded into its gate and up first")
        gate_w, up_w, down_w = (g.quantized[m] for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    else:
        (gate_w, up_w), down_w = folded_gate_up(mlp, gamma), mlp.down_proj.weight
    gate = matmul(g, x, gate_w, f"{name}.gate_proj.weight")
    up = matmul(g, x, up_w, f"{name}.up_proj.weight")
    act = g.op1("Mul", [g.op1("Mul", [gate, g.op1("Sigmoid", [gate])]), up])
    return matmul(g, act, down_w, f"{name}.down_proj.weight")


def _router_logits(g, block, residual: str, arch, name: str) -> tuple[str, str]:
    flat_h = g.op1("Reshape", [residual, g.const([-1, arch.hidden_size])])
    logits = g.op1("MatMul", [flat_h, g.weight(f"{name}.router.weight_t", block.router.weight.T)])
    return flat_h, logits


def _moe_dispatch(g, block, routed, normed: str, residual: str, arch, name: str, first: int = 0) -> str:
    """Route with standard ops; each expert runs only on the rows that chose it."""
    _, logits = _router_logits(g, block, residual, arch, name)
    flat_x = g.op1("Reshape", [normed, g.const([-1, arch.hidden_size])])
    top_k = block.plan.top_k
    weights = None
    if top_k == 1 and (block.plan.normalize_topk or block.ones):
        indices = g.op1("ArgMax", [logits], axis=-1, keepdims=1)  # [T, 1], weight 1
    else:  # chosen on the logits, as in PyTorch: saturated probabilities can tie
        indices = g.op("TopK", [logits, g.const([top_k])], 2, axis=-1)[1]
        if not block.ones:  # "ones": every chosen expert with weight 1, nothing to multiply
            weights = g.op1("GatherElements", [g.op1("Softmax", [logits], axis=-1), indices], axis=-1)
            if block.plan.normalize_topk:
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
    """One ``d2mc::D2mcMoE`` node for the whole block (shared and routed experts), as the plugin contract says:
    float expert weights, or the experts' quantized weights (``g.quantized``) packed with their block scales."""
    quantized = _quantized_experts(g, experts, name)
    attributes = plugin_attributes(experts, block.plan.shared_experts, block.plan.top_k,
                                   normalize_mode(block.plan.normalize_topk, block.ones), quantized)
    logits = g.op1("MatMul", [residual, g.weight(f"{name}.router.weight_t", block.router.weight.T)])
    out = g.name("moe")
    if quantized is None:
        fc1, fc2 = pack_experts(experts)
        weights, scales = (g.weight(f"{name}.moe.fc1", fc1), g.weight(f"{name}.moe.fc2", fc2)), None
    else:
        weights = (g.weight(f"{name}.moe.fc1", quantized.fc1, np.int8),
                   g.weight(f"{name}.moe.fc2", quantized.fc2, np.int8))
        scales = (g.weight(f"{name}.moe.fc1_scales", quantized.fc1_scales),
                  g.weight(f"{name}.moe.fc2_scales", quantized.fc2_scales))
    g.nodes.append(moe_plugin_node(g.name(f"{name}.moe"), normed, logits, *weights, out, attributes, scales))
    return out


def _quantized_experts(g, experts, name: str) -> QuantizedExperts | None:
    """The block's experts packed for the plugin from their quantized gate, up and down projections, or None when
    none of them is quantized."""
    linears = [(e.mlp.gate_proj, e.mlp.up_proj, e.mlp.down_proj) for e in experts]
    found = [tuple(g.quantized.get(linear) for linear in expert) for expert in linears]
    present = [q is not None for expert in found for q in expert]
    if not any(present):
        return None
    if not all(present):
        raise ValueError(f"{name}: some expert projections are quantized and some are not; the plugin node takes "
                         "one form for the whole block")
    for index, expert in enumerate(experts):
        if not torch.all(expert.post_attention_layernorm.weight == 1):
            raise ValueError(f"{name}: expert {index} keeps its norm weight beside quantized projections; quantize "
                             "after d2mc.quantize.fold_expert_norms (the codes must stand for the folded weights)")
    return pack_quantized_experts(found)


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
    if block.ones:
        logits = _chosen_only(g, logits, block.plan.top_k)
    flat_x = g.op1("Reshape", [normed, g.const([-1, arch.hidden_size])])
    fc1, fc2 = pack_experts(routed, routed_scale=float(block.plan.top_k) if block.ones else 1.0)
    out = g.op1("MoE", [flat_x, logits, g.weight(f"{name}.moe.fc1", fc1), "",
                        g.weight(f"{name}.moe.fc2", fc2)], MS_DOMAIN,
                k=block.plan.top_k, activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0,
                activation_beta=0.0, swiglu_limit=1e9,
                normalize_routing_weights=int(block.plan.normalize_topk or block.ones))
    return g.op1("Reshape", [out, g.op1("Shape", [residual])])



def _qmoe(g, block, routed, normed: str, residual: str, name: str) -> str:
    """ONNX Runtime's ``com.microsoft::QMoE`` (the CPU form of the MoE op above) on the experts' ``MatMulNBits``
    tensors stacked per expert (``weights_prepacked=0``): fc1 ``[E, 2I, H * bits / 8]`` with gate and up rows
    interleaved, fc2 ``[E, H, I * bits / 8]``, scales ``[E, rows, blocks]``."""
    # QMoE takes the [batch, sequence, hidden] input as it is and returns that shape; only the router's
    # probabilities must be one row per token
    logits = g.op1("Reshape", [g.op1("MatMul", [residual, g.weight(f"{name}.router.weight_t", block.router.weight.T)]),
                               g.const([-1, len(routed)])])
    if block.ones:
        logits = _chosen_only(g, logits, block.plan.top_k)
    fc1, fc1_scales, fc2, fc2_scales = [], [], [], []
    for expert in routed:
        mlp = expert.mlp
        (gate, gate_scales), (up, up_scales), (down, down_scales) = (
            _nbits(g.quantized[m]) for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
        fc1.append(np.stack([gate, up], 1).reshape(2 * gate.shape[0], -1))  # rows g0, u0, g1, u1, ...
        fc1_scales.append(np.stack([gate_scales, up_scales], 1).reshape(2 * gate.shape[0], -1))
        fc2.append(down.reshape(down.shape[0], -1))
        fc2_scales.append(down_scales * (block.plan.top_k if block.ones else 1))
    q = g.quantized[routed[0].mlp.gate_proj]
    inputs = [g.weight(f"{name}.moe.fc1_q{q.bits}", np.stack(fc1), np.uint8),
              g.weight(f"{name}.moe.fc1_scales", np.stack(fc1_scales)), "",
              g.weight(f"{name}.moe.fc2_q{q.bits}", np.stack(fc2), np.uint8),
              g.weight(f"{name}.moe.fc2_scales", np.stack(fc2_scales))]
    return g.op1("QMoE", [normed, logits, *inputs], MS_DOMAIN, k=block.plan.top_k, activation_type="swiglu",
                 swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0, swiglu_limit=1e9,
                 normalize_routing_weights=int(block.plan.normalize_topk or block.ones), expert_weight_bits=q.bits,
                 block_size=q.block_size, weights_prepacked=0, accuracy_level=g.accuracy_level)


def _nbits(q) -> tuple[np.ndarray, np.ndarray]:
    """``MatMulNBits``'s packed weight and scales of a symmetric QuantizedLinear (QMoE takes no zero points)."""
    packed, scales, zero_points = q.matmul_nbits()
    if zero_points is not None:
        raise ValueError("QMoE experts must be quantized symmetrically")
    return packed, scales
