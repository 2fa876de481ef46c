"""Roofline cost model: FLOPs, bytes moved and predicted time per operator, for prefill and decode.

Each operator's time is ``max(FLOPs / achievable compute, bytes / achievable bandwidth)`` plus a fixed
per-kernel overhead from the device profile (an operator class may stream at a fraction of the achievable
bandwidth: the profile's ``op_bandwidth_efficiency``, e.g. a decode attention kernel that reads the KV cache with
few threads). At batch-1 decode nearly every operator is memory-bound, so the
prediction is about the bytes read per token (weights of the active experts, the KV cache) over bandwidth.

Operator classes per block: ``norm`` (input and post-attention RMSNorms), ``qkv_proj``, ``attention`` (the
score and value products with their KV-cache reads and the cache write), ``o_proj``, ``router`` and ``mlp``
(every expert evaluated); outside the blocks (block -1): ``embedding``, the final ``norm`` and ``lm_head``.

MoE accounting: a decode step reads only the experts it uses. At batch 1 that is the shared experts plus top-k
routed ones; for a batch of ``B`` tokens routed independently and uniformly over ``E`` experts it is the
expected number of distinct experts, ``E * (1 - (1 - k/E) ** B)``, unless measured routing statistics (how
often each expert is chosen, per block) are given. Prefill treats every prompt token the same way. Experts may be
smaller than the model's MLP (``BlockSpec.expert_intermediate``: experts cut from an MLP's neurons); bytes and
FLOPs are those of the experts' own size.

Weights quantized block-wise (int4, int8: weight-only, as ONNX Runtime's ``MatMulNBits`` and TensorRT's
``DequantizeLinear`` store them) are read as their packed values plus, per block of ``block_size`` elements along a
matrix's input, one scale in the activations' float format (fp16 on a GPU, fp32 on a CPU: ``MatMulNBits`` keeps its
scales in the input's type) and, if ``zero_points``, zero points at the weight's own width. Each matrix has a format
of its own (:class:`~d2mc.weight_plan.WeightPlan`: read from an artifact's graph, planned from quantization options,
or one for all from the settings' precision and block size): mixed precision stores some matrices at int8, HQQ's
float zero points add a float residual ``MatMul`` and ``Add`` per matrix and a block-sum ``MatMul`` per input, which
are costed as float kernels of their own, and the LM head may keep a precision of its own (TensorRT Edge-LLM leaves
it fp16 unless asked; an int8 head is in blocks of 64 where they divide the hidden size). Norms, routers and the
embedding row stay in a float format, and the products run at the activations' precision (the weights are
dequantized as they are read). Operators with quantized weights use the profile's ``[precisions.NAME]`` figures
where it has them (:meth:`DeviceProfile.for_precision`); an operator class whose matrices are at several precisions
is costed as one operator per precision.

Kernel launches of an MoE block follow its lowering on the device: on a device with TensorRT the block is one
``D2mcMoE`` plugin node, which normalises once and runs every chosen expert in a fixed number of kernels (route,
gate/up, down on the GEMV path of up to 8 tokens; eight on the grouped path), however many experts there are; on
a device without TensorRT (ONNX Runtime, expert dispatch through standard ops) each expert read is its own norm
and three projections.
"""

from __future__ import annotations

from dataclasses import dataclass

from d2mc.arch import BlockSpec, ModelArch, bytes_per_element, dividing_block_sizes, lm_head_block_size
from d2mc.costs import OUTSIDE, BlockCost, OpCost, PhaseCost, RooflineReport  # noqa: F401  (part of this API)
from d2mc.errors import UserError
from d2mc.ops.moe import GEMV_KERNELS, GEMV_MAX_TOKENS, GROUPED_KERNELS
from d2mc.profiles import OP_CLASSES, DeviceProfile  # noqa: F401  (OP_CLASSES is part of this module's API)
from d2mc.weight_plan import QUANTIZED, MatrixFormat, WeightPlan

PHASES = ("prefill", "decode")
_FLOAT_FORMATS = ("fp32", "fp16", "bf16")

UNIFORM_ROUTING = ("decode reads the shared experts plus the top-k routed experts of each token; a batch of B tokens "
                   "reads the expected number of distinct experts under uniform routing, E * (1 - (1 - k/E) ** B)")
