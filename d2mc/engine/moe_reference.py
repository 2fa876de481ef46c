"""The exact math of the ``D2mcMoE`` plugin in PyTorch: the reference its CUDA kernels are tested against.

It follows the kernels' rounding points, so an fp16 comparison measures the kernels and not a different
order of roundings: routing in fp32; each expert's gate and up products accumulated in fp32, the SwiGLU
activation rounded to the tensor type (the kernels keep it in a workspace of that type); the down product
accumulated in fp32 and weighted in fp32; one rounding of the sum to the tensor type at the end.
"""

from __future__ import annotations

import torch

from d2mc.engine.plugin_spec import MoePluginAttributes


def route(router_logits: torch.Tensor, top_k: int, normalize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights (fp32) and indices of the top_k routed experts per token, ``[T, top_k]`` each (``normalize``: 0
    softmax probability, 1 renormalised, 2 weight 1)."""
    logits = router_logits.float()
    probs = torch.softmax(logits, dim=-1)
    # chosen by the logits (a saturated softmax ties); torch.topk does not promise an order among equal values,
    # the kernel takes the lower index first
    order = torch.argsort(-logits, dim=-1, stable=True)[:, :top_k]
    weights = probs.gather(-1, order)
    if normalize == 2:
        weights = torch.ones_like(weights)
    elif normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, order


def expert_outputs(x: torch.Tensor, fc1: torch.Tensor, fc2: torch.Tensor, expert: int) -> torch.Tensor:
    """One expert's SwiGLU MLP on rows ``x`` ``[n, H]``, fp32 result (before the routing weight)."""
    rows = fc1[expert].float()
    gate, up = rows[0::2], rows[1::2]  # interleaved: row 2i gate_i, row 2i+1 up_i
    xf = x.float()
    act = (torch.nn.functional.silu(xf @ gate.T) * (xf @ up.T)).to(x.dtype).float()
    return act @ fc2[expert].float().T


def moe_reference(hidden: torch.Tensor, router_logits: torch.Tensor, fc1: torch.Tensor, fc2: torch.Tensor,
                  attributes: MoePluginAttributes) -> torch.Tensor:
    """What one ``D2mcMoE`` node outputs, in the dtype of ``hidden``."""
    a = attributes
    shape = hidden.shape
    x = hidden.reshape(-1, a.hidden_size)
    logits = router_logits.reshape(-1, a.num_experts)
    if tuple(fc1.shape) != a.fc1_shape() or tuple(fc2.shape) != a.fc2_shape():
        raise ValueError(f"fc1 {tuple(fc1.shape)} / fc2 {tuple(fc2.shape)} do not match {a.fc1_shape()} / "
                         f"{a.fc2_shape()}")
    out = torch.zeros(x.shape[0], a.hidden_size, dtype=torch.float32)
    for s in range(a.num_shared):
        out += expert_outputs(x, fc1, fc2, s)
    weights, indices = route(logits, a.top_k, a.normalize)
    for e in range(a.num_experts):
        token, slot = torch.where(indices == e)
        if token.numel():
            y = expert_outputs(x[token], fc1, fc2, a.num_shared + e)
            out.index_add_(0, token, y * weights[token, slot, None])
    return out.to(hidden.dtype).reshape(shape)
