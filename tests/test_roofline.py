from pathlib import Path

import pytest

from d2mc.arch import BlockSpec, ModelArch
from d2mc.errors import UserError
from d2mc.loading import load_model
from d2mc.profiles import load_profile
from d2mc.roofline import RooflineSettings, estimate_phase, expected_distinct_experts, predict_decode_seconds

DATA = Path(__file__).parent / "data"


def arch(blocks=None, **kw):
    base = dict(family="llama", hidden_size=8, intermediate_size=16, num_heads=2, num_kv_heads=1, head_dim=4,
                vocab_size=32, tie_word_embeddings=True, max_position_embeddings=4096)
    base.update(kw)
    return ModelArch(blocks=tuple(blocks or [BlockSpec()]), **base)


def ops(cost, block=0):
    return {o.op: o for o in cost.ops if o.block == block and o.op != "norm"}


def test_hand_computed_decode_costs_per_operator():
    a = arch()
    profile = load_profile("orin-agx")
    cost = estimate_phase(a, profile, "decode", RooflineSettings(context=10, precision="fp16"))
    o = ops(cost)
    # q: 2x4=8, k and v: 1x4=4 each -> qkv out 16; fp16 weights 2 bytes, fp16 activations 2 bytes
    assert o["qkv_proj"].flops == 2 * 8 * 16
    assert o["qkv_proj"].bytes == 8 * 16 * 2 + (8 + 16) * 2
    # attention over 11 positions: QK and PV, 4 FLOPs per (position, query dim); reads 11 K and V rows of 4
    assert o["attention"].flops == 4 * 11 * 8
    assert o["attention"].bytes == 11 * 2 * 4 * 2 + 2 * 4 * 2 + 2 * 8 * 2
    assert o["o_proj"].flops == 2 * 8 * 8 and o["o_proj"].bytes == 8 * 8 * 2 + 16 * 2
    assert o["mlp"].flops == 2 * 3 * 8 * 16 and o["mlp"].bytes == 3 * 8 * 16 * 2 + (16 + 48) * 2
    head = [op for op in cost.ops if op.op == "lm_head"][0]
    assert head.flops == 2 * 8 * 32 and head.bytes == 8 * 32 * 2 + (8 + 32) * 2
    for op in cost.ops:
        assert op.bound == "memory"  # batch-1 decode is memory-bound everywhere
        expected = max(op.flops / profile.achievable_flops("fp16"), op.bytes / profile.achievable_bandwidth)
        assert op.seconds == pytest.approx(expected + op.kernels * profile.kernel_overhead_us * 1e-6)


def test_prefill_attention_is_causal():
    cost = estimate_phase(arch(), load_profile("orin-agx"), "prefill", RooflineSettings(prefill=6))
    assert ops(cost)["attention"].flops == 4 * (6 * 7 / 2) * 8


def test_moe_decode_reads_only_the_chosen_experts():
    profile = load_profile("orin-agx")
    dense = ops(estimate_phase(arch([BlockSpec()]), profile, "decode", RooflineSettings()))
    moe = ops(estimate_phase(arch([BlockSpec(experts=4, top_k=1)]), profile, "decode", RooflineSettings()))
    assert moe["mlp"].bytes == dense["mlp"].bytes
    assert moe["router"].flops == 2 * 8 * 4
    shared = ops(estimate_phase(arch([BlockSpec(experts=3, shared_experts=1)]), profile, "decode",
                                RooflineSettings()))
    assert shared["mlp"].flops == 2 * dense["mlp"].flops


def test_batch_reads_the_expected_distinct_experts():
    assert expected_distinct_experts(4, 1, 1) == 1
    assert expected_distinct_experts(4, 1, 2) == pytest.approx(4 * (1 - 0.75 ** 2))
    profile = load_profile("orin-agx")
    single = ops(estimate_phase(arch([BlockSpec(experts=4)]), profile, "decode", RooflineSettings(batch=1)))
    batched = ops(estimate_phase(arch([BlockSpec(experts=4)]), profile, "decode", RooflineSettings(batch=8)))
    weights = 3 * 8 * 16 * 2
    assert batched["mlp"].bytes - single["mlp"].bytes == pytest.approx(
        (expected_distinct_experts(4, 1, 8) - 1) * weights + 7 * (16 + 48) * 2)


def test_measured_routing_statistics_replace_the_uniform_assumption():
    profile = load_profile("orin-agx")
    a = arch([BlockSpec(experts=2)])
    skewed = estimate_phase(a, profile, "decode", RooflineSettings(batch=4), expert_load={0: [1.0, 0.0]})
    uniform = estimate_phase(a, profile, "decode", RooflineSettings(batch=4))
    assert ops(skewed)["mlp"].bytes < ops(uniform)["mlp"].bytes


@pytest.mark.parametrize("kwargs, message", [
    ({"context": -1}, "--context must be a positive whole number"),
    ({"prefill": 0}, "--prefill must be a positive whole number"),
    ({"precision": "fp12"}, "unknown precision 'fp12'"),
])
def test_bad_settings_are_one_line(kwargs, message):
    with pytest.raises(UserError, match=message):
        RooflineSettings(**kwargs)


def test_context_past_the_maximum_is_refused():
    with pytest.raises(UserError, match="--context 5000 is past the model's maximum of 4096"):
        predict_decode_seconds(arch(), load_profile("orin-agx"), context=5000)


def test_llama_3_2_1b_on_orin_is_near_weight_bytes_over_bandwidth():
    loaded = load_model(DATA / "llama-3.2-1b-config.json", config_only=True)
    assert round(loaded.arch.total_params / 1e9, 2) == 1.24
    seconds = predict_decode_seconds(loaded.arch, load_profile("orin-agx"), context=512)
    ideal = loaded.arch.total_params * 2 / 204.8e9
    assert ideal == pytest.approx(0.0121, rel=0.02)
    assert ideal < seconds < 1.35 * ideal
