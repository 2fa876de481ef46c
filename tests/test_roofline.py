import json
import re
import tomllib
from functools import cache
from pathlib import Path

import pytest

from d2mc.arch import BlockSpec, ModelArch
from d2mc.errors import UserError
from d2mc.loading import load_model
from d2mc.profiles import load_profile
from d2mc.roofline import (
    RooflineSettings,
    analyze,
    estimate_phase,
    expected_distinct_experts,
    predict_decode_seconds,
    predict_prefill_seconds,
)

DATA = Path(__file__).parent / "data"
PUBLISHED = tomllib.loads((DATA / "published_decode.toml").read_text())


def arch(blocks=None, **kw):
    base = dict(family="llama", hidden_size=8, intermediate_size=16, num_heads=2, num_kv_heads=1, head_dim=4,
                vocab_size=32, tie_word_embeddings=True, max_position_embeddings=4096)
    base.update(kw)
    return ModelArch(blocks=tuple(blocks or [BlockSpec()]), **base)


def ops(cost, block=0):
    return {o.op: o for o in cost.ops if o.block == block and o.op != "norm"}


def norms(cost, block=0):
    return [o for o in cost.ops if o.block == block and o.op == "norm"]


def test_hand_computed_decode_costs_per_operator():
    a = arch()
    profile = load_profile("orin-agx")
    cost = estimate_phase(a, profile, "decode", RooflineSettings(context=10, precision="fp16"))
    o = ops(cost)
    # q: 2x4=8, k and v: 1x4=4 each -> qkv out 16; fp16 weights 2 bytes, fp16 activations 2 bytes
    assert o["qkv_proj"].flops == 2 * 8 * 16
    assert o["qkv_proj"].bytes == 8 * 16 * 2 + (8 + 16) * 2
    # attention over 11 positions: QK and PV, 4 FLOPs per (position, query dim); reads 11 K and V rows of 4,
    # writes the new K and V row, reads q and writes the output (8 each)
    assert o["attention"].flops == 4 * 11 * 8
    assert o["attention"].bytes == 11 * 2 * 4 * 2 + 2 * 4 * 2 + 2 * 8 * 2
    assert o["o_proj"].flops == 2 * 8 * 8 and o["o_proj"].bytes == 8 * 8 * 2 + 16 * 2
    # gate, up, down: 3 matrices 8x16; activations in 8, gate/up/product 3x16, out 8
    assert o["mlp"].flops == 2 * 3 * 8 * 16 and o["mlp"].bytes == 3 * 8 * 16 * 2 + (16 + 48) * 2
    # two RMSNorms per block: 4 FLOPs per element, weight 8 x 2 bytes, read and write the 8 activations
    assert [(n.flops, n.bytes) for n in norms(cost)] == [(4 * 8, 8 * 2 + 2 * 8 * 2)] * 2
    outside = {o.op: o for o in cost.ops if o.block == -1}
    assert outside["embedding"].flops == 0 and outside["embedding"].bytes == 8 * (2 + 2)
    assert outside["lm_head"].flops == 2 * 8 * 32 and outside["lm_head"].bytes == 8 * 32 * 2 + (8 + 32) * 2
    for op in cost.ops:
        assert op.bound == "memory"  # batch-1 decode is memory-bound everywhere
        expected = max(op.flops / profile.achievable_flops("fp16"), op.bytes / profile.achievable_bandwidth)
        assert op.seconds == pytest.approx(expected + op.kernels * profile.kernel_overhead_us * 1e-6)
    assert cost.seconds == pytest.approx(sum(op.seconds for op in cost.ops))


