"""insert-router: fit each fused block's router (and expert output scales) on calibration activations."""

from __future__ import annotations

import logging

from d2mc.activations import group_activations
from d2mc.context import Context
from d2mc.pipeline import Pass, PassResult, register_pass
from d2mc.routing import fit_group_router

log = logging.getLogger(__name__)


@register_pass
class InsertRouter(Pass):
    """For every token of the calibration text, the best expert is the one whose output, added to the block's
    post-attention hidden state, lands closest to what the dense group of layers produced. Each expert's output
    is rescaled by the least-squares factor on its tokens (folded into ``down_proj``), then the router, a linear
    map of the post-attention hidden state, is fitted to pick the best expert (cross-entropy weighted by how
    much the choice matters). A fifth of the tokens is held back to report router agreement
    (:func:`d2mc.routing.fit_group_router`)."""

    name = "insert-router"
    requires = ("model", "teacher", "calibration", "fused")
    provides = ("routers",)
    transforms_model = True

    def __init__(self, batch_size: int = 4, fit_scales: bool = True, iterations: int = 60):
        self.batch_size, self.fit_scales, self.iterations = batch_size, fit_scales, iterations

    def run(self, ctx: Context) -> PassResult:
        fused = [(i, plan) for i, plan in enumerate(ctx.model.config.blocks) if ctx.model.model.layers[i].router is not None]
        stats = {}
        if fused:
            inputs, targets = group_activations(ctx.teacher, [plan.expert_layers for _, plan in fused],
                                                ctx.calibration, self.batch_size)
            for i, plan in fused:  # each group's activations are let go once its router is fitted
                h, y = inputs.pop(0), targets.pop(0)
                stats[i] = fit_group_router(ctx.model.model.layers[i], h, y, self.fit_scales, self.iterations)
                del h, y
                log.info("block %d (layers %s): router agreement %.3f, load %s", i, list(plan.expert_layers),
                         stats[i]["agreement"], [round(x, 3) for x in stats[i]["load"]])
        ctx.results["routers"] = stats
        return PassResult(modified=bool(fused), summary={"routers": {str(k): v for k, v in stats.items()}})
