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

``config.blocks[i]`` is the :class:`~d2mc.arch.BlockPlan` of block ``i``: where each piece came from in the dense
parent. Under ``routing_weights="ones"`` every chosen expert counts in full (``w = 1``) and the weight carries the
router's gradient (``1 + p - p.detach()``) for recovery training. With ``gate_gradient`` set (recovery training
does), a top-1 normalised block computes its gate, always exactly 1, as ``p / p.detach()``: the same value, with a
gradient that reaches the router.
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
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from d2mc.arch import MOE_MODEL_TYPE, SUPPORTED_FAMILIES, BlockPlan

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
    """Config of a converted model: the dense parent's config plus the block plans (``blocks``, a list of
    :class:`~d2mc.arch.BlockPlan`; ``config.json`` holds them as dicts)."""

    model_type = MOE_MODEL_TYPE
    sub_configs = {"base_config": AutoConfig}

    def __init__(self, base_config=None, blocks=None, **kwargs):
        if isinstance(base_config, dict):
            base_config = CONFIG_MAPPING[base_config["model_type"]](**base_config)
        self.base_config = base_config
        self.blocks = [b if isinstance(b, BlockPlan) else BlockPlan.from_dict(b) for b in (blocks or [])]
        if base_config is not None:
            for name in _MIRRORED:
                if hasattr(base_config, name):
                    kwargs.setdefault(name, getattr(base_config, name))
            kwargs.setdefault("tie_word_embeddings", base_config.tie_word_embeddings)
            # the KV cache is sized from num_hidden_layers: only blocks with attention count
            attention_layers = [b.attention_layer for b in self.blocks if b.attention_layer is not None]
            kwargs["num_hidden_layers"] = len(attention_layers)
            if getattr(base_config, "layer_types", None) is not None:
                kwargs["layer_types"] = [base_config.layer_types[i] for i in attention_layers]
        super().__init__(**kwargs)

    def to_dict(self) -> dict:
        """The config as ``config.json`` holds it, each block plan as a dict."""
        out = super().to_dict()
        out["blocks"] = [b.to_dict() for b in self.blocks]
        return out

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


class D2MCBlock(GradientCheckpointingLayer):
    """An optional attention, then shared and routed experts (see the module docstring for the math). Under
    gradient checkpointing (``model.gradient_checkpointing_enable()``, the Trainer's ``activation_checkpointing``)
    a block keeps only its input for the backward pass and runs again there; its routing is a function of that
    input, so the recomputed tokens go to the same experts."""

    def __init__(self, attention_config, plan: BlockPlan, classes: dict[str, type], attention_idx: int | None):
        super().__init__()
        hidden, eps = attention_config.hidden_size, attention_config.rms_norm_eps
        self.shared_experts = plan.shared_experts
        self.top_k = plan.top_k
        self.normalize_topk = plan.normalize_topk
        self.routing_weights = plan.routing_weights
        self.gate_gradient = False  # the training form of a top-1 normalised gate (module docstring); not saved
        if attention_idx is None:
            self.input_layernorm = None
            self.self_attn = None
        else:
            self.input_layernorm = classes["RMSNorm"](hidden, eps=eps)
            self.self_attn = classes["Attention"](attention_config, layer_idx=attention_idx)
        expert_config = attention_config
        if plan.expert_intermediate:
            expert_config = copy.deepcopy(attention_config)
            expert_config.intermediate_size = plan.expert_intermediate
        self.experts = nn.ModuleList(
            D2MCExpert(classes["RMSNorm"](hidden, eps=eps), classes["MLP"](expert_config))
            for _ in plan.expert_layers)
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
        if self.gate_gradient and self.top_k == 1 and self.normalize_topk:
            # the gate p / p is exactly 1; dividing by p.detach() passes the gradient of p (Switch Transformers)
            indices = logits.argmax(-1, keepdim=True)
            top = torch.softmax(logits, dim=-1).gather(-1, indices)
            return (top / top.detach()).to(hidden.dtype), indices
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
        if self.router is None:
            for expert in self.experts[self.shared_experts:]:
                out = out + expert(hidden)
            return out
        return out + self.dispatch(hidden)

    def dispatch(self, hidden: torch.Tensor) -> torch.Tensor:
        """The routed experts' part of the output: each routed expert runs on the tokens that chose it only, its
        output weighted by the gate and scattered back in place (the shared experts and the residual are not
        included)."""
        flat = hidden.reshape(-1, hidden.shape[-1])
        weights, indices = self.route(flat)
        result = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts[self.shared_experts:]):
            token, slot = torch.where(indices == e)
            if token.numel():
                result.index_add_(0, token, expert(flat[token]) * weights[token, slot, None])
        return result.reshape(hidden.shape)


class D2MCMoEPreTrainedModel(PreTrainedModel):
    config_class = D2MCMoEConfig
    config: D2MCMoEConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
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
            has_attention = plan.attention_layer is not None
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


AutoConfig.register(MOE_MODEL_TYPE, D2MCMoEConfig)
AutoModelForCausalLM.register(D2MCMoEConfig, D2MCMoEForCausalLM)
