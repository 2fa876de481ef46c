"""The ONNX graph under construction: named nodes and initializers, and the pieces every block uses (RMSNorm,
a projection); :mod:`d2mc.lowering.onnx_graph` assembles a model from them."""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

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


def _linear_t(module) -> torch.Tensor:
    return module.weight.T


def project(g, x: str, linear, name: str) -> str:
    out = g.op1("MatMul", [x, g.weight(f"{name}.weight_t", _linear_t(linear))])
    if getattr(linear, "bias", None) is not None:
        out = g.op1("Add", [out, g.weight(f"{name}.bias", linear.bias)])
    return out
