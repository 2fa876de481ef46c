"""References for the ``D2mcMoE`` plugin's tests and benchmark: its exact math in PyTorch (what the CUDA kernels are
tested against), the PyTorch block it replaces, and that block alone as a TensorRT-flavoured ONNX.

The math follows the kernels' rounding points, so an fp16 comparison measures the kernels and not a different
order of roundings: routing in fp32; each expert's gate and up products accumulated in fp32, the SwiGLU
activation rounded to the tensor type (the kernels keep it in a workspace of that type); the down product
accumulated in fp32 and weighted in fp32; one rounding of the sum to the tensor type at the end.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from d2mc.ops.moe import (
    PLUGIN_DOMAIN,
    MoePluginAttributes,
    moe_plugin_node,
    normalize_mode,
    pack_experts,
    plugin_attributes,
)

DTYPES = {"fp32": (np.float32, TensorProto.FLOAT), "fp16": (np.float16, TensorProto.FLOAT16)}


def route(router_logits: torch.Tensor, top_k: int, normalize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights (fp32) and indices of the top_k routed experts per token, ``[T, top_k]`` each (``normalize``: 0
    softmax probability, 1 renormalised, 2 weight 1)."""
    logits = router_logits.float()
    probs = torch.softmax(logits, dim=-1)
    # chosen by the logits (a saturated softmax ties); torch.topk does not promise an order among equal values,
    # the kernel takes the lower index first
    order = torch.argsort(-logits, dim=-1, stable=True)[:, :top_k]
    weights = probs.gather(-1, order)
    if normalize == 2:
        weights = torch.ones_like(weights)
    elif normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, order


def expert_outputs(x: torch.Tensor, fc1: torch.Tensor, fc2: torch.Tensor, expert: int) -> torch.Tensor:
    """One expert's SwiGLU MLP on rows ``x`` ``[n, H]``, fp32 result (before the routing weight)."""
    rows = fc1[expert].float()
    gate, up = rows[0::2], rows[1::2]  # interleaved: row 2i gate_i, row 2i+1 up_i
    xf = x.float()
    act = (torch.nn.functional.silu(xf @ gate.T) * (xf @ up.T)).to(x.dtype).float()
    return act @ fc2[expert].float().T


def moe_reference(hidden: torch.Tensor, router_logits: torch.Tensor, fc1: torch.Tensor, fc2: torch.Tensor,
                  attributes: MoePluginAttributes) -> torch.Tensor:
    """What one ``D2mcMoE`` node outputs, in the dtype of ``hidden``."""
    a = attributes
    shape = hidden.shape
    x = hidden.reshape(-1, a.hidden_size)
    logits = router_logits.reshape(-1, a.num_experts)
    if tuple(fc1.shape) != a.fc1_shape() or tuple(fc2.shape) != a.fc2_shape():
        raise ValueError(f"fc1 {tuple(fc1.shape)} / fc2 {tuple(fc2.shape)} do not match {a.fc1_shape()} / "
                         f"{a.fc2_shape()}")
    out = torch.zeros(x.shape[0], a.hidden_size, dtype=torch.float32)
    for s in range(a.num_shared):
        out += expert_outputs(x, fc1, fc2, s)
    weights, indices = route(logits, a.top_k, a.normalize)
    for e in range(a.num_experts):
        token, slot = torch.where(indices == e)
        if token.numel():
            y = expert_outputs(x[token], fc1, fc2, a.num_shared + e)
            out.index_add_(0, token, y * weights[token, slot, None])
    return out.to(hidden.dtype).reshape(shape)


def plugin_weights(block) -> tuple[torch.Tensor, torch.Tensor, MoePluginAttributes]:
    """``fc1``, ``fc2`` and the plugin attributes of a converted model's MoE block, packed as the lowering packs them."""
    attributes = plugin_attributes(block.experts, block.shared_experts, block.top_k,
                                   normalize_mode(block.normalize_topk, block.routing_weights == "ones"))
    return *pack_experts(block.experts), attributes


def rms(hidden: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS normalisation without a weight (the experts' weights are folded into fc1), in fp32."""
    x = hidden.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def block_reference(block, hidden: torch.Tensor) -> torch.Tensor:
    """The PyTorch block's expert part with its residual: ``hidden + experts(hidden)`` (what the graph outputs)."""
    with torch.no_grad():
        out = hidden
        for expert in block.experts[: block.shared_experts]:
            out = out + expert(hidden)
        return out + block.dispatch(hidden)


def moe_block_onnx(block, path: str | Path, precision: str = "fp16", eps: float = 1e-6) -> Path:
    """Write ``output = hidden + D2mcMoE(rms(hidden), router(hidden), fc1, fc2)``, the block's expert part as a
    TensorRT-flavoured ONNX with standard ops around the plugin node (weights inline; test-sized blocks only), so
    that TensorRT builds it alone and its output can be compared with :func:`block_reference`."""
    np_dtype, onnx_dtype = DTYPES[precision]
    fc1, fc2, attributes = plugin_weights(block)
    hidden_size = attributes.hidden_size
    dims = ["batch_size", "sequence_length"]
    initializers = [
        numpy_helper.from_array(fc1.float().numpy().astype(np_dtype), "fc1"),
        numpy_helper.from_array(fc2.float().numpy().astype(np_dtype), "fc2"),
        numpy_helper.from_array(block.router.weight.detach().T.float().numpy().astype(np_dtype), "router_t"),
        numpy_helper.from_array(np.array([-1], np.int64), "last_axis"),
        numpy_helper.from_array(np.array(2.0, np.float32), "two"),
        numpy_helper.from_array(np.array(eps, np.float32), "eps"),
    ]
    nodes = [
        helper.make_node("Cast", ["hidden"], ["x32"], to=TensorProto.FLOAT),
        helper.make_node("Pow", ["x32", "two"], ["squares"]),
        helper.make_node("ReduceMean", ["squares", "last_axis"], ["mean_square"], keepdims=1),
        helper.make_node("Add", ["mean_square", "eps"], ["variance"]),
        helper.make_node("Sqrt", ["variance"], ["rms"]),
        helper.make_node("Div", ["x32", "rms"], ["normed32"]),
        helper.make_node("Cast", ["normed32"], ["normed"], to=onnx_dtype),
        helper.make_node("MatMul", ["hidden", "router_t"], ["router_logits"]),
        moe_plugin_node("moe", "normed", "router_logits", "fc1", "fc2", "experts", attributes),
        helper.make_node("Add", ["hidden", "experts"], ["output"]),
    ]
    graph = helper.make_graph(nodes, "d2mc_moe_block",
                              [helper.make_tensor_value_info("hidden", onnx_dtype, [*dims, hidden_size])],
                              [helper.make_tensor_value_info("output", onnx_dtype, [*dims, hidden_size])],
                              initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(PLUGIN_DOMAIN, 1)])
    model.ir_version = 10
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, path)
    return path
