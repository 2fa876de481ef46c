"""reconstruct-blocks: train each fused block to reproduce the dense group it replaced (block-wise recovery)."""

from __future__ import annotations

import logging

import torch

from d2mc.activations import group_activations
from d2mc.context import Context
from d2mc.errors import UserError
from d2mc.pipeline import Pass, PassResult, register_pass
from d2mc.reconstruction import BATCH_TOKENS, LR, SEED, reconstruct_experts
from d2mc.routing import fit_group_router

log = logging.getLogger(__name__)


def take_block(block, found) -> None:
    """Put the experts and router of ``found`` (the same plan, reconstructed) into ``block``, keeping which of the
    block's parameters train."""
    flags = [p.requires_grad for p in block.experts.parameters()]
    block.experts = found.experts.train(block.training)
    for p, flag in zip(block.experts.parameters(), flags, strict=True):
        p.requires_grad_(flag)
    with torch.no_grad():
        block.router.weight.copy_(found.router.weight)


@register_pass
class ReconstructBlocks(Pass):
    """The cheap first stage of recovery. For every fused block, on the dense parent's own activations: the
    post-attention hidden state ``h`` of the group's first layer in, the group's output ``y`` out. The block's
    experts are trained (Adam in fp32 whatever the model's dtype, routing held at the fitted router's choice) so that
    ``h + experts(h)`` matches ``y``; each expert learns to stand in for the whole group on the tokens sent to
    it. The router is refitted afterwards on the trained experts, as insert-router fits it (its statistics are
    ``reconstructed_routers``). Attention weights do not change.

    With ``reuse_search`` (the auto method's conversion), a block the plan search (plan-auto) already built and
    reconstructed the same number of steps, after insert-router's default fit, is taken as the search left it
    instead of being trained again."""

    name = "reconstruct-blocks"
    requires = ("model", "teacher", "calibration", "routers")
    provides = ("reconstruction", "reconstructed_routers")
    transforms_model = True

    def __init__(self, steps: int = 150, lr: float = LR, batch_tokens: int = BATCH_TOKENS, seed: int = SEED,
                 batch_size: int = 4, reuse_search: bool = False):
        self.steps, self.lr, self.batch_tokens, self.seed, self.batch_size = steps, lr, batch_tokens, seed, batch_size
        if not isinstance(reuse_search, bool):
            raise UserError(f"reconstruct-blocks: reuse_search is true or false, not {reuse_search!r}")
        self.reuse_search = reuse_search

    def run(self, ctx: Context) -> PassResult:
        fused = [(i, plan) for i, plan in enumerate(ctx.model.config.blocks)
                 if ctx.model.model.layers[i].router is not None]
        stats, routers = {}, {}
        searched = ctx.results.get("reconstructed_blocks", {}) if self.reuse_search else {}
        for i, plan in fused:
            found = searched.get(plan)
            if found is not None and found.settings == (self.steps, self.lr, self.batch_tokens, self.seed):
                take_block(ctx.model.model.layers[i], found.block)
                stats[i] = {k: found.stats[k] for k in ("mse_before", "mse_after")}
                routers[i] = found.stats["router"]
                log.info("block %d: as the plan search reconstructed it (error %.4g -> %.4g)", i,
                         stats[i]["mse_before"], stats[i]["mse_after"])
        fused = [(i, plan) for i, plan in fused if i not in stats]
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
        ctx.results["reconstruction"] = dict(sorted(stats.items()))
        ctx.results["reconstructed_routers"] = dict(sorted(routers.items()))
        return PassResult(modified=bool(stats), summary={"blocks": {str(k): v for k, v in stats.items()}})
