import copy

import pytest
import torch

from d2mc.arch import BlockPlan
from d2mc.errors import UserError
from d2mc.inspection import count_parameters
from d2mc.lowering import LoweringOptions, lower_to_onnx
from d2mc.pipeline import PassManager, create_pass
from d2mc.plan import upcycle_block
from d2mc.verify import verify_onnx


def upcycle(ctx, **options):
    return PassManager([create_pass("upcycle", **options)]).run(ctx)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_copies_compute_the_dense_model_whatever_the_router(tiny_context, family):
    ctx = tiny_context(family, teacher=False)
    dense = copy.deepcopy(ctx.model)
    upcycle(ctx, experts=4, top_k=2)
    ids = torch.randint(0, 256, (2, 10))
    assert (logits(ctx.model, ids) - logits(dense, ids)).abs().max() < 1e-5
    assert ctx.model.model.layers[0].router.weight.abs().sum() > 0  # a random router, not a uniform one


def test_parameter_accounting(tiny_context):
    ctx = tiny_context(teacher=False)
    dense = copy.deepcopy(ctx.arch)
    upcycle(ctx, experts=4, top_k=2, layers="2-5")
    counts, active = ctx.arch.param_counts(), ctx.arch.active_param_counts()
    assert counts == count_parameters(ctx.model)
    mlp = dense.mlp_params
    assert counts["mlp"] == dense.param_counts()["mlp"] + 4 * 3 * mlp  # four layers, three more copies each
    assert active["mlp"] == dense.param_counts()["mlp"] + 4 * mlp  # top-2: one more MLP per upcycled layer
    assert counts["router"] == 4 * 4 * 64


def test_partitions_with_every_expert_reproduce_the_dense_model(tiny_context):
    ctx = tiny_context(teacher=False)
    dense = copy.deepcopy(ctx.model)
    upcycle(ctx, experts=4, top_k=4, init="partition")
    ids = torch.randint(0, 256, (1, 12))
    assert (logits(ctx.model, ids) - logits(dense, ids)).abs().max() < 1e-5
    assert ctx.arch.total_params == count_parameters(ctx.model)["mlp"] + sum(
        v for k, v in count_parameters(ctx.model).items() if k != "mlp")
    assert ctx.arch.blocks[0].expert_intermediate == 32


@pytest.mark.parametrize("init", ["copy", "partition"])
def test_upcycled_export_matches_pytorch(tiny_context, tmp_path, init):
    ctx = upcycle(tiny_context("mistral", teacher=False), experts=4, top_k=2, init=init, layers="1-3")
    with torch.no_grad():  # a router that discriminates, so that routing shows in the comparison
        for block in ctx.model.model.layers[1:4]:
            block.router.weight.normal_(std=0.5)
    for i, options in enumerate([LoweringOptions(), LoweringOptions(moe_op="contrib"),
                                 LoweringOptions(flavour="tensorrt")]):
        result = verify_onnx(ctx.model, lower_to_onnx(ctx.model, tmp_path / str(i), options), prefill=12,
                             decode_steps=6)
        assert result.passed and result.max_abs_diff < 1e-4, (options, result)


@pytest.mark.parametrize("args, message", [
    ((8, 9), "--top-k 9 is more than the 8 experts"),
    ((8, 0), "--top-k must be at least 1, not 0"),
    ((1, 1), "--experts must be at least 2, not 1"),
    ((8, 1, "clone"), "unknown upcycling init 'clone': choose one of copy, partition"),
    ((256, 1, "partition"), "--experts 256 is more than the 128 neurons of each MLP"),
])
def test_refusals_are_one_line(args, message):
    block = BlockPlan.dense(1)
    with pytest.raises(UserError, match=message) as info:
        upcycle_block(block, 128, *args)
    assert "\n" not in str(info.value)


def test_an_already_converted_model_is_refused(tiny_context):
    ctx = upcycle(tiny_context(teacher=False), experts=2)
    with pytest.raises(UserError, match="upcycling starts from a dense model"):
        upcycle(ctx, experts=2)
