"""fuse-experts: turn each planned group into one block whose experts are the group's MLPs."""

from __future__ import annotations

from d2mc.context import Context
from d2mc.pipeline import Pass, PassResult, register_pass
from d2mc.restructure import restructure


@register_pass
class FuseExperts(Pass):
    """Each group keeps its first layer's attention; every MLP of the group, with its own post-attention norm,
    becomes an expert of that block. Routers start uniform; insert-router fits them. A mixed plan's dropped layers
    go here too (its attention-only drops were made by prune-attention)."""

    name = "fuse-experts"
    requires = ("model", "plan", "pruned")
    provides = ("fused",)
    transforms_model = True
    consumes_model = True  # restructure moves the input's modules

    def run(self, ctx: Context) -> PassResult:
        plan = ctx.results["plan"]
        ctx.model = restructure(ctx.model, plan.blocks("lfuc"))
        ctx.results["fused"] = [list(g) for g in plan.groups]
        return PassResult(modified=bool(plan.groups or plan.dropped),
                          summary={"fused_groups": ctx.results["fused"], "dropped_layers": plan.dropped})