def test_hand_computed_prefill_costs():
    cost = estimate_phase(arch(), load_profile("orin-agx"), "prefill", RooflineSettings(prefill=6, precision="fp16"))
    o = ops(cost)
    assert o["qkv_proj"].flops == 2 * 6 * 8 * 16
    assert o["qkv_proj"].bytes == 8 * 16 * 2 + 6 * (8 + 16) * 2  # weights once, activations per token
    assert o["attention"].flops == 4 * (6 * 7 / 2) * 8  # causal: 21 (query, key) pairs
    assert o["mlp"].flops == 6 * 2 * 3 * 8 * 16
    head = [op for op in cost.ops if op.op == "lm_head"][0]
    assert head.flops == 2 * 8 * 32  # only the last position's logits are computed
    # an exported graph computes the logits of every prompt position
    graph = estimate_phase(arch(), load_profile("orin-agx"), "prefill",
                           RooflineSettings(prefill=6, precision="fp16", all_logits=True))
    head = [op for op in graph.ops if op.op == "lm_head"][0]
    assert head.flops == 6 * 2 * 8 * 32 and head.bytes == 8 * 32 * 2 + 6 * (8 + 32) * 2


def test_kv_precision_scales_the_cache_bytes():
    profile = load_profile("orin-agx")
    fp16 = ops(estimate_phase(arch(), profile, "decode", RooflineSettings(context=100, precision="fp16")))
    kv8 = ops(estimate_phase(arch(), profile, "decode", RooflineSettings(context=100, precision="fp16",
                                                                         kv_precision="int8")))
    assert fp16["attention"].bytes - kv8["attention"].bytes == 101 * 2 * 4 * 1 + 2 * 4 * 1
    # a 4- or 8-bit cache must be asked for: int4 weights keep the activations' float format
    assert RooflineSettings(precision="int4").kv_for("gpu") == "fp16"
    assert RooflineSettings(precision="int4").kv_for("cpu") == "fp32"
    assert RooflineSettings(precision="fp16").kv_for("cpu") == "fp16"


def quantizable(**kw):
    """h 32, two query heads and one KV head of 16 (q 32, k 16, v 16), MLP 64, vocab 64: every input size is a
    multiple of 16."""
    return arch(**{**dict(hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1, head_dim=16,
                          vocab_size=64), **kw})


def test_int4_weights_read_packed_values_and_a_scale_per_block():
    cost = estimate_phase(quantizable(), load_profile("orin-agx"), "decode",
                          RooflineSettings(context=10, precision="int4", block_size=16))
    o = ops(cost)
    # qkv is 32 in x 64 out: 32 * 64 / 2 bytes of packed 4-bit values; blocks of 16 along the input give 2 blocks
    # per output column, 128 blocks, each with an fp16 scale (2 bytes); fp16 activations 32 in, 64 out
    assert o["qkv_proj"].bytes == 32 * 64 / 2 + 128 * 2 + (32 + 64) * 2
    assert o["o_proj"].bytes == 32 * 32 / 2 + 32 * 2 * 2 + (32 + 32) * 2
    # gate and up 32 x 64 (2 blocks per column, 128 columns), down 64 x 32 (4 blocks per column, 32 columns)
    assert o["mlp"].bytes == 3 * 32 * 64 / 2 + (2 * 64 * 2 + 32 * 4) * 2 + (2 * 32 + 3 * 64) * 2
    # the LM head follows the weights unless told otherwise: 32 x 64 packed, 128 blocks
    assert ops(cost, -1)["lm_head"].bytes == 32 * 64 / 2 + 128 * 2 + (32 + 64) * 2
    # norms and the embedding row stay fp16, the KV cache too (11 positions read, one written, K and V of 16)
    assert [n.bytes for n in norms(cost)] == [32 * 2 + 2 * 32 * 2] * 2
    assert ops(cost, -1)["embedding"].bytes == 32 * (2 + 2)
    assert o["attention"].bytes == 11 * 2 * 16 * 2 + 2 * 16 * 2 + 2 * 32 * 2


