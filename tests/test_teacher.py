"""The teacher of a conversion shares the parent's weights; only what the conversion changes is held twice."""

import copy

import torch

from d2mc.arch import ModelArch
from d2mc.context import Context
from d2mc.convert import ConvertOptions, conversion_passes
from d2mc.pipeline import PassManager
from d2mc.teacher import frozen_alias, own_parameters
from tests.conftest import tiny_model


def storage(model) -> set[int]:
    return {p.untyped_storage().data_ptr() for p in model.parameters()}


def test_the_alias_shares_every_weight_in_modules_of_its_own():
    model = tiny_model("llama", tie_word_embeddings=True)
    teacher = frozen_alias(model)
    assert storage(teacher) == storage(model)
    assert teacher.model.layers[0] is not model.model.layers[0]
    assert not any(p.requires_grad for p in teacher.parameters()) and all(p.requires_grad for p in model.parameters())
    assert teacher.lm_head.weight is teacher.model.embed_tokens.weight  # still tied, as one parameter
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        assert torch.equal(teacher(ids).logits, model(ids).logits)


def test_owned_parameters_leave_the_teacher_and_stay_tied():
    model = tiny_model("llama", tie_word_embeddings=True)
    teacher = frozen_alias(model)
    own_parameters(model, ["model.embed_tokens.weight", "model.layers.1.mlp.up_proj.weight"])
    with torch.no_grad():
        model.model.embed_tokens.weight.zero_()
        model.model.layers[1].mlp.up_proj.weight.zero_()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert teacher.model.embed_tokens.weight.abs().sum() > 0 and teacher.model.layers[1].mlp.up_proj.weight.abs().sum() > 0
    assert len(storage(model) - storage(teacher)) == 2  # the embedding (tied: once) and one projection


def convert_tiny(dtype=torch.float32, **options):
    model = tiny_model("llama", num_hidden_layers=8).to(dtype)
    parent = copy.deepcopy(model)
    ctx = Context(model=model, arch=ModelArch.from_config(model.config), teacher=frozen_alias(model),
                  calibration=torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0)))
    PassManager(conversion_passes(ConvertOptions(plan="2-3,5-6", reconstruct_steps=20, **options))).run(ctx)
    return ctx, parent


def test_a_conversion_leaves_the_teacher_as_the_parent_was_and_copies_only_what_changed():
    ctx, parent = convert_tiny()
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        assert torch.equal(ctx.teacher(ids).logits, parent(ids).logits)
    shared = storage(ctx.model) & storage(ctx.teacher)
    own = [p for p in ctx.model.parameters() if p.untyped_storage().data_ptr() not in shared]
    changed = {id(p) for i in (2, 4) for p in ctx.model.model.layers[i].parameters()}  # the fused blocks
    assert own and all(id(p) in changed for p in own)  # the rescaled, reconstructed experts and the routers


def test_a_bf16_model_converts_in_bf16_with_routers_fitted_in_fp32():
    ctx, parent = convert_tiny(torch.bfloat16)
    assert {p.dtype for p in ctx.model.parameters()} == {torch.bfloat16}
    stats = ctx.results["reconstructed_routers"]
    assert sorted(stats) == [2, 4] and all(0 <= s["agreement"] <= 1 for s in stats.values())
    errors = ctx.results["reconstruction"]
    assert all(e["mse_after"] < e["mse_before"] for e in errors.values())
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        assert torch.isfinite(ctx.model(ids).logits).all()
        assert torch.equal(ctx.teacher(ids).logits, parent(ids).logits)
