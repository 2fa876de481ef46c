"""drop-layers: the layer-pruning baseline (ShortGPT): remove whole layers."""

from __future__ import annotations

from d2mc.context import Context
from d2mc.pipeline import Pass, PassResult, register_pass
from d2mc.restructure import restructure


@register_pass
class DropLayers(Pass):
    """Remove whole layers: those of lowest block influence for a count or budget, or the non-kept layers of
    each group of an explicit plan."""

    name = "drop-layers"
    requires = ("model", "plan")
    provides = ("dropped",)
    transforms_model = True
    consumes_model = True  # restructure moves the input's modules

    def run(self, ctx: Context) -> PassResult:
        plan = ctx.results["plan"]
        dropped = plan.dropped or plan.removed_attention
        ctx.model = restructure(ctx.model, plan.blocks("drop-layers"))
        ctx.results["dropped"] = dropped
        return PassResult(modified=bool(dropped), summary={"dropped_layers": dropped})
