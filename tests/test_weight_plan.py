"""The format of every weight matrix: read from a lowered graph, planned from quantization options, counted in bytes
against the graph's initializers, and what the roofline makes of it (mixed precision, HQQ's residuals)."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest

from d2mc.arch import BlockSpec, ModelArch
from d2mc.lowering import lower_to_onnx
from d2mc.profiles import load_profile
from d2mc.quantize import QuantizeOptions, quantize_model
from d2mc.roofline import RooflineSettings, estimate_phase
from d2mc.weight_plan import LEAVES, BlockWeights, MatrixFormat, WeightPlan, read_weight_plan
from tests.conftest import tiny_model, tiny_tokenizer
from tests.quantize.test_model import converted

TOKENIZER = tiny_tokenizer()
VOCAB = len(TOKENIZER)
# the initializers of quantized matrices: MatMulNBits' (and QMoE's) codes, scales and zero points, HQQ's residuals
QUANTIZED_SUFFIXES = ("_q4", "_q8", "_scales", "_zero_points", "_zero_point_residual")


def initializer_bytes(path) -> int:
    """Bytes of the graph's quantized-matrix initializers, as stored (external data: its recorded length)."""
    total = 0
    for tensor in onnx.load(str(path), load_external_data=False).graph.initializer:
        if not tensor.name.endswith(QUANTIZED_SUFFIXES):
            continue
        external = {entry.key: entry.value for entry in tensor.external_data}
        total += int(external["length"]) if external else onnx.numpy_helper.to_array(tensor).nbytes
    return total


@pytest.mark.parametrize("kind, options, moe_op", [
    ("dense", QuantizeOptions("int4", "hqq", 32, mixed_precision="mixed-layers-ends"), "dispatch"),
    ("dense", QuantizeOptions("int4", "rtn", 64, "float", mixed_precision="none"), "dispatch"),
    ("converted", QuantizeOptions("int4", "hqq", 32, mixed_precision="mixed-layers"), "dispatch"),
    ("converted", QuantizeOptions("int4", "rtn", 32, qmoe=True), "contrib"),
    ("converted", QuantizeOptions("int8", block_size=32), "dispatch"),
])
def test_the_graph_stores_the_planned_formats_and_their_bytes_are_its_initializers(kind, options, moe_op, tmp_path):
    """Three counts that must agree: the plan read from the lowered graph against the one planned from the options
    before quantizing; its bytes against the sizes of the graph's initializers; and against the quantized weights'
    own count."""
    model = tiny_model("llama", vocab_size=VOCAB, tie_word_embeddings=True) if kind == "dense" else converted()
    arch = ModelArch.from_config(model.config)
    quantized = quantize_model(model, options, TOKENIZER)
    path = lower_to_onnx(quantized.model, tmp_path / "q", moe_op=moe_op, quantized=quantized)
    plan = read_weight_plan(path)
    assert plan == WeightPlan.from_quantization(arch, options, "fp32")
    assert plan.quantized_bytes(arch) == initializer_bytes(path) == quantized.nbytes()
    if options.mixed:
        assert {f.precision for f in plan.formats()} == {"int4", "int8"}
    assert plan.zero_points == (options.quant_method == "hqq")


def test_a_float_graph_has_no_plan_and_a_float_lm_head_stays_float(tmp_path):
    model = tiny_model("qwen3", vocab_size=VOCAB)
    assert read_weight_plan(lower_to_onnx(model, tmp_path / "fp32")) is None
    options = QuantizeOptions("int4", "rtn", 32, "float", mixed_precision="none")
    quantized = quantize_model(model, options, TOKENIZER)
    plan = read_weight_plan(lower_to_onnx(quantized.model, tmp_path / "q", quantized=quantized))
    # q, k and v are three MatMulNBits nodes in a Qwen3 block (their heads are normalised apart)
    assert plan == WeightPlan.uniform(6, MatrixFormat("int4", 32), MatrixFormat("fp32"))


def smollm2_arch(blocks: int = 30) -> ModelArch:
    return ModelArch(family="llama", hidden_size=576, intermediate_size=1536, num_heads=9, num_kv_heads=3,
                     head_dim=64, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192,
                     blocks=(BlockSpec(),) * blocks)


