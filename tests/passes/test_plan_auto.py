"""plan-auto and the mixed plans it makes, on tiny models: the budget is met, and every kind of mixed plan builds,
saves, reloads, exports and verifies."""

import copy

import pytest
import torch
from d2mc.targets.onnxruntime import export_onnx
from transformers import AutoModelForCausalLM

from d2mc.arch import BlockPlan, ModelArch
from d2mc.convert import ConvertOptions, conversion_passes
from d2mc.damage import DamageProbe
from d2mc.errors import UserError
from d2mc.pipeline import PassManager, create_pass
from d2mc.plan import FusionPlan, GroupShape
from d2mc.planner import DROP_ATTENTION, DROP_LAYER, FUSE, enumerate_actions
from d2mc.profiles import load_profile
from d2mc.report import plan_search_section
from d2mc.restructure import restructure
from d2mc.roofline import predict_decode_seconds


@pytest.mark.parametrize("speedup", [1.1, 1.25])
def test_auto_meets_the_budget_it_was_given(tiny_context, speedup):
    profile = load_profile("orin-agx")
    ctx = tiny_context(profile=profile)
    dense = predict_decode_seconds(ctx.arch, profile, context=256)
    heard = []
    passes = conversion_passes(ConvertOptions(method="auto", speedup=speedup, context=256, reconstruct_steps=10),
                               progress=heard.append)
    PassManager(passes).run(ctx)
    assert heard[0].startswith("screened ") and any(h.startswith("measured ") for h in heard)  # the search's steps
    assert predict_decode_seconds(ctx.arch, profile, context=256) <= dense / speedup
    search = ctx.results["plan_search"]
    chosen = search["chosen"]
    assert chosen["predicted_ms"] == pytest.approx(predict_decode_seconds(ctx.arch, profile, context=256) * 1e3)
    final = [a["reconstructed_damage"] if a["reconstructed_damage"] is not None else a["measured_damage"]
             for a in search["alternatives"]]  # plans with fused blocks are measured again, reconstructed
    assert search["reconstruct_steps"] == 10 and final[0] == min(final)
    assert search["alternatives"][0]["plan"] == chosen["plan"]
    assert all(a["predicted_ms"] <= search["target_ms"] * (1 + 1e-9) for a in search["alternatives"])
    assert {a["kind"] for a in search["actions"]} == {DROP_ATTENTION, DROP_LAYER, FUSE}
    rows = plan_search_section(search)["rows"]  # the report's table: every measured plan, the chosen one marked
    assert [r[1] for r in rows if r[-1] == "yes"] == [chosen["plan"]] and len(rows) == len(search["alternatives"])
    with torch.no_grad():
        assert torch.isfinite(ctx.model(ctx.calibration[:1]).logits).all()


def test_the_plan_depends_on_the_context(tiny_context):
    """At a long context dropping attention saves far more, so the same speed-up needs fewer changes."""
    profile = load_profile("orin-agx")
    removed = {}
    for context in (64, 480):
        ctx = tiny_context(profile=profile)
        PassManager([create_pass("analyze-redundancy"), create_pass("plan-auto", speedup=1.15, context=context)]
                    ).run(ctx)
        plan = ctx.results["plan"]
        removed[context] = len(plan.removed_attention) + len(plan.dropped)
        assert ctx.results["plan_search"]["context"] == context
    assert removed[480] <= removed[64]


def test_an_unreachable_budget_is_refused_before_measuring(tiny_context):
    ctx = tiny_context(profile=load_profile("orin-agx"))
    with pytest.raises(UserError, match="is unreachable: the fastest plan auto may choose"):
        PassManager([create_pass("analyze-redundancy"), create_pass("plan-auto", budget_ms=1e-4, context=256)]).run(ctx)


def test_measured_damage_of_an_action_is_its_calibration_loss_increase(tiny_context):
    """The probe's damage of a plan equals the loss increase of the converted model built from it."""
    ctx = tiny_context()
    probe = DamageProbe(ctx.model, ctx.calibration)
    blocks = [BlockPlan.dense(i) for i in range(8) if i != 5]
    blocks[3] = BlockPlan(None, (3,))

    def loss(model) -> float:
        with torch.no_grad():
            logits = model(ctx.calibration, use_cache=False).logits[:, :-1]
        return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                       ctx.calibration[:, 1:].reshape(-1)))

    expected = loss(restructure(copy.deepcopy(ctx.model), blocks)) - loss(ctx.model)
    assert probe.plan_damage(blocks) == pytest.approx(expected, abs=1e-5)
    assert probe.action_damage(5, 5, None) == pytest.approx(
        loss(restructure(copy.deepcopy(ctx.model), [BlockPlan.dense(i) for i in range(8) if i != 5]))
        - loss(ctx.model), abs=1e-5)


def test_the_reconstructed_damage_of_a_plan_is_the_loss_increase_of_its_conversion(tiny_context):
    """With the probe on the whole calibration text, a plan measured with its fused block reconstructed is the
    model the conversion builds (insert-router, then reconstruct-blocks on the same text) exactly."""
    from d2mc.activations import group_activations

    ctx = tiny_context()
    dense = copy.deepcopy(ctx.model)
    probe = DamageProbe(dense, ctx.calibration)
    fused = BlockPlan(2, (2, 3, 4))
    blocks = [BlockPlan.dense(i) for i in (0, 1)] + [fused] + [BlockPlan.dense(i) for i in (5, 6, 7)]
    (h,), (y,) = group_activations(dense, [fused.expert_layers], ctx.calibration, 4)
    errors = probe.reconstruct(fused, h, y, steps=10).stats
    assert errors["mse_after"] < errors["mse_before"]
    ctx.results["plan"] = FusionPlan(8, [(2, 3, 4)])
    PassManager([create_pass("prune-attention"), create_pass("fuse-experts"), create_pass("insert-router"),
                 create_pass("reconstruct-blocks", steps=10)]).run(ctx)

    def loss(model) -> float:
        with torch.no_grad():
            logits = model(ctx.calibration, use_cache=False).logits[:, :-1]
        return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                       ctx.calibration[:, 1:].reshape(-1)))

    converted = loss(ctx.model) - loss(dense)
    assert probe.plan_damage(blocks, reconstructed=True) == pytest.approx(converted, abs=1e-4)
    assert probe.plan_damage(blocks) > converted  # reconstruction is what lowered it



