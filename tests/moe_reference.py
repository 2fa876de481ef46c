"""References for the ``D2mcMoE`` plugin's tests and benchmark: its exact math in PyTorch (what the CUDA kernels are
tested against), the PyTorch block it replaces, and that block alone as a TensorRT-flavoured ONNX; for quantized
experts, an unpacking of the plugin's codes written apart from the packing (nibbles read back with numpy), so that
the math runs on the weights the codes stand for.

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
    QuantizedExperts,
    moe_plugin_node,
    normalize_mode,
    pack_experts,
    pack_quantized_experts,
    plugin_attributes,
)
from d2mc.quantize import QuantizedModel, QuantizeOptions, quantize_model

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


def plugin_weights(block, quantized: QuantizedExperts | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, MoePluginAttributes]:
    """``fc1``, ``fc2`` and the plugin attributes of a converted model's MoE block, packed as the lowering packs them
    (with ``quantized`` experts, the attributes say so and fc1/fc2 are what is packed: see :func:`unpack`)."""
    attributes = plugin_attributes(block.experts, block.shared_experts, block.top_k,
                                   normalize_mode(block.normalize_topk, block.routing_weights == "ones"), quantized)
    if quantized is not None:
        return torch.from_numpy(quantized.fc1), torch.from_numpy(quantized.fc2), attributes
    return *pack_experts(block.experts), attributes


def quantized_rtn(model, bits: int = 4, block_size: int = 32, lm_head_precision: str = "int8") -> QuantizedModel:
    """``model`` through the quantize step by round-to-nearest (symmetric, experts' norms folded first): a copy
    carrying the dequantized weights, and the codes of every Linear but the routers."""
    return quantize_model(model, QuantizeOptions(f"int{bits}", "rtn", block_size, lm_head_precision,
                                                  mixed_precision="none"))


def block_quantized_experts(block, linears: dict, index: int) -> QuantizedExperts:
    """The packed experts of block ``index`` (``block`` itself) from a :class:`QuantizedModel`'s ``linears``."""
    prefix = f"model.layers.{index}.experts"
    return pack_quantized_experts([tuple(linears[f"{prefix}.{e}.mlp.{p}"] for p in ("gate_proj", "up_proj",
                                                                                     "down_proj"))
                                   for e in range(len(block.experts))])


def unpack(packed, scales, bits: int, block_size: int) -> torch.Tensor:
    """fp32 weights ``[E, rows, cols]`` from the plugin's stored codes ``[E, rows, cols * bits / 8]`` (int8) and
    block scales ``[E, rows, cols / block_size]``: each code sign-extended from its byte, or from its nibble with
    the even column in the low nibble, times its block's scale (exact in fp32)."""
    raw = np.asarray(packed).view(np.uint8)
    if bits == 4:
        nibbles = np.stack([raw & 0x0F, raw >> 4], axis=-1).reshape(*raw.shape[:-1], 2 * raw.shape[-1])
        codes = nibbles.astype(np.int16) - 16 * (nibbles >= 8)
    else:
        codes = raw.view(np.int8)
    factors = np.repeat(np.asarray(scales, dtype=np.float32), block_size, axis=-1)
    return torch.from_numpy(codes.astype(np.float32) * factors)


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


def plugin_node_onnx(attributes: MoePluginAttributes, packed: QuantizedExperts, precision: str = "fp16"
                     ) -> onnx.ModelProto:
    """A graph of one quantized plugin node alone: ``hidden`` (``precision``) and fp32 ``router_logits`` in, the
    packed experts as initializers, ``out`` out; to run its standard-op expansion against :func:`moe_reference`."""
    np_dtype, onnx_dtype = DTYPES[precision]
    weights = [packed.fc1, packed.fc2, packed.fc1_scales.astype(np_dtype), packed.fc2_scales.astype(np_dtype)]
    node = moe_plugin_node("moe", "hidden", "router_logits", "fc1", "fc2", "out", attributes,
                           ("fc1_scales", "fc2_scales"))
    size = attributes.hidden_size
    graph = helper.make_graph(
        [node], "d2mc_moe_node",
        [helper.make_tensor_value_info("hidden", onnx_dtype, [None, size]),
         helper.make_tensor_value_info("router_logits", TensorProto.FLOAT, [None, attributes.num_experts])],
        [helper.make_tensor_value_info("out", onnx_dtype, [None, size])],
        [numpy_helper.from_array(w, n) for w, n in zip(weights, attributes.inputs[2:], strict=True)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(PLUGIN_DOMAIN, 1)])
    model.ir_version = 10
    return model


def run_expanded(model: onnx.ModelProto, hidden: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
    """ONNX Runtime's output of ``model`` with its plugin nodes expanded into standard ops (fp32 activations for
    the dequantized weights: no MatMulNBits rewrite)."""
    import onnxruntime as ort

    from d2mc.lowering.plugin_reference import expand_plugin_nodes

    expand_plugin_nodes(model)
    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"hidden": hidden.numpy(), "router_logits": router_logits.float().numpy()})
    return torch.from_numpy(out)


def moe_block_onnx(block, path: str | Path, precision: str = "fp16", eps: float = 1e-6,
                   quantized: QuantizedExperts | None = None) -> Path:
    """Write ``output = hidden + D2mcMoE(rms(hidden), router(hidden), fc1, fc2[, fc1_scales, fc2_scales])``, the
    block's expert part as a TensorRT-flavoured ONNX with standard ops around the plugin node (weights inline;
    test-sized blocks only), so that TensorRT builds it alone and its output can be compared with
    :func:`block_reference`; ``quantized`` experts go in packed with their scales."""
    np_dtype, onnx_dtype = DTYPES[precision]
    fc1, fc2, attributes = plugin_weights(block, quantized)
    hidden_size = attributes.hidden_size
    dims = ["batch_size", "sequence_length"]
    weights = [fc1.numpy(), fc2.numpy()] if quantized else [fc1.float().numpy().astype(np_dtype),
                                                            fc2.float().numpy().astype(np_dtype)]
    scales = None
    if quantized is not None:
        scales = ("fc1_scales", "fc2_scales")
        weights += [quantized.fc1_scales.astype(np_dtype), quantized.fc2_scales.astype(np_dtype)]
    initializers = [
        *(numpy_helper.from_array(w, n) for w, n in zip(weights, attributes.inputs[2:], strict=True)),
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
        moe_plugin_node("moe", "normed", "router_logits", "fc1", "fc2", "experts", attributes, scales),
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
