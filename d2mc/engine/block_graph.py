"""One MoE block as a TensorRT-flavoured ONNX: the plugin's test graph on a device.

``output = hidden + D2mcMoE(rms(hidden), router(hidden), fc1, fc2)`` with standard ops around the plugin
node (RMSNorm in fp32 through Pow/ReduceMean/Sqrt/Div, the router as a MatMul), so TensorRT builds it alone and
its output can be compared with the PyTorch block (:func:`block_reference`) on the GPU that runs it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from d2mc.engine.plugin_spec import PLUGIN_DOMAIN, MoePluginAttributes, moe_plugin_node
from d2mc.errors import UserError

DTYPES = {"fp32": (np.float32, TensorProto.FLOAT, torch.float32), "fp16": (np.float16, TensorProto.FLOAT16,
                                                                           torch.float16)}


def plugin_weights(block) -> tuple[torch.Tensor, torch.Tensor, MoePluginAttributes]:
    """``fc1`` (gate/up interleaved, expert norm weights folded in), ``fc2`` and the attributes of a D2MC block."""
    if block.router is None:
        raise UserError("the block has no router: it is a dense MLP, not an MoE block")
    fc1, fc2 = [], []
    for expert in block.experts:
        gamma = expert.post_attention_layernorm.weight
        gate = expert.mlp.gate_proj.weight * gamma[None, :]  # [I, H]
        up = expert.mlp.up_proj.weight * gamma[None, :]
        fc1.append(torch.stack([gate, up], dim=1).reshape(-1, gate.shape[1]))  # rows g0, u0, g1, u1, ...
        fc2.append(expert.mlp.down_proj.weight)  # [H, I]
    first = block.experts[0].mlp
    attributes = MoePluginAttributes(
        num_experts=len(block.experts) - block.shared_experts, num_shared=block.shared_experts, top_k=block.top_k,
        hidden_size=first.gate_proj.weight.shape[1], intermediate_size=first.gate_proj.weight.shape[0],
        normalize=2 if block.routing_weights == "ones" else int(block.normalize_topk))
    return torch.stack(fc1).detach(), torch.stack(fc2).detach(), attributes


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
    """Write the block's TensorRT-flavoured ONNX (weights inline; tiny and test-sized blocks only)."""
    np_dtype, onnx_dtype, _ = DTYPES[precision]
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
