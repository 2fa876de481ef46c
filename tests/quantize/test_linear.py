"""The typed form of quantized weights and its two lowerings' tensors, checked against ONNX Runtime itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from d2mc.errors import UserError
from d2mc.quantize import QuantizedLinear, concat_rows, quantize_hqq, quantize_rtn


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


def _unpack_rows(packed: np.ndarray, bits: int, columns: int) -> np.ndarray:
    """Inverse of MatMulNBits' packing of each row (low bits first), the padding dropped."""
    rows = packed.reshape(packed.shape[0], -1)
    if bits == 4:
        rows = np.stack([rows & 0x0F, rows >> 4], -1).reshape(rows.shape[0], -1)
    return rows[:, :columns]


def _hqq_weight(bits=4):
    return quantize_hqq(_weight(48, 192), bits, 64)


def test_hqq_leaves_float_zero_points_and_a_closer_weight_than_rtn():
    weight = _weight(48, 192)
    q = quantize_hqq(weight, 4, 64)
    assert q.float_zero_points and not q.symmetric
    assert not torch.equal(q.zero_points, q.zero_points.round())  # offsets that integer zero points cannot hold
    rtn = quantize_rtn(weight, 4, 64, symmetric=False)
    assert (q.dequantize() - weight).abs().mean() < (rtn.dequantize() - weight).abs().mean()


def test_hqq_recovers_a_weight_already_on_a_min_max_grid():
    """A weight on a block-wise 16-level grid whose ends are each block's min and max (GGUF Q4_1, as SmolLM2-135M
    ships) comes back exactly at the same block size."""
    codes = torch.randint(0, 16, (8, 64), generator=torch.Generator().manual_seed(3))
    codes[:, [0, 32]], codes[:, [1, 33]] = 0, 15
    scales, low = torch.rand(8, 2) * 0.01 + 0.001, torch.rand(8, 2) * -0.05
    weight = (codes.view(8, 2, 32) * scales[..., None] + low[..., None]).view(8, 64)
    torch.testing.assert_close(quantize_hqq(weight, 4, 32).dequantize(), weight, rtol=0, atol=1e-6)


def test_float_zero_points_pack_round_trip():
    q = _hqq_weight()
    packed, scales, zero_points = q.matmul_nbits()
    blocks = q.shape[1] // q.block_size
    assert np.array_equal(_unpack_rows(packed, 4, q.shape[1]), q.codes.numpy())
    rounded = _unpack_rows(zero_points, 4, blocks)
    assert np.array_equal(rounded, q.zero_points.round().clamp(0, 15).numpy())
    # the rounded zero points and the residual stand for exactly the weight the float zero points do
    weight = (q.codes.float().view(q.shape[0], blocks, -1) - torch.from_numpy(rounded).float()[..., None]) * \
        torch.from_numpy(scales)[..., None]
    blocks_ones = torch.kron(torch.eye(blocks), torch.ones(q.block_size, 1))  # [in, blocks]
    x = torch.randn(5, q.shape[1], generator=torch.Generator().manual_seed(2))
    rebuilt = x @ weight.view(q.shape).T + (x @ blocks_ones) @ torch.from_numpy(q.zero_point_residual())
    torch.testing.assert_close(rebuilt, x @ q.dequantize().T, rtol=0, atol=1e-5)


# ONNX Runtime's CPU MatMulNBits refuses 8-bit weights with float zero points; d2mc's form takes them
@pytest.mark.parametrize("form, bits", [("lowered", 4), ("lowered", 8), ("float zero points", 4)])
def test_float_zero_points_through_matmul_nbits_compute_the_dequantized_weight(form, bits):
    """d2mc's lowering (rounded zero points, the residual on the input's block sums) and MatMulNBits taking the
    float zero points itself: both the dequantized weight."""
    from d2mc.lowering.builder import MS_DOMAIN, GraphBuilder, matmul, nbits_attributes, nbits_inputs

    q = _hqq_weight(bits)
    g = GraphBuilder(np.float32, TensorProto.FLOAT)
    if form == "lowered":
        matmul(g, "x", q, "w", "y")
    else:
        inputs = nbits_inputs(g, QuantizedLinear(q.bits, q.block_size, q.codes, q.scales), "w", "x")
        inputs.append(g.weight("zero_points", q.zero_points))
        g.op("MatMulNBits", inputs, ["y"], MS_DOMAIN, **nbits_attributes(g, q))
    x = np.random.default_rng(4).standard_normal((3, q.shape[1])).astype(np.float32)
    np.testing.assert_allclose(_run(g.nodes, g.initializers, x), x @ q.dequantize().T.numpy(), atol=1e-5)


def test_float_zero_points_count_their_residual():
    q = _hqq_weight()
    integer = QuantizedLinear(4, 64, q.codes, q.scales, q.zero_points.round().clamp(0, 15).to(torch.uint8))
    assert q.nbytes() == integer.nbytes() + q.scales.numel() * 4
    with pytest.raises(ValueError, match="only float zero points leave a residual"):
        integer.zero_point_residual()
    with pytest.raises(ValueError, match="same bits, block size and kind of zero points"):
        concat_rows([q, integer])