def predicted(arch, options: QuantizeOptions, phase: str = "decode") -> float:
    settings = RooflineSettings(prefill=128, context=512, precision=options.precision, all_logits=True,
                                weights=WeightPlan.from_quantization(arch, options, "fp32"))
    return estimate_phase(arch, load_profile("host-cpu").for_runtime("onnxruntime-cpu"), phase, settings)


@pytest.mark.parametrize("method", ["hqq", "rtn"])
def test_a_mixed_artifact_is_predicted_slower_than_the_same_artifact_without(method):
    arch = smollm2_arch()
    mixed = predicted(arch, QuantizeOptions("int4", method, 64, mixed_precision="mixed-layers-ends"))
    pure = predicted(arch, QuantizeOptions("int4", method, 64, mixed_precision="none"))
    assert mixed.seconds > pure.seconds and mixed.bytes > pure.bytes
    # the int8 matrices run at the int8 kernels' figures: blocks 0-3 and 27-29 whole, q/k/v and down between
    int8_blocks = {o.block for o in mixed.ops if o.weights == "int8" and o.op == "o_proj"}
    assert int8_blocks == {0, 1, 2, 3, 27, 28, 29}
    assert {o.block for o in pure.ops if o.weights == "int8"} == {-1}  # the LM head only


def test_hqqs_residuals_are_float_kernels_on_top_of_round_to_nearest():
    arch = smollm2_arch()
    hqq = predicted(arch, QuantizeOptions("int4", "hqq", 64, mixed_precision="none"))
    rtn = predicted(arch, QuantizeOptions("int4", "rtn", 64, mixed_precision="none"))
    assert hqq.seconds > rtn.seconds
    # per block: q/k/v (one packed node), o, gate, up, down each a residual MatMul and an Add; a block-sum MatMul per
    # input (q/k/v's, o's, gate and up's, down's)
    extra = sum(o.kernels for o in hqq.ops) - sum(o.kernels for o in rtn.ops)
    assert extra == 30 * (5 * 2 + 4)
    # the residual [in / 64, out] in fp32 per matrix and the 0/1 block-sum matrix [in, in / 64] per input, beyond
    # the integer zero points (per row, 9 or 24 blocks of 4 bits)
    h, q, kv, i = 576, 576, 192, 1536
    residual = 4 * (h // 64 * (q + 2 * kv) + q // 64 * h + 2 * h // 64 * i + i // 64 * h)
    sums = 4 * (3 * h * (h // 64) + i * (i // 64))
    zero_points = (q + 2 * kv) * 5 + h * 5 + 2 * i * 5 + h * 12
    activations = hqq.bytes - rtn.bytes - 30 * (residual + sums + zero_points)
    assert 0 < activations < 30 * 4 * 12 * (h + i)  # the block sums and residual outputs: a few vectors per block


def test_the_plan_follows_the_options_rule_per_block_and_matrix():
    arch = smollm2_arch(8)
    plan = WeightPlan.from_quantization(arch, QuantizeOptions("int4", "hqq", mixed_precision="mixed-layers"), "fp32")
    hqq, int8 = MatrixFormat("int4", 64, True, True), MatrixFormat("int8", 64)
    # layers 0 and 7 (the eighths), then every third layer from round(8 / 8) = 1: 3 and 6
    for index, block in enumerate(plan.blocks):
        moved = index in (0, 3, 6, 7)
        assert block == BlockWeights(*[int8 if moved and leaf in ("q_proj", "k_proj", "v_proj", "down_proj") else hqq
                                       for leaf in LEAVES]), index
    assert plan.lm_head == MatrixFormat("int8", 64)  # round-to-nearest under hqq, blocks of 64
    trt = WeightPlan.from_quantization(arch, QuantizeOptions("int4", tensorrt=True, mixed_precision="none"), "fp16")
    assert trt == WeightPlan.uniform(8, MatrixFormat("int4", 64), MatrixFormat("fp16"))
    # TensorRT's int8 matrices have one scale per output channel (block size 0), fewer scale bytes than blocks
    mixed = WeightPlan.from_quantization(arch, QuantizeOptions("int4", tensorrt=True), "fp16")
    assert {f for f in mixed.formats() if f.bits == 8} == {MatrixFormat("int8", 0)}
    assert MatrixFormat("int8", 0).stored_bytes(576, 1536, 2) == 576 * 1536 + 1536 * 2
    assert MatrixFormat("int8", 0).describe() == "int8 per channel"


def test_calibrated_mixed_precision_plans_its_choice_and_the_layer_rule_before_it():
    arch = smollm2_arch(8)
    rtn, int8 = MatrixFormat("int4", 64), MatrixFormat("int8", 64)
    before = QuantizeOptions("int4", mixed_precision="calibrated")
    assert WeightPlan.from_quantization(arch, before, "fp32") == WeightPlan.from_quantization(
        arch, QuantizeOptions("int4", mixed_precision="mixed-layers-ends"), "fp32")
    chosen = dataclasses.replace(before, int8_matrices=("model.layers.2.self_attn.o_proj",
                                                        "model.layers.5.mlp.experts.0.down_proj",
                                                        "model.layers.5.mlp.experts.1.down_proj"))
    plan = WeightPlan.from_quantization(arch, chosen, "fp32")
    moved = {(2, "o_proj"), (5, "down_proj")}
    for index, block in enumerate(plan.blocks):
        assert block == BlockWeights(*[int8 if (index, leaf) in moved else rtn for leaf in LEAVES]), index


def test_a_plan_for_another_model_is_refused():
    arch = smollm2_arch(4)
    plan = WeightPlan.uniform(3, MatrixFormat("int4", 64), MatrixFormat("int8", 64))
    with pytest.raises(ValueError, match="the weight plan describes 3 blocks, the model has 4"):
        estimate_phase(arch, load_profile("host-cpu"), "decode", RooflineSettings(weights=plan))
    odd = WeightPlan.uniform(4, MatrixFormat("int4", 128), MatrixFormat("int8", 64))
    with pytest.raises(ValueError, match="block 0's q_proj: block size 128 does not divide its input size 576"):
        estimate_phase(arch, load_profile("host-cpu"), "decode", RooflineSettings(weights=odd))


def test_matrix_bytes_are_codes_scales_and_packed_zero_points():
    fmt = MatrixFormat("int4", 64, zero_points=True, residual=True)
    # [192, 576]: 9 blocks a row; codes 576 * 192 / 2, scales 192 * 9 * 4, zero points 192 rows of ceil(9 / 2) bytes
    assert fmt.stored_bytes(576, 192, 4) == 576 * 192 / 2 + 192 * 9 * 4 + 192 * 5
    assert fmt.residual_bytes(576, 192, 4) == 9 * 192 * 4
    assert MatrixFormat("fp32").stored_bytes(576, 192, 4) == 576 * 192 * 4
    assert dataclasses.replace(fmt, residual=False).residual_bytes(576, 192, 4) == 0
    assert np.isclose(MatrixFormat("int8", 32).stored_bytes(64, 8, 2), 64 * 8 + 8 * 2 * 2)


def test_compile_costs_each_model_with_the_plan_its_quantization_will_store():
    from d2mc.compile import planned_settings

    settings = RooflineSettings(precision="int4", block_size=64, lm_head_precision="int8", all_logits=True)
    dense, converted_arch = smollm2_arch(30), smollm2_arch(24)
    options = QuantizeOptions("int4")
    for arch in (dense, converted_arch):  # the rule follows each model's own number of blocks
        planned = planned_settings(settings, arch, options, load_profile("host-cpu"))
        assert planned.weights == WeightPlan.from_quantization(arch, options, "fp32") and not planned.zero_points
    orin = planned_settings(dataclasses.replace(settings, lm_head_precision="fp16"), dense,
                            QuantizeOptions("int4", tensorrt=True, mixed_precision="none"), load_profile("orin-agx"))
    assert orin.weights == WeightPlan.uniform(30, MatrixFormat("int4", 64), MatrixFormat("fp16"))
    assert planned_settings(settings, dense, None, load_profile("host-cpu")) is settings
