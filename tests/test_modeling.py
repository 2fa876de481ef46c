import dataclasses
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import d2mc  # noqa: F401
from d2mc.arch import BlockPlan, ModelArch
from d2mc.inspection import count_parameters
from d2mc.restructure import dense_plan, restructure
from tests.conftest import tiny_model


def fused_plan(num_layers=6, top_k=1, shared=0, normalize=True, attention=2):
    plan = dense_plan(num_layers)
    plan[2:4] = [BlockPlan(attention, (2, 3), shared_experts=shared, top_k=top_k, normalize_topk=normalize)]
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


def test_experts_cut_from_an_mlp_round_trip_with_their_size(tmp_path):
    """Two layers' MLPs each as 4 slices of 32 neurons with weight 1; all 8 chosen: the sum of the two MLPs."""
    plan = dense_plan(6)
    plan[2:4] = [BlockPlan(None, (2,) * 4 + (3,) * 4, top_k=8, expert_intermediate=32, routing_weights="ones")]
    dense = tiny_model("llama")
    model = restructure(tiny_model("llama"), plan)
    block = model.model.layers[2]
    assert [e.mlp.gate_proj.out_features for e in block.experts] == [32] * 8
    hidden = torch.randn(3, 5, 64)
    with torch.no_grad():
        expected = hidden + dense.model.layers[2].mlp(dense.model.layers[2].post_attention_layernorm(hidden)) \
            + dense.model.layers[3].mlp(dense.model.layers[3].post_attention_layernorm(hidden))
        assert (block(hidden) - expected).abs().max() < 1e-5
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.model.layers[2].experts[7].mlp.down_proj.in_features == 32
    arch = ModelArch.from_config(reloaded.config)
    assert arch.param_counts() == count_parameters(reloaded)
    assert arch.blocks[2].expert_intermediate == 32 and arch.blocks[2].active_experts == 8


def test_copies_and_unchanged_blocks_through_restructure():
    """A layer giving several experts of its full size gives copies; restructuring a converted model again keeps a
    split block as it is (its slices cannot be remade from a whole MLP, which no longer exists)."""
    plan = dense_plan(6)
    plan[1] = BlockPlan(1, (1, 1))
    plan[4] = BlockPlan(4, (4,) * 4, top_k=2, expert_intermediate=32, routing_weights="ones")
    model = restructure(tiny_model("llama"), plan)
    copies = model.model.layers[1].experts
    assert copies[0].mlp is not copies[1].mlp and torch.equal(copies[0].mlp.up_proj.weight, copies[1].mlp.up_proj.weight)
    slices = list(model.model.layers[4].experts)
    router = model.model.layers[4].router
    again = restructure(model, plan)
    assert list(again.model.layers[4].experts) == slices and again.model.layers[4].router is router
    bad = dense_plan(6)
    bad[3] = dataclasses.replace(plan[4], attention_layer=3, expert_layers=(3,) * 3, top_k=1)
    with pytest.raises(ValueError, match=r"block 3: 3 expert\(s\) of 32 neurons from layer 3's MLP of 128: a layer "
                                         r"gives copies \(128 neurons each\) or a partition \(3 x 32 = 96, not 128\)"):
        restructure(tiny_model("llama"), bad)
    resplit = list(plan)
    resplit[4] = dataclasses.replace(plan[4], expert_layers=(4,) * 2, expert_intermediate=64)
    with pytest.raises(ValueError, match="layer 4's MLP is not available whole in the source model"):
        restructure(restructure(tiny_model("llama"), plan), resplit)


def test_top_k_beyond_routed_experts_is_refused():
    with pytest.raises(ValueError, match="top_k=3 must be between 1 and the 2 routed experts"):
        ModelArch.from_config(restructure(tiny_model("llama"), fused_plan(top_k=3)).config)


def test_block_plans_keep_their_config_json_form(tmp_path):
    """``config.json`` holds the block plans as the dicts it always held: saved models of earlier versions load, and
    ``to_dict`` / ``from_pretrained`` round-trip the plans."""
    plan = dense_plan(6)
    plan[2:4] = [BlockPlan(2, (2, 3), shared_experts=1)]
    plan[3] = BlockPlan(None, (4,) * 4, top_k=2, expert_intermediate=32, routing_weights="ones")
    model = restructure(tiny_model("llama"), plan)
    saved = model.config.to_dict()["blocks"]
    assert saved[0] == {"attention_layer": 0, "expert_layers": [0], "shared_experts": 0, "top_k": 1,
                        "normalize_topk": True}
    assert saved[3] == {"attention_layer": None, "expert_layers": [4, 4, 4, 4], "shared_experts": 0, "top_k": 2,
                        "normalize_topk": True, "expert_intermediate": 32, "routing_weights": "ones"}
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["blocks"] == saved
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.config.blocks == model.config.blocks == plan
    assert [BlockPlan.from_dict(b) for b in saved] == plan
    with pytest.raises(ValueError, match="routing_weights must be one of"):
        BlockPlan(2, (2,), routing_weights="uniform")
    with pytest.raises(ValueError, match=r"unknown block plan entries \['experts'\]"):
        BlockPlan.from_dict({**saved[0], "experts": 2})


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    """Each block keeps only its input and runs again in the backward pass; routing depends only on that input."""
    def loss_and_grads(checkpointing: bool):
        torch.manual_seed(0)
        model = restructure(tiny_model("llama"), fused_plan(top_k=1))
        torch.nn.init.normal_(model.model.layers[2].router.weight, std=0.5)
        model.train()
        if checkpointing:
            getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
        ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
        loss = model(ids, labels=ids, use_cache=False).loss
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    plain_loss, plain = loss_and_grads(False)
    loss, grads = loss_and_grads(True)
    assert torch.equal(loss, plain_loss)
    assert grads.keys() == plain.keys() and len(grads) > 10
    assert all(torch.allclose(grads[n], plain[n], rtol=0, atol=1e-7) for n in grads)
