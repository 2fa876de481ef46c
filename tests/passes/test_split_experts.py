import copy

import pytest
import torch
from d2mc.passes.split_experts import balanced_kmeans
from transformers import AutoModelForCausalLM

from d2mc.arch import BlockPlan, ModelArch
from d2mc.errors import UserError
from d2mc.inspection import count_parameters
from d2mc.lowering import LoweringOptions, lower_to_onnx
from d2mc.pipeline import PassManager, create_pass
from d2mc.plan import split_block
from d2mc.verify import verify_onnx
from tests.conftest import requires_real_model
from tests.moe_reference import block_reference


def run(ctx, *names_and_options):
    return PassManager([create_pass(n, **o) for n, o in names_and_options]).run(ctx)


def split(ctx, **options):
    return run(ctx, ("split-experts", options))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_every_expert_active_reproduces_the_dense_model(tiny_context, family):
    """Splitting permutes and slices the neurons; with all experts chosen (weight 1 each) nothing changes."""
    ctx = tiny_context(family, teacher=False)
    dense = copy.deepcopy(ctx.model)
    split(ctx, experts=4, active_fraction=1.0, shared=1)
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(1))
    assert (logits(ctx.model, ids) - logits(dense, ids)).abs().max() < 1e-5  # fp32 rounding of the split sums


def test_the_router_keeps_exactly_k_experts(tiny_context):
    ctx = split(tiny_context(teacher=False), experts=8, active_fraction=0.5, shared=1)
    block = ctx.model.model.layers[3]
    assert (block.shared_experts, block.top_k, len(block.experts)) == (1, 3, 8)
    calls = []
    hooks = [e.register_forward_hook(lambda m, a, o, e=e: calls.append((e, a[0].shape[0])))
             for e in block.experts]
    hidden = torch.randn(40, 64)
    with torch.no_grad():
        block_reference(block, hidden)  # the block's experts with their residual, no attention
        _, indices = block.route(hidden)
    for h in hooks:
        h.remove()
    assert indices.shape == (40, 3) and all(len(set(row)) == 3 for row in indices.tolist())
    rows = sum(n for _, n in calls)
    assert rows == 40 * (1 + 3)  # the shared expert on every token, three routed ones per token


def test_parameter_accounting_and_round_trip(tiny_context, tmp_path):
    ctx = tiny_context(teacher=False)
    dense_arch = copy.deepcopy(ctx.arch)
    split(ctx, experts=4, active_fraction=0.5, shared=0)
    arch = ctx.arch
    assert arch.param_counts() == count_parameters(ctx.model)
    assert arch.param_counts()["mlp"] == dense_arch.param_counts()["mlp"]  # the neurons are only regrouped
    assert arch.active_param_counts()["mlp"] == dense_arch.param_counts()["mlp"] // 2
    assert all(b.expert_intermediate == 32 and b.experts == 4 and b.active_experts == 2 for b in arch.blocks)
    ctx.model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 256, (1, 9))
    for a, b in zip(ctx.model.state_dict().values(), reloaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # same weights; the loaded ones are not 64-byte aligned (safetensors), so small GEMMs may round differently
    assert (logits(reloaded, ids) - logits(ctx.model, ids)).abs().max() < 1e-6
    assert reloaded.config.blocks == ctx.model.config.blocks


def test_fitted_router_beats_a_random_one(tiny_context, calibration):
    ctx = split(tiny_context(teacher=False), experts=4, active_fraction=0.5, shared=0)
    dense = tiny_context(teacher=False).model
    fitted = ctx.model
    shuffled = copy.deepcopy(fitted)
    generator = torch.Generator().manual_seed(0)
    for block in shuffled.model.layers:
        block.router.weight.data = torch.randn(block.router.weight.shape, generator=generator)
    target = logits(dense, calibration)
    fitted_err = (logits(fitted, calibration) - target).pow(2).mean()
    random_err = (logits(shuffled, calibration) - target).pow(2).mean()
    assert fitted_err < random_err
    stats = ctx.results["split_routers"]
    assert all(0 <= s["agreement"] <= 1 and 0 < s["mass_recall"] <= 1 + 1e-6 for s in stats.values())


def test_layers_limit_the_split(tiny_context):
    ctx = split(tiny_context(teacher=False), experts=4, active_fraction=0.5, layers="2-5")
    assert [len(b.expert_layers) for b in ctx.model.config.blocks] == [1, 1, 4, 4, 4, 4, 1, 1]


def test_lfuc_experts_split_further_into_one_routed_pool(tiny_context, calibration):
    """A fused block of two MLPs with top-1 routing: each MLP cut into 4 experts, 2 of the 8 chosen per token
    (half of the neurons of the one MLP the block used); with all 4 of an MLP's experts chosen and the router
    copying the LF-UC choice, the block computes what the fused block did."""
    ctx = tiny_context()
    run(ctx, ("analyze-redundancy", {}), ("plan-fusion", {"plan": "2-3"}), ("prune-attention", {}),
        ("fuse-experts", {}), ("insert-router", {}))
    fused = copy.deepcopy(ctx.model)
    split(ctx, experts=4, active_fraction=0.5, shared=0)
    plan = ctx.model.config.blocks[2]
    assert plan.expert_layers == (2,) * 4 + (3,) * 4 and plan.top_k == 2 and plan.shared_experts == 0
    assert ctx.arch.blocks[2].active_experts == 2 and ctx.arch.blocks[2].expert_intermediate == 32

    exact = split(copy.deepcopy(ctx_with(fused, calibration)), experts=4, active_fraction=1.0, shared=0)
    block = exact.model.model.layers[2]
    source = fused.model.layers[2]
    with torch.no_grad():  # route each sub-expert as its MLP was routed: logits of the MLP, repeated 4 times
        block.router.weight.copy_(source.router.weight.repeat_interleave(4, dim=0))
        hidden = torch.randn(30, 64)
        assert (block_reference(block, hidden) - block_reference(source, hidden)).abs().max() < 1e-5


def ctx_with(model, calibration):
    from d2mc.context import Context

    return Context(model=model, arch=ModelArch.from_config(model.config), calibration=calibration)


def test_export_of_a_split_model_matches_pytorch(tiny_context, tmp_path):
    ctx = split(tiny_context("qwen3", teacher=False), experts=4, active_fraction=0.75, shared=1)
    for i, (flavour, moe_op) in enumerate([("onnxruntime", "dispatch"), ("onnxruntime", "contrib"),
                                          ("tensorrt", "dispatch")]):
        path = lower_to_onnx(ctx.model, tmp_path / str(i), LoweringOptions(flavour=flavour, moe_op=moe_op))
        result = verify_onnx(ctx.model, path, prefill=12, decode_steps=6)
        assert result.passed and result.max_abs_diff < 1e-4, (flavour, moe_op, result)
    result = verify_onnx(ctx.model, lower_to_onnx(ctx.model, tmp_path / "fp16", precision="fp16"), "fp16")
    assert result.passed, result


def test_balanced_kmeans_gives_equal_groups_of_similar_points():
    generator = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(4, 16, generator=generator), dim=1)
    points = torch.nn.functional.normalize(centres.repeat_interleave(8, 0)
                                           + 0.05 * torch.randn(32, 16, generator=generator), dim=1)
    labels = balanced_kmeans(points, 4, 20, generator)
    assert torch.bincount(labels).tolist() == [8, 8, 8, 8]
    for c in range(4):  # each true group lands in one cluster
        assert len(set(labels[c * 8:(c + 1) * 8].tolist())) == 1


