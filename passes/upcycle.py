"""upcycle: sparse upcycling, each chosen MLP becomes several experts initialised from it, with a new router."""

from __future__ import annotations

import logging

import torch

from d2mc.arch import MOE_MODEL_TYPE
from d2mc.context import Context
from d2mc.errors import UserError
from d2mc.pipeline import Pass, PassResult, register_pass
from d2mc.plan import parse_layers, upcycle_block
from d2mc.restructure import dense_plan, restructure

log = logging.getLogger(__name__)


@register_pass
class Upcycle(Pass):
    """Sparse upcycling (Komatsuzaki et al., 2022): each chosen layer's MLP becomes ``experts`` experts and a router
    picks ``top_k`` of them per token. ``init="copy"``: every expert is a copy of the MLP (total parameters grow
    ``experts`` times, active ones ``top_k`` times) and the top-k weights are renormalised, so the fresh model
    computes exactly what the dense one did whatever the router says; ``init="partition"``: the experts are
    consecutive slices of the MLP's neurons, each counting in full (``top_k / experts`` of the neurons active).

    The router starts random (normal, ``router_std``, seeded), as in the paper: upcycling is a starting point for
    recovery training, which trains the routers it finds on the model. (For a router fitted without training, and
    neurons grouped by co-activation rather than by position, see split-experts.)
    """

    name = "upcycle"
    requires = ("model",)
    provides = ("upcycled",)
    transforms_model = True
    consumes_model = True  # restructure moves the input's modules

    def __init__(self, experts: int = 8, top_k: int = 1, init: str = "copy", layers: str | None = None,
                 normalize_topk: bool = True, router_std: float = 0.02, seed: int = 0):
        self.experts, self.top_k, self.init, self.layers = experts, top_k, init, layers
        self.normalize_topk, self.router_std, self.seed = normalize_topk, router_std, seed

    def run(self, ctx: Context) -> PassResult:
        model = ctx.model
        if model.config.model_type == MOE_MODEL_TYPE:
            raise UserError("upcycling starts from a dense model: this one is already converted")
        config = model.config
        targets = parse_layers(self.layers, config.num_hidden_layers)
        blocks = dense_plan(config.num_hidden_layers)
        for i in targets:
            blocks[i] = upcycle_block(blocks[i], config.intermediate_size, self.experts, self.top_k, self.init,
                                      self.normalize_topk)
        if self.init == "partition" and getattr(model.model.layers[targets[0]].mlp.down_proj, "bias", None) is not None:
            raise UserError("the MLPs have a down-projection bias (mlp_bias): partitions need bias-free MLPs")
        ctx.model = restructure(model, blocks)
        generator = torch.Generator().manual_seed(self.seed)
        with torch.no_grad():
            for i in targets:
                router = ctx.model.model.layers[i].router
                router.weight.copy_(torch.randn(router.weight.shape, generator=generator) * self.router_std)
        size = blocks[targets[0]].expert_intermediate or config.intermediate_size
        ctx.results["upcycled"] = {"blocks": targets, "experts": self.experts, "top_k": self.top_k,
                                   "init": self.init, "expert_intermediate": size}
        log.info("upcycled %d MLPs into %d experts each (%s), top-%d", len(targets), self.experts, self.init,
                 self.top_k)
        return PassResult(modified=True, summary={"upcycled_blocks": len(targets), "experts": self.experts,
                                                  "top_k": self.top_k, "init": self.init})
