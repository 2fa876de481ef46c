"""The recovery loss terms: KL to the teacher (full or from a cached top-k), the routers' load balance, and the
hidden-state loss at the boundaries of converted blocks."""

from __future__ import annotations

import torch


def kl_full(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(teacher_T || student_T)`` per token, averaged over tokens."""
    t = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    s = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean() * temperature ** 2


def kl_topk(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor, teacher_indices: torch.Tensor,
            temperature: float) -> torch.Tensor:
    """KL to a cached top-k teacher: the k tokens plus one bucket for the rest of the vocabulary."""
    s = torch.log_softmax(student_logits.float() / temperature, dim=-1).gather(-1, teacher_indices)
    p = teacher_logprobs.exp()
    p_rest = (1 - p.sum(-1)).clamp_min(1e-8)
    q_rest = (1 - s.exp().sum(-1)).clamp_min(1e-8)
    kl = (p * (teacher_logprobs - s)).sum(-1) + p_rest * (p_rest.log() - q_rest.log())
    return kl.mean() * temperature ** 2


def balance_loss(router_logits: list[tuple[torch.Tensor, int]]) -> torch.Tensor | None:
    """Switch-style load balance ``E * sum_e f_e P_e``, averaged over routers (1 when perfectly balanced)."""
    terms = []
    for logits, k in router_logits:
        probs = torch.softmax(logits.float().reshape(-1, logits.shape[-1]), dim=-1)
        experts = probs.shape[-1]
        chosen = probs.topk(min(k, experts), dim=-1).indices
        share = torch.zeros(experts, device=probs.device).scatter_add_(
            0, chosen.reshape(-1), torch.ones(chosen.numel(), device=probs.device)) / chosen.numel()
        terms.append(experts * (share * probs.mean(0)).sum())
    return torch.stack(terms).mean() if terms else None


def hidden_loss(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor | None:
    """Mean over ``(student, teacher)`` hidden-state pairs of the squared error per token relative to the teacher's
    squared norm there (so that every boundary counts alike, whatever the scale of the residual stream at its
    depth)."""
    terms = [((s.float() - t.float()) ** 2).sum(-1).div(t.float().pow(2).sum(-1).clamp_min(1e-6)).mean()
             for s, t in pairs]
    return torch.stack(terms).mean() if terms else None