def test_zero_points_are_stored_at_the_weights_width():
    settings = RooflineSettings(context=10, precision="int4", block_size=16, zero_points=True)
    o = ops(estimate_phase(quantizable(), load_profile("orin-agx"), "decode", settings))
    # 128 blocks: fp16 scales (256 bytes) and 4-bit zero points (64 bytes)
    assert o["qkv_proj"].bytes == 32 * 64 / 2 + 128 * 2 + 128 / 2 + (32 + 64) * 2
    int8 = RooflineSettings(context=10, precision="int8", block_size=32, zero_points=True)
    o = ops(estimate_phase(quantizable(), load_profile("orin-agx"), "decode", int8))
    # one block of 32 per column: 64 blocks, an fp16 scale and an 8-bit zero point each
    assert o["qkv_proj"].bytes == 32 * 64 + 64 * (2 + 1) + (32 + 64) * 2


def test_matmulnbits_scales_are_fp32_on_a_cpu():
    """ONNX Runtime's MatMulNBits keeps its scales in the input's type: fp32 activations on a CPU."""
    settings = RooflineSettings(context=10, precision="int8", block_size=32)
    o = ops(estimate_phase(quantizable(), load_profile("host-cpu"), "decode", settings))
    assert o["qkv_proj"].bytes == 32 * 64 + 64 * 4 + (32 + 64) * 4
    assert o["attention"].bytes == 11 * 2 * 16 * 4 + 2 * 16 * 4 + 2 * 32 * 4  # fp32 KV cache


def test_the_lm_head_keeps_its_own_precision():
    settings = RooflineSettings(context=10, precision="int4", block_size=16, lm_head_precision="fp16")
    head = ops(estimate_phase(quantizable(), load_profile("orin-agx"), "decode", settings), -1)["lm_head"]
    assert head.bytes == 32 * 64 * 2 + (32 + 64) * 2 and head.flops == 2 * 32 * 64
    # fp16 weights with an int4 head: only the head is quantized
    head_only = RooflineSettings(context=10, precision="fp16", block_size=16, lm_head_precision="int4")
    cost = estimate_phase(quantizable(), load_profile("orin-agx"), "decode", head_only)
    assert ops(cost, -1)["lm_head"].bytes == 32 * 64 / 2 + 128 * 2 + (32 + 64) * 2
    assert ops(cost)["mlp"].bytes == 3 * 32 * 64 * 2 + (2 * 32 + 3 * 64) * 2


def test_an_int8_lm_head_is_counted_in_blocks_of_64_where_they_divide_the_hidden_size():
    settings = RooflineSettings(context=10, precision="int4", block_size=32, lm_head_precision="int8")
    wide = ops(estimate_phase(quantizable(hidden_size=64), load_profile("host-cpu"), "decode", settings), -1)
    # 64 in x 64 out, one block of 64 per column: 64 fp32 scales (the weights' blocks of 32 would give 128)
    assert wide["lm_head"].bytes == 64 * 64 + 64 * 4 + (64 + 64) * 4
    narrow = ops(estimate_phase(quantizable(), load_profile("host-cpu"), "decode", settings), -1)
    assert narrow["lm_head"].bytes == 32 * 64 + 64 * 4 + (32 + 64) * 4  # 64 does not divide 32: blocks of 32


def test_quantized_operators_run_at_the_precision_figures_of_the_profile():
    import dataclasses

    base = load_profile("orin-agx")
    profile = dataclasses.replace(base, precisions={"int4": {"bandwidth_efficiency": 0.5, "kernel_overhead_us": 10.0}})
    settings = RooflineSettings(context=10, precision="int4", block_size=16, lm_head_precision="fp16")
    cost = estimate_phase(quantizable(), profile, "decode", settings)
    bandwidth = base.memory_bandwidth_gbps * 1e9
    for op in cost.ops:
        if op.op in ("qkv_proj", "o_proj", "mlp"):
            assert op.seconds == pytest.approx(op.bytes / (bandwidth * 0.5) + op.kernels * 10e-6)
        else:  # the fp16 LM head, attention, norms and the embedding keep the profile's own figures
            assert op.seconds == pytest.approx(op.bytes / base.achievable_bandwidth + op.kernels * 6e-6)
    # weight-only int4 computes at the activations' precision
    wide = quantizable(hidden_size=2048, intermediate_size=8192, num_heads=16, head_dim=128, num_kv_heads=4)
    prefill = estimate_phase(wide, profile, "prefill", RooflineSettings(prefill=512, precision="int4"))
    mlp = ops(prefill)["mlp"]
    assert mlp.bound == "compute"
    assert mlp.seconds == pytest.approx(mlp.flops / base.achievable_flops("fp16") + 3 * 10e-6)


