"""The converted model: a Hugging Face model class whose blocks are Dense2MoE blocks.

Each block is an optional attention (reused from the source family: Llama, Qwen2, Qwen3, Mistral), then one or
more MLP experts, each an MLP of the dense parent with the post-attention norm of its own layer::

    h   = x + self_attn(input_layernorm(x))            # or h = x when the block has no attention
    out = h + sum_{e shared} expert_e(h)               # always-active experts
            + sum_{e in top-k} w_e * expert_e(h)       # routed experts
    expert_e(h) = mlp_e(post_attention_layernorm_e(h))
    p = softmax(router(h)) over the routed experts;  w = p_topk / sum(p_topk) if normalize_topk else p_topk

A block with a single routed expert has no router and that expert is always active (weight 1). Only blocks that
keep attention hold a KV-cache entry: their attention ``layer_idx`` counts attention blocks only.

``config.blocks[i]`` records where each piece came from in the dense parent:
``{"attention_layer": int | None, "expert_layers": [int, ...], "shared_experts": int, "top_k": int,
"normalize_topk": bool}``; the first ``shared_experts`` entries of ``expert_layers`` are the shared ones.
Two optional entries describe experts cut from an MLP's neurons (split-experts, upcycle):

- ``"expert_intermediate": int``: the intermediate size of every expert of the block (default: the parent's).
  A layer may then appear several times in ``expert_layers``: each occurrence is one expert made from that
  layer's MLP, a copy of it (same size) or one slice of its neurons (``occurrences x size`` = the MLP's size).
- ``"routing_weights": "ones"``: every chosen expert counts in full (``w = 1``), so the experts cut from an MLP
  add up to it exactly when all are chosen; ``"softmax"`` (default) is the rule above. Under ``"ones"`` the
  weight carries the router's gradient (``1 + p - p.detach()``) for recovery training.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from d2mc.arch import MOE_MODEL_TYPE, SUPPORTED_FAMILIES

ROUTING_WEIGHTS = ("softmax", "ones")
# transformers 5.24 renamed the KV-cache argument and output field ``past_key_values`` to ``cache``; the model
# accepts both names and hands the cache on under the name the installed version reads.
_OUTPUT_FIELDS = {f.name for f in dataclasses.fields(BaseModelOutputWithPast)}
CACHE_ARG = "cache" if "cache" in _OUTPUT_FIELDS else "past_key_values"

_CLASS_PREFIX = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "mistral": "Mistral"}
_MIRRORED = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
             "head_dim", "max_position_embeddings", "rms_norm_eps", "sliding_window", "rope_parameters",
             "bos_token_id", "eos_token_id", "pad_token_id", "hidden_act", "use_cache")


def family_classes(family: str) -> dict[str, type]:
    """The attention, MLP, RMSNorm and rotary-embedding classes of a source family."""
    if family not in SUPPORTED_FAMILIES:
        raise ValueError(f"no module classes for family {family!r}")
    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    prefix = _CLASS_PREFIX[family]
    return {kind: getattr(module, f"{prefix}{kind}") for kind in ("Attention", "MLP", "RMSNorm", "RotaryEmbedding")}


class D2MCMoEConfig(PretrainedConfig):
    """Config of a converted model: the dense parent's config plus the block plan."""

    model_type = MOE_MODEL_TYPE
    sub_configs = {"base_config": AutoConfig}

    def __init__(self, base_config=None, blocks=None, **kwargs):
        if isinstance(base_config, dict):
            base_config = CONFIG_MAPPING[base_config["model_type"]](**base_config)
        self.base_config = base_config
        self.blocks = [dict(b) for b in (blocks or [])]
        if base_config is not None:
            for name in _MIRRORED:
                if hasattr(base_config, name):
                    kwargs.setdefault(name, getattr(base_config, name))
            kwargs.setdefault("tie_word_embeddings", base_config.tie_word_embeddings)
            # the KV cache is sized from num_hidden_layers: only blocks with attention count
            attention_layers = [b["attention_layer"] for b in self.blocks if b.get("attention_layer") is not None]
            kwargs["num_hidden_layers"] = len(attention_layers)
            if getattr(base_config, "layer_types", None) is not None:
                kwargs["layer_types"] = [base_config.layer_types[i] for i in attention_layers]
        super().__init__(**kwargs)

    @property
    def family(self) -> str:
        return self.base_config.model_type

    def attention_config(self) -> PretrainedConfig:
        """The parent's config renumbered so attention ``layer_idx`` counts attention blocks only."""
        config = copy.deepcopy(self.base_config)
        config.num_hidden_layers = self.num_hidden_layers
        if getattr(self, "layer_types", None) is not None:
            config.layer_types = list(self.layer_types)
        config._attn_implementation = self._attn_implementation
        return config


