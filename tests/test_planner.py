"""The planner on small synthetic damage and cost tables, where the optimal plan is known by enumeration."""

import itertools
import random

import pytest

from d2mc.arch import BlockSpec
from d2mc.plan import GroupShape
from d2mc.planner import (
    DROP_ATTENTION,
    DROP_LAYER,
    FUSE,
    KEEP,
    Action,
    PlanChoice,
    ScoredAction,
    best_within,
    block_seconds,
    correct_damages,
    enumerate_actions,
    group_shapes,
    pareto_plans,
    rescore,
)

KEEP_S, OUTSIDE_S = 10.0, 5.0


def all_plans(n, scored):
    """Every plan by brute force: each way of covering layers 0..n-1 with keeps and the scored actions."""
    starting = {}
    for s in scored:
        starting.setdefault(s.action.first, []).append(s)

    def cover(i):
        if i == n:
            yield (), 0.0, 0.0
            return
        for rest, sec, dmg in cover(i + 1):
            yield rest, sec + KEEP_S, dmg
        for s in starting.get(i, ()):
            for rest, sec, dmg in cover(s.action.last + 1):
                yield (s.action, *rest), sec + s.seconds, dmg + s.damage

    return [PlanChoice(actions, OUTSIDE_S + sec, dmg) for actions, sec, dmg in cover(0)]


def test_the_frontier_is_exact_on_a_known_table():
    # layer 2's attention is nearly free to drop; fusing 3-4 saves most for least damage; dropping 1 is costly
    scored = [ScoredAction(Action(DROP_ATTENTION, 2, 2), 8.0, 0.01),
              ScoredAction(Action(DROP_LAYER, 1, 1), 0.0, 1.0),
              ScoredAction(Action(DROP_LAYER, 3, 3), 0.0, 0.5),
              ScoredAction(Action(FUSE, 3, 4, GroupShape()), 11.0, 0.05)]
    plans = pareto_plans(6, scored, KEEP_S, OUTSIDE_S)
    assert [p.seconds for p in plans] == sorted(p.seconds for p in plans)
    assert best_within(plans, OUTSIDE_S + 60).label == "dense"
    assert best_within(plans, OUTSIDE_S + 58).label == "drop attention 2"
    assert best_within(plans, OUTSIDE_S + 57).label == "fuse 3-4 (top-1)"
    assert best_within(plans, OUTSIDE_S + 49).label == "drop attention 2; fuse 3-4 (top-1)"
    assert best_within(plans, OUTSIDE_S + 48).label == "drop attention 2; drop layer 3"
    assert best_within(plans, OUTSIDE_S + 1) is None


@pytest.mark.parametrize("seed", range(5))
def test_the_frontier_matches_brute_force_on_random_tables(seed):
    rng = random.Random(seed)
    n = 7
    actions = enumerate_actions(n, range(1, n - 1), max_group=3)
    scored = [ScoredAction(a, 0.0 if a.kind == DROP_LAYER else rng.uniform(2, 14), rng.uniform(0, 1))
              for a in actions]
    plans = pareto_plans(n, scored, KEEP_S, OUTSIDE_S)
    brute = all_plans(n, scored)
    for target in [OUTSIDE_S + t for t in range(0, 80, 3)]:
        best = best_within(plans, target)
        meeting = [p for p in brute if p.seconds <= target]
        if not meeting:
            assert best is None
            continue
        assert best.damage == pytest.approx(min(p.damage for p in meeting))
        assert best.seconds <= target


def test_a_restricted_search_uses_only_the_allowed_actions():
    scored = [ScoredAction(Action(DROP_ATTENTION, 2, 2), 8.0, 0.01),
              ScoredAction(Action(DROP_LAYER, 3, 3), 0.0, 0.5)]
    plans = pareto_plans(5, scored, KEEP_S, OUTSIDE_S, allowed=lambda a: a.kind == DROP_LAYER)
    assert all(a.kind == DROP_LAYER for p in plans for a in p.actions)


def test_actions_respect_the_edges_the_candidates_and_the_group_size():
    actions = enumerate_actions(8, [2, 3, 4, 6, 7], max_group=3)
    assert all(0 not in a.layers and 7 not in a.layers for a in actions)
    fused = {(a.first, a.last) for a in actions if a.kind == FUSE}
    assert fused == {(1, 2), (1, 3), (2, 3), (2, 4), (3, 4), (5, 6)}
    assert {a.first for a in actions if a.kind == DROP_LAYER} == {2, 3, 4, 6}


def test_group_shapes_never_route_every_expert():
    assert group_shapes(2) == [GroupShape(False, 1)]
    assert set(group_shapes(3)) == {GroupShape(False, 1), GroupShape(False, 2), GroupShape(True, 1)}
    assert GroupShape(True, 2) in group_shapes(4)
    assert group_shapes(4, shapes=False) == [GroupShape(False, 1)]


def test_a_plan_builds_its_blocks_and_its_fusion_plan():
    plan = PlanChoice((Action(FUSE, 1, 3, GroupShape(True, 1)), Action(DROP_ATTENTION, 5, 5),
                       Action(DROP_LAYER, 6, 6)), 0.0, 0.0)
    blocks = plan.blocks(8)
    assert [(b.attention_layer, b.expert_layers, b.shared_experts) for b in blocks] == [
        (0, (0,), 0), (1, (1, 2, 3), 1), (4, (4,), 0), (None, (5,), 0), (7, (7,), 0)]
    fusion = plan.fusion_plan(8)
    assert fusion.blocks("auto") == blocks
    assert fusion.removed_attention == [2, 3, 5] and fusion.dropped == [6]
    assert fusion.describe() == "fuse 1-3 (shared + top-1); drop attention 5; drop layers 6"


def test_block_seconds_cost_each_distinct_block_once():
    calls = []

    def spec_seconds(spec: BlockSpec) -> float:
        calls.append(spec)
        return 1.0 + spec.experts

    actions = [Action(DROP_ATTENTION, 2, 2), Action(DROP_ATTENTION, 3, 3), Action(DROP_LAYER, 4, 4),
               Action(FUSE, 1, 2, GroupShape())]
    seconds = block_seconds(spec_seconds, actions)
    assert seconds[actions[2]] == 0.0 and seconds[actions[3]] == 3.0
    assert len(calls) == 2


def test_the_correction_refits_a_kind_that_was_underestimated():
    a, b = Action(DROP_ATTENTION, 2, 2), Action(DROP_LAYER, 3, 3)
    damages = {a: 0.1, b: 0.2}
    measured = [PlanChoice((a,), 0, 0.1, measured=0.3), PlanChoice((b,), 0, 0.2, measured=0.2),
                PlanChoice((a, b), 0, 0.3, measured=0.5)]
    corrected, factors = correct_damages(damages, measured, strength=0.01)
    assert factors[DROP_ATTENTION] == pytest.approx(3.0, rel=0.05)
    assert factors[DROP_LAYER] == pytest.approx(1.0, rel=0.05)
    assert rescore(measured[2], corrected).damage == pytest.approx(0.5, rel=0.05)


def test_keep_is_not_a_plan_action():
    with pytest.raises(ValueError):
        Action(FUSE, 2, 2)
    assert Action(KEEP, 3, 3).block.attention_layer == 3
    assert list(itertools.islice(Action(FUSE, 2, 4, GroupShape()).layers, 3)) == [2, 3, 4]