def test_float_weights_ignore_the_quantization_settings():
    profile = load_profile("orin-agx")
    plain = estimate_phase(quantizable(), profile, "decode", RooflineSettings(context=10))
    other = estimate_phase(quantizable(), profile, "decode", RooflineSettings(context=10, block_size=16,
                                                                              zero_points=True))
    assert [(o.bytes, o.seconds) for o in plain.ops] == [(o.bytes, o.seconds) for o in other.ops]


def test_compute_bound_prefill_on_a_wide_model():
    wide = arch(hidden_size=2048, intermediate_size=8192, num_heads=16, num_kv_heads=4, head_dim=128, vocab_size=1000)
    cost = estimate_phase(wide, load_profile("orin-agx"), "prefill", RooflineSettings(prefill=512))
    assert ops(cost)["mlp"].bound == "compute" and cost.bound == "compute"


def test_moe_decode_reads_only_the_chosen_experts():
    profile = load_profile("orin-agx")
    dense = ops(estimate_phase(arch([BlockSpec()]), profile, "decode", RooflineSettings()))
    moe = ops(estimate_phase(arch([BlockSpec(experts=4, top_k=1)]), profile, "decode", RooflineSettings()))
    assert moe["mlp"].bytes == dense["mlp"].bytes and moe["mlp"].flops == dense["mlp"].flops
    assert moe["router"].flops == 2 * 8 * 4 and moe["router"].bytes == 8 * 4 * 2 + 8 * 2
    top2 = ops(estimate_phase(arch([BlockSpec(experts=4, top_k=2)]), profile, "decode", RooflineSettings()))
    assert top2["mlp"].bytes - (16 + 48) * 2 * 2 == 2 * 3 * 8 * 16 * 2
    shared = ops(estimate_phase(arch([BlockSpec(experts=3, shared_experts=1)]), profile, "decode",
                                RooflineSettings()))
    assert shared["mlp"].flops == 2 * dense["mlp"].flops
    assert shared["mlp"].bytes == 2 * 3 * 8 * 16 * 2 + 2 * (16 + 48) * 2


def test_smaller_experts_read_and_compute_their_own_size():
    """Experts of 4 neurons cut from an MLP of 16: top-2 of 4 reads and computes two 4-neuron experts."""
    profile = load_profile("orin-agx")
    split = ops(estimate_phase(arch([BlockSpec(experts=4, top_k=2, expert_intermediate=4)]), profile, "decode",
                               RooflineSettings()))
    assert split["mlp"].flops == 2 * 2 * 3 * 8 * 4
    assert split["mlp"].bytes == 2 * 3 * 8 * 4 * 2 + 2 * (16 + 3 * 4) * 2
    a = arch([BlockSpec(experts=4, top_k=2, expert_intermediate=4), BlockSpec()])
    assert a.param_counts()["mlp"] == 4 * 3 * 8 * 4 + 3 * 8 * 16
    assert a.active_param_counts()["mlp"] == 2 * 3 * 8 * 4 + 3 * 8 * 16


def test_an_moe_block_is_one_plugin_node_on_a_tensorrt_device():
    """On a TensorRT device the experts run inside one D2mcMoE node (route, gate/up, down on the GEMV path; 8 kernels
    on the grouped path) and the block normalises once; ONNX Runtime dispatch launches per expert."""
    block = arch([BlockSpec(experts=8, top_k=4, expert_intermediate=2)])
    orin, host = load_profile("orin-agx"), load_profile("host-cpu")
    decode = estimate_phase(block, orin, "decode", RooflineSettings())
    assert ops(decode)["mlp"].kernels == 3 and [n.kernels for n in norms(decode)] == [1, 1]
    assert ops(estimate_phase(block, orin, "prefill", RooflineSettings(prefill=64)))["mlp"].kernels == 8
    cpu = estimate_phase(block, host, "decode", RooflineSettings(precision="fp32"))
    assert ops(cpu)["mlp"].kernels == 4 * 3 and [n.kernels for n in norms(cpu)] == [1, 4]
    dense = estimate_phase(arch(), orin, "decode", RooflineSettings())
    assert ops(dense)["mlp"].kernels == 3  # a dense MLP is unchanged


