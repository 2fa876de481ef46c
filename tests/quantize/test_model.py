"""The quantize step on tiny models of every family, dense and converted: what it quantizes, the weights the
quantized model carries, the folded norms, GPTQ against round-to-nearest, and the options it refuses."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from d2mc.arch import ModelArch
from d2mc.errors import MissingDependencyError, OptionError
from d2mc.quantize import GPTQMODEL_INSTALL, QuantizeOptions, fold_expert_norms, quantize_model
from d2mc.restructure import dense_plan, restructure
from tests.conftest import tiny_model, tiny_tokenizer

requires_gptqmodel = pytest.mark.skipif(importlib.util.find_spec("gptqmodel") is None,
                                        reason=f"GPTQModel: pip install {GPTQMODEL_INSTALL}")
TOKENIZER = tiny_tokenizer()
VOCAB = len(TOKENIZER)


def converted(family: str = "llama", **overrides):
    plan = dense_plan(6)
    plan[2:5] = [{"attention_layer": 2, "expert_layers": [2, 3, 4], "shared_experts": 0, "top_k": 1,
                  "normalize_topk": True}]
    model = restructure(tiny_model(family, vocab_size=VOCAB, **overrides), plan)
    torch.nn.init.normal_(model.model.layers[2].router.weight, std=0.5)
    return model


def calibration_options(method="rtn", **overrides):
    return QuantizeOptions("int4", method, 32, calib_sequences=4, calib_length=64,
                           **{"mixed_precision": "none", **overrides})


def linears(model) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("router")}


@pytest.mark.parametrize("kind", ["dense", "converted"])
def test_every_linear_is_quantized_and_the_model_carries_its_weights(family, kind):
    model = tiny_model(family, vocab_size=VOCAB) if kind == "dense" else converted(family)
    reference = [p.detach().clone() for p in model.parameters()]
    result = quantize_model(model, calibration_options(), TOKENIZER)
    assert set(result.linears) == linears(model)  # every projection, every expert and the LM head; no router
    modules = dict(result.model.named_modules())
    for name, q in result.linears.items():
        head = name == "lm_head"  # int8, in blocks of 64 (the hidden size, 64, takes them)
        assert (q.bits, q.block_size) == ((8, 64) if head else (4, 32)) and q.symmetric
        torch.testing.assert_close(modules[name].weight, q.dequantize(), rtol=0, atol=0)
    assert all(torch.equal(a, b) for a, b in zip(reference, model.parameters(), strict=True))  # source untouched


@pytest.mark.parametrize("kind", ["dense", "converted"])
def test_hqq_gives_every_linear_but_the_lm_head_float_zero_points(kind):
    model = tiny_model("llama", vocab_size=VOCAB) if kind == "dense" else converted()
    result = quantize_model(model, QuantizeOptions("int4", "hqq", 32, mixed_precision="none"), TOKENIZER)
    assert set(result.linears) == linears(model)
    modules = dict(result.model.named_modules())
    for name, q in result.linears.items():
        # the LM head by round-to-nearest: a tied embedding reads its bytes, with integer zero points only
        assert q.float_zero_points == (name != "lm_head") and q.symmetric == (name == "lm_head")
        torch.testing.assert_close(modules[name].weight, q.dequantize(), rtol=0, atol=0)
    assert result.to_dict()["symmetric"] is False


@pytest.mark.parametrize("mixed, int8_layers", [("mixed-layers", {0: "qkv-down", 2: "qkv-down"}),
                                                 ("mixed-layers-ends", {0: "all", 2: "qkv-down"})])
@pytest.mark.parametrize("method", ["rtn", "hqq"])
def test_mixed_precision_moves_the_chosen_matrices_to_int8(method, mixed, int8_layers):
    """Four blocks (the third one with three experts): the first eighth is block 0, the last eighth (blocks from
    3.5 on) none, every third block between is block 2."""
    model = converted()
    result = quantize_model(model, QuantizeOptions("int4", method, 32, "float", mixed_precision=mixed), TOKENIZER)
    assert len(result.linears) == len(linears(model)) - 1  # the float LM head
    for name, q in result.linears.items():
        index, leaf = int(name.split(".")[2]), name.rpartition(".")[2]
        chosen = int8_layers.get(index)
        int8 = chosen == "all" or (chosen == "qkv-down" and leaf in ("q_proj", "k_proj", "v_proj", "down_proj"))
        assert q.bits == (8 if int8 else 4), name
        assert q.float_zero_points == (method == "hqq" and not int8)  # int8 matrices by round-to-nearest
    assert result.to_dict()["mixed_precision"] == mixed


def test_expert_norms_are_folded_into_gate_and_up():
    model = converted()
    folded = converted()
    fold_expert_norms(folded)
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(folded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    for expert in folded.model.layers[2].experts:
        assert torch.equal(expert.post_attention_layernorm.weight, torch.ones(64))


def test_a_tied_embedding_follows_its_quantized_lm_head():
    model = tiny_model("llama", vocab_size=VOCAB, tie_word_embeddings=True)
    result = quantize_model(model, calibration_options(), TOKENIZER)
    assert result.model.model.embed_tokens.weight is result.model.lm_head.weight
    torch.testing.assert_close(result.model.lm_head.weight, result.linears["lm_head"].dequantize(), rtol=0, atol=0)


@pytest.mark.parametrize("head, block, hidden, expected", [("int8", 32, 576, 64), ("int8", 32, 96, 32),
                                                          ("int8", 128, 1024, 128), ("int4", 32, 576, 32)])
def test_an_int8_lm_head_takes_blocks_of_64_where_they_divide_its_input(head, block, hidden, expected):
    assert QuantizeOptions("int4", block_size=block, lm_head_precision=head).lm_head_block_size(hidden) == expected


def test_a_float_lm_head_stays_as_it_was():
    model = tiny_model("qwen2", vocab_size=VOCAB)
    result = quantize_model(model, calibration_options(lm_head_precision="float"), TOKENIZER)
    assert "lm_head" not in result.linears
    assert torch.equal(result.model.lm_head.weight, model.lm_head.weight)


@requires_gptqmodel
@pytest.mark.parametrize("kind", ["dense", "converted"])
def test_gptq_is_closer_to_the_float_model_than_round_to_nearest(kind):
    """GPTQ compensates each column's rounding error on the calibration activations: on text like them its
    model's logits are nearer the float model's than round-to-nearest's."""
    model = tiny_model("llama", vocab_size=VOCAB) if kind == "dense" else converted()
    from d2mc.data import calibration_batch

    text = calibration_batch(TOKENIZER, 4, 64, seed=1)
    errors = {}
    for method in ("rtn", "gptq"):
        result = quantize_model(model, calibration_options(method), TOKENIZER)
        assert set(result.linears) == linears(model)
        with torch.no_grad():
            errors[method] = (result.model(text).logits - model(text).logits).pow(2).mean().item()
    assert errors["gptq"] < errors["rtn"]


