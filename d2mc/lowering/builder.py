"""The ONNX graph under construction: named nodes and initializers, and the pieces every block uses (RMSNorm,
a projection); :mod:`d2mc.lowering.onnx_graph` assembles a model from them.

A projection whose weight was quantized (a :class:`~d2mc.quantize.QuantizedLinear` in ``GraphBuilder.quantized``,
looked up by its module) is, in the tensorrt flavour, ``DequantizeLinear`` (opset 21, block-wise along the input
axis, signed int4/int8 codes, no zero point: symmetric) feeding the ``MatMul``: TensorRT fuses the pair into a
weight-only GEMM."""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from d2mc.errors import UserError

MS_DOMAIN = "com.microsoft"
PRECISIONS = {"fp32": (np.float32, TensorProto.FLOAT), "fp16": (np.float16, TensorProto.FLOAT16)}


class GraphBuilder:
    """Accumulates nodes and initializers with unique names."""

    def __init__(self, np_dtype, onnx_dtype):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.np_dtype, self.onnx_dtype = np_dtype, onnx_dtype
        self.trt = False  # emit only operators TensorRT parses natively
        self.quantized: dict = {}  # Linear module -> its QuantizedLinear; a Linear not in it is lowered in float
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


def norm(g: GraphBuilder, residual: str, delta: str | None, weight, eps: float, name: str,
          hidden: int = 0) -> tuple[str, str]:
    """RMSNorm of ``residual + delta`` (weight None: no scale); returns (normalised, new residual)."""
    if g.trt:
        summed = residual if delta is None else g.op1("Add", [residual, delta])
        normed = rms(g, summed, eps)
        return (g.op1("Mul", [normed, g.weight(f"{name}.weight", weight)]) if weight is not None else normed), summed
    gamma = g.weight(f"{name}.weight", weight if weight is not None else torch.ones(hidden))
    if delta is None:
        return g.op1("SimplifiedLayerNormalization", [residual, gamma], axis=-1, epsilon=eps, stash_type=1), residual
    normed, _, _, summed = g.op("SkipSimplifiedLayerNormalization", [residual, delta, gamma], 4, MS_DOMAIN,
                                epsilon=eps)
    return normed, summed


def rms(g: GraphBuilder, x: str, eps: float) -> str:
    """``x / sqrt(mean(x^2) + eps)`` over the last axis in fp32, in standard ops (the pattern TensorRT fuses)."""
    fp16 = g.onnx_dtype == TensorProto.FLOAT16
    x32 = g.op1("Cast", [x], to=TensorProto.FLOAT) if fp16 else x
    mean = g.op1("ReduceMean", [g.op1("Pow", [x32, g.const(2.0, np.float32)]), g.const([-1])], keepdims=1)
    normed = g.op1("Div", [x32, g.op1("Sqrt", [g.op1("Add", [mean, g.const(eps, np.float32)])])])
    return g.op1("Cast", [normed], to=g.onnx_dtype) if fp16 else normed


def project(g, x: str, linear, name: str) -> str:
    """``x @ W.T (+ bias)`` for the Linear ``linear``, from its codes when ``g.quantized`` holds them."""
    q = g.quantized.get(linear)
    out = matmul(g, x, q if q is not None else linear.weight, f"{name}.weight")
    if getattr(linear, "bias", None) is not None:
        out = g.op1("Add", [out, g.weight(f"{name}.bias", linear.bias)])
    return out


def matmul(g, x: str, weight, name: str, output: str | None = None) -> str:
    """``x @ weight.T`` for a weight ``[out, in]``: a float tensor (``MatMul`` on the transposed initializer
    ``{name}_t``) or a :class:`~d2mc.quantize.QuantizedLinear` (``DequantizeLinear`` of ``{name}_t_q{bits}`` and
    ``{name}_t_scales`` first); into ``output`` when given."""
    outputs = [output] if output else 1
    if isinstance(weight, torch.Tensor):
        return g.op("MatMul", [x, g.weight(f"{name}_t", weight.T)], outputs)[0]
    if weight.pre_scale is not None:
        x = g.op1("Mul", [x, g.weight(f"{name}.pre_scale", weight.pre_scale)])
    return g.op("MatMul", [x, dequantized(g, weight, f"{name}_t")], outputs)[0]


def dequantized(g, q, name: str) -> str:
    """The float weight ``[in, out]`` of the symmetric ``q`` as ``DequantizeLinear(codes, scales)``, its scales in
    the graph's float type (the type the weight comes out in): block-wise (``axis=0``, ``block_size``), or per
    output channel (``axis=1``, scales ``[out]``) for int8 codes with one block per row, the form TensorRT
    dequantizes int8 weights in (its block dequantization is int4 only)."""
    from d2mc.quantize import pack_signed

    if not g.trt:
        raise ValueError("quantized weights lower to the tensorrt flavour's DequantizeLinear only")
    if not q.symmetric:
        raise UserError("the tensorrt flavour takes symmetric quantized weights (signed codes, zero point 0: what "
                        "TensorRT dequantizes): quantize symmetrically")
    codes = q.signed_codes().T  # [in, out]
    packed = pack_signed(np.ascontiguousarray(codes), q.bits)
    kind = TensorProto.INT4 if q.bits == 4 else TensorProto.INT8
    g.initializers.append(onnx.TensorProto(name=f"{name}_q{q.bits}", data_type=kind, dims=list(codes.shape),
                                           raw_data=packed.tobytes()))
    if q.bits == 8 and q.scales.shape[1] == 1:
        return g.op1("DequantizeLinear", [f"{name}_q8", g.weight(f"{name}_scales", q.scales[:, 0])], axis=1)
    return g.op1("DequantizeLinear", [f"{name}_q{q.bits}", g.weight(f"{name}_scales", q.scales.T)], axis=0,
                 block_size=q.block_size)
