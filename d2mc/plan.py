"""Fusion plans: which consecutive layers become one Dense2MoE block, and the block lists each method builds."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from d2mc.errors import UserError

METHODS = ("lfuc", "drop-layers", "drop-attention")


@dataclass
class FusionPlan:
    """Groups of consecutive parent layers; the first layer of a group keeps its attention.

    Under LF-UC a group becomes one block: the kept layer's attention, then every MLP of the group as an expert.
    Under drop-attention the other layers of a group lose their attention and keep their MLP in sequence.
    Under drop-layers they are removed whole (``dropped`` may name layers chosen outside the groups).
    """

    num_layers: int
    groups: list[tuple[int, ...]]
    top_k: int = 1
    shared_expert: bool = False
    normalize_topk: bool = True
    dropped: list[int] = field(default_factory=list)
    reason: str = ""

    @property
    def removed_attention(self) -> list[int]:
        """Layers whose attention the plan removes."""
        return sorted(layer for g in self.groups for layer in g[1:])

    def blocks(self, method: str) -> list[dict]:
        """The ``config.blocks`` list a method builds from this plan."""
        removed = set(self.removed_attention)
        if method == "drop-layers":
            dropped = set(self.dropped or removed)
            return [_block(i, [i]) for i in range(self.num_layers) if i not in dropped]
        if method == "drop-attention":
            return [_block(None if i in removed else i, [i]) for i in range(self.num_layers)]
        if method != "lfuc":
            raise UserError(f"unknown method '{method}': choose one of {', '.join(METHODS)}")
        starts = {g[0]: g for g in self.groups}
        blocks = []
        for i in range(self.num_layers):
            if i in removed:
                continue
            group = starts.get(i, (i,))
            shared = 1 if self.shared_expert and len(group) > 1 else 0
            routed = len(group) - shared
            blocks.append(_block(i, list(group), shared, min(self.top_k, max(routed, 1)), self.normalize_topk))
        return blocks

    def to_dict(self) -> dict:
        return {**asdict(self), "groups": [list(g) for g in self.groups],
                "removed_attention": self.removed_attention}


def _block(attention, experts, shared=0, top_k=1, normalize=True) -> dict:
    return {"attention_layer": attention, "expert_layers": experts, "shared_experts": shared, "top_k": top_k,
            "normalize_topk": normalize}


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
