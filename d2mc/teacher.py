"""The dense parent beside a model under conversion, without a second copy of its weights.

A conversion moves the parent's modules into the converted model and changes only some of them: the experts of
fused blocks (rescaled, reconstructed), the parameters recovery trains. The teacher that passes and recovery
compare with is :func:`frozen_alias`: its own module objects over the parent's parameter storage, so it costs no
memory until something changes. Whatever writes a parameter of the converted model in place first gives it storage
of its own with :func:`own_parameters`; the teacher keeps the parent's values, and only what changed is held twice.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn


def frozen_alias(model: nn.Module) -> nn.Module:
    """A frozen copy of ``model`` (eval mode, no gradients) whose parameters and buffers share ``model``'s storage.

    The modules are new objects, so moving them into a converted model or replacing their parameters leaves the
    copy as it was; writing into a shared tensor in place would change both (see :func:`own_parameters`)."""
    memo: dict[int, object] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(p.detach(), requires_grad=False)
    for b in model.buffers():
        memo[id(b)] = b
    return copy.deepcopy(model, memo).eval()


@torch.no_grad()
def own_parameters(module: nn.Module, names: Iterable[str] | None = None, dtype: torch.dtype | None = None) -> None:
    """Give the parameters of ``module`` (those named in ``names``, or all) storage of their own, optionally in
    ``dtype``; a parameter that appears under several names (tied weights) stays one parameter."""
    wanted = None if names is None else set(names)
    chosen = {id(p) for name, p in module.named_parameters() if wanted is None or name in wanted}
    copies: dict[int, nn.Parameter] = {}
    for sub in module.modules():
        for name, p in list(sub.named_parameters(recurse=False)):
            if id(p) not in chosen:
                continue
            if id(p) not in copies:
                copies[id(p)] = nn.Parameter(p.detach().to(dtype or p.dtype, copy=True), requires_grad=p.requires_grad)
            setattr(sub, name, copies[id(p)])
