"""prune-attention: delete the attention (weights and KV-cache entry) of the layers the plan removes."""

from __future__ import annotations

from d2mc.context import Context
from d2mc.pipeline import Pass, PassResult, register_pass
from d2mc.restructure import restructure


@register_pass
class PruneAttention(Pass):
    """Every layer stays a block of its own; the plan's removed layers keep only their MLP. On its own this is
    the drop-attention baseline; before fuse-experts it is the first step of LF-UC."""

    name = "prune-attention"
    requires = ("model", "plan")
    provides = ("pruned",)
    transforms_model = True
    consumes_model = True  # restructure moves the input's modules

    def run(self, ctx: Context) -> PassResult:
        plan = ctx.results["plan"]
        ctx.model = restructure(ctx.model, plan.blocks("drop-attention"))
        ctx.results["pruned"] = plan.removed_attention
        return PassResult(modified=bool(plan.removed_attention),
                          summary={"removed_attention": plan.removed_attention})
