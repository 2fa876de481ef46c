"""What ``d2mc inspect`` reports: dimensions, parameters by component and their bytes, KV-cache size."""

from __future__ import annotations

from d2mc.arch import BYTES_PER_ELEMENT
from d2mc.loading import LoadedModel

COMPONENTS = ("embedding", "attention", "mlp", "router", "norms", "lm_head")
WEIGHT_PRECISIONS = ("fp32", "fp16", "int8", "int4")


def component_of(name: str) -> str:
    """The component a parameter belongs to, from its module path."""
    if "embed_tokens" in name:
        return "embedding"
    if name.startswith("lm_head"):
        return "lm_head"
    if "router" in name:
        return "router"
    if "self_attn" in name:  # includes Qwen3's q_norm and k_norm
        return "attention"
    if "norm" in name:
        return "norms"
    if "mlp" in name or "experts" in name:
        return "mlp"
    raise ValueError(f"parameter '{name}' belongs to no known component")


def count_parameters(model) -> dict[str, int]:
    """Parameters of ``model`` by component, each shared tensor counted once (works on the meta device)."""
    counts = dict.fromkeys(COMPONENTS, 0)
    for name, param in model.named_parameters():  # named_parameters() skips tied duplicates
        counts[component_of(name)] += param.numel()
    return counts


def inspect_model(loaded: LoadedModel) -> dict:
    """Everything ``d2mc inspect`` prints, as plain data."""
    arch = loaded.arch
    counts = count_parameters(loaded.model)
    total = sum(counts.values())
    return {
        "model": loaded.source,
        "family": arch.family,
        "layers": arch.num_blocks,
        "attention_layers": len(arch.attention_blocks),
        "hidden_size": arch.hidden_size,
        "intermediate_size": arch.intermediate_size,
        "attention_heads": arch.num_heads,
        "kv_heads": arch.num_kv_heads,
        "head_dim": arch.head_dim,
        "vocab_size": arch.vocab_size,
        "tied_embeddings": arch.tie_word_embeddings,
        "max_position_embeddings": arch.max_position_embeddings,
        "parameters": {**counts, "total": total},
        "active_parameters_per_token": arch.active_params,
        "bytes": {p: {c: n * BYTES_PER_ELEMENT[p] for c, n in {**counts, "total": total}.items()}
                  for p in WEIGHT_PRECISIONS},
        "kv_cache_bytes_per_token": {p: arch.kv_cache_bytes_per_token(p) for p in ("fp32", "fp16", "int8")},
        "config_only": loaded.config_only,
    }
