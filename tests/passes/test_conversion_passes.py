import pytest
import torch

from d2mc.errors import UserError
from d2mc.pipeline import PassManager, create_pass
from d2mc.plan import FusionPlan, choose_groups, parse_plan
from d2mc.profiles import load_profile


def run(ctx, *names_and_options):
    passes = [create_pass(n, **o) for n, o in names_and_options]
    return PassManager(passes).run(ctx)


def test_analyze_redundancy_reports_every_layer(tiny_context):
    ctx = run(tiny_context(), ("analyze-redundancy", {}))
    result = ctx.results["redundancy"]
    assert set(result) == {"block", "attention", "mlp"}
    assert all(len(v) == 8 and all(0 <= x <= 2 for x in v) for v in result.values())


def test_lfuc_pipeline_on_every_family(tiny_context, family):
    ctx = tiny_context(family)
    run(ctx, ("analyze-redundancy", {}), ("plan-fusion", {"remove_attention": 2}), ("prune-attention", {}),
        ("fuse-experts", {}), ("insert-router", {}))
    arch = ctx.arch
    assert len(arch.attention_blocks) == 6 and arch.num_blocks == 6
    assert sum(b.experts for b in arch.blocks) == 8
    for stats in ctx.results["routers"].values():
        assert 0 <= stats["agreement"] <= 1 and abs(sum(stats["load"]) - 1) < 1e-6
    ids = torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        assert ctx.model(ids).logits.shape == (1, 6, 256)


def test_fitted_router_beats_uniform_routing(tiny_context, calibration):
    """The fitted router must reconstruct the dense model better than the zero-initialised (uniform) one."""
    import copy

    ctx = tiny_context()
    run(ctx, ("analyze-redundancy", {}), ("plan-fusion", {"plan": "2-3,5-6"}), ("prune-attention", {}),
        ("fuse-experts", {}))
    uniform = copy.deepcopy(ctx.model)
    run(ctx, ("insert-router", {}))
    with torch.no_grad():
        target = ctx.teacher(calibration).logits
        fitted_err = (ctx.model(calibration).logits - target).pow(2).mean()
        uniform_err = (uniform(calibration).logits - target).pow(2).mean()
    assert fitted_err < uniform_err


def test_drop_attention_and_drop_layers_baselines(tiny_context):
    ctx = run(tiny_context(teacher=False), ("analyze-redundancy", {}),
              ("plan-fusion", {"remove_attention": 2, "method": "drop-attention"}), ("prune-attention", {}))
    assert len(ctx.arch.attention_blocks) == 6 and ctx.arch.num_blocks == 8
    ctx = run(tiny_context(teacher=False), ("analyze-redundancy", {}),
              ("plan-fusion", {"remove_attention": 2, "method": "drop-layers"}), ("drop-layers", {}))
    assert ctx.arch.num_blocks == 6 and len(ctx.arch.attention_blocks) == 6


def test_speedup_plan_meets_the_predicted_target(tiny_context):
    from d2mc.roofline import predict_decode_seconds

    profile = load_profile("orin-agx")
    ctx = tiny_context(profile=profile)
    dense = predict_decode_seconds(ctx.arch, profile, context=256)
    run(ctx, ("analyze-redundancy", {}), ("plan-fusion", {"speedup": 1.1, "context": 256}), ("prune-attention", {}),
        ("fuse-experts", {}))
    assert predict_decode_seconds(ctx.arch, profile, context=256) <= dense / 1.1
    with pytest.raises(UserError, match="is unreachable"):
        run(tiny_context(profile=profile), ("analyze-redundancy", {}),
            ("plan-fusion", {"speedup": 50, "context": 256}))


@pytest.mark.parametrize("text, message", [
    ("2-3,3-4", "overlap at layer 3"),
    ("5-9", "out of range: the model has layers 0-7"),
    ("0-1", "touches the first or last layer"),
    ("4", "write groups as FIRST-LAST"),
    ("4-4", "at least two layers"),
])
def test_bad_plans_are_refused(text, message):
    with pytest.raises(UserError, match=message):
        parse_plan(text, 8)


def test_plan_sources_are_exclusive():
    with pytest.raises(UserError, match="give exactly one of"):
        create_pass("plan-fusion", remove_attention=2, speedup=1.2)
    with pytest.raises(UserError, match="give exactly one of"):
        create_pass("plan-fusion")


def test_choose_groups_respects_guards_and_group_size():
    scores = [0.9, 0.5, 0.01, 0.02, 0.03, 0.04, 0.05, 0.9]
    groups = choose_groups(scores, 3, max_group=2)
    assert all(len(g) == 2 and g[0] >= 1 and g[-1] <= 6 for g in groups)
    assert sorted(layer for g in groups for layer in g[1:]) == [2, 4, 6]
    assert choose_groups(scores, 2, max_group=3) == [(1, 2, 3)]
    with pytest.raises(UserError, match="cannot remove 5 attention modules"):
        choose_groups(scores, 5, max_group=2)


def test_plan_blocks_per_method():
    plan = FusionPlan(num_layers=6, groups=[(1, 2), (3, 4)], shared_expert=False)
    assert [b.expert_layers for b in plan.blocks("lfuc")] == [(0,), (1, 2), (3, 4), (5,)]
    assert [b.attention_layer for b in plan.blocks("drop-attention")] == [0, 1, None, 3, None, 5]
    assert [b.expert_layers for b in plan.blocks("drop-layers")] == [(0,), (1,), (3,), (5,)]
    shared = FusionPlan(num_layers=6, groups=[(1, 2, 3)], shared_expert=True)
    assert shared.blocks("lfuc")[1].shared_experts == 1


def test_block_reconstruction_lowers_the_block_error(tiny_context):
    ctx = tiny_context()
    run(ctx, ("analyze-redundancy", {}), ("plan-fusion", {"plan": "2-4"}), ("prune-attention", {}),
        ("fuse-experts", {}), ("insert-router", {}), ("reconstruct-blocks", {"steps": 60, "lr": 1e-3}))
    (stats,) = ctx.results["reconstruction"].values()
    assert stats["mse_after"] < stats["mse_before"]


def test_the_model_a_conversion_started_from_is_consumed(loaded_tiny, calibration):
    """prune-attention moves the dense model's modules into the converted one: using the loaded model afterwards
    fails instead of computing with modules that are no longer its own."""
    from d2mc.context import Context

    loaded = loaded_tiny()
    ctx = run(Context.from_loaded(loaded, calibration=calibration), ("analyze-redundancy", {}),
              ("plan-fusion", {"remove_attention": 2}), ("prune-attention", {}))
    with pytest.raises(RuntimeError, match="this model was consumed by pass 'prune-attention'"):
        loaded.model(calibration[:1])
    assert ctx.model(calibration[:1]).logits.shape == (1, 32, 256)