def test_a_block_without_attention_has_no_attention_operators():
    profile = load_profile("orin-agx")
    cost = estimate_phase(arch([BlockSpec(attention=False, experts=2)]), profile, "decode", RooflineSettings())
    assert set(ops(cost)) == {"router", "mlp"}
    assert len(norms(cost)) == 1


def test_batch_reads_the_expected_distinct_experts():
    assert expected_distinct_experts(4, 1, 1) == 1
    assert expected_distinct_experts(4, 1, 2) == pytest.approx(4 * (1 - 0.75 ** 2))
    assert expected_distinct_experts(4, 2, 1000) == pytest.approx(4)
    profile = load_profile("orin-agx")
    single = ops(estimate_phase(arch([BlockSpec(experts=4)]), profile, "decode", RooflineSettings(batch=1)))
    batched = ops(estimate_phase(arch([BlockSpec(experts=4)]), profile, "decode", RooflineSettings(batch=8)))
    weights = 3 * 8 * 16 * 2
    assert batched["mlp"].bytes - single["mlp"].bytes == pytest.approx(
        (expected_distinct_experts(4, 1, 8) - 1) * weights + 7 * (16 + 48) * 2)


def test_batch_shares_weights_but_not_the_kv_cache():
    profile = load_profile("orin-agx")
    one = ops(estimate_phase(arch(), profile, "decode", RooflineSettings(context=100, batch=1)))
    four = ops(estimate_phase(arch(), profile, "decode", RooflineSettings(context=100, batch=4)))
    assert four["o_proj"].flops == 4 * one["o_proj"].flops
    assert four["o_proj"].bytes - one["o_proj"].bytes == 3 * 16 * 2  # activations only: weights read once
    assert four["attention"].bytes == 4 * one["attention"].bytes  # each sequence reads its own cache


def test_measured_routing_statistics_replace_the_uniform_assumption():
    profile = load_profile("orin-agx")
    a = arch([BlockSpec(experts=2)])
    skewed = estimate_phase(a, profile, "decode", RooflineSettings(batch=4), expert_load={0: [1.0, 0.0]})
    uniform = estimate_phase(a, profile, "decode", RooflineSettings(batch=4))
    assert ops(skewed)["mlp"].bytes < ops(uniform)["mlp"].bytes
    assert ops(skewed)["mlp"].bytes == ops(estimate_phase(a, profile, "decode", RooflineSettings()))["mlp"].bytes \
        + 3 * (16 + 48) * 2  # one expert read, four tokens' activations
    # counts work as well as fractions
    counts = estimate_phase(a, profile, "decode", RooflineSettings(batch=4), expert_load={0: [30, 10]})
    fractions = estimate_phase(a, profile, "decode", RooflineSettings(batch=4), expert_load={0: [0.75, 0.25]})
    assert ops(counts)["mlp"].bytes == ops(fractions)["mlp"].bytes
    assert "measured routing statistics" in analyze(a, profile, expert_load={0: [1, 1]}).routing


@pytest.mark.parametrize("load, message", [
    ({1: [1.0, 1.0]}, "routing statistics given for block 1, which has no router"),
    ({0: [1.0]}, r"routing statistics of block 0 need 2 non-negative values, not \[1.0\]"),
    ({0: [-1.0, 2.0]}, "need 2 non-negative values"),
])
def test_bad_routing_statistics_are_one_line(load, message):
    with pytest.raises(UserError, match=message):
        estimate_phase(arch([BlockSpec(experts=2), BlockSpec()]), load_profile("orin-agx"), "decode",
                       RooflineSettings(), expert_load=load)


