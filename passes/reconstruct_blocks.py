"""reconstruct-blocks: train each fused block to reproduce the dense group it replaced (block-wise recovery)."""

from __future__ import annotations

import logging

from d2mc.activations import group_activations
from d2mc.context import Context
from d2mc.pipeline import Pass, PassResult, register_pass
from d2mc.reconstruction import reconstruct_experts
from d2mc.routing import fit_group_router

log = logging.getLogger(__name__)


@register_pass
class ReconstructBlocks(Pass):
    """The cheap first stage of recovery. For every fused block, on the dense parent's own activations: the
    post-attention hidden state ``h`` of the group's first layer in, the group's output ``y`` out. The block's
    experts are trained (Adam in fp32 whatever the model's dtype, routing held at the fitted router's choice) so that
    ``h + experts(h)`` matches ``y``; each expert learns to stand in for the whole group on the tokens sent to
    it. The router is refitted afterwards on the trained experts, as insert-router fits it (its statistics are
    ``reconstructed_routers``). Attention weights do not change."""

    name = "reconstruct-blocks"
    requires = ("model", "teacher", "calibration", "routers")
    provides = ("reconstruction", "reconstructed_routers")
    transforms_model = True

    def __init__(self, steps: int = 150, lr: float = 3e-4, batch_tokens: int = 512, seed: int = 0,
                 batch_size: int = 4):
        self.steps, self.lr, self.batch_tokens, self.seed, self.batch_size = steps, lr, batch_tokens, seed, batch_size

    def run(self, ctx: Context) -> PassResult:
        fused = [(i, plan) for i, plan in enumerate(ctx.model.config.blocks)
                 if ctx.model.model.layers[i].router is not None]
        stats, routers = {}, {}
        if fused and self.steps:
            inputs, targets = group_activations(ctx.teacher, [plan.expert_layers for _, plan in fused],
                                                ctx.calibration, self.batch_size)
            for i, _ in fused:  # each group's activations are let go once its block is done
                h, y = inputs.pop(0), targets.pop(0)
                block = ctx.model.model.layers[i]
                before, after = reconstruct_experts(block, h, y, self.steps, self.lr, self.batch_tokens, self.seed)
                routers[i] = fit_group_router(block, h, y)
                stats[i] = {"mse_before": before, "mse_after": after}
                log.info("block %d: reconstruction error %.4g -> %.4g", i, before, after)
                del h, y
        ctx.results["reconstruction"] = stats
        ctx.results["reconstructed_routers"] = routers
        return PassResult(modified=bool(stats), summary={"blocks": {str(k): v for k, v in stats.items()}})