MEASURED_ROUTING = ("decode reads the shared experts plus the routed experts the batch uses; the expected number "
                    "of distinct experts comes from measured routing statistics (per-expert selection rates)")


@dataclass(frozen=True)
class TensorFormats:
    """Bytes per element of the tensors other than the weight matrices (whose formats a
    :class:`~d2mc.weight_plan.WeightPlan` gives), as :class:`RooflineSettings` resolve them on one kind of device."""

    float_weight: float  # norms, routers and the embedding row, kept in a float format
    activation: float  # also each scale and zero-point residual of a quantized matrix
    kv: float
    compute: str  # the precision the matrix products run at


@dataclass(frozen=True)
class RooflineSettings:
    """What to cost: a prefill of ``prefill`` tokens and one decode step after ``context`` cached tokens, for
    ``batch`` sequences, with weights at ``precision`` and the KV cache at ``kv_precision``.

    int4/int8 weights are quantized in blocks of ``block_size`` elements along each matrix's input, with a zero
    point per block when ``zero_points``; the LM head is at ``lm_head_precision`` (default: the weights'). ``weights``,
    when given, is the format of every matrix (:class:`~d2mc.weight_plan.WeightPlan`: an artifact's, or a
    quantization's plan) and replaces those four for the matrices; ``precision`` then names the plan's most common
    one.
    ``activation_precision`` defaults to fp32 on a CPU and on a GPU to the weights' precision if it is fp32, fp16 or
    bf16, else fp16; ``kv_precision`` to the weights' precision if it is one of those, else the activations'.

    ``all_logits``: the prefill computes logits at every prompt position, as exported graphs do (their ``logits``
    output is ``[batch, sequence, vocab]``); ``generate()`` keeps only the last position's."""

    prefill: int = 128
    context: int = 512
    batch: int = 1
    precision: str = "fp16"
    kv_precision: str | None = None
    all_logits: bool = False
    block_size: int = 128
    zero_points: bool = False
    lm_head_precision: str | None = None
    activation_precision: str | None = None
    weights: WeightPlan | None = None

    def __post_init__(self):
        for name in ("prefill", "context", "batch", "block_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"--{name.replace('_', '-')} must be a positive whole number, not {value}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise UserError(f"--block-size must be a power of two of at least 16 (32, 64, 128), not {self.block_size}")
        for precision in (self.precision, self.kv_precision, self.lm_head_precision, self.activation_precision):
            if precision:
                bytes_per_element(precision)
        if self.activation_precision and self.activation_precision not in _FLOAT_FORMATS:
            raise UserError(f"--activation-precision must be a float format ({', '.join(_FLOAT_FORMATS)}), "
                            f"not {self.activation_precision}")

    @property
    def lm_head(self) -> str:
        return self.lm_head_precision or self.precision

    @property
    def quantized(self) -> bool:
        """Whether any weights are stored block-wise (int4/int8)."""
        if self.weights is not None:
            return self.weights.quantized
        return bool({self.precision, self.lm_head} & set(QUANTIZED))

    def plan(self, arch: ModelArch) -> WeightPlan:
        """The format of every weight matrix of ``arch``: :attr:`weights`, else every block matrix at ``precision``
        and the LM head at its own (an int8 head in its own blocks: :func:`d2mc.arch.lm_head_block_size`)."""
        if self.weights is not None:  # checked against the model by check_fits
            return self.weights
        head_block = lm_head_block_size(self.lm_head, self.block_size, arch.hidden_size)
        return WeightPlan.uniform(arch.num_blocks, self._format(self.precision, self.block_size),
                                  self._format(self.lm_head, head_block))

    def _format(self, precision: str, block_size: int) -> MatrixFormat:
        if precision not in QUANTIZED:
            return MatrixFormat(precision)
        return MatrixFormat(precision, block_size, zero_points=self.zero_points)

    def activation_for(self, kind: str) -> str:
        """The activations' precision on a device of ``kind`` ("gpu" or "cpu")."""
        if self.activation_precision:
            return self.activation_precision
        if kind != "gpu":
            return "fp32"
        return self.precision if self.precision in _FLOAT_FORMATS else "fp16"

    def kv_for(self, kind: str) -> str:
        """The KV cache's precision on a device of ``kind``: a 4- or 8-bit cache must be asked for."""
        if self.kv_precision:
            return self.kv_precision
        return self.precision if self.precision in _FLOAT_FORMATS else self.activation_for(kind)

    def formats(self, kind: str) -> TensorFormats:
        """Bytes per element of the tensors other than the weight matrices on a device of ``kind``."""
        activation = self.activation_for(kind)
        a = bytes_per_element(activation)
        return TensorFormats(
            float_weight=bytes_per_element(self.precision) if self.precision in _FLOAT_FORMATS else a, activation=a,
            kv=bytes_per_element(self.kv_for(kind)),
            compute=activation if self.precision in QUANTIZED else self.precision)

    def check_fits(self, arch: ModelArch, phases=("prefill", "decode")) -> None:
        """Refuse lengths past the model's position limit (the decode step adds one token to the context) and a
        block size that does not divide the input size of a quantized matrix."""
        limit = arch.max_position_embeddings
        if "prefill" in phases and self.prefill > limit:
            raise UserError(f"--prefill {self.prefill} is past the model's maximum of {limit} positions")
        if "decode" in phases and self.context + 1 > limit:
            raise UserError(f"--context {self.context} is past the model's maximum of {limit} positions "
                            f"(the decode step needs one more: use --context {limit - 1} or less)")
        if self.weights is not None:  # formats read from a graph or planned from checked quantization options
            self.weights.check(arch)
            return
        inputs = []  # (what, input size) of each quantized matrix
        if self.precision in QUANTIZED:
            inputs += [("the attention projections and MLP gate/up", arch.hidden_size),
                       ("the attention output projection", arch.num_heads * arch.head_dim)]
            inputs += [("the MLP down projection", n) for n in sorted({arch.expert_intermediate(b) for b in arch.blocks})]
        if self.lm_head in QUANTIZED:
            inputs.append(("the LM head", arch.hidden_size))
        for what, size in inputs:
            if size % self.block_size:
                fits = dividing_block_sizes(n for _, n in inputs)
                hint = f"use --block-size {' or '.join(fits)}" if fits else "no block size of 32 or more divides them all"
                raise UserError(f"--block-size {self.block_size} does not divide the input size {size} of {what}: "
                                f"{hint}")


def expected_distinct_experts(routed: int, top_k: int, tokens: int) -> float:
    """Expected number of distinct experts a batch of ``tokens`` touches under uniform top-k routing."""
    if routed <= 1:
        return float(routed)
    return routed * (1.0 - (1.0 - top_k / routed) ** tokens)


def _selection_rates(arch: ModelArch, expert_load: dict[int, list[float]] | None) -> dict[int, list[float]]:
    """Per MoE block, the probability that one token selects each routed expert (they add up to top_k).

    ``expert_load`` may give counts or fractions per routed expert; they are rescaled to top_k per token.
    """
    if not expert_load:
        return {}
    rates = {}
    for raw_index, load in expert_load.items():
        i = int(raw_index)
        if not 0 <= i < arch.num_blocks or not arch.blocks[i].has_router:
            raise UserError(f"routing statistics given for block {i}, which has no router")
        block = arch.blocks[i]
        if len(load) != block.routed_experts or any(v < 0 for v in load) or not sum(load):
            raise UserError(f"routing statistics of block {i} need {block.routed_experts} non-negative values, "
                            f"not {list(load)}")
        total = float(sum(load))
        rates[i] = [min(1.0, block.top_k * v / total) for v in load]
    return rates


def estimate_phase(arch: ModelArch, profile: DeviceProfile, phase: str, settings: RooflineSettings,
                   expert_load: dict[int, list[float]] | None = None) -> PhaseCost:
    """Cost of ``phase`` ("prefill" of ``settings.prefill`` tokens, or "decode" at ``settings.context``)."""
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, not {phase!r}")
    settings.check_fits(arch, (phase,))
    rates = _selection_rates(arch, expert_load)
    b = settings.batch
    n = settings.prefill if phase == "prefill" else 1
    past = 0 if phase == "prefill" else settings.context
    tokens = b * n
    f = settings.formats(profile.kind)
    fw, a, kvb = f.float_weight, f.activation, f.kv
    plan = settings.plan(arch)
    h = arch.hidden_size
    q_dim, kv_dim = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    cost = PhaseCost(phase, b, n, past)
    ops = cost.ops

    def add(block, op, flops, bytes_, kernels=1, weights=None):
        ops.append(OpCost(block, op, float(flops), float(bytes_), kernels, weights=weights))

    add(OUTSIDE, "embedding", 0, tokens * h * (fw + a))
    for i, block in enumerate(arch.blocks):
        formats = plan.blocks[i]
        if block.attention:
            add(i, "norm", 4 * tokens * h, h * fw + 2 * tokens * h * a)
            # q, k and v read one input as one packed projection (one per format, should their formats differ)
            packed: dict[MatrixFormat, int] = {}
            for leaf, out in (("q_proj", q_dim), ("k_proj", kv_dim), ("v_proj", kv_dim)):
                packed[formats.of(leaf)] = packed.get(formats.of(leaf), 0) + out
            _add_matrices(add, i, "qkv_proj", [(fmt, h, out, "x") for fmt, out in packed.items()], tokens, a)
            if phase == "prefill":  # causal: each query attends to the keys before it; K and V come from qkv_proj
                pairs = b * n * (n + 1) / 2
                kv_read = tokens * 2 * kv_dim * a
            else:  # every cached position of every sequence is read once, plus the new one
                pairs = b * (past + 1)
                kv_read = b * (past + 1) * 2 * kv_dim * kvb
            kv_write = tokens * 2 * kv_dim * kvb
            add(i, "attention", 4 * pairs * q_dim, kv_read + kv_write + 2 * tokens * q_dim * a)
            _add_matrices(add, i, "o_proj", [(formats.o_proj, q_dim, h, "x")], tokens, a)
        _add_experts(add, i, block, tokens, h, arch.expert_intermediate(block), formats, fw, a, rates.get(i),
                     fused_moe=bool(profile.tensorrt_precisions))
    add(OUTSIDE, "norm", 4 * tokens * h, h * fw + 2 * tokens * h * a)
    logits_tokens = tokens if settings.all_logits else b
    _add_matrices(add, OUTSIDE, "lm_head", [(plan.lm_head, h, arch.vocab_size, "x")], logits_tokens, a)

    views = {w: profile.for_precision(w) if w else profile for w in {o.weights for o in ops}}
    for o in ops:
        view = views[o.weights]
        compute, memory = o.flops / view.achievable_flops(f.compute), o.bytes / view.bandwidth_for(o.op)
        o.bound = "compute" if compute > memory else "memory"
        o.seconds = max(compute, memory) + o.kernels * view.kernel_overhead_us * 1e-6
    return cost


def _add_matrices(add, i: int, op: str, nodes: list[tuple[MatrixFormat, int, int, str]], tokens: int, a: float,
                  read: float = 1.0, active: int = 1, runs: int = 1, kernels: int | None = None) -> None:
    """The operators of class ``op`` in block ``i`` that read weight matrices: ``nodes`` gives each matrix product's
    ``(format, in, out, input)`` (products on the same ``input`` read one tensor); those of one format are one
    operator at that format's figures (its ``weights``), reading the matrices ``read`` times (the experts read) and
    computing for ``active`` per token; each product is a kernel per one of ``runs``, or the first operator takes
    ``kernels`` for all. A residual of float zero points adds a float operator: per product a ``MatMul`` and an
    ``Add``, per input a block-sum ``MatMul`` with a 0/1 matrix ``[in, in / block_size]``."""
    groups: dict[MatrixFormat, list] = {}
    for node in nodes:
        groups.setdefault(node[0], []).append(node)
    for number, (fmt, group) in enumerate(groups.items()):
        inputs = {node[3]: node[1] for node in group}
        count = runs * len(group) if kernels is None else kernels if number == 0 else 0
        add(i, op, 2 * tokens * active * sum(k * n for _, k, n, _ in group),
            read * sum(fmt.stored_bytes(k, n, a) for _, k, n, _ in group)
            + tokens * active * (sum(inputs.values()) + sum(n for _, _, n, _ in group)) * a,
            count, weights=fmt.precision)
        if not fmt.residual:
            continue
        sums = {name: k // fmt.block_size for name, k in inputs.items()}
        add(i, op, 2 * tokens * active * sum(k // fmt.block_size * n for _, k, n, _ in group),
            read * sum(fmt.residual_bytes(k, n, a) for _, k, n, _ in group)
            + tokens * active * sum(k // fmt.block_size + 3 * n for _, k, n, _ in group) * a,
            runs * 2 * len(group))
        add(i, op, 2 * tokens * active * sum(inputs[name] * s for name, s in sums.items()),
            sum(inputs[name] * s * a * read + tokens * active * (inputs[name] + s) * a for name, s in sums.items()),
            runs * len(sums))


def _add_experts(add, i: int, block: BlockSpec, tokens: int, h: int, inter: int, formats, fw: float, a: float,
                 rates: list[float] | None, fused_moe: bool = False) -> None:
    """Norms, router and MLPs of one block (``inter``: each expert's intermediate size; ``formats``: the block's
    :class:`~d2mc.weight_plan.BlockWeights`; ``fw``, ``a``: bytes per element of the float norm and router weights,
    of the activations); the weights read are those of the experts the tokens use. ``fused_moe``: a routed block
    runs as one plugin node (see the module text)."""
    active_per_token = block.active_experts
    if block.has_router:
        add(i, "router", 2 * tokens * h * block.routed_experts, h * block.routed_experts * fw + tokens * h * a)
        if rates:
            distinct = sum(1.0 - (1.0 - p) ** tokens for p in rates)
        else:
            distinct = expected_distinct_experts(block.routed_experts, block.top_k, tokens)
        read = block.shared_experts + distinct
    else:
        read = block.experts
    runs = max(1, round(read))
    norm_kernels, mlp_kernels = runs, None
    if fused_moe and block.has_router:
        norm_kernels, mlp_kernels = 1, GEMV_KERNELS if tokens <= GEMV_MAX_TOKENS else GROUPED_KERNELS
    add(i, "norm", 4 * tokens * h * active_per_token, read * h * fw + 2 * tokens * h * a * active_per_token,
        kernels=norm_kernels)
    # gate and up read the normed input, down their product; SiLU and the product ride along
    _add_matrices(add, i, "mlp", [(formats.gate_proj, h, inter, "x"), (formats.up_proj, h, inter, "x"),
                                  (formats.down_proj, inter, h, "product")],
                  tokens, a, read=read, active=active_per_token, runs=runs, kernels=mlp_kernels)


def estimate(arch: ModelArch, profile: DeviceProfile, settings: RooflineSettings | None = None,
             expert_load: dict[int, list[float]] | None = None) -> dict[str, PhaseCost]:
    """Prefill and decode costs of ``arch`` on ``profile``."""
    settings = settings or RooflineSettings()
    return {phase: estimate_phase(arch, profile, phase, settings, expert_load) for phase in PHASES}


def analyze(arch: ModelArch, profile: DeviceProfile, settings: RooflineSettings | None = None,
            expert_load: dict[int, list[float]] | None = None) -> RooflineReport:
    """Both phases with the inputs that produced them, ready for a report (:meth:`RooflineReport.to_dict`)."""
    settings = settings or RooflineSettings()
    phases = estimate(arch, profile, settings, expert_load)
    return RooflineReport(profile, settings, phases, arch.total_params, arch.active_params,
                          MEASURED_ROUTING if expert_load else UNIFORM_ROUTING)


def predict_decode_seconds(arch: ModelArch, profile: DeviceProfile, context: int = 512,
                           precision: str = "fp16", batch: int = 1, kv_precision: str | None = None,
                           expert_load: dict[int, list[float]] | None = None, block_size: int = 128,
                           lm_head_precision: str | None = None) -> float:
    """Predicted seconds for one decode step at ``context`` (what latency budgets are planned against); int4/int8
    weights in blocks of ``block_size``, the LM head at ``lm_head_precision`` (default: the weights')."""
    settings = RooflineSettings(context=context, precision=precision, batch=batch, kv_precision=kv_precision,
                                block_size=block_size, lm_head_precision=lm_head_precision)
    return estimate_phase(arch, profile, "decode", settings, expert_load).seconds


def predict_prefill_seconds(arch: ModelArch, profile: DeviceProfile, tokens: int = 128,
                            precision: str = "fp16", batch: int = 1) -> float:
    """Predicted seconds for a prefill of ``tokens`` prompt tokens."""
    settings = RooflineSettings(prefill=tokens, precision=precision, batch=batch)
    return estimate_phase(arch, profile, "prefill", settings).seconds
