"""Roofline cost model: FLOPs, bytes moved and predicted time per operator, for prefill and decode.

Each operator's time is ``max(FLOPs / achievable compute, bytes / achievable bandwidth)`` plus a fixed
per-kernel overhead from the device profile. At batch-1 decode nearly every operator is memory-bound, so the
prediction is about the bytes read per token (weights of the active experts, the KV cache) over bandwidth.

MoE accounting: a decode step reads only the experts it uses. At batch 1 that is the shared experts plus top-k
routed ones; for a batch of ``T`` tokens routed independently and uniformly over ``E`` experts it is the
expected number of distinct experts, ``E * (1 - (1 - k/E) ** T)``, unless measured routing statistics (expert
load fractions per block) are given.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from d2mc.arch import BlockSpec, ModelArch, bytes_per_element
from d2mc.errors import UserError
from d2mc.profiles import DeviceProfile

OP_CLASSES = ("embedding", "norm", "qkv_proj", "attention", "o_proj", "router", "mlp", "lm_head")


@dataclass
class OpCost:
    """One operator class in one block (block -1: outside the blocks)."""

    block: int
    op: str
    flops: float
    bytes: float
    kernels: int
    seconds: float = 0.0
    bound: str = ""

    @property
    def intensity(self) -> float:
        """Arithmetic intensity, FLOPs per byte."""
        return self.flops / self.bytes if self.bytes else 0.0


@dataclass
class PhaseCost:
    """Every operator of one phase (a prefill of ``tokens`` or one decode step at ``context``)."""

    phase: str
    batch: int
    tokens: int
    context: int
    ops: list[OpCost] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return sum(o.seconds for o in self.ops)

    @property
    def flops(self) -> float:
        return sum(o.flops for o in self.ops)

    @property
    def bytes(self) -> float:
        return sum(o.bytes for o in self.ops)

    def per_block(self) -> dict[int, float]:
        """Predicted seconds per block (-1 gathers embedding, final norm and LM head)."""
        out: dict[int, float] = {}
        for o in self.ops:
            out[o.block] = out.get(o.block, 0.0) + o.seconds
        return out

    def to_dict(self) -> dict:
        return {"phase": self.phase, "batch": self.batch, "tokens": self.tokens, "context": self.context,
                "seconds": self.seconds, "flops": self.flops, "bytes": self.bytes,
                "ops": [{**asdict(o), "intensity": o.intensity} for o in self.ops]}


@dataclass(frozen=True)
class RooflineSettings:
    prefill: int = 128
    context: int = 512
    batch: int = 1
    precision: str = "fp16"
    kv_precision: str | None = None  # defaults to the weight precision, at least fp16

    def __post_init__(self):
        for name in ("prefill", "context", "batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise UserError(f"--{name} must be a positive whole number, not {value}")
        bytes_per_element(self.precision)
        if self.kv_precision:
            bytes_per_element(self.kv_precision)

    @property
    def kv(self) -> str:
        if self.kv_precision:
            return self.kv_precision
        return self.precision if bytes_per_element(self.precision) >= 2 else "fp16"


def expected_distinct_experts(routed: int, top_k: int, tokens: int) -> float:
    """Expected number of distinct experts a batch of ``tokens`` touches under uniform top-k routing."""
    if routed <= 1:
        return float(routed)
    return routed * (1.0 - (1.0 - top_k / routed) ** tokens)


def estimate_phase(arch: ModelArch, profile: DeviceProfile, phase: str, settings: RooflineSettings,
                   expert_load: dict[int, list[float]] | None = None) -> PhaseCost:
    """Cost of ``phase`` ("prefill" of ``settings.prefill`` tokens, or "decode" at ``settings.context``)."""
    if phase == "decode" and settings.context + 1 > arch.max_position_embeddings:
        raise UserError(f"--context {settings.context} is past the model's maximum of "
                        f"{arch.max_position_embeddings} positions")
    if phase == "prefill" and settings.prefill > arch.max_position_embeddings:
        raise UserError(f"--prefill {settings.prefill} is past the model's maximum of "
                        f"{arch.max_position_embeddings} positions")
    b = settings.batch
    n = settings.prefill if phase == "prefill" else 1
    past = 0 if phase == "prefill" else settings.context
    tokens = b * n
    w = bytes_per_element(settings.precision)
    a = max(w, 2.0) if profile.kind == "gpu" else 4.0  # activations stay in a float format
    kvb = bytes_per_element(settings.kv)
    h, inter = arch.hidden_size, arch.intermediate_size
    q_dim, kv_dim = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    cost = PhaseCost(phase, b, n, past)
    ops = cost.ops

    def add(block, op, flops, bytes_, kernels=1):
        ops.append(OpCost(block, op, float(flops), float(bytes_), kernels))

    add(-1, "embedding", 0, tokens * h * (w + a))
    for i, block in enumerate(arch.blocks):
        if block.attention:
            add(i, "norm", 4 * tokens * h, h * w + 2 * tokens * h * a)
            add(i, "qkv_proj", 2 * tokens * h * (q_dim + 2 * kv_dim),
                h * (q_dim + 2 * kv_dim) * w + tokens * (h + q_dim + 2 * kv_dim) * a)
            if phase == "prefill":  # causal: each query attends to the keys before it
                pairs = b * n * (n + 1) / 2
                kv_read = tokens * 2 * kv_dim * a
            else:
                pairs = b * (past + 1)
                kv_read = b * (past + 1) * 2 * kv_dim * kvb
            add(i, "attention", 4 * pairs * q_dim, kv_read + tokens * 2 * kv_dim * kvb + 2 * tokens * q_dim * a)
            add(i, "o_proj", 2 * tokens * q_dim * h, q_dim * h * w + tokens * (q_dim + h) * a)
        _add_experts(add, i, block, tokens, h, inter, w, a, expert_load.get(i) if expert_load else None)
    add(-1, "norm", 4 * tokens * h, h * w + 2 * tokens * h * a)
    logits_tokens = b  # generation keeps only the last position's logits
    add(-1, "lm_head", 2 * logits_tokens * h * arch.vocab_size,
        h * arch.vocab_size * w + logits_tokens * (h + arch.vocab_size) * a)

    flops_per_s = profile.achievable_flops(settings.precision)
    bandwidth = profile.achievable_bandwidth
    for o in ops:
        compute, memory = o.flops / flops_per_s, o.bytes / bandwidth
        o.bound = "compute" if compute > memory else "memory"
        o.seconds = max(compute, memory) + o.kernels * profile.kernel_overhead_us * 1e-6
    return cost


def _add_experts(add, i: int, block: BlockSpec, tokens: int, h: int, inter: int, w: float, a: float,
                 load: list[float] | None) -> None:
    expert_weights = 3 * h * inter * w
    active_per_token = block.active_experts
    if block.has_router:
        add(i, "router", 2 * tokens * h * block.routed_experts, h * block.routed_experts * w + tokens * h * a)
        if load:  # measured fraction of routed slots each expert receives
            distinct = sum(1.0 - (1.0 - f) ** tokens for f in load if f > 0)
        else:
            distinct = expected_distinct_experts(block.routed_experts, block.top_k, tokens)
        read = block.shared_experts + distinct
    else:
        read = block.experts
    add(i, "norm", 4 * tokens * h * active_per_token, read * h * w + 2 * tokens * h * a * active_per_token,
        kernels=max(1, round(read)))
    add(i, "mlp", 2 * tokens * active_per_token * 3 * h * inter,
        read * expert_weights + tokens * active_per_token * (2 * h + 3 * inter) * a, kernels=max(1, round(read)) * 3)


def estimate(arch: ModelArch, profile: DeviceProfile, settings: RooflineSettings | None = None,
             expert_load: dict[int, list[float]] | None = None) -> dict[str, PhaseCost]:
    """Prefill and decode costs of ``arch`` on ``profile``."""
    settings = settings or RooflineSettings()
    return {phase: estimate_phase(arch, profile, phase, settings, expert_load) for phase in ("prefill", "decode")}


def predict_decode_seconds(arch: ModelArch, profile: DeviceProfile, context: int = 512,
                           precision: str = "fp16", batch: int = 1) -> float:
    """Predicted seconds for one decode step at ``context`` (what latency budgets are planned against)."""
    settings = RooflineSettings(context=context, precision=precision, batch=batch)
    return estimate_phase(arch, profile, "decode", settings).seconds
