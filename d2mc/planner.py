"""The search behind ``--method auto``: per parent layer, keep it, drop its attention only, fuse its MLP as an expert
of the block before it, or drop it whole; the plan of least predicted damage whose predicted decode latency meets
a budget.

A plan is a sequence of :class:`Action`\\ s over consecutive parent layers. Its predicted decode time is the
roofline's, which adds up over blocks (each block's seconds follow from its :class:`~d2mc.arch.BlockSpec`), and its
predicted damage is the sum of the damages measured for its actions one at a time (:mod:`d2mc.damage`). The search
keeps, at every layer, the Pareto set of partial plans (seconds, damage) and extends each by every action that
starts there, so the frontier it returns is exact for the additive model: every plan on it is the least damaging
one at its latency. :func:`correct_damages` then refits the additive model on whole plans measured as they are.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

from d2mc.arch import BlockPlan, BlockSpec
from d2mc.plan import FusionPlan, GroupShape

KEEP, DROP_ATTENTION, DROP_LAYER, FUSE = "keep", "drop-attention", "drop-layer", "fuse"
KINDS = (DROP_ATTENTION, DROP_LAYER, FUSE)


@dataclass(frozen=True)
class Action:
    """What becomes of the parent layers ``first..last``: kept (one layer), its attention dropped (one layer), the
    layer dropped (one layer), or the group fused into one block (the first layer keeps its attention, every MLP of
    the group becomes an expert, routed by ``shape``)."""

    kind: str
    first: int
    last: int
    shape: GroupShape | None = None

    def __post_init__(self):
        if self.kind not in (KEEP, *KINDS):
            raise ValueError(f"unknown action kind {self.kind!r}")
        if (self.kind == FUSE) != (self.last > self.first) or (self.kind == FUSE) != (self.shape is not None):
            raise ValueError("a fused action covers at least two layers and has a shape; the others one layer")

    @property
    def layers(self) -> range:
        return range(self.first, self.last + 1)

    @property
    def block(self) -> BlockPlan | None:
        """The block the action builds (None for a dropped layer)."""
        if self.kind == KEEP:
            return BlockPlan.dense(self.first)
        if self.kind == DROP_ATTENTION:
            return BlockPlan(None, (self.first,))
        if self.kind == DROP_LAYER:
            return None
        shared = int(self.shape.shared_expert)
        return BlockPlan(self.first, tuple(self.layers), shared, self.shape.top_k)

    @property
    def label(self) -> str:
        if self.kind == FUSE:
            return f"fuse {self.first}-{self.last} ({self.shape.label})"
        return f"{self.kind.replace('-', ' ')} {self.first}"


def group_shapes(size: int, shapes: bool = True) -> list[GroupShape]:
    """The routings a group of ``size`` layers may take: top-1 always; with ``shapes`` also top-2 (when three or
    more MLPs are routed) and the kept layer's MLP as shared expert (top-1, and top-2 when three or more remain
    routed). A top-k equal to the routed count would make the block dense, so it is not offered."""
    out = [GroupShape(False, 1)]
    if shapes:
        if size >= 3:
            out.append(GroupShape(False, 2))
        if size - 1 >= 2:
            out.append(GroupShape(True, 1))
        if size - 1 >= 3:
            out.append(GroupShape(True, 2))
    return out


def enumerate_actions(num_layers: int, eligible: Iterable[int], max_group: int = 4, shapes: bool = True
                      ) -> list[Action]:
    """Every action on the ``eligible`` layers (never the first or the last layer): drop the attention, drop the
    layer, and fuse each run of eligible layers of at most ``max_group - 1`` into the layer before it (which may be
    any layer but the first; it keeps its attention), in each routing :func:`group_shapes` offers."""
    eligible = sorted(set(eligible) - {0, num_layers - 1})
    chosen = set(eligible)
    actions = [Action(kind, i, i) for i in eligible for kind in (DROP_ATTENTION, DROP_LAYER)]
    for head in range(1, num_layers - 2):
        for last in range(head + 1, min(head + max_group, num_layers - 1)):
            if last not in chosen:
                break
            actions += [Action(FUSE, head, last, shape) for shape in group_shapes(last - head + 1, shapes)]
    return actions


@dataclass(frozen=True)
class ScoredAction:
    """An action with its block's predicted decode seconds and its predicted damage."""

    action: Action
    seconds: float
    damage: float