def dense_block(layer=3):
    return BlockPlan.dense(layer)


@pytest.mark.parametrize("args, message", [
    ((200, 0.5), "--experts 200 is more than the 128 neurons of each MLP"),
    ((1, 0.5), "--experts must be at least 2, not 1"),
    ((6, 0.5), "--experts 6 does not divide the 128 neurons of each MLP into equal experts"),
    ((8, 1.5), r"--active-fraction 1.5 is out of range: give the share of each MLP's neurons that stays active "
               r"per token, in \(0, 1\]"),
    ((8, 0), "--active-fraction 0 is out of range"),
    ((8, 0.3), "--active-fraction 0.3 of 8 experts per MLP is 2.4 experts: choose a multiple of 1/8"),
    ((8, 0.25, 2), "--split-shared 2 keeps 2 experts always active, which leaves none of the 2 active experts to "
                   "route"),
    ((8, 0.5, 8), "--split-shared 8 must be between 0 and 7"),
])
def test_refusals_are_one_line(args, message):
    with pytest.raises(UserError, match=message) as info:
        split_block(dense_block(), 128, *args)
    assert "\n" not in str(info.value)


def test_refusals_for_blocks_that_cannot_be_split():
    fused = BlockPlan(2, (2, 3), top_k=2)
    with pytest.raises(UserError, match="splitting needs experts that count in full"):
        split_block(fused, 128, 4, 0.5)
    already = split_block(dense_block(), 128, 4, 0.5)
    with pytest.raises(UserError, match="is already split into experts"):
        split_block(already, 128, 4, 0.5)
    with pytest.raises(UserError, match="no block has all its MLPs in layers 9"):
        from d2mc.plan import split_plan

        split_plan([dense_block()], 128, 4, 0.5, layers=[9])
    with pytest.raises(UserError, match="layer range '3-12' is out of range: the model has layers 0-7"):
        create_pass("split-experts", layers="3-12").run(ctx_with(_tiny(), torch.zeros(1, 4, dtype=torch.long)))


def _tiny():
    from tests.conftest import tiny_model

    return tiny_model("llama", num_hidden_layers=8)


@pytest.mark.real_model
@requires_real_model
def test_split_smollm2_keeps_its_shape_and_reproduces_it_with_every_expert():
    """On the real model: every MLP into 8 experts of 192 neurons; with all active the logits do not change."""
    from d2mc.data import calibration_batch
    from d2mc.loading import load_model

    loaded = load_model("smollm2-135m")
    calibration = calibration_batch(loaded.tokenizer, 2, 64)
    ids = calibration[:1, :32]
    expected = logits(loaded.model, ids)
    ctx = split(ctx_with(loaded.model, calibration), experts=8, active_fraction=1.0, shared=1, layers="10-11",
                iterations=5, cluster_iterations=3)
    assert ctx.model.config.blocks[10].expert_intermediate == 192
    assert (logits(ctx.model, ids) - expected).abs().max() < 1e-3