@pytest.mark.parametrize("kwargs, message", [
    ({"context": -1}, "--context must be a positive whole number, not -1"),
    ({"prefill": 0}, "--prefill must be a positive whole number, not 0"),
    ({"batch": 2.5}, "--batch must be a positive whole number, not 2.5"),
    ({"precision": "fp12"}, "unknown precision 'fp12': choose one of fp32, fp16"),
    ({"kv_precision": "int3"}, "unknown precision 'int3'"),
    ({"lm_head_precision": "int2"}, "unknown precision 'int2'"),
    ({"block_size": 0}, "--block-size must be a positive whole number, not 0"),
    ({"block_size": 48}, r"--block-size must be a power of two of at least 16 \(32, 64, 128\), not 48"),
    ({"activation_precision": "int8"}, "--activation-precision must be a float format"),
])
def test_bad_settings_are_one_line(kwargs, message):
    with pytest.raises(UserError, match=message):
        RooflineSettings(**kwargs)


def test_lengths_past_the_maximum_are_refused():
    small = arch(max_position_embeddings=256)
    with pytest.raises(UserError, match=r"--context 256 is past the model's maximum of 256 positions \(the decode "
                                        r"step needs one more: use --context 255 or less\)"):
        predict_decode_seconds(small, load_profile("orin-agx"), context=256)
    assert predict_decode_seconds(small, load_profile("orin-agx"), context=255) > 0
    with pytest.raises(UserError, match="--prefill 300 is past the model's maximum of 256 positions"):
        predict_prefill_seconds(small, load_profile("orin-agx"), tokens=300)


@pytest.mark.parametrize("settings, message", [
    (RooflineSettings(precision="int4"), "--block-size 128 does not divide the input size 576 of the attention "
                                         "projections and MLP gate/up: use --block-size 32"),
    (RooflineSettings(precision="fp16", lm_head_precision="int8", block_size=128),
     "--block-size 128 does not divide the input size 576 of the LM head: use --block-size 64 or 32"),
    (RooflineSettings(precision="int4", block_size=64), "--block-size 64 does not divide the input size 1568 of the "
                                                        "MLP down projection: use --block-size 32"),
])
def test_a_block_size_that_does_not_divide_an_input_is_one_line(settings, message):
    """SmolLM2's hidden size 576 is 4.5 blocks of 128; experts of 1568 neurons are 24.5 blocks of 64. The hint names
    the block sizes that divide every quantized input (only the LM head's when only the head is quantized)."""
    smol = arch([BlockSpec(), BlockSpec(experts=2, expert_intermediate=1568)], hidden_size=576,
                intermediate_size=1536, num_heads=9, num_kv_heads=3, head_dim=64, vocab_size=1000)
    with pytest.raises(UserError, match=re.escape(message)):
        estimate_phase(smol, load_profile("orin-agx"), "decode", settings)
    fp16 = RooflineSettings(precision="fp16", block_size=128)  # float weights have no blocks to divide
    assert estimate_phase(smol, load_profile("orin-agx"), "decode", fp16).seconds > 0


def test_a_profile_without_the_precision_is_refused():
    import dataclasses

    fp16_only = dataclasses.replace(load_profile("orin-agx"), peak_tflops={"fp16": 42.5})
    with pytest.raises(UserError, match="device 'orin-agx' has no throughput for fp32: it lists fp16"):
        predict_decode_seconds(arch(), fp16_only, precision="fp32")


def test_an_operator_class_can_stream_slower():
    import dataclasses

    profile = load_profile("orin-agx")
    slow = dataclasses.replace(profile, op_bandwidth_efficiency={"attention": 0.5})
    settings = RooflineSettings(context=1000)
    fast_ops, slow_ops = ops(estimate_phase(arch(), profile, "decode", settings)), \
        ops(estimate_phase(arch(), slow, "decode", settings))
    overhead = profile.kernel_overhead_us * 1e-6
    assert slow_ops["attention"].seconds - overhead == pytest.approx(2 * (fast_ops["attention"].seconds - overhead))
    assert slow_ops["mlp"].seconds == fast_ops["mlp"].seconds