@dataclass(frozen=True)
class PlanChoice:
    """A whole plan: the actions other than keep, its predicted decode seconds and damage (additive), and the
    damage measured on the whole plan where it was (as built, and with its fused blocks reconstructed)."""

    actions: tuple[Action, ...]
    seconds: float
    damage: float
    measured: float | None = None
    reconstructed: float | None = None  # measured with its fused blocks reconstructed, where it was

    @property
    def final_damage(self) -> float | None:
        """The damage the plan is chosen by: measured with its fused blocks reconstructed, else measured."""
        return self.reconstructed if self.reconstructed is not None else self.measured

    @property
    def label(self) -> str:
        return "; ".join(a.label for a in self.actions) or "dense"

    def blocks(self, num_layers: int) -> list[BlockPlan]:
        """The ``config.blocks`` of the plan."""
        by_first = {a.first: a for a in self.actions}
        blocks, i = [], 0
        while i < num_layers:
            action = by_first.get(i, Action(KEEP, i, i))
            if action.block is not None:
                blocks.append(action.block)
            i = action.last + 1
        return blocks

    def fusion_plan(self, num_layers: int, reason: str = "") -> FusionPlan:
        """The plan as the conversion passes read it."""
        fused = [a for a in self.actions if a.kind == FUSE]
        return FusionPlan(num_layers=num_layers, groups=[tuple(a.layers) for a in fused],
                          shapes=[a.shape for a in fused],
                          attention_dropped=[a.first for a in self.actions if a.kind == DROP_ATTENTION],
                          dropped=[a.first for a in self.actions if a.kind == DROP_LAYER], reason=reason)

    def damage_by_kind(self, damages: dict[Action, float]) -> dict[str, float]:
        """The plan's predicted damage split by kind of action (from ``damages``, one per action)."""
        out = dict.fromkeys(KINDS, 0.0)
        for a in self.actions:
            out[a.kind] += damages[a]
        return out

    def to_dict(self) -> dict:
        return {"plan": self.label, "predicted_ms": self.seconds * 1e3, "predicted_damage": self.damage,
                "measured_damage": self.measured, "reconstructed_damage": self.reconstructed}


def pareto_plans(num_layers: int, scored: Sequence[ScoredAction], keep_seconds: float, outside_seconds: float,
                 allowed: Callable[[Action], bool] | None = None) -> list[PlanChoice]:
    """Every plan on the (predicted seconds, predicted damage) frontier, fastest first.

    ``keep_seconds`` is a dense block's seconds, ``outside_seconds`` the embedding, final norm and LM head's; a plan's
    seconds are those plus its blocks'. ``allowed`` restricts the actions (e.g. one kind only)."""
    starting: dict[int, list[ScoredAction]] = {}
    for s in scored:
        if allowed is None or allowed(s.action):
            starting.setdefault(s.action.first, []).append(s)
    # a label is (seconds, damage, trail); a trail is a linked list (action, previous trail) of the non-keep actions
    pending: list[list[tuple]] = [[] for _ in range(num_layers + 1)]
    pending[0] = [(outside_seconds, 0.0, None)]
    for i in range(num_layers):
        labels = _frontier(pending[i])
        pending[i] = []
        for seconds, damage, trail in labels:
            pending[i + 1].append((seconds + keep_seconds, damage, trail))
            for s in starting.get(i, ()):
                pending[s.action.last + 1].append((seconds + s.seconds, damage + s.damage, (s.action, trail)))
    plans = []
    for seconds, damage, trail in _frontier(pending[num_layers]):
        actions = []
        while trail is not None:
            action, trail = trail
            actions.append(action)
        plans.append(PlanChoice(tuple(reversed(actions)), seconds, damage))
    return sorted(plans, key=lambda p: p.seconds)


def _frontier(labels: list[tuple]) -> list[tuple]:
    """The labels no other label beats on both seconds and damage."""
    out, best = [], math.inf
    for label in sorted(labels, key=lambda x: (x[0], x[1])):
        if label[1] < best - 1e-12:
            out.append(label)
            best = label[1]
    return out


def best_within(plans: Sequence[PlanChoice], target_seconds: float) -> PlanChoice | None:
    """The least damaging plan whose predicted seconds meet ``target_seconds`` (None if none does)."""
    meeting = [p for p in plans if p.seconds <= target_seconds * (1 + 1e-12)]
    return min(meeting, key=lambda p: (p.damage, p.seconds)) if meeting else None


def correct_damages(damages: dict[Action, float], measured: Sequence[PlanChoice], strength: float = 1.0
                    ) -> tuple[dict[Action, float], dict[str, float]]:
    """Refit the additive damage model on whole plans measured as they are: one factor per kind of action, the
    least-squares fit of each plan's measured damage to its predicted damage by kind, pulled towards 1 (by
    ``strength``, on the scale of the predictions) so that a few plans cannot swing it far; factors stay within
    [0.25, 4]. Returns the corrected damages and the factors."""
    import numpy as np

    plans = [p for p in measured if p.measured is not None and p.actions]
    if not plans:
        return dict(damages), dict.fromkeys(KINDS, 1.0)
    x = np.array([[p.damage_by_kind(damages)[k] for k in KINDS] for p in plans])
    y = np.array([p.measured for p in plans])
    scale = np.maximum(np.abs(x).mean(0), 1e-9)
    ridge = strength * np.diag(scale ** 2)
    factors = np.linalg.solve(x.T @ x + ridge, x.T @ y + ridge @ np.ones(len(KINDS)))
    factors = np.clip(factors, 0.25, 4.0)
    by_kind = dict(zip(KINDS, (float(f) for f in factors), strict=True))
    return {a: d * by_kind[a.kind] for a, d in damages.items()}, by_kind


def rescore(plan: PlanChoice, damages: dict[Action, float]) -> PlanChoice:
    """``plan`` with its predicted damage recomputed from ``damages``."""
    return replace(plan, damage=sum(damages[a] for a in plan.actions))


def block_seconds(spec_seconds: Callable[[BlockSpec], float], actions: Iterable[Action]) -> dict[Action, float]:
    """Each action's block seconds from ``spec_seconds`` (one roofline call per distinct block shape)."""
    cache: dict[BlockSpec, float] = {}
    out = {}
    for a in actions:
        block = a.block
        if block is None:
            out[a] = 0.0
            continue
        spec = block.spec
        if spec not in cache:
            cache[spec] = spec_seconds(spec)
        out[a] = cache[spec]
    return out
