"""A small, framework-free description of a decoder-only model: what the cost model and the passes read.

:class:`BlockPlan` is one block of a converted model as the dense parent's pieces make it up (the entries of
``config.blocks``). :class:`ModelArch` is built from a Hugging Face config (dense Llama/Qwen2/Qwen3/Mistral, or a
converted d2mc MoE model) and describes each block by :class:`BlockSpec`, the cost model's view of a block plan:
whether it keeps attention, how many MLP experts it holds and how many of them are active per token.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from d2mc.errors import UserError

SUPPORTED_FAMILIES = ("llama", "qwen2", "qwen3", "mistral")
MOE_MODEL_TYPE = "d2mc_moe"
SUPPORTED_TEXT = (
    "d2mc supports decoder-only Llama, Qwen2, Qwen3 and Mistral models (layers with self_attn, a gated "
    "SwiGLU mlp, input_layernorm and post_attention_layernorm)"
)

BYTES_PER_ELEMENT = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5}
ROUTING_WEIGHTS = ("softmax", "ones")


@dataclass(frozen=True)
class BlockPlan:
    """Where each piece of one converted block comes from in the dense parent (layer numbers are the parent's).

    - ``attention_layer``: the layer whose attention (and input norm) the block keeps; ``None``: no attention.
    - ``expert_layers``: the layer of each expert's MLP (with that layer's post-attention norm); the first
      ``shared_experts`` are always active, the rest are routed, ``top_k`` of them per token. A block with a
      single routed expert has no router and that expert is always active.
    - ``normalize_topk``: the chosen experts' softmax probabilities are renormalised to sum to 1.
    - ``expert_intermediate``: the intermediate size of every expert of the block; ``None``: the parent's. A layer
      may then appear several times in ``expert_layers``: each occurrence is one expert made from that layer's
      MLP, a copy of it (same size) or one slice of its neurons (``occurrences x size`` = the MLP's size).
    - ``routing_weights``: ``"softmax"``, the rule of :mod:`d2mc.modeling`; ``"ones"``: every chosen expert counts
      in full (``w = 1``), so the experts cut from an MLP add up to it exactly when all are chosen.

    ``config.json`` keeps the plans as the dicts of :meth:`to_dict` (the two optional fields only when set).
    """

    attention_layer: int | None
    expert_layers: tuple[int, ...]
    shared_experts: int = 0
    top_k: int = 1
    normalize_topk: bool = True
    expert_intermediate: int | None = None
    routing_weights: str = "softmax"

    def __post_init__(self):
        object.__setattr__(self, "expert_layers", tuple(self.expert_layers))
        if self.routing_weights not in ROUTING_WEIGHTS:
            raise ValueError(f"routing_weights must be one of {ROUTING_WEIGHTS}, not {self.routing_weights!r}")

    @classmethod
    def dense(cls, layer: int) -> BlockPlan:
        """The block that reproduces the parent's ``layer`` as it is."""
        return cls(attention_layer=layer, expert_layers=(layer,))

    @classmethod
    def from_dict(cls, data: dict) -> BlockPlan:
        """A plan from an entry of ``config.blocks`` as ``config.json`` holds it."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown block plan entries {sorted(unknown)}: expected {sorted(known)}")
        return cls(**data)

    def to_dict(self) -> dict:
        """The ``config.json`` form: lists for tuples, the optional fields only when they differ from the default."""
        out = {"attention_layer": self.attention_layer, "expert_layers": list(self.expert_layers),
               "shared_experts": self.shared_experts, "top_k": self.top_k, "normalize_topk": self.normalize_topk}
        if self.expert_intermediate is not None:
            out["expert_intermediate"] = self.expert_intermediate
        if self.routing_weights != "softmax":
            out["routing_weights"] = self.routing_weights
        return out

    @property
    def layers(self) -> set[int]:
        """Every parent layer the block holds a piece of."""
        return set(self.expert_layers) | ({self.attention_layer} if self.attention_layer is not None else set())

    @property
    def expert_signature(self) -> tuple:
        """What makes two blocks' experts the same: their parent layers, sizes and shared count."""
        return self.expert_layers, self.expert_intermediate, self.shared_experts

    @property
    def active_mlps(self) -> tuple[list[int], int]:
        """Positions (in ``expert_layers``) of the always-active MLPs, and how many MLPs a token uses."""
        routed = len(self.expert_layers) - self.shared_experts
        if routed <= 1:
            return list(range(len(self.expert_layers))), len(self.expert_layers)
        return list(range(self.shared_experts)), self.shared_experts + self.top_k

    @property
    def spec(self) -> BlockSpec:
        """The cost model's view of the block."""
        return BlockSpec(attention=self.attention_layer is not None, experts=len(self.expert_layers),
                         top_k=self.top_k, shared_experts=self.shared_experts,
                         expert_intermediate=self.expert_intermediate)


@dataclass(frozen=True)
class BlockSpec:
    """One block as the cost model sees it: counts, not parent layers (the fields mean what :class:`BlockPlan`'s
    do; ``attention`` is whether it keeps one, ``experts`` how many it holds). A dense layer is ``BlockSpec()``."""

    attention: bool = True
    experts: int = 1
    top_k: int = 1
    shared_experts: int = 0
    expert_intermediate: int | None = None

    def __post_init__(self):
        if self.experts < 1:
            raise ValueError("a block needs at least one MLP")
        if self.expert_intermediate is not None and self.expert_intermediate < 1:
            raise ValueError("expert_intermediate must be positive")
        if not 0 <= self.shared_experts <= self.experts:
            raise ValueError("shared_experts must be between 0 and experts")
        if self.routed_experts and not 1 <= self.top_k <= self.routed_experts:
            raise ValueError(f"top_k={self.top_k} must be between 1 and the {self.routed_experts} routed experts")

    @property
    def routed_experts(self) -> int:
        return self.experts - self.shared_experts

    @property
    def has_router(self) -> bool:
        """A router exists when there is a choice to make among routed experts."""
        return self.routed_experts > 1

    @property
    def active_experts(self) -> int:
        """Experts evaluated per token."""
        if self.routed_experts == 0:
            return self.shared_experts
        return self.shared_experts + (self.top_k if self.has_router else self.routed_experts)


@dataclass(frozen=True)
class ModelArch:
    """Dimensions and block structure of a supported decoder-only model."""

    family: str
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    max_position_embeddings: int
    attention_bias: bool = False
    qk_norm: bool = False
    blocks: tuple[BlockSpec, ...] = field(default_factory=tuple)

    @classmethod
    def from_config(cls, config) -> ModelArch:
        """Describe a Hugging Face config, refusing architectures d2mc cannot convert."""
        model_type = getattr(config, "model_type", None)
        base = config
        blocks = None
        if model_type == MOE_MODEL_TYPE:
            base = config.base_config
            blocks = tuple(b.spec for b in config.blocks)
            model_type = base.model_type
        if model_type not in SUPPORTED_FAMILIES:
            raise UserError(f"unsupported architecture '{model_type}': {SUPPORTED_TEXT}")
        if getattr(base, "hidden_act", "silu") not in ("silu", "swish"):
            raise UserError(f"unsupported MLP activation '{base.hidden_act}': {SUPPORTED_TEXT}")
        num_heads = base.num_attention_heads
        head_dim = getattr(base, "head_dim", None) or base.hidden_size // num_heads
        if blocks is None:
            blocks = tuple(BlockSpec() for _ in range(base.num_hidden_layers))
        return cls(
            family=model_type,
            hidden_size=base.hidden_size,
            intermediate_size=base.intermediate_size,
            num_heads=num_heads,
            num_kv_heads=getattr(base, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            vocab_size=base.vocab_size,
            tie_word_embeddings=bool(getattr(base, "tie_word_embeddings", False)),
            max_position_embeddings=getattr(base, "max_position_embeddings", 2048),
            attention_bias=bool(getattr(base, "attention_bias", model_type == "qwen2")),
            qk_norm=model_type == "qwen3",
            blocks=blocks,
        )

    # ---- structure ---------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def attention_blocks(self) -> list[int]:
        """Indices of blocks that keep attention (and so a KV-cache entry)."""
        return [i for i, b in enumerate(self.blocks) if b.attention]

    # ---- parameters per piece ----------------------------------------------------------------------
    @property
    def attention_params(self) -> int:
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        params = h * q + 2 * h * kv + q * h
        if self.attention_bias:
            params += q + 2 * kv
        if self.qk_norm:
            params += 2 * self.head_dim
        return params

    @property
    def mlp_params(self) -> int:
        """Parameters of one MLP of the model's own size."""
        return 3 * self.hidden_size * self.intermediate_size

    def expert_intermediate(self, block: BlockSpec) -> int:
        """Intermediate size of each expert of ``block``."""
        return block.expert_intermediate or self.intermediate_size

    def expert_params(self, block: BlockSpec) -> int:
        """Parameters of one expert of ``block`` (gate, up and down projections)."""
        return 3 * self.hidden_size * self.expert_intermediate(block)

    def router_params(self, block: BlockSpec) -> int:
        return self.hidden_size * block.routed_experts if block.has_router else 0

    def param_counts(self) -> dict[str, int]:
        """Parameters by component; ``lm_head`` is 0 when it shares the embedding."""
        h = self.hidden_size
        counts = {"embedding": self.vocab_size * h, "attention": 0, "mlp": 0, "router": 0, "norms": h,
                  "lm_head": 0 if self.tie_word_embeddings else self.vocab_size * h}
        for b in self.blocks:
            if b.attention:
                counts["attention"] += self.attention_params
                counts["norms"] += h
            counts["mlp"] += b.experts * self.expert_params(b)
            counts["norms"] += b.experts * h
            counts["router"] += self.router_params(b)
        return counts

    def active_param_counts(self) -> dict[str, int]:
        """Parameters one token touches, by component (the embedding row read is not counted as a matrix)."""
        counts = self.param_counts()
        h = self.hidden_size
        counts["mlp"] = sum(b.active_experts * self.expert_params(b) for b in self.blocks)
        counts["norms"] = h + sum(h * (b.attention + b.active_experts) for b in self.blocks)
        return counts

    @property
    def total_params(self) -> int:
        return sum(self.param_counts().values())

    @property
    def active_params(self) -> int:
        return sum(self.active_param_counts().values())

    def kv_cache_bytes_per_token(self, precision: str = "fp16") -> float:
        """Bytes of K and V cached per token over all blocks that keep attention."""
        per_layer = 2 * self.num_kv_heads * self.head_dim * bytes_per_element(precision)
        return per_layer * len(self.attention_blocks)


def dividing_block_sizes(sizes) -> list[str]:
    """The quantization block sizes (128, 64, 32) that divide every one of ``sizes``, largest first, as text for a
    hint."""
    return [str(b) for b in (128, 64, 32) if all(n % b == 0 for n in sizes)]


# an int8 LM head in blocks of 64: on SmolLM2-135M the held-out perplexity of blocks of 32 (40.96 against 41.05,
# int4 body) and its MatMulNBits with int8 activations faster (half the per-block steps; docs/quantization.md)
INT8_LM_HEAD_BLOCK = 64


def lm_head_block_size(precision: str, block_size: int, hidden_size: int) -> int:
    """The block size of an LM head quantized at ``precision`` beside weights in blocks of ``block_size``: an int8
    head in blocks of :data:`INT8_LM_HEAD_BLOCK` where they divide ``hidden_size`` (its input) and the weights' are
    smaller, otherwise the weights' ``block_size``."""
    if precision == "int8" and block_size < INT8_LM_HEAD_BLOCK and hidden_size % INT8_LM_HEAD_BLOCK == 0:
        return INT8_LM_HEAD_BLOCK
    return block_size


def bytes_per_element(precision: str) -> float:
    try:
        return BYTES_PER_ELEMENT[precision]
    except KeyError:
        raise UserError(f"unknown precision '{precision}': choose one of {', '.join(BYTES_PER_ELEMENT)}") from None
