"""split-experts: cut each MLP's neurons into experts by co-activation and route each token to a few of them."""

from __future__ import annotations

import logging

import torch

from d2mc.activations import capture
from d2mc.arch import MOE_MODEL_TYPE, BlockPlan
from d2mc.context import Context
from d2mc.errors import UserError
from d2mc.pipeline import Pass, PassResult, register_pass
from d2mc.plan import parse_layers, split_plan
from d2mc.restructure import dense_plan, restructure
from d2mc.routing import fit_mass_router

log = logging.getLogger(__name__)

MIN_TOKENS = 64  # fewest calibration tokens to group an MLP's neurons on


@register_pass
class SplitExperts(Pass):
    """ToMoE / MoEfication without training. On calibration text, each MLP's neurons are grouped by co-activation:
    a neuron's pattern is the size of its contribution to the output on every token (``|silu(g) u| * |down col|``),
    normalised, and balanced k-means on those patterns cuts the MLP into ``experts`` equal groups
    (neurons that fire together share an expert). Each group becomes an expert (a slice of the MLP's weights), all
    counting with weight 1, so with every expert chosen the block computes the dense MLP exactly.

    A router (a linear map of the block's hidden state, as in every d2mc MoE block) is fitted to the dense
    activations: for each token the experts that hold most of its contribution are the targets (soft
    cross-entropy on the experts' output norms, :func:`d2mc.routing.fit_mass_router`), and the top ``k`` run,
    ``k / experts = active_fraction``; its statistics are ``split_routers``.
    ``shared`` experts per always-active MLP hold the neurons with the largest mean contribution and are never
    routed (they count towards the active share); by default a quarter of them, leaving at least one to route.

    On a converted model every MLP of a block is split and the block routes among all their experts: the active
    share is a fraction of the MLPs the block used per token (an LF-UC block with top-1 routing over two fused MLPs
    and ``active_fraction=0.5`` keeps ``0.5 * experts`` of ``2 * experts`` active), and the targets are the
    experts of the MLPs its own router chose. ``layers`` limits the split to blocks whose MLPs all come from those
    parent layers (default: every block).
    """

    name = "split-experts"
    requires = ("model", "calibration")
    provides = ("split", "split_routers")
    transforms_model = True
    consumes_model = True  # restructure moves the input's modules

    def __init__(self, experts: int = 8, active_fraction: float = 0.5, shared: int | None = None,
                 layers: str | None = None,
                 batch_size: int = 4, iterations: int = 100, cluster_iterations: int = 30, seed: int = 0):
        if experts < 2:
            raise UserError(f"--experts must be at least 2, not {experts}")
        if not 0 < active_fraction <= 1:
            raise UserError(f"--active-fraction {active_fraction:g} is out of range: give the share of each MLP's "
                            "neurons that stays active per token, in (0, 1]")
        self.experts, self.active_fraction, self.shared, self.layers = experts, active_fraction, shared, layers
        self.batch_size, self.iterations, self.cluster_iterations, self.seed = (batch_size, iterations,
                                                                                cluster_iterations, seed)

    def run(self, ctx: Context) -> PassResult:
        model = ctx.model
        converted = model.config.model_type == MOE_MODEL_TYPE
        base = model.config.base_config if converted else model.config
        sources = list(model.config.blocks) if converted else dense_plan(base.num_hidden_layers)
        layers = parse_layers(self.layers, base.num_hidden_layers) if self.layers is not None else None
        blocks, targets = split_plan(sources, base.intermediate_size, self.experts, self.active_fraction,
                                     self.shared, layers)
        for i in targets:
            for _, mlp in _mlps(model, i, converted):
                if getattr(mlp.down_proj, "bias", None) is not None:
                    raise UserError("the MLPs have a down-projection bias (mlp_bias): split-experts supports "
                                    "bias-free MLPs only")
        generator = torch.Generator().manual_seed(self.seed)
        # the hidden state each target block hands its MLPs (and its router), before their norms: [T, H]
        inputs, _ = capture(model, ctx.calibration, self.batch_size,
                            inputs=[_mlps(model, i, converted)[0][0] for i in targets])
        activity = {}
        for i, h in zip(targets, inputs, strict=True):
            activity[i] = _source_activity(model, i, sources[i], h, converted)
            always = set(sources[i].active_mlps[0])
            per_mlp = blocks[i].shared_experts // max(len(always), 1)
            for m, (norm, mlp) in enumerate(_mlps(model, i, converted)):
                shared = per_mlp if m in always else 0
                used = activity[i][m]  # an LF-UC expert is grouped on the tokens routed to it, if there are enough
                order = self._cluster(norm, mlp, h[used] if used.sum() >= MIN_TOKENS else h, shared, generator)
                _permute_neurons(mlp, order)
        ctx.model = restructure(model, blocks)
        stats = {}
        for i, h in zip(targets, inputs, strict=True):
            block = ctx.model.model.layers[i]
            source_mlp = _source_mlp_of(blocks[i], sources[i])[block.shared_experts:]
            stats[i] = fit_mass_router(block, h, [activity[i][m] for m in source_mlp], self.iterations, self.seed)
            log.info("block %d: %d experts of %d neurons, top-%d (+%d shared); router agreement %.3f, mass recall "
                     "%.3f", i, len(blocks[i].expert_layers), blocks[i].expert_intermediate,
                     blocks[i].top_k, blocks[i].shared_experts, stats[i]["agreement"], stats[i]["mass_recall"])
        ctx.results["split_routers"] = stats
        shared = [blocks[i].shared_experts for i in targets]
        ctx.results["split"] = {"blocks": targets, "experts_per_mlp": self.experts,
                                "active_fraction": self.active_fraction, "shared_per_block": shared,
                                "expert_intermediate": blocks[targets[0]].expert_intermediate}
        summary = {"split_blocks": len(targets), "experts_per_mlp": self.experts,
                   "active_fraction": self.active_fraction, "shared_per_block": sorted(set(shared)),
                   "mean_agreement": sum(s["agreement"] for s in stats.values()) / len(stats),
                   "mean_mass_recall": sum(s["mass_recall"] for s in stats.values()) / len(stats)}
        return PassResult(modified=True, summary=summary)

    @torch.no_grad()
    def _cluster(self, norm, mlp, h: torch.Tensor, shared: int, generator) -> torch.Tensor:
        """A permutation of the MLP's neurons: ``shared`` groups of the largest mean contribution first, then the
        routed groups from balanced k-means on the neurons' contribution patterns."""
        contribution = _contributions(norm, mlp, h).cpu()  # [T, I]; the clustering's bookkeeping runs on the CPU
        neurons = contribution.shape[1]
        size = neurons // self.experts
        first = torch.empty(0, dtype=torch.long)
        rest = torch.arange(neurons)
        if shared:
            first = contribution.mean(0).topk(shared * size).indices.sort().values
            keep = torch.ones(neurons, dtype=torch.bool)
            keep[first] = False
            rest = rest[keep]
        patterns = contribution[:, rest].T  # [neurons, tokens]
        patterns = patterns / patterns.norm(dim=1, keepdim=True).clamp_min(1e-12)
        labels = balanced_kmeans(patterns, self.experts - shared, self.cluster_iterations, generator)
        groups = [rest[labels == c] for c in range(self.experts - shared)]
        return torch.cat([first, *groups])


