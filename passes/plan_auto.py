"""plan-auto: the mixed plan of least measured damage whose predicted decode latency meets a budget (``--method auto``)."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable

from d2mc.arch import BlockSpec, ModelArch
from d2mc.context import Context
from d2mc.errors import UserError
from d2mc.pipeline import Pass, PassResult, register_pass
from d2mc.planner import (
    DROP_ATTENTION,
    DROP_LAYER,
    FUSE,
    PlanChoice,
    ScoredAction,
    best_within,
    block_seconds,
    correct_damages,
    enumerate_actions,
    pareto_plans,
    rescore,
)
from d2mc.roofline import RooflineSettings, estimate_phase

log = logging.getLogger(__name__)

# restricted searches whose best plans are measured beside the mixed one: the shapes of the fixed methods
RESTRICTIONS = {
    "mixed": None,
    "fusion only": lambda a: a.kind == FUSE,
    "fused pairs only (top-1)": lambda a: a.kind == FUSE and a.last == a.first + 1,
    "attention only": lambda a: a.kind == DROP_ATTENTION,
    "layers only": lambda a: a.kind == DROP_LAYER,
    "no layer dropped": lambda a: a.kind != DROP_LAYER,
}


@dataclasses.dataclass(frozen=True)
class DecodeCosts:
    """The roofline's decode seconds of a model, split as the planner adds them up: one block by its spec, a
    dense block, and what lies outside the blocks (embedding, final norm, LM head)."""

    spec_seconds: Callable[[BlockSpec], float]
    keep: float
    outside: float
    dense: float


def decode_costs(arch: ModelArch, profile, context: int, precision: str, block_size: int = 128,
                 lm_head_precision: str | None = None) -> DecodeCosts:
    """Per-block decode seconds on ``profile`` at ``context`` cached tokens (the roofline adds blocks up, so a plan's
    seconds are ``outside`` plus its blocks')."""
    settings = RooflineSettings(context=context, precision=precision, block_size=block_size,
                                lm_head_precision=lm_head_precision)
    settings.check_fits(arch, ("decode",))

    def spec_seconds(spec: BlockSpec) -> float:
        one = dataclasses.replace(arch, blocks=(spec,))
        return estimate_phase(one, profile, "decode", settings).per_block()[0]

    dense = estimate_phase(arch, profile, "decode", settings)
    per_block = dense.per_block()
    return DecodeCosts(spec_seconds, spec_seconds(BlockSpec()), per_block[-1], dense.seconds)


MAX_GROUP = 6  # most layers per fused group unless given: docs/planning.md measures 3, 6 and 7


@register_pass
class PlanAuto(Pass):
    """Exactly one of ``budget_ms`` (predicted decode latency on the profile at ``context``) or ``speedup`` (S times
    faster than dense there).

    Per parent layer the plan keeps it, drops its attention, fuses its MLP as an expert of the block before it
    (groups of at most ``max_group`` layers, :data:`MAX_GROUP` unless given; top-1 or top-2, with or without the
    kept layer's MLP as a shared expert), or drops it. Candidates are the ``candidate_share`` of the interior
    layers of lowest block influence (analyze-redundancy). Every action is screened by its local error (only its
    block runs: how far it lands from the dense hidden state after its layers); the ``screen`` actions of least
    local error of each kind, group size and routing go on (fewer for groups of more than two layers, :meth:`screened_per_bucket`), the others are
    left out. Each of those is measured: the calibration-loss increase with that action alone (on the first
    ``probe_sequences`` calibration sequences, :class:`d2mc.damage.DamageProbe`). The search
    (:func:`d2mc.planner.pareto_plans`) gives the least damaging plan at every predicted latency. The best plan under
    the budget, and the best of each restricted search (fusion only, fused pairs, attention only, layers only), are
    then measured whole; the additive model is refitted on them (one factor per kind of action), searched again,
    and the plan of least measured damage is chosen. With ``reconstruct_steps`` (the conversion's, when it
    reconstructs fused blocks) the plans with fused blocks are measured again with those blocks reconstructed as
    the conversion will, and that damage decides; the chosen plan's blocks so built go on as
    ``reconstructed_blocks``, which ``reconstruct-blocks`` takes instead of training them again.
    ``ctx.results["plan_search"]`` keeps every measured plan with its predicted latency and damage, and each
    action's damage."""

    name = "plan-auto"
    requires = ("arch", "redundancy", "model", "calibration", "profile")
    provides = ("plan", "plan_search", "reconstructed_blocks")

    def __init__(self, budget_ms: float | None = None, speedup: float | None = None, context: int = 512,
                 precision: str = "fp16", block_size: int = 128, lm_head_precision: str | None = None,
                 max_group: int | None = None, candidate_share: float = 0.7, shapes: bool = True,
                 screen: int = 6, probe_sequences: int = 2, batch_size: int = 2, reconstruct_steps: int = 0,
                 progress: Callable[[str], None] | None = None):
        if (budget_ms is None) == (speedup is None):
            raise UserError("--method auto needs exactly one of --budget-ms or --speedup")
        if budget_ms is not None and not budget_ms > 0:
            raise UserError(f"--budget-ms must be positive, not {budget_ms}")
        if speedup is not None and not speedup >= 1:
            raise UserError(f"--speedup must be at least 1, not {speedup}")
        max_group = MAX_GROUP if max_group is None else max_group
        if max_group < 2 or not 0 < candidate_share <= 1 or probe_sequences < 1 or screen < 1:
            raise UserError("--max-group must be at least 2, the candidate share in (0, 1], and the screen and the "
                            "probe at least 1")
        self.budget_ms, self.speedup, self.context, self.precision = budget_ms, speedup, context, precision
        self.block_size, self.lm_head_precision = block_size, lm_head_precision
        self.max_group, self.candidate_share, self.shapes, self.screen = max_group, candidate_share, shapes, screen
        self.probe_sequences, self.batch_size, self.progress = probe_sequences, batch_size, progress
        self.reconstruct_steps = reconstruct_steps

    def run(self, ctx: Context) -> PassResult:
        from d2mc.damage import DamageProbe

        start, start_cpu = time.perf_counter(), time.process_time()
        n = ctx.arch.num_blocks
        costs = decode_costs(ctx.arch, ctx.profile, self.context, self.precision, self.block_size,
                             self.lm_head_precision)
        target = self.budget_ms * 1e-3 if self.budget_ms is not None else costs.dense / self.speedup
        actions = enumerate_actions(n, self._candidates(ctx.results["redundancy"]["block"]), self.max_group,
                                    self.shapes)
        seconds = block_seconds(costs.spec_seconds, actions)
        fastest = costs.outside + costs.keep * (n - len({a.first for a in actions if a.kind == DROP_LAYER}))
        if fastest > target:
            raise UserError(
                f"a predicted decode of {target * 1e3:.3f} ms on {ctx.profile.name} at context {self.context} is "
                f"unreachable: the fastest plan auto may choose (every candidate layer dropped) predicts "
                f"{fastest * 1e3:.3f} ms (dense {costs.dense * 1e3:.3f} ms): ask for at most "
                f"{math.floor(costs.dense / fastest * 100) / 100:.2f}x (--speedup) or at least "
                f"{math.ceil(fastest * 1e6) / 1e3:.3f} ms (--budget-ms)")
        probe = DamageProbe(ctx.model, ctx.calibration[: self.probe_sequences], self.batch_size)
        local = {a: probe.local_error(a.first, a.last, a.block) for a in actions}
        screen = self.screen
        screened = self.screened(actions, local, screen)
        while screen < len(actions) and best_within(pareto_plans(
                n, [ScoredAction(a, seconds[a], 0.0) for a in screened], costs.keep, costs.outside), target) is None:
            screen *= 2  # the budget needs more of the screened-out actions
            screened = self.screened(actions, local, screen)
        self._say(f"screened {len(actions)} actions by local error, measuring {len(screened)} "
                  f"[{time.perf_counter() - start:.0f} s]")
        damages = {}
        for i, a in enumerate(screened):
            damages[a] = probe.action_damage(a.first, a.last, a.block)
            if (i + 1) % 10 == 0 or i + 1 == len(screened):
                self._say(f"measured {i + 1}/{len(screened)} actions [{time.perf_counter() - start:.0f} s]")
        actions = screened

        def search(damage_of: dict) -> dict[str, PlanChoice]:
            scored = [ScoredAction(a, seconds[a], damage_of[a]) for a in actions]
            found = {}
            for name, allowed in RESTRICTIONS.items():
                best = best_within(pareto_plans(n, scored, costs.keep, costs.outside, allowed), target)
                if best is not None:
                    found[name] = best
            return found

        measured: dict[tuple, PlanChoice] = {}

        def measure(plans: dict[str, PlanChoice]) -> None:
            for plan in plans.values():
                if plan.actions not in measured:
                    measured[plan.actions] = dataclasses.replace(plan, measured=probe.plan_damage(plan.blocks(n)))

        additive = search(damages)
        measure(additive)
        corrected_damages, factors = correct_damages(damages, list(measured.values()))
        corrected = search(corrected_damages)
        measure({"corrected": corrected["mixed"]})
        reconstruction = self._reconstruct(ctx, probe, measured, n)
        chosen = min(measured.values(), key=lambda p: (p.final_damage, p.seconds))
        settings = RooflineSettings(context=self.context, precision=self.precision, block_size=self.block_size,
                                    lm_head_precision=self.lm_head_precision)
        check = estimate_phase(dataclasses.replace(ctx.arch, blocks=tuple(b.spec for b in chosen.blocks(n))),
                               ctx.profile, "decode", settings).seconds
        assert math.isclose(check, chosen.seconds, rel_tol=1e-9), (check, chosen.seconds)
        after = " after block reconstruction" if self.reconstruct_steps else ""
        reason = (f"least measured damage{after} ({chosen.final_damage:+.4f} nats/token on calibration text) of "
                  f"{len(measured)} candidate plans whose predicted decode ({chosen.seconds * 1e3:.3f} ms at context "
                  f"{self.context}, {self.precision}) meets {target * 1e3:.3f} ms on {ctx.profile.name} (dense "
                  f"{costs.dense * 1e3:.3f} ms): {chosen.label}")
        plan = chosen.fusion_plan(n, reason)
        ctx.results["plan"] = plan
        ctx.results["reconstructed_blocks"] = {block: probe.reconstructed[block] for block in chosen.blocks(n)
                                               if block in probe.reconstructed}
        names = {p.actions: name for name, p in [*additive.items(), ("corrected", corrected["mixed"])]}
        ctx.results["plan_search"] = {
            "target_ms": target * 1e3, "dense_ms": costs.dense * 1e3, "context": self.context,
            "precision": self.precision, "profile": ctx.profile.name,
            "candidates": sorted({layer for a in actions for layer in a.layers}),
            "probe_tokens": int(ctx.calibration[: self.probe_sequences].numel()), "screen": screen,
            "dense_loss": probe.dense_loss, "correction": factors,
            "chosen": chosen.to_dict(),
            "alternatives": [{"search": names.get(p.actions, "corrected"), **rescore(p, damages).to_dict(),
                              "corrected_damage": rescore(p, corrected_damages).damage}
                             for p in sorted(measured.values(), key=lambda p: p.final_damage)],
            "reconstruct_steps": self.reconstruct_steps, "reconstruction": reconstruction,
            "actions": [{"action": a.label, "kind": a.kind, "block_ms": seconds[a] * 1e3,
                         "saved_ms": (costs.keep * len(a.layers) - seconds[a]) * 1e3, "local_error": local[a],
                         "damage": damages.get(a)} for a in local],
            "seconds": time.perf_counter() - start,
            "cpu_seconds": time.process_time() - start_cpu,  # every thread's: wall time is this over the cores used
        }
        log.info("plan: %s", reason)
        return PassResult(summary={"plan": chosen.label, "reason": reason,
                                   "measured_plans": len(measured), "actions": len(actions)})

    def _reconstruct(self, ctx: Context, probe, measured: dict, n: int) -> dict:
        """Measure again, as the conversion will build them, the plans with fused blocks: each distinct fused block
        reconstructed ``reconstruct_steps`` steps on the calibration text (as ``reconstruct-blocks`` does), then the
        whole plan. Reconstruction lowers a fused block's damage, not a dropped layer's, so without it the search
        would favour dropping layers. Returns each block's reconstruction error before and after."""
        from d2mc.activations import group_activations

        fused = sorted({a.block for p in measured.values() for a in p.actions if a.kind == FUSE},
                       key=lambda b: (b.expert_layers, b.shared_experts, b.top_k))
        if not self.reconstruct_steps or not fused:
            return {}
        start = time.perf_counter()
        inputs, targets = group_activations(ctx.model, [b.expert_layers for b in fused], ctx.calibration,
                                            self.batch_size)
        errors = {}
        for block, h, y in zip(fused, inputs, targets, strict=True):
            stats = probe.reconstruct(block, h, y, self.reconstruct_steps).stats
            errors[f"{block.expert_layers[0]}-{block.expert_layers[-1]} (shared {block.shared_experts}, top-"
                   f"{block.top_k})"] = {k: stats[k] for k in ("mse_before", "mse_after")}
        for key, plan in measured.items():
            if any(a.kind == FUSE for a in plan.actions):
                measured[key] = dataclasses.replace(plan, reconstructed=probe.plan_damage(plan.blocks(n), True))
        self._say(f"reconstructed {len(fused)} fused blocks {self.reconstruct_steps} steps and measured their plans "
                  f"again [{time.perf_counter() - start:.0f} s]")
        return errors

    @staticmethod
    def screened_per_bucket(screen: int, size: int) -> int:
        """How many actions of one kind, routing and group size of ``size`` layers go on to be measured: ``screen``
        up to pairs, then fewer (2 x screen / size, at least half the screen). Larger groups of one routing overlap
        in most of their layers, so their next candidates add little, while each costs a measurement and there
        are more group sizes to cover."""
        return screen if size <= 2 else max(screen // 2, 2 * screen // size)

    @classmethod
    def screened(cls, actions: list, local: dict, screen: int) -> list:
        """The actions of least local error of each kind, group size and routing, in their order."""
        buckets: dict[tuple, list] = {}
        for a in actions:
            buckets.setdefault((a.kind, len(a.layers), a.shape), []).append(a)
        kept = {a for (_, size, _), bucket in buckets.items()
                for a in sorted(bucket, key=local.get)[:cls.screened_per_bucket(screen, size)]}
        return [a for a in actions if a in kept]

    def _candidates(self, block_influence: list[float]) -> list[int]:
        """The interior layers of lowest block influence, ``candidate_share`` of them."""
        interior = range(1, len(block_influence) - 1)
        count = max(1, math.ceil(self.candidate_share * len(interior)))
        return sorted(sorted(interior, key=lambda i: block_influence[i])[:count])

    def _say(self, text: str) -> None:
        log.info("plan-auto: %s", text)
        if self.progress:
            self.progress(text)

