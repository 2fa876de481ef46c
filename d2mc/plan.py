"""Fusion plans: which consecutive layers become one Dense2MoE block, and the block lists each method builds."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from d2mc.arch import BlockPlan
from d2mc.errors import UserError

METHODS = ("lfuc", "drop-layers", "drop-attention", "split-experts", "lfuc-split", "upcycle", "auto")
PLANNED_METHODS = ("lfuc", "drop-layers", "drop-attention", "lfuc-split")  # those that remove layers by a plan
UPCYCLE_INITS = ("copy", "partition")


@dataclass(frozen=True)
class GroupShape:
    """How one fused group routes: with ``shared_expert`` the kept layer's MLP is always active, and ``top_k`` of
    the other (routed) MLPs run per token."""

    shared_expert: bool = False
    top_k: int = 1

    @property
    def label(self) -> str:
        return ("shared + " if self.shared_expert else "") + f"top-{self.top_k}"


@dataclass
class FusionPlan:
    """Groups of consecutive parent layers; the first layer of a group keeps its attention.

    Under LF-UC a group becomes one block: the kept layer's attention, then every MLP of the group as an expert.
    Under drop-attention the other layers of a group lose their attention and keep their MLP in sequence.
    Under drop-layers they are removed whole (``dropped`` may name layers chosen outside the groups).

    A mixed plan (``auto``) also names ``attention_dropped`` layers (their attention goes, their MLP stays a block
    of its own), ``dropped`` layers (removed whole) and a :class:`GroupShape` per group in ``shapes`` (empty: every
    group routes by the plan-wide ``top_k`` and ``shared_expert``).
    """

    num_layers: int
    groups: list[tuple[int, ...]]
    top_k: int = 1
    shared_expert: bool = False
    normalize_topk: bool = True
    dropped: list[int] = field(default_factory=list)
    attention_dropped: list[int] = field(default_factory=list)
    shapes: list[GroupShape] = field(default_factory=list)
    reason: str = ""

    @property
    def removed_attention(self) -> list[int]:
        """Layers whose attention the plan removes while keeping their MLP (fused or on its own)."""
        return sorted({layer for g in self.groups for layer in g[1:]} | set(self.attention_dropped))

    def shape(self, group: int) -> GroupShape:
        """The routing of group number ``group``."""
        return self.shapes[group] if self.shapes else GroupShape(self.shared_expert, self.top_k)

    def blocks(self, method: str) -> list[BlockPlan]:
        """The ``config.blocks`` list a method builds from this plan (``auto`` builds the mixed plan as LF-UC)."""
        removed = set(self.removed_attention)
        if method == "drop-layers":
            dropped = set(self.dropped or removed)
            return [BlockPlan.dense(i) for i in range(self.num_layers) if i not in dropped]
        if method == "drop-attention":
            return [BlockPlan(None if i in removed else i, (i,)) for i in range(self.num_layers)]
        if method not in ("lfuc", "lfuc-split", "auto"):
            raise UserError(f"unknown method '{method}': choose one of {', '.join(PLANNED_METHODS)}")
        starts = {g[0]: n for n, g in enumerate(self.groups)}
        fused = {layer for g in self.groups for layer in g[1:]}
        blocks = []
        for i in range(self.num_layers):
            if i in fused or i in self.dropped:
                continue
            if i in self.attention_dropped:
                blocks.append(BlockPlan(None, (i,)))
                continue
            if i not in starts:
                blocks.append(BlockPlan.dense(i))
                continue
            group, shape = self.groups[starts[i]], self.shape(starts[i])
            shared = 1 if shape.shared_expert and len(group) > 1 else 0
            routed = len(group) - shared
            blocks.append(BlockPlan(i, group, shared, min(shape.top_k, max(routed, 1)), self.normalize_topk))
        return blocks

    def describe(self) -> str:
        """The plan in a line as LF-UC and ``auto`` build it: fused groups with their routing, then the attention
        and the layers it removes."""
        parts = [f"fuse {g[0]}-{g[-1]} ({self.shape(n).label})" for n, g in enumerate(self.groups)]
        if self.attention_dropped:
            parts.append("drop attention " + _fmt_layers(self.attention_dropped))
        if self.dropped:
            parts.append("drop layers " + _fmt_layers(self.dropped))
        return "; ".join(parts) or "dense"

    def to_dict(self) -> dict:
        return {**asdict(self), "groups": [list(g) for g in self.groups],
                "removed_attention": self.removed_attention}


def parse_plan(text: str, num_layers: int, keep_edges: bool = True) -> list[tuple[int, ...]]:
    """Parse ``"12-13,16-18"`` into groups, refusing bad ranges, overlaps and (by default) the edge layers."""
    groups: list[tuple[int, ...]] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        first, sep, last = part.partition("-")
        if not sep or not first.strip().isdigit() or not last.strip().isdigit():
            raise UserError(f"bad plan group '{part}': write groups as FIRST-LAST, e.g. 12-13,16-17")
        a, b = int(first), int(last)
        if b <= a:
            raise UserError(f"bad plan group '{part}': a group needs at least two layers, FIRST < LAST")
        if b >= num_layers:
            raise UserError(f"plan group '{part}' is out of range: the model has layers 0-{num_layers - 1}")
        groups.append(tuple(range(a, b + 1)))
    if not groups:
        raise UserError("the plan is empty: give groups such as 12-13,16-17")
    validate_groups(groups, num_layers, keep_edges)
    return sorted(groups)


def validate_groups(groups: list[tuple[int, ...]], num_layers: int, keep_edges: bool = True) -> None:
    """Refuse overlapping groups and, when ``keep_edges``, groups touching the first or last layer."""
    seen: dict[int, tuple[int, ...]] = {}
    for g in groups:
        for layer in g:
            if layer in seen:
                raise UserError(f"plan groups {_fmt(seen[layer])} and {_fmt(g)} overlap at layer {layer}")
            seen[layer] = g
        if keep_edges and (g[0] == 0 or g[-1] == num_layers - 1):
            raise UserError(f"plan group {_fmt(g)} touches the first or last layer, which stay dense")


def _fmt(g: tuple[int, ...]) -> str:
    return f"{g[0]}-{g[-1]}"


def choose_groups(scores: list[float], remove: int, max_group: int = 2, keep_edges: bool = True
                  ) -> list[tuple[int, ...]]:
    """Remove the attention of the ``remove`` most redundant layers (lowest score), fusing each run of removed
    layers into the layer before it; runs are at most ``max_group - 1`` long."""
    n = len(scores)
    if remove == 0:
        return []
    first = 2 if keep_edges else 1  # layer 1 may be a kept layer; layer 0 stays dense
    last = n - 2 if keep_edges else n - 1
    removed: set[int] = set()
    for layer in sorted(range(first, last + 1), key=lambda i: scores[i]):
        trial = removed | {layer}
        if all(len(run) <= max_group - 1 for run in _runs(trial)):
            removed = trial
            if len(removed) == remove:
                return [(run[0] - 1, *run) for run in _runs(removed)]
    raise UserError(f"cannot remove {remove} attention modules from {n} layers with groups of at most "
                    f"{max_group} layers while the first and last layers stay dense: ask for fewer or allow "
                    "larger groups (--max-group)")


def _runs(layers: set[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for layer in sorted(layers):
        if runs and runs[-1][-1] == layer - 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    return runs


# ---- experts cut from MLPs: split-experts (ToMoE / MoEfication) and upcycle --------------------------------------

def parse_layers(text: str | None, num_layers: int) -> list[int]:
    """Parse ``"2-27"`` or ``"3,5,8-9"`` into layer numbers (``None``: every layer), refusing bad ranges."""
    if text is None:
        return list(range(num_layers))
    layers: set[int] = set()
    for part in (p.strip() for p in str(text).split(",") if p.strip()):
        first, sep, last = part.partition("-")
        if not first.strip().isdigit() or (sep and not last.strip().isdigit()):
            raise UserError(f"bad layer range '{part}': write layers as 3,5 or FIRST-LAST, e.g. 2-27")
        a, b = int(first), int(last) if sep else int(first)
        if b < a or b >= num_layers:
            raise UserError(f"layer range '{part}' is out of range: the model has layers 0-{num_layers - 1}")
        layers.update(range(a, b + 1))
    if not layers:
        raise UserError("no layers given: write them as 3,5 or FIRST-LAST, e.g. 2-27")
    return sorted(layers)


def check_expert_count(experts: int, intermediate: int, option: str = "--experts") -> int:
    """The neurons per expert when an MLP of ``intermediate`` neurons is cut into ``experts`` equal slices."""
    if experts < 2:
        raise UserError(f"{option} must be at least 2, not {experts}")
    if experts > intermediate:
        raise UserError(f"{option} {experts} is more than the {intermediate} neurons of each MLP")
    if intermediate % experts:
        raise UserError(f"{option} {experts} does not divide the {intermediate} neurons of each MLP into equal "
                        f"experts: choose a divisor of {intermediate}")
    return intermediate // experts


def split_block(block: BlockPlan, intermediate: int, experts: int, active_fraction: float,
                shared: int | None = None, where: str = "") -> BlockPlan:
    """The block split-experts makes of ``block``: every MLP cut into ``experts`` experts of equal size, routed
    together with weight 1 each, ``active_fraction`` of the neurons the block used per token still active.

    ``shared`` experts of every always-active MLP (a dense layer's MLP, an LF-UC shared expert) stay always active
    and count towards the active share; ``None`` keeps a quarter of the experts (at least one left to route), the
    best of 0 to 3 of 8 on SmolLM2 (benchmarks/split_experts.py). In ``expert_layers`` the shared experts come first, then each MLP's routed
    experts in the order of its layers; each layer's experts are consecutive slices of its (permuted) neurons.
    """
    where = where or f"block of layers {list(block.expert_layers)}"
    size = check_expert_count(experts, intermediate)
    if not 0 < active_fraction <= 1:
        raise UserError(f"--active-fraction {active_fraction:g} is out of range: give the share of each MLP's "
                        "neurons that stays active per token, in (0, 1]")
    if block.expert_intermediate:
        raise UserError(f"{where} is already split into experts")
    layers = block.expert_layers
    always, used = block.active_mlps
    if len(always) < len(layers) and not (block.top_k == 1 and block.normalize_topk
                                          and block.routing_weights == "softmax"):
        raise UserError(f"{where} weights its experts by their softmax probability (top-k above 1 or no "
                        "normalisation): splitting needs experts that count in full (top-1, normalised)")
    active = active_fraction * experts * used
    if abs(active - round(active)) > 1e-6:
        raise UserError(f"--active-fraction {active_fraction:g} of {experts} experts per MLP is {active:g} experts: "
                        f"choose a multiple of 1/{experts}")
    if shared is None:
        shared = min(experts // 4, (round(active) - 1) // len(always)) if always else 0
    if not 0 <= shared < experts:
        raise UserError(f"--split-shared {shared} must be between 0 and {experts - 1} (of {experts} experts)")
    n_shared = shared * len(always)
    top_k = round(active) - n_shared
    if top_k < 1:
        raise UserError(f"--split-shared {shared} keeps {n_shared} experts always active, which leaves none of the "
                        f"{round(active)} active experts to route: lower --split-shared or raise --active-fraction")
    shared_layers = [layers[i] for i in always for _ in range(shared)]
    routed_layers = [layer for i, layer in enumerate(layers) for _ in range(experts - (shared if i in always else 0))]
    return BlockPlan(block.attention_layer, shared_layers + routed_layers, shared_experts=n_shared, top_k=top_k,
                     normalize_topk=True, expert_intermediate=size, routing_weights="ones")


def split_plan(blocks: list[BlockPlan], intermediate: int, experts: int, active_fraction: float,
               shared: int | None = None, layers: list[int] | None = None) -> tuple[list[BlockPlan], list[int]]:
    """``blocks`` with every block whose MLPs all come from ``layers`` (default: all) split by :func:`split_block`;
    also returns the indices of the split blocks."""
    chosen = None if layers is None else set(layers)
    targets = [i for i, b in enumerate(blocks) if chosen is None or set(b.expert_layers) <= chosen]
    if not targets:
        raise UserError(f"no block has all its MLPs in layers {_fmt_layers(layers)}: nothing to split")
    out = list(blocks)
    for i in targets:
        out[i] = split_block(blocks[i], intermediate, experts, active_fraction, shared, where=f"block {i}")
    return out, targets


def _fmt_layers(layers) -> str:
    return ",".join(str(x) for x in layers) if layers else "(none)"


def upcycle_block(block: BlockPlan, intermediate: int, experts: int, top_k: int, init: str = "copy",
                  normalize_topk: bool = True) -> BlockPlan:
    """The block upcycle makes of a dense layer's ``block``: its MLP as ``experts`` experts, ``top_k`` per token.

    ``init="copy"``: full copies, weighted by their (renormalised) softmax probability, so a fresh upcycled model
    computes what the dense one did; ``"partition"``: consecutive slices of the neurons, each counting in full.
    """
    if init not in UPCYCLE_INITS:
        raise UserError(f"unknown upcycling init '{init}': choose one of {', '.join(UPCYCLE_INITS)}")
    if len(block.expert_layers) != 1:
        raise UserError(f"upcycling starts from dense layers; layers {list(block.expert_layers)} are already fused")
    if init == "copy":
        if experts < 2:
            raise UserError(f"--experts must be at least 2, not {experts}")
        size = None
    else:
        size = check_expert_count(experts, intermediate)
    if not 1 <= top_k <= experts:
        raise UserError(f"--top-k {top_k} is more than the {experts} experts" if top_k > experts
                        else f"--top-k must be at least 1, not {top_k}")
    return BlockPlan(block.attention_layer, block.expert_layers * experts, top_k=top_k, normalize_topk=normalize_topk,
                     expert_intermediate=size, routing_weights="softmax" if size is None else "ones")
