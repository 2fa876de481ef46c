"""The typed form of quantized weights and its two lowerings' tensors, checked against ONNX Runtime itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from d2mc.errors import UserError
from d2mc.quantize import QuantizedLinear, quantize_rtn


def _weight(out_features=48, in_features=128, seed=0):
    return torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed)) * 0.05


def _run(nodes, initializers, x, optimize=True):
    import onnxruntime as ort

    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, x.shape[1]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    options = ort.SessionOptions()
    if not optimize:  # ONNX Runtime would fuse DequantizeLinear + MatMul into MatMulNBits with int8 activations
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("block", [32, 128])
def test_rtn_packing_equals_onnxruntime_quantizer(bits, block, symmetric):
    # the packer ONNX Runtime's own quantizer calls (not a public API: used here only as the reference)
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    weight = _weight()
    q = quantize_rtn(weight, bits, block, symmetric)
    packed, scales, zero_points = q.matmul_nbits()
    n, k = weight.shape
    ort_packed = np.zeros_like(packed)
    ort_scales = np.zeros_like(scales)
    ort_zp = np.zeros((n, -(-(k // block) * bits // 8)), np.uint8)
    pack = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
    pack(ort_packed, np.ascontiguousarray(weight.T.numpy()), ort_scales, ort_zp, block, n, k, symmetric)
    np.testing.assert_array_equal(packed, ort_packed)
    if symmetric:
        assert zero_points is None
    else:
        np.testing.assert_array_equal(zero_points, ort_zp)
    np.testing.assert_allclose(scales, ort_scales, rtol=1e-6)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [4, 8])
def test_matmul_nbits_computes_the_dequantized_weight(symmetric, bits):
    q = quantize_rtn(_weight(), bits, 32, symmetric)
    packed, scales, zero_points = q.matmul_nbits()
    inits = [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales, "S")]
    inputs = ["x", "B", "S"]
    if zero_points is not None:
        inits.append(numpy_helper.from_array(zero_points, "Z"))
        inputs.append("Z")
    node = helper.make_node("MatMulNBits", inputs, ["y"], domain="com.microsoft", K=q.shape[1], N=q.shape[0],
                            bits=bits, block_size=q.block_size)
    x = np.random.default_rng(0).standard_normal((5, q.shape[1])).astype(np.float32)
    expected = x @ q.dequantize().T.numpy()
    np.testing.assert_allclose(_run([node], inits, x), expected, atol=1e-5)


@pytest.mark.parametrize("bits", [4, 8])
def test_signed_codes_through_dequantize_linear_compute_the_dequantized_weight(bits):
    """The tensorrt flavour's form: signed codes ``[in, out]`` stored by pack_signed, block scales, no zero point."""
    from d2mc.quantize import pack_signed

    q = quantize_rtn(_weight(), bits, 32)
    codes = np.ascontiguousarray(q.signed_codes().T)
    kind = TensorProto.INT4 if bits == 4 else TensorProto.INT8
    inits = [TensorProto(name="W", data_type=kind, dims=list(codes.shape), raw_data=pack_signed(codes, bits).tobytes()),
             numpy_helper.from_array(q.scales.T.contiguous().numpy(), "S")]
    nodes = [helper.make_node("DequantizeLinear", ["W", "S"], ["w"], axis=0, block_size=q.block_size),
             helper.make_node("MatMul", ["x", "w"], ["y"])]
    x = np.random.default_rng(1).standard_normal((3, q.shape[1])).astype(np.float32)
    np.testing.assert_allclose(_run(nodes, inits, x, optimize=False), x @ q.dequantize().T.numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="signed codes stand for a symmetric weight"):
        quantize_rtn(_weight(), bits, 32, symmetric=False).signed_codes()


def test_rtn_error_is_within_half_a_step():
    weight = _weight()
    q = quantize_rtn(weight, 4, 32, symmetric=False)
    step = q.scales.repeat_interleave(32, 1)
    assert ((q.dequantize() - weight).abs() <= step / 2 + 1e-7).all()


def test_pre_scale_multiplies_the_input_columns():
    q = quantize_rtn(_weight(), 4, 32)
    scale = torch.linspace(0.5, 2.0, q.shape[1])
    scaled = QuantizedLinear(q.bits, q.block_size, q.codes, q.scales, q.zero_points, scale)
    torch.testing.assert_close(scaled.dequantize(), q.dequantize() * scale[None, :])


def test_bytes_count_packed_codes_scales_and_zero_points():
    sym = quantize_rtn(_weight(48, 128), 4, 32, symmetric=True)
    asym = quantize_rtn(_weight(48, 128), 4, 32, symmetric=False)
    assert sym.nbytes() == 48 * 128 // 2 + 48 * 4 * 4
    assert asym.nbytes() == sym.nbytes() + 48 * 2


def test_block_size_must_divide_the_input():
    with pytest.raises(UserError, match="block_size 128 does not divide the input size 96"):
        quantize_rtn(_weight(8, 96), 4, 128)
