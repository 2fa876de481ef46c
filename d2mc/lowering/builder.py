"""The ONNX graph under construction: named nodes and initializers, and the pieces every block uses (RMSNorm,
a projection); :mod:`d2mc.lowering.onnx_graph` assembles a model from them.

A projection whose weight was quantized (:class:`~d2mc.quantize.QuantizedLinear`, looked up by its module in
``GraphBuilder.quantized``) is ``com.microsoft::MatMulNBits`` in the onnxruntime flavour and ``DequantizeLinear``
(opset 21, symmetric: signed codes, no zero point) feeding a ``MatMul`` in the tensorrt flavour, which TensorRT
fuses into a weight-only GEMM: block-wise along the input axis, or per output channel for int8 codes with one block
per row (TensorRT dequantizes int8 weights only so). Float zero points (HQQ's) enter MatMulNBits rounded, which
keeps its int8-activation kernels, and what the rounding moved is added back as a small float MatMul on the
input's block sums (:meth:`~d2mc.quantize.QuantizedLinear.zero_point_residual`)."""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from d2mc.errors import UserError
from d2mc.quantize import pack_signed
from d2mc.quantize.linear import BLOCK_SIZES
from d2mc.quantize.options import DEFAULT_BLOCK_SIZE

MS_DOMAIN = "com.microsoft"
EXTERNAL_MIN_BYTES = 1024  # smaller initializers stay inside the graph
EXTERNAL_ALIGNMENT = 4096  # each external tensor starts on a page, so ONNX Runtime can map it
PRECISIONS = {"fp32": (np.float32, TensorProto.FLOAT), "fp16": (np.float16, TensorProto.FLOAT16)}


class ExternalData:
    """The external data file of a graph, written as the initializers are made: the graph holds only their
    locations, so lowering a model never keeps a second copy of its weights in memory."""

    def __init__(self, path):
        self.path = path
        self.file = open(path, "wb")  # noqa: SIM115 (closed by close(), after the last weight)

    def add(self, name: str, array: np.ndarray, data_type: int | None = None, dims=None) -> onnx.TensorProto:
        """A tensor proto for ``array`` whose bytes go to the file (little-endian, row-major); ``data_type`` and
        ``dims`` describe bytes already packed (INT4 codes, two to a byte)."""
        offset = -self.file.tell() % EXTERNAL_ALIGNMENT + self.file.tell()
        self.file.seek(offset)
        array.astype(array.dtype.newbyteorder("<"), copy=False).tofile(self.file)
        tensor = TensorProto(name=name, data_type=data_type or helper.np_dtype_to_tensor_dtype(array.dtype),
                             dims=array.shape if dims is None else dims)
        for key, value in (("location", self.path.name), ("offset", offset), ("length", array.nbytes)):
            tensor.external_data.add(key=key, value=str(value))
        tensor.data_location = TensorProto.EXTERNAL
        return tensor

    def close(self) -> None:
        self.file.close()


class GraphBuilder:
    """Accumulates nodes and initializers with unique names; with ``data`` the large initializers go straight to
    that external data file. ``quantized`` maps a Linear module to its quantized weight, emitted at
    ``accuracy_level`` (``MatMulNBits``'s: 4 computes with int8 activations)."""

    def __init__(self, np_dtype, onnx_dtype, data: ExternalData | None = None, quantized: dict | None = None,
                 accuracy_level: int = 0):
        self.data = data
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.np_dtype, self.onnx_dtype = np_dtype, onnx_dtype
        self.trt = False  # emit only operators TensorRT parses natively
        self.quantized = quantized or {}
        self.accuracy_level = accuracy_level
        self._count = 0
        self._consts: dict[tuple, str] = {}
        self._block_sums: dict[tuple, str] = {}

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def weight(self, name: str, tensor, dtype=None) -> str:
        array = tensor.detach().float().cpu().numpy() if isinstance(tensor, torch.Tensor) else np.asarray(tensor)
        array = array.astype(dtype or self.np_dtype, copy=False)
        if self.data is not None and array.nbytes >= EXTERNAL_MIN_BYTES:
            self.initializers.append(self.data.add(name, array))
        else:
            self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def packed(self, name: str, data_type: int, dims, raw: bytes) -> str:
        """An initializer of ``data_type`` and ``dims`` from bytes already in ONNX's layout (INT4: two codes to a
        byte)."""
        if self.data is not None and len(raw) >= EXTERNAL_MIN_BYTES:
            self.initializers.append(self.data.add(name, np.frombuffer(raw, np.uint8), data_type, dims))
        else:
            self.initializers.append(helper.make_tensor(name, data_type, dims, raw, raw=True))
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
    # the mean and inverse standard deviation outputs stay unnamed: ONNX Runtime then neither allocates nor writes them
    normed, _, _, summed = g.op("SkipSimplifiedLayerNormalization", [residual, delta, gamma],
                                [g.name("normed"), "", "", g.name("residual")], MS_DOMAIN, epsilon=eps)
    return normed, summed


def rms(g: GraphBuilder, x: str, eps: float) -> str:
    """``x / sqrt(mean(x^2) + eps)`` over the last axis in fp32, in standard ops (the pattern TensorRT fuses)."""
    fp16 = g.onnx_dtype == TensorProto.FLOAT16
    x32 = g.op1("Cast", [x], to=TensorProto.FLOAT) if fp16 else x
    mean = g.op1("ReduceMean", [g.op1("Pow", [x32, g.const(2.0, np.float32)]), g.const([-1])], keepdims=1)
    normed = g.op1("Div", [x32, g.op1("Sqrt", [g.op1("Add", [mean, g.const(eps, np.float32)])])])
    return g.op1("Cast", [normed], to=g.onnx_dtype) if fp16 else normed


