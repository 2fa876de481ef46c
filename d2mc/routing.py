"""Routers fitted without training: a block's router is a linear map of its hidden state (no bias), fitted by
L-BFGS to choose the experts that calibration activations say are best.

- :func:`fit_router` is the one fit: multinomial logistic regression on hard labels or on soft targets.
- :func:`fit_group_router`: a fused LF-UC block against the dense group of layers it replaced (insert-router,
  and again after reconstruct-blocks trained the experts).
- :func:`fit_mass_router`: experts cut from MLPs, against the share of each token's contribution they hold
  (split-experts).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from d2mc.teacher import own_parameters

FIT_SHARE = 0.8  # of the calibration tokens, the share a router is fitted on; the rest measure agreement


def fit_router(x: torch.Tensor, targets: torch.Tensor, iterations: int, *, classes: int | None = None,
               weight: torch.Tensor | None = None) -> torch.Tensor:
    """The ``[classes, features]`` weight of a linear map without bias whose softmax over ``x @ W.T`` predicts
    ``targets``: class indices ``[T]`` (then ``classes`` says how many) or probabilities ``[T, classes]``.
    ``weight`` ``[T]`` weights each token's cross-entropy; a small L2 penalty keeps the map finite when the
    classes separate."""
    if targets.is_floating_point():
        classes = targets.shape[1]
    elif classes is None:
        raise ValueError("class indices as targets need the number of classes")
    w = torch.zeros(classes, x.shape[1], device=x.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([w], max_iter=iterations, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        losses = torch.nn.functional.cross_entropy(x @ w.T, targets, reduction="none")
        loss = (losses if weight is None else losses * weight).mean() + 1e-4 * (w ** 2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return w.detach()


def split_tokens(n: int, seed: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded split of ``n`` token positions into those the router is fitted on and those held back (the same
    split on every device)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(device)
    cut = int(FIT_SHARE * n)
    return perm[:cut], perm[cut:]


def fit_group_router(block, h: torch.Tensor, y: torch.Tensor, fit_scales: bool = True, iterations: int = 60,
                     outputs: Sequence[torch.Tensor] | None = None) -> dict:
    """Fit a fused block to the dense group it replaced, from the group's post-attention hidden state ``h`` (of its
    first layer) and output ``y`` (of its last), both ``[T, H]``.

    For every token the best expert is the one whose output, added to ``h``, lands closest to ``y``. With
    ``fit_scales`` each routed expert's output is first rescaled by the least-squares factor on its tokens (folded
    into ``down_proj``, which gets storage of its own first: the dense parent may share it). The router is then
    fitted to pick the best expert, each token's cross-entropy weighted by how much the choice matters (the gap
    between the best and second-best expert). Returns router agreement on held-back tokens, the router's and the
    best choice's load, the scales and the token count. Runs on the device of ``h``; the block's weights may be in
    any dtype (the fit is in fp32). ``outputs``: the block's experts' outputs on ``h`` (fp32, in their order) when the
    caller has them already."""
    shared = block.shared_experts
    routed = block.experts[shared:]
    dtype = block.router.weight.dtype
    with torch.no_grad():
        if outputs is None:
            x = h.to(dtype)
            outputs = [e(x).float() for e in block.experts]
            del x
        residual = y - h - sum(outputs[:shared], torch.zeros_like(h))
        outs = torch.stack(list(outputs[shared:]))  # [E, T, H]
        scales = torch.ones(len(routed), device=h.device)
        if fit_scales:
            labels = _errors(outs, residual).argmin(0)
            for e, expert in enumerate(routed):
                mine = labels == e
                if mine.any():
                    num = (outs[e, mine] * residual[mine]).sum()
                    den = (outs[e, mine] ** 2).sum().clamp_min(1e-12)
                    scales[e] = (num / den).clamp(0.5, 4.0)
                own_parameters(expert.mlp.down_proj)
                expert.mlp.down_proj.weight.mul_(float(scales[e]))
                if getattr(expert.mlp.down_proj, "bias", None) is not None:
                    expert.mlp.down_proj.bias.mul_(float(scales[e]))
            outs.mul_(scales[:, None, None])
        errors = _errors(outs, residual)  # [E, T]
        labels = errors.argmin(0)
        best2 = errors.topk(2, dim=0, largest=False).values
        weight = best2[1] - best2[0]
        weight = weight / weight.mean().clamp_min(1e-12)
        del outs
    n = h.shape[0]
    train, held = split_tokens(n, 0, h.device)
    scale = h[train].std(0).clamp_min(1e-6)
    weights = fit_router(h[train] / scale, labels[train], iterations, classes=len(routed), weight=weight[train])
    with torch.no_grad():
        block.router.weight.copy_((weights / scale).to(dtype))
        chosen = block.router(h.to(dtype)).argmax(-1)
        agreement = float((chosen[held] == labels[held]).float().mean())
        load = torch.bincount(chosen, minlength=len(routed)).float() / n
        oracle_load = torch.bincount(labels, minlength=len(routed)).float() / n
    return {"agreement": agreement, "load": load.tolist(), "oracle_load": oracle_load.tolist(),
            "scales": scales.cpu().tolist(), "tokens": n}


def _errors(outs: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """Squared distance of each expert's output to the residual the dense group added: ``[E, T]``."""
    return ((outs - residual[None]) ** 2).sum(-1)


def fit_mass_router(block, h: torch.Tensor, expert_activity: list[torch.Tensor], iterations: int = 100,
                    seed: int = 0) -> dict:
    """Fit the router of a block of experts cut from MLPs to the experts that hold most of each token's
    contribution (soft cross-entropy on the routed experts' output norms), from the block's hidden state ``h``
    ``[T, H]``. ``expert_activity[e]`` (``[T]`` bool) says on which tokens routed expert ``e``'s source MLP was
    used at all (an MLP its own source block did not choose carries nothing). Returns top-k agreement with the
    best experts and the share of their mass captured, both on held-back tokens, and the load."""
    routed = block.experts[block.shared_experts:]
    with torch.no_grad():
        dtype = block.router.weight.dtype
        mass = torch.stack([e(h.to(dtype)).float().norm(dim=-1) for e in routed], 1)  # [T, R]
        for e, active in enumerate(expert_activity):
            mass[:, e] *= active.to(mass.device, mass.dtype)
    n = h.shape[0]
    train, held = split_tokens(n, seed, h.device)
    x = h / h.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-6)  # top-k does not depend on the token's scale
    scale = x[train].std(0).clamp_min(1e-6)
    target = mass / mass.sum(-1, keepdim=True).clamp_min(1e-12)
    weights = fit_router(x[train] / scale, target[train], iterations)
    with torch.no_grad():
        block.router.weight.copy_((weights / scale).to(dtype))
        k = block.top_k
        chosen = block.router(x.to(dtype)).float().topk(k, dim=-1).indices
        oracle = mass.topk(k, dim=-1).indices
        overlap = (chosen[:, :, None] == oracle[:, None, :]).any(-1).float().sum(-1) / k
        captured = mass.gather(1, chosen).sum(-1)
        best = mass.gather(1, oracle).sum(-1).clamp_min(1e-12)
        load = torch.bincount(chosen.reshape(-1), minlength=len(routed)).float() / chosen.numel()
    return {"agreement": float(overlap[held].mean()), "mass_recall": float((captured / best)[held].mean()),
            "load": load.tolist(), "tokens": n, "top_k": k, "routed_experts": len(routed)}
