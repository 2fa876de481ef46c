import pytest
import torch
from transformers import AutoModelForCausalLM

import d2mc  # noqa: F401
from d2mc.arch import ModelArch
from d2mc.inspection import count_parameters
from d2mc.modeling import dense_plan, restructure
from tests.conftest import tiny_model


def fused_plan(num_layers=6, top_k=1, shared=0, normalize=True, attention=2):
    plan = dense_plan(num_layers)
    plan[2:4] = [{"attention_layer": attention, "expert_layers": [2, 3], "shared_experts": shared, "top_k": top_k,
                  "normalize_topk": normalize}]
    return plan


def test_empty_plan_reproduces_dense_logits_exactly(family):
    ids = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        expected = tiny_model(family)(ids).logits
        assert torch.equal(restructure(tiny_model(family), dense_plan(6))(ids).logits, expected)


def test_all_experts_active_is_the_weighted_sum():
    model = restructure(tiny_model("llama"), fused_plan(top_k=2, normalize=False, attention=None))
    block = model.model.layers[2]
    torch.nn.init.normal_(block.router.weight)
    hidden = torch.randn(3, 5, 64)
    probs = torch.softmax(block.router(hidden), -1)
    expected = hidden + sum(probs[..., e, None] * block.experts[e](hidden) for e in range(2))
    with torch.no_grad():
        assert torch.allclose(block(hidden), expected, atol=1e-6)


def test_cached_generation_equals_uncached_forward(family):
    model = restructure(tiny_model(family), fused_plan())
    torch.nn.init.normal_(model.model.layers[2].router.weight)
    prompt = torch.randint(0, 256, (1, 5))
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=6, do_sample=False)
        uncached = model(out).logits[0, 4:-1].argmax(-1)
    assert out[0, 5:].tolist() == uncached.tolist()
    assert model.config.num_hidden_layers == 5  # KV entries only for the 5 blocks with attention


def test_save_load_round_trip_and_parameter_counts(tmp_path, family):
    model = restructure(tiny_model(family), fused_plan(shared=1))
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
    arch = ModelArch.from_config(reloaded.config)
    assert arch.param_counts() == count_parameters(reloaded)
    assert arch.blocks[2].experts == 2 and arch.blocks[2].active_experts == 2 and not arch.blocks[2].has_router


def test_top_k_beyond_routed_experts_is_refused():
    with pytest.raises(ValueError, match="top_k=3 must be between 1 and the 2 routed experts"):
        ModelArch.from_config(restructure(tiny_model("llama"), fused_plan(top_k=3)).config)
