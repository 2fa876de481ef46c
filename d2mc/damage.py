"""Measured damage of plan actions: the calibration-loss increase when the dense model is changed as planned.

:class:`DamageProbe` runs the dense parent once over the calibration text and keeps every layer's input (and
post-attention) hidden state. The damage of one action (a block replacing layers ``first..last``) is then measured
from the kept hidden state at ``first``: the action's block, then the parent's remaining layers, then the LM head,
and the mean next-token loss against the dense model's on the same tokens (nats per token; ``exp`` of it is the
perplexity ratio). A whole plan is measured from the embedding. :meth:`DamageProbe.local_error` is the cheap
screen before that: only the action's block runs, and its output is compared with the dense model's after
``last``. Fused blocks get their router (and expert output
scales) fitted on the dense model's own activations, as ``insert-router`` fits them; the dense model is never
changed (fused experts are copies).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence

import torch
from torch import nn

from d2mc.activations import batches, hooks
from d2mc.arch import BlockPlan
from d2mc.modeling import D2MCBlock, family_classes
from d2mc.reconstruction import BATCH_TOKENS, LR, SEED, ReconstructedBlock, reconstruct_experts
from d2mc.restructure import dense_plan, restructure
from d2mc.routing import fit_group_router

log = logging.getLogger(__name__)


class DamageProbe:
    """Calibration-loss increases of single actions and whole plans on a copy of the dense ``model``."""

    def __init__(self, model, calibration: torch.Tensor, batch_size: int = 4):
        self.calibration, self.batch_size = calibration, batch_size
        num_layers = model.config.num_hidden_layers
        self.probe = restructure(copy.deepcopy(model), dense_plan(num_layers)).eval().requires_grad_(False)
        self.dense_blocks = list(self.probe.model.layers)
        self.classes = family_classes(self.probe.config.family)
        self.inputs, mids = self._record()
        self.mids = [m.reshape(-1, m.shape[-1]) for m in mids]
        self.dense_loss = self._loss_from(0, self.dense_blocks)
        self.router_fits: dict[BlockPlan, dict] = {}
        self.expert_outputs: dict[tuple[int, int], torch.Tensor] = {}
        self.reconstructed: dict[BlockPlan, ReconstructedBlock] = {}

    @property
    def num_layers(self) -> int:
        return len(self.dense_blocks)

    @torch.no_grad()
    def _record(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Every block's input ``[N, S, H]`` (and, after them, the last block's output) and every block's
        post-attention hidden state."""
        inputs: list[list[torch.Tensor]] = [[] for _ in range(self.num_layers + 1)]
        mids: list[list[torch.Tensor]] = [[] for _ in range(self.num_layers)]
        handles = []
        for i, block in enumerate(self.dense_blocks):
            handles.append(block.register_forward_pre_hook(
                lambda m, args, kwargs, i=i: inputs[i].append(args[0].float()), with_kwargs=True))
            handles.append(block.experts[0].post_attention_layernorm.register_forward_pre_hook(
                lambda m, args, i=i: mids[i].append(args[0].float())))
        handles.append(self.dense_blocks[-1].register_forward_hook(
            lambda m, args, kwargs, out: inputs[-1].append(out.float()), with_kwargs=True))
        with hooks(handles):
            for batch in batches(self.calibration, self.batch_size):
                self.probe.model(batch, use_cache=False)
        return [torch.cat(x) for x in inputs], [torch.cat(x) for x in mids]

    @torch.no_grad()
    def local_error(self, first: int, last: int, plan: BlockPlan | None) -> float:
        """How far the block ``plan`` (None: nothing) lands from the dense model's hidden state after ``last``,
        from the recorded input at ``first``: the squared error relative to that hidden state's squared norm."""
        target = self.inputs[last + 1]
        if plan is None:
            return float((self.inputs[first] - target).pow(2).sum() / target.pow(2).sum())
        block = self.block(plan)
        outputs = []
        handle = block.register_forward_hook(lambda m, args, kwargs, out: outputs.append(out.float()),
                                             with_kwargs=True)
        model = self.probe.model
        kept = model.layers
        model.layers = nn.ModuleList([block])
        try:
            for start in range(0, self.calibration.shape[0], self.batch_size):
                model(inputs_embeds=self.inputs[first][start: start + self.batch_size].to(self.probe.dtype),
                      use_cache=False)
        finally:
            model.layers = kept
            handle.remove()
        return float((torch.cat(outputs) - target).pow(2).sum() / target.pow(2).sum())

    @torch.no_grad()
    def _loss_from(self, start: int, blocks: Sequence[nn.Module]) -> float:
        """Mean next-token loss of running ``blocks`` from the recorded input of parent layer ``start``."""
        model = self.probe
        kept = model.model.layers
        model.model.layers = nn.ModuleList(blocks)
        total, count = 0.0, 0
        try:
            for first in range(0, self.calibration.shape[0], self.batch_size):
                ids = self.calibration[first: first + self.batch_size]
                hidden = self.inputs[start][first: first + self.batch_size]
                logits = model(inputs_embeds=hidden.to(model.dtype), use_cache=False).logits[:, :-1].float()
                total += float(nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                           ids[:, 1:].reshape(-1), reduction="sum"))
                count += ids[:, 1:].numel()
        finally:
            model.model.layers = kept
        return total / count

    def block(self, plan: BlockPlan) -> nn.Module:
        """The block ``plan`` builds, from the dense model's modules: attention and norms shared, the experts of a
        routed block copied (its router fit scales them), its router fitted on the dense model's activations once
        per plan and reused."""
        if plan == BlockPlan.dense(plan.attention_layer):
            return self.dense_blocks[plan.attention_layer]
        block = self._build(plan)
        if block.router is not None:
            if plan in self.router_fits:
                _apply_fit(block, self.router_fits[plan])
            else:
                h = self.mids[plan.expert_layers[0]]
                y = self.inputs[plan.expert_layers[-1] + 1].reshape(-1, h.shape[-1])
                fit = fit_group_router(block, h.to(self.probe.dtype), y.to(self.probe.dtype),
                                       outputs=[self._expert_output(plan.expert_layers[0], layer)
                                                for layer in plan.expert_layers])
                self.router_fits[plan] = {**fit, "router": block.router.weight.detach().clone()}
        return block.eval()

    def _build(self, plan: BlockPlan) -> nn.Module:
        """The block ``plan`` builds before its router is fitted (a routed block's router untrained)."""
        has_attention = plan.attention_layer is not None
        with torch.device("meta"):
            block = D2MCBlock(self.probe.model.attention_config, plan, self.classes, 0 if has_attention else None)
        if has_attention:
            source = self.dense_blocks[plan.attention_layer]
            block.self_attn, block.input_layernorm = source.self_attn, source.input_layernorm
        routed = block.router is not None
        block.experts = nn.ModuleList(
            copy.deepcopy(self.dense_blocks[layer].experts[0]) if routed else self.dense_blocks[layer].experts[0]
            for layer in plan.expert_layers)
        if routed:
            block.router = nn.Linear(block.router.in_features, block.router.out_features, bias=False,
                                     dtype=self.probe.dtype)
        return block

    @torch.no_grad()
    def _expert_output(self, first: int, layer: int) -> torch.Tensor:
        """Parent layer ``layer``'s MLP (with its norm) on the post-attention hidden state of layer ``first``, fp32,
        computed once: the router fits of every group starting at ``first`` share it."""
        if (first, layer) not in self.expert_outputs:
            expert = self.dense_blocks[layer].experts[0]
            self.expert_outputs[first, layer] = expert(self.mids[first].to(self.probe.dtype)).float()
        return self.expert_outputs[first, layer]

    def action_damage(self, first: int, last: int, plan: BlockPlan | None) -> float:
        """The loss increase of replacing parent layers ``first..last`` by the block ``plan`` (None: dropping them),
        every other layer dense."""
        blocks = ([self.block(plan)] if plan is not None else []) + self.dense_blocks[last + 1:]
        return self._loss_from(first, blocks) - self.dense_loss

    def plan_damage(self, blocks: Sequence[BlockPlan], reconstructed: bool = False) -> float:
        """The loss increase of the whole plan ``blocks`` (the ``config.blocks`` of a converted model); with
        ``reconstructed``, its blocks that :meth:`reconstruct` trained as it left them."""
        return self._loss_from(0, [self.reconstructed[p].block if reconstructed and p in self.reconstructed
                                   else self.block(p) for p in blocks]) - self.dense_loss

    def reconstruct(self, plan: BlockPlan, h: torch.Tensor, y: torch.Tensor, steps: int) -> ReconstructedBlock:
        """Build the fused block ``plan`` as the conversion does, from the group's post-attention hidden state ``h``
        of its first layer and output ``y`` of its last (``[T, H]``, on the calibration text): its router fitted
        (``insert-router``), its experts trained ``steps`` steps to reproduce the dense group and its router fitted
        again (``reconstruct-blocks``); kept for :meth:`plan_damage` and for the conversion to take as it is."""
        block = self._build(plan)
        fit_group_router(block, h, y)
        before, after = reconstruct_experts(block, h, y, steps)
        router = fit_group_router(block, h, y)
        found = ReconstructedBlock(block.eval(), (steps, LR, BATCH_TOKENS, SEED),
                                   {"mse_before": before, "mse_after": after, "router": router})
        self.reconstructed[plan] = found
        return found


@torch.no_grad()
def _apply_fit(block: D2MCBlock, fit: dict) -> None:
    """A router fit (weights, and the expert output scales folded into ``down_proj``) on a fresh copy of its block."""
    block.router.weight.copy_(fit["router"])
    for expert, scale in zip(block.experts[block.shared_experts:], fit["scales"], strict=True):
        expert.mlp.down_proj.weight.mul_(scale)
        if getattr(expert.mlp.down_proj, "bias", None) is not None:
            expert.mlp.down_proj.bias.mul_(scale)
