"""insert-router: fit each fused block's router (and expert output scales) on calibration activations."""

from __future__ import annotations

import logging

import torch

from d2mc.activations import batches, hooks, output_tensor
from d2mc.context import Context
from d2mc.pipeline import Pass, PassResult, register_pass

log = logging.getLogger(__name__)


@register_pass
class InsertRouter(Pass):
    """For every token of the calibration text, the best expert is the one whose output, added to the block's
    post-attention hidden state, lands closest to what the dense group of layers produced. Each expert's output
    is rescaled by the least-squares factor on its tokens (folded into ``down_proj``), then the router, a linear
    map of the post-attention hidden state, is fitted to pick the best expert (cross-entropy weighted by how
    much the choice matters). A fifth of the tokens is held back to report router agreement."""

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
            inputs, targets = self._teacher_activations(ctx, [plan["expert_layers"] for _, plan in fused])
            for (i, plan), h, y in zip(fused, inputs, targets, strict=False):
                stats[i] = self._fit_block(ctx.model.model.layers[i], h, y)
                log.info("block %d (layers %s): router agreement %.3f, load %s", i, plan["expert_layers"],
                         stats[i]["agreement"], [round(x, 3) for x in stats[i]["load"]])
        ctx.results["routers"] = stats
        return PassResult(modified=bool(fused), summary={"routers": {str(k): v for k, v in stats.items()}})

    @torch.no_grad()
    def _teacher_activations(self, ctx: Context, groups: list[list[int]]):
        """Post-attention hidden state of each group's first layer and output of its last, in the dense parent."""
        layers = ctx.teacher.model.layers
        inputs = [[] for _ in groups]
        targets = [[] for _ in groups]
        handles = []
        for g, group in enumerate(groups):
            handles.append(layers[group[0]].post_attention_layernorm.register_forward_pre_hook(
                lambda module, args, g=g: inputs[g].append(args[0].reshape(-1, args[0].shape[-1]).float())))
            handles.append(layers[group[-1]].register_forward_hook(
                lambda module, args, output, g=g: targets[g].append(
                    output_tensor(output).reshape(-1, output_tensor(output).shape[-1]).float())))
        with hooks(handles):
            for batch in batches(ctx.calibration, self.batch_size):
                ctx.teacher(batch, use_cache=False)
        return [torch.cat(x) for x in inputs], [torch.cat(y) for y in targets]

    def _fit_block(self, block, h: torch.Tensor, y: torch.Tensor) -> dict:
        shared = block.shared_experts
        routed = block.experts[shared:]
        with torch.no_grad():
            residual = y - h - sum((e(h) for e in block.experts[:shared]), torch.zeros_like(h))
            outs = torch.stack([e(h).float() for e in routed])  # [E, T, H]
            scales = torch.ones(len(routed))
            if self.fit_scales:
                labels = _errors(outs, residual).argmin(0)
                for e, expert in enumerate(routed):
                    mine = labels == e
                    if mine.any():
                        num = (outs[e, mine] * residual[mine]).sum()
                        den = (outs[e, mine] ** 2).sum().clamp_min(1e-12)
                        scales[e] = float((num / den).clamp(0.5, 4.0))
                    expert.mlp.down_proj.weight.mul_(scales[e])
                    if getattr(expert.mlp.down_proj, "bias", None) is not None:
                        expert.mlp.down_proj.bias.mul_(scales[e])
                outs = outs * scales[:, None, None]
            errors = _errors(outs, residual)  # [E, T]
            labels = errors.argmin(0)
            best2 = errors.topk(2, dim=0, largest=False).values
            weight = best2[1] - best2[0]
            weight = weight / weight.mean().clamp_min(1e-12)
        n = h.shape[0]
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
        train, held = perm[: int(0.8 * n)], perm[int(0.8 * n):]
        scale = h[train].std(0).clamp_min(1e-6)
        weights = _fit_logistic(h[train] / scale, labels[train], weight[train], len(routed), self.iterations)
        with torch.no_grad():
            block.router.weight.copy_((weights / scale).to(block.router.weight.dtype))
            chosen = block.router(h.to(block.router.weight.dtype)).argmax(-1)
            agreement = float((chosen[held] == labels[held]).float().mean())
            load = torch.bincount(chosen, minlength=len(routed)).float() / n
            oracle_load = torch.bincount(labels, minlength=len(routed)).float() / n
        return {"agreement": agreement, "load": load.tolist(), "oracle_load": oracle_load.tolist(),
                "scales": scales.tolist(), "tokens": n}


def _errors(outs: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """Squared distance of each expert's output to the residual the dense group added: ``[E, T]``."""
    return ((outs - residual[None]) ** 2).sum(-1)


def _fit_logistic(x: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, classes: int,
                  iterations: int) -> torch.Tensor:
    """Weighted multinomial logistic regression without bias (the router is a plain linear map)."""
    w = torch.zeros(classes, x.shape[1], requires_grad=True)
    optimizer = torch.optim.LBFGS([w], max_iter=iterations, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = (torch.nn.functional.cross_entropy(x @ w.T, labels, reduction="none") * weight).mean()
        loss = loss + 1e-4 * (w ** 2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return w.detach()