class D2MCExpert(nn.Module):
    """An MLP of the dense parent with the post-attention norm of its own layer."""

    def __init__(self, norm: nn.Module, mlp: nn.Module):
        super().__init__()
        self.post_attention_layernorm = norm
        self.mlp = mlp

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.post_attention_layernorm(hidden))


class D2MCBlock(nn.Module):
    """An optional attention, then shared and routed experts (see the module docstring for the math)."""

    def __init__(self, attention_config, plan: dict, classes: dict[str, type], attention_idx: int | None):
        super().__init__()
        hidden, eps = attention_config.hidden_size, attention_config.rms_norm_eps
        self.shared_experts = plan.get("shared_experts", 0)
        self.top_k = plan.get("top_k", 1)
        self.normalize_topk = plan.get("normalize_topk", True)
        self.routing_weights = plan.get("routing_weights", "softmax")
        if self.routing_weights not in ROUTING_WEIGHTS:
            raise ValueError(f"routing_weights must be one of {ROUTING_WEIGHTS}, not {self.routing_weights!r}")
        if attention_idx is None:
            self.input_layernorm = None
            self.self_attn = None
        else:
            self.input_layernorm = classes["RMSNorm"](hidden, eps=eps)
            self.self_attn = classes["Attention"](attention_config, layer_idx=attention_idx)
        expert_config = attention_config
        if plan.get("expert_intermediate"):
            expert_config = copy.deepcopy(attention_config)
            expert_config.intermediate_size = plan["expert_intermediate"]
        self.experts = nn.ModuleList(
            D2MCExpert(classes["RMSNorm"](hidden, eps=eps), classes["MLP"](expert_config))
            for _ in plan["expert_layers"])
        routed = len(self.experts) - self.shared_experts
        self.router = nn.Linear(hidden, routed, bias=False) if routed > 1 else None

    @property
    def attention_type(self) -> str:
        return getattr(self.self_attn, "layer_type", None) or "full_attention"

    def route(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Weights and indices (into the routed experts) of the top-k experts for each token: ``[..., k]``.

        The choice is made on the logits: a trained router can saturate the softmax, and probabilities that round
        to the same value (0 or 1) would leave the choice to each runtime's tie-breaking."""
        logits = self.router(hidden).float()
        indices = logits.topk(self.top_k, dim=-1).indices
        weights = torch.softmax(logits, dim=-1).gather(-1, indices)
        if self.routing_weights == "ones":  # exactly 1 in value; the gradient reaches the router through p
            weights = 1.0 + (weights - weights.detach())
        elif self.normalize_topk:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(hidden.dtype), indices

    def forward(self, hidden, attention_mask=None, position_embeddings=None, position_ids=None, cache=None,
                **kwargs):
        if self.self_attn is not None:
            attended, _ = self.self_attn(hidden_states=self.input_layernorm(hidden), attention_mask=attention_mask,
                                         position_ids=position_ids, position_embeddings=position_embeddings,
                                         **{CACHE_ARG: cache}, **kwargs)
            hidden = hidden + attended
        out = hidden
        for expert in self.experts[: self.shared_experts]:
            out = out + expert(hidden)
        routed = self.experts[self.shared_experts:]
        if self.router is None:
            for expert in routed:
                out = out + expert(hidden)
            return out
        return out + self._dispatch(hidden, routed)

    def _dispatch(self, hidden: torch.Tensor, routed) -> torch.Tensor:
        """Run each routed expert on the tokens that chose it only, weighted, scattered back in place."""
        flat = hidden.reshape(-1, hidden.shape[-1])
        weights, indices = self.route(flat)
        result = torch.zeros_like(flat)
        for e, expert in enumerate(routed):
            token, slot = torch.where(indices == e)
            if token.numel():
                result.index_add_(0, token, expert(flat[token]) * weights[token, slot, None])
        return result.reshape(hidden.shape)


class D2MCMoEPreTrainedModel(PreTrainedModel):
    config_class = D2MCMoEConfig
    config: D2MCMoEConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["D2MCBlock"]
    _skip_keys_device_placement = [CACHE_ARG]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True


class D2MCMoEModel(D2MCMoEPreTrainedModel):
    """Embedding, Dense2MoE blocks, final norm."""

    def __init__(self, config: D2MCMoEConfig):
        super().__init__(config)
        classes = family_classes(config.family)
        self.attention_config = config.attention_config()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        blocks, attention_idx = [], 0
        for plan in config.blocks:
            has_attention = plan.get("attention_layer") is not None
            blocks.append(D2MCBlock(self.attention_config, plan, classes, attention_idx if has_attention else None))
            attention_idx += has_attention
        self.layers = nn.ModuleList(blocks)
        self.norm = classes["RMSNorm"](config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = classes["RotaryEmbedding"](config=self.attention_config)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, cache=None, **kwargs) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        cache = past_key_values if cache is None else cache
        self.attention_config._attn_implementation = self.config._attn_implementation
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = getattr(self.config, "use_cache", True) if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past).unsqueeze(0)
        mask_kwargs = dict(config=self.attention_config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                           position_ids=position_ids, **{CACHE_ARG: cache})
        masks = {}
        for block in self.layers:
            kind = block.attention_type
            if block.self_attn is not None and kind not in masks:
                sliding = kind == "sliding_attention" or (
                    self.config.family == "mistral" and getattr(self.attention_config, "sliding_window", None))
                masks[kind] = (create_sliding_window_causal_mask if sliding else create_causal_mask)(**mask_kwargs)
        hidden = inputs_embeds
        position_embeddings = self.rotary_emb(hidden, position_ids=position_ids)
        for block in self.layers:
            hidden = block(hidden, attention_mask=masks.get(block.attention_type), position_ids=position_ids,
                           position_embeddings=position_embeddings, cache=cache, use_cache=use_cache, **kwargs)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden), **{CACHE_ARG: cache})