def project(g, x: str, linear, name: str) -> str:
    """``x @ W.T (+ bias)`` for the Linear ``linear``, quantized when ``g.quantized`` holds its weight."""
    q = g.quantized.get(linear)
    out = matmul(g, x, q if q is not None else linear.weight, f"{name}.weight")
    if getattr(linear, "bias", None) is not None:
        out = g.op1("Add", [out, g.weight(f"{name}.bias", linear.bias)])
    return out


def matmul(g, x: str, weight, name: str, output: str | None = None) -> str:
    """``x @ weight.T`` for a weight ``[out, in]``: a float tensor (a ``MatMul`` on the transposed initializer
    ``{name}_t``) or a :class:`~d2mc.quantize.QuantizedLinear`; into ``output`` when given."""
    outputs = [output] if output else 1
    if isinstance(weight, torch.Tensor):
        return g.op("MatMul", [x, g.weight(f"{name}_t", weight.T)], outputs)[0]
    if weight.pre_scale is not None:
        x = g.op1("Mul", [x, g.weight(f"{name}.pre_scale", weight.pre_scale)])
    if g.trt:
        return g.op("MatMul", [x, dequantized(g, weight, f"{name}_t")], outputs)[0]
    if weight.float_zero_points:  # rounded zero points in MatMulNBits, plus what the rounding moved
        product = g.op1("MatMulNBits", nbits_inputs(g, weight, name, x), MS_DOMAIN, **nbits_attributes(g, weight))
        residual = g.weight(f"{name}_zero_point_residual", weight.zero_point_residual())
        return g.op("Add", [product, g.op1("MatMul", [block_sums(g, x, weight), residual])], outputs)[0]
    return g.op("MatMulNBits", nbits_inputs(g, weight, name, x), outputs, MS_DOMAIN,
                **nbits_attributes(g, weight))[0]


def block_sums(g, x: str, q) -> str:
    """``x [..., in]`` summed over each of ``q``'s blocks, ``[..., in / block_size]``: a MatMul with a 0/1 matrix
    (any rank of ``x``), made once per input and block size (q, k and v, or gate and up, read one input)."""
    in_features = q.shape[1]
    key = (x, in_features, q.block_size)
    if key not in g._block_sums:
        ones = np.kron(np.eye(in_features // q.block_size), np.ones((q.block_size, 1)))
        g._block_sums[key] = g.op1("MatMul", [x, g.const(ones, g.np_dtype)])
    return g._block_sums[key]


def nbits_inputs(g, q, name: str, x: str = "") -> list[str]:
    """``[x, B, scales(, zero_points)]`` of a ``MatMulNBits`` node for ``q`` (initializers ``{name}_q{bits}``,
    ``{name}_scales``, ``{name}_zero_points``), without ``x`` when it is empty."""
    packed, scales, zero_points = nbits_form(q).matmul_nbits()
    inputs = [x] if x else []
    inputs += [g.weight(f"{name}_q{q.bits}", packed, np.uint8), g.weight(f"{name}_scales", scales)]
    if zero_points is not None:
        inputs.append(g.weight(f"{name}_zero_points", zero_points, np.uint8))
    return inputs


def nbits_attributes(g, q) -> dict:
    out_features, in_features = q.shape
    return dict(K=in_features, N=out_features, bits=q.bits, block_size=nbits_form(q).block_size,
                accuracy_level=g.accuracy_level)


def nbits_form(q):
    """``q`` in blocks ``MatMulNBits`` takes (a power of two from 16 to 256): as it is, or, for one scale per output
    channel (int8 weights that also go to TensorRT), in blocks of 64 (int8's default elsewhere) where 64 divides its
    input, else the largest such blocks that do."""
    if q.block_size in BLOCK_SIZES:
        return q
    block = DEFAULT_BLOCK_SIZE["int8"]
    return q.in_blocks(block if q.block_size % block == 0 else max(b for b in BLOCK_SIZES if q.block_size % b == 0))


def dequantized(g, q, name: str) -> str:
    """The float weight ``[in, out]`` of the symmetric ``q`` as ``DequantizeLinear(codes, scales)``, its scales in
    the graph's float type (the type the weight comes out in): block-wise (``axis=0``, ``block_size``), or per
    output channel (``axis=1``, scales ``[out]``) for int8 codes with one block per row, the form TensorRT
    dequantizes int8 weights in (its block dequantization is int4 only)."""
    if not q.symmetric:
        raise UserError("the tensorrt flavour takes symmetric quantized weights (signed codes, zero point 0: what "
                        "TensorRT dequantizes): quantize symmetrically")
    codes = q.signed_codes().T  # [in, out]
    packed = pack_signed(np.ascontiguousarray(codes), q.bits)
    kind = TensorProto.INT4 if q.bits == 4 else TensorProto.INT8
    codes_name = g.packed(f"{name}_q{q.bits}", kind, codes.shape, packed.tobytes())
    if q.bits == 8 and q.scales.shape[1] == 1:
        return g.op1("DequantizeLinear", [codes_name, g.weight(f"{name}_scales", q.scales[:, 0])], axis=1)
    return g.op1("DequantizeLinear", [codes_name, g.weight(f"{name}_scales", q.scales.T)], axis=0,
                 block_size=q.block_size)