def _mlps(model, i: int, converted: bool) -> list[tuple]:
    """(post-attention norm, MLP) of every MLP of block ``i``."""
    if converted:
        return [(e.post_attention_layernorm, e.mlp) for e in model.model.layers[i].experts]
    layer = model.model.layers[i]
    return [(layer.post_attention_layernorm, layer.mlp)]


@torch.no_grad()
def _source_activity(model, i: int, source: BlockPlan, h: torch.Tensor, converted: bool) -> list[torch.Tensor]:
    """For each MLP of the source block, which tokens use it (its router's choice; always-active MLPs: all)."""
    always, _ = source.active_mlps
    count = len(source.expert_layers)
    active = [torch.ones(h.shape[0], dtype=torch.bool, device=h.device) for _ in range(count)]
    if len(always) < count:
        block = model.model.layers[i]
        _, indices = block.route(h.to(block.router.weight.dtype))
        for r in range(count - source.shared_experts):
            active[source.shared_experts + r] = (indices == r).any(-1)
    return active


def _source_mlp_of(plan: BlockPlan, source: BlockPlan) -> list[int]:
    """For each expert of the split block, the index of the source MLP it was cut from."""
    position = {layer: m for m, layer in enumerate(source.expert_layers)}
    return [position[layer] for layer in plan.expert_layers]


def _contributions(norm, mlp, h: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """``|silu(gate(x)) * up(x)| * |down column|`` per token and neuron, ``x = norm(h)``: ``[T, I]`` in fp32."""
    dtype = mlp.gate_proj.weight.dtype
    column = mlp.down_proj.weight.float().norm(dim=0)
    out = []
    for start in range(0, h.shape[0], chunk):
        x = norm(h[start: start + chunk].to(dtype))
        act = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
        out.append(act.float().abs() * column)
    return torch.cat(out)


@torch.no_grad()
def _permute_neurons(mlp, order: torch.Tensor) -> None:
    """Reorder the MLP's intermediate neurons in place. Its function does not change, so a teacher sharing these
    weights (:func:`d2mc.teacher.frozen_alias`) computes what it did, and no copy is needed."""
    for name in ("gate_proj", "up_proj"):
        linear = getattr(mlp, name)
        linear.weight.copy_(linear.weight[order])
        if linear.bias is not None:
            linear.bias.copy_(linear.bias[order])
    mlp.down_proj.weight.copy_(mlp.down_proj.weight[:, order])


def balanced_kmeans(points: torch.Tensor, clusters: int, iterations: int, generator) -> torch.Tensor:
    """Cluster unit-norm rows of ``points`` into ``clusters`` groups of equal size by cosine similarity.

    Spherical k-means whose assignment step fills each cluster to exactly ``len(points) / clusters`` members:
    points propose to their most similar centroid with room left; a full centroid keeps its most similar
    proposers. Returns the cluster of each point.
    """
    n = points.shape[0]
    size = n // clusters
    centroids = points[torch.randperm(n, generator=generator)[:clusters]].clone()
    labels = torch.full((n,), -1, dtype=torch.long)
    for _ in range(max(1, iterations)):
        new = _balanced_assign(points @ centroids.T, size)
        if torch.equal(new, labels):
            break
        labels = new
        for c in range(clusters):
            mean = points[labels == c].mean(0)
            centroids[c] = mean / mean.norm().clamp_min(1e-12)
    return labels


def _balanced_assign(similarity: torch.Tensor, size: int) -> torch.Tensor:
    n, clusters = similarity.shape
    similarity = similarity.clone()
    labels = torch.full((n,), -1, dtype=torch.long)
    room = [size] * clusters
    while (labels < 0).any():
        free = (labels < 0).nonzero().squeeze(1)
        choice = similarity[free].argmax(1)
        for c in choice.unique().tolist():
            proposers = free[choice == c]
            take = min(room[c], proposers.numel())
            best = proposers[similarity[proposers, c].argsort(descending=True)[:take]]
            labels[best] = c
            room[c] -= take
            if room[c] == 0:
                similarity[:, c] = float("-inf")
    return labels