class D2MCMoEForCausalLM(D2MCMoEPreTrainedModel, GenerationMixin):
    """A converted causal LM; ``from_pretrained``, ``generate`` and ``Trainer`` work on it as on any HF model."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: D2MCMoEConfig):
        super().__init__(config)
        self.model = D2MCMoEModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, cache=None, **kwargs):
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             cache=past_key_values if cache is None else cache, inputs_embeds=inputs_embeds,
                             use_cache=use_cache, **kwargs)
        hidden = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_ARG: getattr(outputs, CACHE_ARG)})


def parent_modules(model) -> dict[str, dict]:
    """The dense parent's modules by layer number, from a dense model or a converted one.

    ``"mlp"``/``"post_norm"`` hold the whole MLPs (with their norms) by layer; an MLP that a converted model holds
    as several experts (copies or slices) is found only under ``"blocks"``, which maps each converted block's
    :func:`expert_signature` to its experts and router, so an unchanged block is carried over as it is.
    """
    found = {"attention": {}, "input_norm": {}, "mlp": {}, "post_norm": {}, "router": {}, "blocks": {}}
    if isinstance(model, D2MCMoEForCausalLM):
        for block, plan in zip(model.model.layers, model.config.blocks, strict=False):
            if plan.get("attention_layer") is not None:
                found["attention"][plan["attention_layer"]] = block.self_attn
                found["input_norm"][plan["attention_layer"]] = block.input_layernorm
            layers = plan["expert_layers"]
            whole = not plan.get("expert_intermediate")
            for layer, expert in zip(layers, block.experts, strict=False):
                if whole and layers.count(layer) == 1:
                    found["mlp"][layer] = expert.mlp
                    found["post_norm"][layer] = expert.post_attention_layernorm
            signature = expert_signature(plan)
            found["blocks"][signature] = list(block.experts)
            if block.router is not None:
                found["router"][signature] = block.router
    else:
        for i, layer in enumerate(model.model.layers):
            found["attention"][i], found["input_norm"][i] = layer.self_attn, layer.input_layernorm
            found["mlp"][i], found["post_norm"][i] = layer.mlp, layer.post_attention_layernorm
    return found


def expert_signature(plan: dict) -> tuple:
    """What makes two blocks' experts the same: their parent layers, sizes and shared count."""
    return (tuple(plan["expert_layers"]), plan.get("expert_intermediate"), plan.get("shared_experts", 0))


