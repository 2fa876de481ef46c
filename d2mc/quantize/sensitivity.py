"""Calibrated mixed precision: which int4 matrices of a model go to int8, from what their int4 error costs the loss
on calibration text.

Each group of Linears that read one input (q/k/v; one MLP's or expert's gate and up; o; down) gets one bit width,
as MatMulNBits packs them. Its cost is the increase of the calibration loss its int4 error causes, to second order
around the float model: ``1/2 sum(F * dW**2)`` with ``F`` the diagonal Fisher information of the loss (squared
gradients, summed over calibration sequences) and ``dW`` the weight's quantization error. Moving a group to int8
gains its int4 cost minus its int8 cost, for the bytes int8 adds; the groups with the most gain per added byte move
until the added bytes reach :data:`INT8_SHARE` of what moving every group would add. An expert's gradients come
only from the tokens its router sends it; the quantizer scores a block's experts together (their gate and up; their
down), so that every expert of a block stores one matrix alike (:class:`d2mc.weight_plan.WeightPlan`).

One forward and backward per calibration sequence, over the first :data:`FISHER_TOKENS` tokens of the calibration
text: SmolLM2-135M's forward and backward took about 20-30 s per 256-token sequence on a 2-core CPU shared with two
other heavy processes, and quantizing stays within 2 minutes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from d2mc.quantize.linear import QuantizedLinear

# the byte budget: a share of the bytes that every int4 matrix at int8 would add. On SmolLM2-135M (rtn, block 64,
# 4,096 held-out tokens, PyTorch) 0.3 scored as the mixed-layers-ends preset at about its bytes (36.78 against 36.87),
# 0.4 1.068x the fp32 perplexity at +5 MB more, 0.5 1.060x at +10 MB: docs/quantization.md
INT8_SHARE = 0.4

# 4 sequences of the default 256 tokens: on SmolLM2-135M all 16 of them (4,096 tokens) chose a set that scored the
# same (36.78 at share 0.3) in 460-580 s instead of 60-90 s, the machine shared
FISHER_TOKENS = 1024

Group = Sequence[tuple[str, nn.Linear]]


@dataclass(frozen=True)
class GroupCost:
    """One group of Linears reading one input: its names, the loss its int4 and int8 errors add (second order),
    and the bytes int8 adds over int4."""

    names: tuple[str, ...]
    int4_cost: float
    int8_cost: float
    added_bytes: int

    @property
    def gain(self) -> float:
        return self.int4_cost - self.int8_cost


def fisher_sequences(length: int) -> int:
    """How many calibration sequences of ``length`` tokens :func:`fisher_diagonal` reads."""
    return max(1, FISHER_TOKENS // length)


def fisher_diagonal(model, calibration: torch.Tensor, modules: Sequence[nn.Linear]) -> dict[nn.Linear, torch.Tensor]:
    """The diagonal Fisher information of the next-token loss of ``model`` on ``calibration`` (``[n, length]``
    token ids; its first :data:`FISHER_TOKENS` tokens, at least one sequence) for the weight of each of ``modules``:
    squared gradients, one sequence at a time, summed."""
    calibration = calibration[: fisher_sequences(calibration.shape[1])]
    parameters = list(model.parameters())
    before = [p.requires_grad for p in parameters]
    for p in parameters:
        p.requires_grad_(False)
    fisher = {m: torch.zeros_like(m.weight, dtype=torch.float32) for m in modules}
    try:
        for m in modules:
            m.weight.requires_grad_(True)
        with torch.enable_grad():
            for sequence in calibration:
                ids = sequence[None].to(next(model.parameters()).device)
                logits = model(ids, use_cache=False).logits[:, :-1].float()
                loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
                grads = torch.autograd.grad(loss, [m.weight for m in modules], allow_unused=True)
                for m, grad in zip(modules, grads, strict=True):
                    if grad is not None:  # an expert no token of this sequence reached
                        fisher[m] += grad.float() ** 2
    finally:
        for p, flag in zip(parameters, before, strict=True):
            p.requires_grad_(flag)
    return fisher


def group_costs(groups: Sequence[Group], fisher: dict[nn.Linear, torch.Tensor],
                quantize: Callable[[str, nn.Linear, int], QuantizedLinear]) -> list[GroupCost]:
    """The cost of each group at int4 and int8 (``quantize(name, module, bits)``: the weight as the quantizer would
    store it)."""
    costs = []
    for group in groups:
        int4_cost = int8_cost = 0.0
        added = 0
        for name, module in group:
            weight = module.weight.detach().float()
            low, high = quantize(name, module, 4), quantize(name, module, 8)
            int4_cost += 0.5 * float((fisher[module] * (weight - low.dequantize()) ** 2).sum())
            int8_cost += 0.5 * float((fisher[module] * (weight - high.dequantize()) ** 2).sum())
            added += high.nbytes() - low.nbytes()
        costs.append(GroupCost(tuple(name for name, _ in group), int4_cost, int8_cost, added))
    return costs


def choose_int8(costs: Sequence[GroupCost], share: float = INT8_SHARE) -> tuple[str, ...]:
    """The names of the matrices to move to int8: whole groups, the most gain per added byte first, while the added
    bytes stay within ``share`` of what moving every group would add (a group that would pass the budget is
    skipped for smaller ones after it)."""
    budget = share * sum(c.added_bytes for c in costs)
    chosen, spent = [], 0
    for cost in sorted(costs, key=lambda c: c.gain / c.added_bytes, reverse=True):
        if cost.gain > 0 and spent + cost.added_bytes <= budget:
            chosen += cost.names
            spent += cost.added_bytes
    return tuple(sorted(chosen))
