"""What the roofline cost model returns: the cost of each operator, block and phase, and the report of a model on a
device (:mod:`d2mc.roofline` computes them)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from d2mc.profiles import DeviceProfile
    from d2mc.roofline import RooflineSettings

OUTSIDE = -1  # block index of the embedding, the final norm and the LM head


@dataclass
class OpCost:
    """One operator class in one block (block -1: outside the blocks); ``weights``: the precision of the stored
    matrices it reads (None: none, or float kernels beside them such as a zero-point residual), whose figures of the
    device profile it runs at."""

    block: int
    op: str
    flops: float
    bytes: float
    kernels: int
    seconds: float = 0.0
    bound: str = ""
    weights: str | None = None

    @property
    def intensity(self) -> float:
        """Arithmetic intensity, FLOPs per byte."""
        return self.flops / self.bytes if self.bytes else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "intensity": self.intensity}


@dataclass
class BlockCost:
    """The operators of one block added up; ``bound`` is the bound of the operators that take most of its time."""

    block: int
    seconds: float
    flops: float
    bytes: float
    bound: str

    @property
    def intensity(self) -> float:
        return self.flops / self.bytes if self.bytes else 0.0

    @property
    def label(self) -> str:
        return "embed+head" if self.block == OUTSIDE else str(self.block)

    def to_dict(self) -> dict:
        return {**asdict(self), "label": self.label, "intensity": self.intensity}


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

    @property
    def intensity(self) -> float:
        return self.flops / self.bytes if self.bytes else 0.0

    @property
    def bound(self) -> str:
        memory = sum(o.seconds for o in self.ops if o.bound == "memory")
        return "memory" if memory >= self.seconds / 2 else "compute"

    def per_block(self) -> dict[int, float]:
        """Predicted seconds per block (-1 gathers embedding, final norm and LM head)."""
        return {b.block: b.seconds for b in self.blocks()}

    def blocks(self) -> list[BlockCost]:
        """Per-block totals, blocks in order, then the embedding/final norm/LM head."""
        grouped: dict[int, list[OpCost]] = {}
        for o in self.ops:
            grouped.setdefault(o.block, []).append(o)
        out = []
        for block in sorted(grouped, key=lambda b: (b == OUTSIDE, b)):
            ops = grouped[block]
            seconds = sum(o.seconds for o in ops)
            memory = sum(o.seconds for o in ops if o.bound == "memory")
            out.append(BlockCost(block, seconds, sum(o.flops for o in ops), sum(o.bytes for o in ops),
                                 "memory" if memory >= seconds / 2 else "compute"))
        return out

    def per_op_class(self) -> dict[str, dict[str, float]]:
        """Totals per operator class over all blocks."""
        out: dict[str, dict[str, float]] = {}
        for o in self.ops:
            agg = out.setdefault(o.op, {"seconds": 0.0, "flops": 0.0, "bytes": 0.0})
            agg["seconds"] += o.seconds
            agg["flops"] += o.flops
            agg["bytes"] += o.bytes
        return out

    def to_dict(self) -> dict:
        return {"phase": self.phase, "batch": self.batch, "tokens": self.tokens, "context": self.context,
                "seconds": self.seconds, "flops": self.flops, "bytes": self.bytes, "intensity": self.intensity,
                "bound": self.bound, "blocks": [b.to_dict() for b in self.blocks()],
                "op_classes": self.per_op_class(), "ops": [o.to_dict() for o in self.ops]}


@dataclass
class RooflineReport:
    """Prefill and decode costs of one model on one device, with the inputs that produced them."""

    profile: DeviceProfile
    settings: RooflineSettings
    phases: dict[str, PhaseCost]
    params_total: int
    params_active: int
    routing: str

    @property
    def prefill(self) -> PhaseCost:
        return self.phases["prefill"]

    @property
    def decode(self) -> PhaseCost:
        return self.phases["decode"]

    def to_dict(self) -> dict:
        p, s = self.profile, self.settings
        return {
            "profile": {"name": p.name, "description": p.description, "kind": p.kind,
                        "bandwidth_gbps": p.memory_bandwidth_gbps,
                        "achievable_bandwidth_gbps": p.achievable_bandwidth / 1e9,
                        "achievable_tflops": p.achievable_flops(s.formats(p.kind).compute) / 1e12,
                        "kernel_overhead_us": p.kernel_overhead_us,
                        "op_bandwidth_efficiency": p.op_bandwidth_efficiency,
                        "precisions": p.precisions,
                        "source": "figures from " + (str(p.path.name) if p.path else p.name) + " ([source] says "
                                  "which are datasheet and which measured)"},
            "settings": {"prefill": s.prefill, "context": s.context, "batch": s.batch, "precision": s.precision,
                         "kv": s.kv_for(p.kind), "lm_head": s.lm_head, "activations": s.activation_for(p.kind),
                         **({"block_size": s.block_size, "zero_points": s.zero_points}
                            if s.quantized and s.weights is None else {}),
                         **({"weights": s.weights.summary()} if s.weights is not None else {})},
            "parameters": {"total": self.params_total, "active_per_token": self.params_active},
            "moe_accounting": self.routing,
            "phases": {name: cost.to_dict() for name, cost in self.phases.items()},
        }