def restructure(model, blocks: list[dict]) -> D2MCMoEForCausalLM:
    """Assemble a converted model with the block plan ``blocks`` from the modules of ``model``.

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
    for b, (block, plan) in enumerate(zip(converted.model.layers, blocks, strict=False)):
        if block.self_attn is not None:
            attention = modules["attention"][plan["attention_layer"]]
            attention.layer_idx = block.self_attn.layer_idx
            attention.config = attention_config
            if hasattr(attention, "layer_type"):
                attention.layer_type = block.self_attn.layer_type
                attention.sliding_window = block.self_attn.sliding_window
            block.self_attn = attention
            block.input_layernorm = modules["input_norm"][plan["attention_layer"]]
        signature = expert_signature(plan)
        if signature in modules["blocks"]:
            block.experts = nn.ModuleList(modules["blocks"][signature])
        else:
            _experts_from_mlps(b, block, plan, modules, dtype)
        if block.router is not None:
            router = modules["router"].get(signature)
            if router is None:
                router = nn.Linear(config.hidden_size, block.router.out_features, bias=False, dtype=dtype)
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


def _experts_from_mlps(b: int, block: D2MCBlock, plan: dict, modules: dict, dtype: torch.dtype) -> None:
    """Fill ``block.experts`` from whole parent MLPs: the MLP itself, copies of it, or slices of its neurons."""
    layers = plan["expert_layers"]
    seen: dict[int, int] = {}
    for i, layer in enumerate(layers):
        if layer not in modules["mlp"]:
            raise ValueError(f"block {b}: layer {layer}'s MLP is not available whole in the source model (it is "
                             "already split into experts there)")
        mlp, norm = modules["mlp"][layer], modules["post_norm"][layer]
        occurrence = seen[layer] = seen.get(layer, -1) + 1
        count = layers.count(layer)
        whole = mlp.gate_proj.out_features
        size = plan.get("expert_intermediate") or whole
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


def dense_plan(num_layers: int) -> list[dict]:
    """The plan that reproduces a dense model block for block."""
    return [{"attention_layer": i, "expert_layers": [i], "shared_experts": 0, "top_k": 1, "normalize_topk": True}
            for i in range(num_layers)]


def _plain_base_config(config) -> PretrainedConfig:
    config = config.__class__.from_dict(config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


AutoConfig.register(MOE_MODEL_TYPE, D2MCMoEConfig)
AutoModelForCausalLM.register(D2MCMoEConfig, D2MCMoEForCausalLM)