@pytest.mark.parametrize("steps, taken", [(10, True), (5, False)])
def test_the_conversion_takes_the_blocks_the_plan_search_reconstructed_the_same_way(tiny_context, steps, taken):
    """reconstruct-blocks with reuse_search takes a block the search reconstructed with its own settings (the same
    model as training it again: logits within 1e-5) and trains the others."""
    from d2mc.activations import group_activations

    fused = BlockPlan(2, (2, 3, 4))
    models = []
    for reuse in (False, True):
        ctx = tiny_context()
        if reuse:
            probe = DamageProbe(copy.deepcopy(ctx.model), ctx.calibration)
            (h,), (y,) = group_activations(ctx.model, [fused.expert_layers], ctx.calibration, 4)
            found = probe.reconstruct(fused, h, y, steps=10)
            ctx.results["reconstructed_blocks"] = {fused: found}
        ctx.results["plan"] = FusionPlan(8, [(2, 3, 4)])
        PassManager([create_pass("prune-attention"), create_pass("fuse-experts"), create_pass("insert-router"),
                     create_pass("reconstruct-blocks", steps=steps, reuse_search=reuse)]).run(ctx)
        models.append(ctx)
    fresh, reused = models
    block = reused.model.model.layers[2]
    assert (block.experts is found.block.experts) == taken
    assert all(p.requires_grad == q.requires_grad for p, q in zip(
        block.parameters(), fresh.model.model.layers[2].parameters(), strict=True))
    if taken:
        assert reused.results["reconstruction"] == {2: {k: found.stats[k] for k in ("mse_before", "mse_after")}}
        assert reused.results["reconstructed_routers"][2] == found.stats["router"]
    with torch.no_grad():
        expected = fresh.model(fresh.calibration, use_cache=False).logits
        got = reused.model(reused.calibration, use_cache=False).logits
    assert (got - expected).abs().max() < 1e-5


MIXED = {
    "pair and attention-only drop": FusionPlan(8, [(1, 2)], attention_dropped=[5]),
    "top-2 of three and a dropped layer": FusionPlan(8, [(2, 3, 4)], shapes=[GroupShape(False, 2)], dropped=[6]),
    "shared expert, top-1": FusionPlan(8, [(1, 2, 3)], shapes=[GroupShape(True, 1)], attention_dropped=[5, 6]),
    "shared expert, top-2, and a pair": FusionPlan(8, [(1, 2, 3, 4), (5, 6)],
                                                   shapes=[GroupShape(True, 2), GroupShape(False, 1)]),
    "everything at once": FusionPlan(8, [(1, 2), (3, 4, 5)], shapes=[GroupShape(False, 1), GroupShape(True, 1)],
                                     dropped=[6]),
}


@pytest.mark.parametrize("name", MIXED)
def test_every_kind_of_mixed_plan_builds_saves_reloads_exports_and_verifies(tiny_context, tmp_path, name):
    plan = MIXED[name]
    ctx = tiny_context()
    ctx.results["plan"] = plan
    PassManager([create_pass("prune-attention"), create_pass("fuse-experts"), create_pass("insert-router"),
                 create_pass("reconstruct-blocks", steps=5)]).run(ctx)
    assert list(ctx.model.config.blocks) == plan.blocks("auto")
    arch = ModelArch.from_config(ctx.model.config)
    assert arch.num_blocks == 8 - len(plan.dropped) - sum(len(g) - 1 for g in plan.groups)
    ctx.model.save_pretrained(tmp_path / "model")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ctx.calibration).logits, ctx.model(ctx.calibration).logits)
    result = export_onnx(reloaded, None, tmp_path / "onnx")
    assert result.verify["passed"]
    trt = export_onnx(reloaded, None, tmp_path / "onnx-tensorrt", flavour="tensorrt", precision="fp16")
    assert trt.verify["passed"]


def test_the_screen_keeps_the_least_local_error_of_each_bucket_and_fewer_of_larger_groups():
    from collections import defaultdict

    from d2mc.passes.plan_auto import PlanAuto

    assert [PlanAuto.screened_per_bucket(6, size) for size in range(1, 8)] == [6, 6, 4, 3, 3, 3, 3]
    actions = enumerate_actions(14, range(1, 13), max_group=6)
    local = {a: float(torch.rand((), generator=torch.Generator().manual_seed(i))) for i, a in enumerate(actions)}
    kept = set(PlanAuto.screened(actions, local, 6))
    buckets = defaultdict(list)
    for a in actions:
        buckets[(a.kind, len(a.layers), a.shape)].append(a)
    assert len(buckets) == 2 + 1 + 3 + 4 * 3  # drop attention, drop layer; pairs top-1; 3: three routings; 4-6: four
    for (_, size, _), bucket in buckets.items():
        ranked = sorted(bucket, key=local.get)
        assert {a for a in bucket if a in kept} == set(ranked[:PlanAuto.screened_per_bucket(6, size)])
