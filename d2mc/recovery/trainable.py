"""What recovery trains: the routers, the blocks the conversion changed, or everything; and the routers' gate
gradient during training."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

from torch import nn

from d2mc.errors import UserError


def routed_blocks(model) -> list[nn.Module]:
    """Modules with a linear ``router`` (every MoE block of a converted model, whatever the method)."""
    return [m for m in model.modules() if isinstance(getattr(m, "router", None), nn.Linear)]


def changed_blocks(model) -> list[int]:
    """Blocks the conversion changed: those with a router or several experts, without attention, or next to
    parent layers that are gone."""
    config = model.config
    plans = getattr(config, "blocks", None)
    if not plans:
        raise UserError("recovery trains converted models: convert the model first (d2mc convert)")
    present = set()
    for plan in plans:
        present.update(plan.layers)
    parent_layers = config.base_config.num_hidden_layers
    changed = []
    for i, (plan, block) in enumerate(zip(plans, model.model.layers, strict=True)):
        layers = plan.layers
        gone_next = any(0 <= n < parent_layers and n not in present for n in (min(layers) - 1, max(layers) + 1))
        if (plan.attention_layer is None or len(plan.expert_layers) > 1 or gone_next
                or plan.attention_layer != plan.expert_layers[0]
                or isinstance(getattr(block, "router", None), nn.Linear)):
            changed.append(i)
    return changed


def block_boundaries(model) -> list[tuple[int, int]]:
    """``(block, parent layer)`` for each block the conversion changed: the student's hidden state after that block
    stands where the dense parent's stands after that layer (the last parent layer before the next block's first;
    layers dropped in between count as passed)."""
    plans = model.config.blocks
    parent_layers = model.config.base_config.num_hidden_layers
    return [(i, (min(plans[i + 1].layers) - 1) if i + 1 < len(plans) else parent_layers - 1)
            for i in changed_blocks(model)]


def trainable_parameters(model, train: str) -> list[str]:
    """Names of the parameters ``train`` selects (``routers``, ``blocks`` or ``all``)."""
    if train == "all":
        return [name for name, _ in model.named_parameters()]
    if train == "routers":
        names = [name for name, _ in model.named_parameters() if name.split(".")[-2:-1] == ["router"]]
        if not names:
            raise UserError("the model has no routers (drop-layers and drop-attention models have none): train "
                            "'blocks' or 'all'")
        return names
    prefixes = tuple(f"model.layers.{i}." for i in changed_blocks(model))
    names = [name for name, _ in model.named_parameters() if name.startswith(prefixes)]
    if not names:
        raise UserError("the conversion changed no block: there is nothing to recover with --train blocks")
    return names


@contextlib.contextmanager
def trainable(model, names: Sequence[str]):
    """Only ``names`` require gradients inside the block; the previous flags come back afterwards."""
    chosen = set(names)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        for name, p in model.named_parameters():
            p.requires_grad_(name in chosen)
        yield
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])


@contextlib.contextmanager
def router_gradients(model, enabled: bool = True):
    """Give top-1 normalised routers a gradient during training; yields how many blocks get one.

    With one routed expert per token and normalised weights the gate is always exactly 1, so the task loss
    never reaches the router. Inside this block such a block's gate is computed in its training form,
    ``p / p.detach()`` (the block's ``gate_gradient`` flag, see :mod:`d2mc.modeling`): the same value (exactly 1)
    with the gradient of ``log p`` scaled by how much the chosen expert's output helps, as in Switch Transformers.
    Outputs are bit-identical; only training sees the difference."""
    gated = [b for b in routed_blocks(model) if enabled and getattr(b, "top_k", None) == 1
             and getattr(b, "normalize_topk", False) and hasattr(b, "gate_gradient")]
    for block in gated:
        block.gate_gradient = True
    try:
        yield len(gated)
    finally:
        for block in gated:
            block.gate_gradient = False
