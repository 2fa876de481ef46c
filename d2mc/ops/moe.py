"""The MoE op contract: the ``D2mcMoE`` plugin node and the expert weight layout, shared by the lowering (which
writes it), the engine builder (which reads it) and the roofline (which counts the plugin's kernels).

One node per MoE block (docs/tensorrt-plugin.md has the full text)::

    D2mcMoE(hidden [T, H] or [B, S, H], router_logits [T, E] or [B, S, E], fc1 [S+E, 2I, H], fc2 [S+E, H, I])
        -> out (the shape and type of hidden)

    domain "d2mc"; attributes plugin_version="1", plugin_namespace="d2mc", num_experts=E (routed),
    num_shared=S, top_k, hidden_size=H, intermediate_size=I, activation="swiglu", normalize (0, 1 or 2)

``hidden`` is the block's RMS-normalised hidden state *without* a norm weight: each expert's own
post-attention norm weight is folded into its rows of ``fc1`` (as the ONNX Runtime lowering does).
``fc1`` interleaves gate and up rows (row ``2i`` is gate_i, row ``2i+1`` is up_i: the layout of ONNX Runtime's
``com.microsoft::MoE`` with ``swiglu_fusion=1``), shared experts first. Routing: ``p = softmax(logits)`` in fp32
over the E routed experts, the top_k largest (lower index first on ties), renormalised to sum to 1 when
``normalize`` is 1, scaled by their full-softmax probability when it is 0, and weighted 1 each when it is 2 (experts
cut from one MLP's neurons, which add up to it). Shared experts always run with weight 1.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from d2mc.errors import UserError

if TYPE_CHECKING:  # the contract itself is read without torch (the engine builder, the roofline)
    import torch

PLUGIN_NAME = "D2mcMoE"
PLUGIN_VERSION = "1"
PLUGIN_NAMESPACE = "d2mc"
PLUGIN_DOMAIN = "d2mc"
PLUGIN_INPUTS = ("hidden", "router_logits", "fc1", "fc2")
ACTIVATIONS = ("swiglu",)
MAX_EXPERTS = 64  # the routing kernel keeps one token's logits in one warp's registers (two per lane)
MAX_TOP_K = 8
GEMV_MAX_TOKENS = 8  # kGemvMaxTokens: up to this many tokens the GEMV path runs (route, gate/up, down kernels)
GEMV_KERNELS = 3
GROUPED_KERNELS = 8  # route, memset, count, scan, scatter, grouped gate/up, grouped down, combine
NORMALIZE = {0: "softmax probability", 1: "renormalised over the top-k", 2: "weight 1 for every chosen expert"}


@dataclass(frozen=True)
class MoePluginAttributes:
    """The attributes of one ``D2mcMoE`` node, validated."""

    num_experts: int
    num_shared: int
    top_k: int
    hidden_size: int
    intermediate_size: int
    activation: str = "swiglu"
    normalize: int = 1
    plugin_version: str = PLUGIN_VERSION
    plugin_namespace: str = PLUGIN_NAMESPACE

    def __post_init__(self):
        problems = []
        if not 1 <= self.num_experts <= MAX_EXPERTS:
            problems.append(f"num_experts={self.num_experts} must be in 1..{MAX_EXPERTS}")
        if self.num_shared < 0:
            problems.append(f"num_shared={self.num_shared} must be >= 0")
        if not 1 <= self.top_k <= min(self.num_experts, MAX_TOP_K):
            problems.append(f"top_k={self.top_k} must be in 1..min(num_experts, {MAX_TOP_K})")
        if self.hidden_size < 1 or self.intermediate_size < 1:
            problems.append("hidden_size and intermediate_size must be positive")
        if self.activation not in ACTIVATIONS:
            problems.append(f"activation '{self.activation}' is not one of {', '.join(ACTIVATIONS)}")
        if self.normalize not in NORMALIZE:
            problems.append(f"normalize={self.normalize} must be 0, 1 or 2")
        if self.plugin_version != PLUGIN_VERSION:
            problems.append(f"plugin_version '{self.plugin_version}' is not {PLUGIN_VERSION}")
        if self.plugin_namespace != PLUGIN_NAMESPACE:
            problems.append(f"plugin_namespace '{self.plugin_namespace}' is not '{PLUGIN_NAMESPACE}'")
        if problems:
            raise UserError(f"{PLUGIN_NAME} node: {'; '.join(problems)}")

    @property
    def total_experts(self) -> int:
        return self.num_experts + self.num_shared

    def fc1_shape(self) -> tuple[int, int, int]:
        return (self.total_experts, 2 * self.intermediate_size, self.hidden_size)

    def fc2_shape(self) -> tuple[int, int, int]:
        return (self.total_experts, self.hidden_size, self.intermediate_size)

    def to_onnx(self) -> dict:
        """Attributes as the ONNX node carries them."""
        return asdict(self)

    @classmethod
    def from_onnx(cls, attrs: dict, where: str = "") -> MoePluginAttributes:
        """Read a node's attributes (a name -> value dict; bytes are decoded), naming what is missing."""
        values = {k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items()}
        required = ("num_experts", "num_shared", "top_k", "hidden_size", "intermediate_size")
        missing = [k for k in required if k not in values]
        if missing:
            raise UserError(f"{PLUGIN_NAME} node {where}: missing attribute(s) {', '.join(missing)}")
        known = {k: values[k] for k in cls.__dataclass_fields__ if k in values}
        for key in required + ("normalize",):
            if key in known:
                known[key] = int(known[key])
        return cls(**known)