@pytest.mark.parametrize("options, message", [
    (dict(precision="int3"), "precision int3 is not a quantized precision: choose int4 or int8"),
    (dict(quant_method="awq"), "unknown quant_method 'awq': choose one of rtn, hqq, gptq"),
    (dict(quant_method="hqq", tensorrt=True), "quant_method hqq cannot go to TensorRT: HQQ's zero points are floats "
                                              "and ONNX DequantizeLinear takes only integer ones"),
    (dict(block_size=48), "block_size must be 32, 64 or 128, not 48"),
    (dict(lm_head_precision="fp8"), "lm_head_precision must be one of int8, int4, float, not fp8"),
    (dict(accuracy_level=5), "accuracy_level must be one of 0-4, not 5"),
    (dict(mixed_precision="some"), "mixed_precision must be one of none, mixed-layers, mixed-layers-ends, calibrated, not some"),
    (dict(precision="int8", mixed_precision="mixed-layers"),
     "mixed_precision mixed-layers moves int4 matrices to int8: it needs precision int4, not int8"),
    (dict(mixed_precision="mixed-layers", tensorrt=True), "mixed_precision mixed-layers cannot go to TensorRT: its rule "
                                                          "by layer would put an MoE block's experts at int8"),
])
def test_bad_options_are_refused(options, message):
    with pytest.raises(OptionError, match=message):
        QuantizeOptions(**options)


def test_qmoe_takes_round_to_nearest_and_one_bit_width():
    assert QuantizeOptions("int4", qmoe=True).quant_method == "rtn"
    with pytest.raises(OptionError, match="^quant_method hqq cannot go to moe_op contrib: com.microsoft::QMoE takes "
                                          "only integer zero points; use moe_op dispatch"):
        QuantizeOptions("int4", "hqq", qmoe=True)
    with pytest.raises(OptionError, match="^mixed_precision mixed-layers cannot go to moe_op contrib: "
                                          "com.microsoft::QMoE takes one bit width"):
        QuantizeOptions("int4", mixed_precision="mixed-layers", qmoe=True)


def test_a_block_size_that_does_not_divide_a_weight_is_refused():
    arch = ModelArch.from_config(tiny_model("llama").config)
    with pytest.raises(OptionError, match=r"^block_size 128 does not divide the hidden size \(64\) of the model: "
                                          r"use block_size 64 or 32$"):
        QuantizeOptions("int4", block_size=128).check_divides(arch)


def test_the_default_block_size_is_64_where_it_divides_every_input_and_32_elsewhere():
    fits = ModelArch.from_config(tiny_model("llama").config)  # inputs 64 and 128
    narrow = ModelArch.from_config(tiny_model("llama", hidden_size=96).config)  # 96 = 4 heads of 24
    assert QuantizeOptions("int4").fitted(fits).block_size == 64
    assert QuantizeOptions("int4").fitted(narrow).block_size == 32
    QuantizeOptions("int4").check_divides(narrow)
    with pytest.raises(OptionError, match=r"^block_size 64 does not divide the hidden size \(96\)"):
        QuantizeOptions("int4", block_size=64).check_divides(narrow)  # a block size given stays as given


def test_a_missing_library_says_what_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gptqmodel" else object())
    with pytest.raises(MissingDependencyError, match=f"pip install {GPTQMODEL_INSTALL}$"):
        QuantizeOptions("int4", "gptq").check_installed()


def test_defaults_by_precision_and_target():
    def defaults(**options):
        o = QuantizeOptions(**options)
        return o.quant_method, o.block_size, o.mixed_precision, o.lm_head_precision

    assert defaults(precision="int4") == ("rtn", 64, "calibrated", "int8")
    assert defaults(precision="int4", quant_method="hqq") == ("hqq", 64, "calibrated", "int8")
    assert defaults(precision="int8") == ("rtn", 64, "none", "int8")
    assert defaults(precision="int4", tensorrt=True) == ("rtn", 64, "calibrated", "float")
    assert defaults(precision="int4", qmoe=True) == ("rtn", 64, "none", "int8")
    # a record from before mixed precision: every matrix at its precision
    assert QuantizeOptions.from_dict({"precision": "int4", "quant_method": "rtn"}).mixed_precision == "none"
