"""Assembling a converted model from the modules of its dense parent (or of an earlier converted model).

:func:`restructure` builds the :class:`~d2mc.modeling.D2MCMoEForCausalLM` of a list of block plans, moving the
source's modules into it (the source is consumed); :func:`parent_modules` finds those modules by parent layer.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PretrainedConfig

from d2mc.arch import BlockPlan
from d2mc.modeling import D2MCBlock, D2MCExpert, D2MCMoEConfig, D2MCMoEForCausalLM


@dataclass(frozen=True)
class ParentModules:
    """The dense parent's modules by layer number, found in a dense model or a converted one.

    ``mlp``/``post_norm`` hold the whole MLPs (with their norms) by layer; an MLP that a converted model holds as
    several experts (copies or slices) is found only under ``experts``, which maps each converted block's
    :attr:`~d2mc.arch.BlockPlan.expert_signature` to its experts (and ``routers`` to its router), so an unchanged
    block is carried over as it is.
    """

    attention: dict[int, nn.Module] = field(default_factory=dict)
    input_norm: dict[int, nn.Module] = field(default_factory=dict)
    mlp: dict[int, nn.Module] = field(default_factory=dict)
    post_norm: dict[int, nn.Module] = field(default_factory=dict)
    experts: dict[tuple, list[nn.Module]] = field(default_factory=dict)
    routers: dict[tuple, nn.Module] = field(default_factory=dict)


def parent_modules(model) -> ParentModules:
    """The :class:`ParentModules` of a dense model or a converted one."""
    found = ParentModules()
    if isinstance(model, D2MCMoEForCausalLM):
        for block, plan in zip(model.model.layers, model.config.blocks, strict=False):
            if plan.attention_layer is not None:
                found.attention[plan.attention_layer] = block.self_attn
                found.input_norm[plan.attention_layer] = block.input_layernorm
            layers = plan.expert_layers
            whole = not plan.expert_intermediate
            for layer, expert in zip(layers, block.experts, strict=False):
                if whole and layers.count(layer) == 1:
                    found.mlp[layer] = expert.mlp
                    found.post_norm[layer] = expert.post_attention_layernorm
            found.experts[plan.expert_signature] = list(block.experts)
            if block.router is not None:
                found.routers[plan.expert_signature] = block.router
    else:
        for i, layer in enumerate(model.model.layers):
            found.attention[i], found.input_norm[i] = layer.self_attn, layer.input_layernorm
            found.mlp[i], found.post_norm[i] = layer.mlp, layer.post_attention_layernorm
    return found


def restructure(model, blocks: list[BlockPlan]) -> D2MCMoEForCausalLM:
    """Assemble a converted model with the block plans ``blocks`` (or their ``config.json`` dicts) from the modules
    of ``model``.

    ``model`` is a dense model or a converted one; its modules are moved, not copied, so it must not be used
    afterwards. A block whose experts are unchanged keeps them and its router; otherwise each expert is made from
    its layer's whole MLP: the MLP itself, a copy when the layer gives several experts of its full size, or
    consecutive slices of its neurons when it gives ``n`` experts of ``1/n`` of its size (a down-projection bias,
    if any, goes to the first slice). A new router starts at zero (uniform routing) until a pass fits it.
    """
    base = model.config.base_config if isinstance(model, D2MCMoEForCausalLM) else _plain_base_config(model.config)
    config = D2MCMoEConfig(base_config=base, blocks=blocks)
    config._attn_implementation = model.config._attn_implementation
    with torch.device("meta"):
        converted = D2MCMoEForCausalLM(config)
    modules = parent_modules(model)
    attention_config = converted.model.attention_config
    dtype = model.lm_head.weight.dtype
    for b, (block, plan) in enumerate(zip(converted.model.layers, config.blocks, strict=False)):
        if block.self_attn is not None:
            attention = modules.attention[plan.attention_layer]
            attention.layer_idx = block.self_attn.layer_idx
            attention.config = attention_config
            if hasattr(attention, "layer_type"):
                attention.layer_type = block.self_attn.layer_type
                attention.sliding_window = block.self_attn.sliding_window
            block.self_attn = attention
            block.input_layernorm = modules.input_norm[plan.attention_layer]
        signature = plan.expert_signature
        if signature in modules.experts:
            block.experts = nn.ModuleList(modules.experts[signature])
        else:
            _experts_from_mlps(b, block, plan, modules, dtype)
        if block.router is not None:
            router = modules.routers.get(signature)
            if router is None:
                router = nn.Linear(config.hidden_size, block.router.out_features, bias=False, dtype=dtype,
                                   device=model.lm_head.weight.device)
                nn.init.zeros_(router.weight)
            block.router = router
    converted.model.embed_tokens = model.model.embed_tokens
    converted.model.norm = model.model.norm
    converted.model.rotary_emb = model.model.rotary_emb
    converted.model.rotary_emb.config = attention_config
    converted.lm_head = model.lm_head
    if config.tie_word_embeddings:
        converted.lm_head.weight = converted.model.embed_tokens.weight
    return converted.eval()


def _experts_from_mlps(b: int, block: D2MCBlock, plan: BlockPlan, modules: ParentModules, dtype: torch.dtype
                       ) -> None:
    """Fill ``block.experts`` from whole parent MLPs: the MLP itself, copies of it, or slices of its neurons."""
    layers = plan.expert_layers
    seen: dict[int, int] = {}
    for i, layer in enumerate(layers):
        if layer not in modules.mlp:
            raise ValueError(f"block {b}: layer {layer}'s MLP is not available whole in the source model (it is "
                             "already split into experts there)")
        mlp, norm = modules.mlp[layer], modules.post_norm[layer]
        occurrence = seen[layer] = seen.get(layer, -1) + 1
        count = layers.count(layer)
        whole = mlp.gate_proj.out_features
        size = plan.expert_intermediate or whole
        if size == whole:
            block.experts[i] = D2MCExpert(norm if occurrence == 0 else copy.deepcopy(norm),
                                          mlp if occurrence == 0 else copy.deepcopy(mlp))
        elif size * count == whole:
            template = block.experts[i].mlp.to_empty(device=mlp.gate_proj.weight.device).to(dtype)
            _copy_slice(template, mlp, occurrence * size, (occurrence + 1) * size, first=occurrence == 0)
            block.experts[i] = D2MCExpert(copy.deepcopy(norm), template)
        else:
            raise ValueError(f"block {b}: {count} expert(s) of {size} neurons from layer {layer}'s MLP of {whole}: "
                             f"a layer gives copies ({whole} neurons each) or a partition ({count} x {size} = "
                             f"{count * size}, not {whole})")


@torch.no_grad()
def _copy_slice(target: nn.Module, source: nn.Module, start: int, stop: int, first: bool) -> None:
    """Neurons ``start:stop`` of the SwiGLU MLP ``source`` into the smaller MLP ``target``."""
    for name in ("gate_proj", "up_proj"):
        src, dst = getattr(source, name), getattr(target, name)
        dst.weight.copy_(src.weight[start:stop])
        if src.bias is not None:
            dst.bias.copy_(src.bias[start:stop])
    target.down_proj.weight.copy_(source.down_proj.weight[:, start:stop])
    if source.down_proj.bias is not None:
        target.down_proj.bias.copy_(source.down_proj.bias if first else torch.zeros_like(source.down_proj.bias))


def dense_plan(num_layers: int) -> list[BlockPlan]:
    """The plan that reproduces a dense model block for block."""
    return [BlockPlan.dense(i) for i in range(num_layers)]


def _plain_base_config(config) -> PretrainedConfig:
    config = config.__class__.from_dict(config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config