def test_report_is_json_and_adds_up():
    report = analyze(arch([BlockSpec(), BlockSpec(experts=2)]), load_profile("orin-agx"),
                     RooflineSettings(prefill=16, context=64))
    data = json.loads(json.dumps(report.to_dict()))
    for phase in ("prefill", "decode"):
        p = data["phases"][phase]
        assert [b["label"] for b in p["blocks"]] == ["0", "1", "embed+head"]
        assert sum(b["seconds"] for b in p["blocks"]) == pytest.approx(p["seconds"])
        assert sum(c["bytes"] for c in p["op_classes"].values()) == pytest.approx(p["bytes"])
        assert set(p["op_classes"]) == {"embedding", "norm", "qkv_proj", "attention", "o_proj", "router", "mlp",
                                        "lm_head"}
    assert data["settings"]["kv"] == "fp16" and "uniform routing" in data["moe_accounting"]
    assert data["parameters"]["active_per_token"] < data["parameters"]["total"]


def test_removing_attention_and_fusing_lowers_decode_time():
    profile = load_profile("orin-agx")
    dense = arch([BlockSpec()] * 4, hidden_size=256, intermediate_size=768, num_heads=4, num_kv_heads=2,
                 head_dim=64, vocab_size=1000)
    fused = ModelArch(**{**dense.__dict__, "blocks": (BlockSpec(), BlockSpec(experts=2), BlockSpec())})
    assert predict_decode_seconds(fused, profile, context=2048) < predict_decode_seconds(dense, profile, context=2048)


def test_llama_3_2_1b_on_orin_is_near_weight_bytes_over_bandwidth():
    loaded = load_model(DATA / "llama-3.2-1b-config.json", config_only=True)
    assert round(loaded.arch.total_params / 1e9, 2) == 1.24
    profile = load_profile("orin-agx")
    seconds = predict_decode_seconds(loaded.arch, profile, context=512)
    ideal = loaded.arch.total_params * 2 / 204.8e9
    assert ideal == pytest.approx(0.0121, rel=0.02)
    # the roofline adds only the bandwidth efficiency, the KV cache and kernel overheads to the ideal
    assert seconds == pytest.approx(ideal / profile.bandwidth_efficiency, rel=0.1)


@cache
def config_arch(model: str) -> ModelArch:
    return load_model(DATA / f"{model}-config.json", config_only=True).arch


def test_qwen3_configs_are_the_published_models():
    """Qwen3-0.6B is 0.6B parameters with its tied embedding (0.44B without), Qwen3-8B 8.2B with its own LM head."""
    assert round(config_arch("qwen3-0.6b").total_params / 1e9, 2) == 0.60
    assert config_arch("qwen3-0.6b").qk_norm and config_arch("qwen3-0.6b").head_dim == 128
    assert round(config_arch("qwen3-8b").total_params / 1e9, 1) == 8.2
    assert not config_arch("qwen3-8b").tie_word_embeddings


@pytest.mark.parametrize("row", PUBLISHED["rows"], ids=lambda r: f"{r['profile']}-{r['model']}")
def test_jetson_profiles_predict_published_decode(row):
    """The profiles fitted on published rows (orin-agx, thor) predict them within 10%; the profiles derived from
    them (the other Orin modules, datasheet figures and the efficiencies fitted on AGX Orin) predict their own
    device's held-out rows within 15%."""
    source = PUBLISHED["sources"][row["source"]]
    settings = RooflineSettings(**{k: source[k] for k in ("context", "precision", "block_size", "zero_points",
                                                          "lm_head_precision", "kv_precision")})
    seconds = estimate_phase(config_arch(row["model"]), load_profile(row["profile"]), "decode", settings).seconds
    tolerance = {"fit": 0.10, "check": 0.15}[row["role"]]
    assert abs(seconds * row["tokens_per_s"] - 1) <= tolerance
