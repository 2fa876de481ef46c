"""Calibrated mixed precision: the matrix whose int4 error costs the calibration loss most goes to int8 (checked
against the loss itself on a model where that matrix is known), whole groups within the byte budget, on dense and
converted models, recorded so that quantizing again from the record gives the same weights."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from d2mc.data import calibration_batch
from d2mc.errors import OptionError
from d2mc.quantize import QuantizeOptions, quantize_model, quantize_rtn
from d2mc.quantize.sensitivity import INT8_SHARE, GroupCost, choose_int8
from tests.conftest import tiny_model
from tests.quantize.test_model import TOKENIZER, VOCAB, converted

# two down projections off the int4 grid, the first with an outlier in every block of 32 (round-to-nearest int4
# flattens the rest of each block to zero), the second without
OUTLIER, PLAIN = "model.layers.1.mlp.down_proj", "model.layers.4.mlp.down_proj"


def calibrated(**overrides) -> QuantizeOptions:
    return QuantizeOptions("int4", "rtn", 32, "float", mixed_precision="calibrated", calib_sequences=4,
                           calib_length=64, **overrides)


def loss(model, text: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(text).logits[:, :-1]
    return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), text[:, 1:].reshape(-1)))


@pytest.mark.parametrize("seed", [0, 1])
def test_the_matrix_whose_int4_error_costs_most_goes_to_int8(seed):
    """Every other matrix already lies on its int4 grid (it costs nothing at int4, gains nothing at int8). Of the two
    down projections of one size, the outlier one costs the calibration loss most, measured directly (each alone at
    int4); a budget with room for one of them moves that one, a budget for all moves both and no other."""
    model = tiny_model("llama", seed=seed, vocab_size=VOCAB)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, module in modules.items():
            if isinstance(module, torch.nn.Linear) and name not in ("lm_head", OUTLIER, PLAIN):
                module.weight.copy_(quantize_rtn(module.weight, 4, 32).dequantize())
        modules[OUTLIER].weight[:, ::32] *= 40
    text = calibration_batch(TOKENIZER, 4, 64)  # what calibrated() reads
    increase = {}
    for name in (OUTLIER, PLAIN):
        alone = copy.deepcopy(model)
        weight = dict(alone.named_modules())[name].weight
        with torch.no_grad():
            weight.copy_(quantize_rtn(weight, 4, 32).dequantize())
        increase[name] = loss(alone, text) - loss(model, text)
    assert increase[OUTLIER] > 10 * max(increase[PLAIN], 0)
    assert quantize_model(model, calibrated(int8_share=0.05), TOKENIZER).options.int8_matrices == (OUTLIER,)
    result = quantize_model(model, calibrated(int8_share=1), TOKENIZER)
    assert result.options.int8_matrices == (OUTLIER, PLAIN)
    assert {name for name, q in result.linears.items() if q.bits == 8} == {OUTLIER, PLAIN}


def test_groups_reading_one_input_move_together_on_a_converted_model():
    """q/k/v, and each expert's gate and up, are one MatMulNBits input each: they take one bit width; a block's
    experts move together."""
    model = converted()
    result = quantize_model(model, calibrated(int8_share=0.5), TOKENIZER)
    int8 = set(result.options.int8_matrices)
    assert 0 < len(int8) < len(result.linears)
    for name, q in result.linears.items():
        assert q.bits == (8 if name in int8 else 4), name
        assert result.options.bits_of(name, 4) == q.bits
    for parent in {name.rpartition(".")[0] for name in result.linears if name != "lm_head"}:
        for together in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
            names = [f"{parent}.{leaf}" for leaf in together if f"{parent}.{leaf}" in result.linears]
            assert len({name in int8 for name in names}) <= 1, names
    experts = {}
    for name in result.linears:
        if ".experts." in name:
            experts.setdefault((name.split(".")[2], name.rpartition(".")[2]), set()).add(name in int8)
    assert experts and all(len(bits) == 1 for bits in experts.values()), experts


def test_the_record_gives_the_same_weights_again():
    model = tiny_model("qwen2", vocab_size=VOCAB)
    first = quantize_model(model, calibrated(), TOKENIZER)
    record = json.loads(json.dumps(first.to_dict()))  # as an artifact stores it
    assert record["int8_matrices"] == list(first.options.int8_matrices) and record["int8_share"] == INT8_SHARE
    again = quantize_model(model, QuantizeOptions.from_dict(record), TOKENIZER)
    assert again.options == first.options
    for name, q in first.linears.items():
        assert torch.equal(again.linears[name].codes, q.codes) and q.bits == again.linears[name].bits, name


def test_the_budget_takes_the_most_gain_per_byte_and_skips_what_does_not_fit():
    costs = [GroupCost(("a",), 10.0, 1.0, 100), GroupCost(("b", "c"), 30.0, 0.0, 200),
             GroupCost(("d",), 2.0, 0.0, 10), GroupCost(("e",), 0.5, 0.5, 10)]
    # gain per byte: d 0.2, b/c 0.15, a 0.09, e 0 (never moved); half of 320 bytes: d, then b/c (210) does not
    # fit and a (110) does
    assert choose_int8(costs, 0.5) == ("a", "d")
    assert choose_int8(costs, 1.0) == ("a", "b", "c", "d")


def test_bits_of_refuses_to_guess_before_the_choice():
    with pytest.raises(ValueError, match="has not chosen its int8 matrices yet"):
        calibrated().bits_of("model.layers.0.self_attn.q_proj", 6)


@pytest.mark.parametrize("options, message", [
    (dict(int8_share=0), "int8_share must be above 0 and at most 1, not 0"),
    (dict(mixed_precision="mixed-layers", int8_matrices=("x",)),
     "int8_matrices are what mixed_precision calibrated chose, not mixed-layers"),
    (dict(mixed_precision="mixed-layers-ends", tensorrt=True), "mixed_precision mixed-layers-ends cannot go to "
                                                                "TensorRT"),
    (dict(mixed_precision="calibrated", qmoe=True), "mixed_precision calibrated cannot go to moe_op contrib"),
    (dict(mixed_precision="none", calib_data="x.txt"),
     "calib_data is the calibration text of GPTQ and calibrated mixed precision: rtn with mixed_precision none"),
])
def test_bad_options_are_refused(options, message):
    with pytest.raises(OptionError, match=message):
        QuantizeOptions("int4", **options)


def test_for_tensorrt_the_int8_matrices_have_one_scale_per_channel_and_the_plugins_experts_stay_int4():
    """TensorRT dequantizes int8 weights only per channel, and its D2mcMoE plugin takes one width for all of a
    block's experts: calibrated mixed precision for TensorRT moves the other matrices to int8 with one scale per
    output channel, and the weight plan counts them so."""
    from d2mc.arch import ModelArch
    from d2mc.weight_plan import WeightPlan

    model = converted()
    options = QuantizeOptions("int4", block_size=64, mixed_precision="calibrated", calib_sequences=4, calib_length=64,
                              int8_share=1, tensorrt=True)
    result = quantize_model(model, options, TOKENIZER)
    int8 = set(result.options.int8_matrices)
    assert int8 and all(".experts." not in name or not name.startswith("model.layers.2.") for name in int8)
    for name, q in result.linears.items():
        if name in int8:
            assert q.bits == 8 and q.block_size == q.shape[1] and q.scales.shape == (q.shape[0], 1), name
        elif name != "lm_head":
            assert q.bits == 4 and q.block_size == 64, name
    plan = WeightPlan.from_quantization(ModelArch.from_config(model.config), result.options, "fp16")
    assert {f.block_size for f in plan.formats() if f.bits == 8} == {0}
    assert any(f.bits == 8 for f in plan.blocks[2].formats()[:4])  # the attention of the MoE block may move
    assert {f.bits for f in plan.blocks[2].formats()[4:]} == {4}
