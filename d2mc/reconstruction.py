"""Block-wise reconstruction: train a fused block's experts to reproduce the dense group of layers it replaced
(the ``reconstruct-blocks`` pass, and the plan search's measure of a plan as the conversion will build it)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ReconstructedBlock:
    """A fused block built and reconstructed as the conversion does (by the plan search, which measured it): its
    router fitted, its experts trained ``steps`` steps, its router fitted again; ``stats`` are the reconstruction's
    error before and after (``mse_before``, ``mse_after``) and the last router fit's statistics (``router``);
    ``settings`` the reconstruction's steps, learning rate, batch tokens and seed."""

    block: nn.Module
    settings: tuple[int, float, int, int]
    stats: dict


LR, BATCH_TOKENS, SEED = 3e-4, 512, 0  # a reconstruction's defaults


def reconstruct_experts(block, h: torch.Tensor, y: torch.Tensor, steps: int, lr: float = LR,
                        batch_tokens: int = BATCH_TOKENS, seed: int = SEED) -> tuple[float, float]:
    """Train ``block``'s experts so that ``h + experts(h)`` matches ``y`` (the group's post-attention hidden state of
    its first layer in, ``[T, H]``, and its last layer's output out), with Adam in fp32 whatever the block's dtype
    and the routing held at the router's current choice. The experts are trained as copies (the dense parent may
    share their weights) and put back in the block's dtype; the router does not change. Returns the mean squared
    error before and after."""
    experts, router = block.experts, block.router
    dtype = router.weight.dtype
    flags = [p.requires_grad for p in experts.parameters()]
    block.experts = copy.deepcopy(experts).float().requires_grad_(True)
    block.router = copy.deepcopy(router).float().requires_grad_(False)
    try:
        before, after = _fit(block, h, y, steps, lr, batch_tokens, seed)
    finally:
        trained = block.experts.to(dtype)
        for p, flag in zip(trained.parameters(), flags, strict=True):
            p.requires_grad_(flag)
        block.experts, block.router = trained, router
    return before, after


def _fit(block, h: torch.Tensor, y: torch.Tensor, steps: int, lr: float, batch_tokens: int,
         seed: int) -> tuple[float, float]:
    optimizer = torch.optim.Adam(block.experts.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    target = y - h

    def loss_on(rows):
        x = h[rows]
        out = sum((e(x) for e in block.experts[: block.shared_experts]), torch.zeros_like(x))
        out = out + block.dispatch(x)
        return torch.nn.functional.mse_loss(out, target[rows])

    everything = torch.arange(h.shape[0], device=h.device)
    with torch.no_grad():
        before = float(loss_on(everything))
    for _ in range(steps):
        rows = torch.randint(0, h.shape[0], (batch_tokens,), generator=generator).to(h.device)
        optimizer.zero_grad()
        loss_on(rows).backward()
        optimizer.step()
    with torch.no_grad():
        after = float(loss_on(everything))
    return before, after