def moe_plugin_node(name: str, hidden: str, router_logits: str, fc1: str, fc2: str, output: str,
                    attributes: MoePluginAttributes):
    """The ``D2mcMoE`` ONNX node (with ``onnx.helper``); the graph must import the opset ``(PLUGIN_DOMAIN, 1)``."""
    from onnx import helper

    return helper.make_node(PLUGIN_NAME, [hidden, router_logits, fc1, fc2], [output], name=name,
                            domain=PLUGIN_DOMAIN, **attributes.to_onnx())


def folded_gate_up(mlp, gamma) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate and up weights ``[I, H]`` of a SwiGLU MLP with a norm weight ``gamma`` folded into their input columns
    (``gamma`` None: as they are), so that every expert of a block reads one weightless RMS-normalised input."""
    gate, up = mlp.gate_proj.weight, mlp.up_proj.weight
    if gamma is not None:
        gate, up = gate * gamma[None, :], up * gamma[None, :]
    return gate, up


def pack_experts(experts, routed_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``fc1 [E, 2I, H]`` (gate and up rows interleaved, each expert's post-attention norm weight folded in) and
    ``fc2 [E, H, I]`` (the down projections times ``routed_scale``) of ``experts``: the layout of the plugin and of
    ONNX Runtime's ``com.microsoft::MoE`` with ``swiglu_fusion=1``."""
    import torch

    fc1, fc2 = [], []
    for expert in experts:
        gate, up = folded_gate_up(expert.mlp, expert.post_attention_layernorm.weight)
        fc1.append(torch.stack([gate, up], dim=1).reshape(-1, gate.shape[1]))  # rows g0, u0, g1, u1, ...
        down = expert.mlp.down_proj.weight
        fc2.append(down * routed_scale if routed_scale != 1.0 else down)
    return torch.stack(fc1).detach(), torch.stack(fc2).detach()


def normalize_mode(normalize_topk: bool, unit_weights: bool) -> int:
    """The plugin's ``normalize`` attribute: 2 when every chosen expert counts with weight 1 (experts cut from one
    MLP), else 1 (renormalised over the top-k) or 0 (full-softmax probability)."""
    return 2 if unit_weights else int(normalize_topk)


def plugin_attributes(experts, num_shared: int, top_k: int, normalize: int) -> MoePluginAttributes:
    """The attributes of the node for ``experts`` (shared first), sized from the first expert's MLP."""
    first = experts[0].mlp.gate_proj.weight
    return MoePluginAttributes(num_experts=len(experts) - num_shared, num_shared=num_shared, top_k=top_k,
                               hidden_size=first.shape[1], intermediate_size=first.shape[0], normalize=normalize)
