"""plan-fusion: choose the groups of layers to fuse, from a count, a latency budget or an explicit plan."""

from __future__ import annotations

import dataclasses
import logging

from d2mc.context import Context
from d2mc.errors import UserError
from d2mc.pipeline import Pass, PassResult, register_pass
from d2mc.plan import FusionPlan, choose_groups, parse_layers, parse_plan, split_plan
from d2mc.roofline import predict_decode_seconds

log = logging.getLogger(__name__)


MAX_GROUP = 8  # most layers per fused group unless given


@register_pass
class PlanFusion(Pass):
    """Exactly one of ``remove_attention`` (K attention modules), ``budget_ms`` (predicted decode latency on the
    profile), ``speedup`` (predicted decode S times faster than dense) or ``plan`` ("12-13,16-17").

    Counts and budgets pick the layers with the lowest block influence (analyze-redundancy); budgets take the
    smallest number of removals whose roofline prediction meets the target. For ``lfuc-split`` the prediction is
    that of the fused blocks after split-experts (``experts``, ``active_fraction``, ``split_shared``, ``layers``).
    """

    name = "plan-fusion"
    requires = ("arch", "redundancy")
    provides = ("plan",)

    def __init__(self, method: str = "lfuc", remove_attention: int | None = None, budget_ms: float | None = None,
                 speedup: float | None = None, plan: str | None = None, top_k: int = 1, shared_expert: bool = False,
                 normalize_topk: bool = True, max_group: int | None = None, context: int = 512, precision: str = "fp16",
                 block_size: int = 128, lm_head_precision: str | None = None, experts: int = 8,
                 active_fraction: float = 0.5, split_shared: int = 0, layers: str | None = None):
        given = [k for k, v in {"--remove-attention": remove_attention, "--budget-ms": budget_ms,
                                "--speedup": speedup, "--plan": plan}.items() if v is not None]
        if len(given) != 1:
            raise UserError("give exactly one of --remove-attention, --budget-ms, --speedup or --plan"
                            + (f" (got {', '.join(given)})" if given else ""))
        if remove_attention is not None and remove_attention < 0:
            raise UserError("--remove-attention must be zero or more")
        if budget_ms is not None and budget_ms <= 0:
            raise UserError("--budget-ms must be positive")
        if speedup is not None and speedup < 1:
            raise UserError("--speedup must be at least 1")
        max_group = MAX_GROUP if max_group is None else max_group
        if top_k < 1 or max_group < 2:
            raise UserError("--top-k must be at least 1 and --max-group at least 2")
        self.method, self.remove_attention, self.budget_ms, self.speedup = method, remove_attention, budget_ms, speedup
        self.plan, self.top_k, self.shared_expert, self.normalize_topk = plan, top_k, shared_expert, normalize_topk
        self.max_group, self.context, self.precision, self.block_size = max_group, context, precision, block_size
        self.lm_head_precision = lm_head_precision
        self.split = {"experts": experts, "active_fraction": active_fraction, "shared": split_shared, "layers": layers}

    def run(self, ctx: Context) -> PassResult:
        n = ctx.arch.num_blocks
        scores = ctx.results["redundancy"]["block"]
        options = dict(num_layers=n, top_k=self.top_k, shared_expert=self.shared_expert,
                       normalize_topk=self.normalize_topk)
        if self.plan is not None:
            plan = FusionPlan(groups=parse_plan(self.plan, n), reason=f"explicit plan {self.plan}", **options)
        elif self.remove_attention is not None:
            plan = self._plan_for(self.remove_attention, scores, options)
        else:
            plan = self._plan_for_budget(ctx, scores, options)
        if self.method == "drop-layers" and self.plan is None:
            # ShortGPT: the K whole layers of lowest block influence, wherever they are
            k = len(plan.removed_attention)
            plan.dropped = sorted(sorted(range(1, n - 1), key=lambda i: scores[i])[:k])
        _check_top_k(plan)
        ctx.results["plan"] = plan
        log.info("plan: %s (%s)", plan.groups, plan.reason)
        return PassResult(summary={"groups": [list(g) for g in plan.groups], "reason": plan.reason})

    def _plan_for(self, k: int, scores, options) -> FusionPlan:
        groups = choose_groups(scores, k, self.max_group)
        return FusionPlan(groups=groups, reason=f"remove the attention of the {k} layers of lowest block "
                                                f"influence", **options)

    def _plan_for_budget(self, ctx: Context, scores, options) -> FusionPlan:
        if ctx.profile is None:
            raise UserError("--budget-ms and --speedup need a device profile: add --target")
        dense = predict_decode_seconds(ctx.arch, ctx.profile, self.context, self.precision,
                                       block_size=self.block_size,
                                       lm_head_precision=self.lm_head_precision)
        target = self.budget_ms * 1e-3 if self.budget_ms is not None else dense / self.speedup
        best = None
        for k in range(0, ctx.arch.num_blocks):
            try:
                plan = self._plan_for(k, scores, options)
            except UserError:
                break
            predicted = predict_decode_seconds(self._arch_of(ctx.arch, plan), ctx.profile, self.context,
                                               self.precision, block_size=self.block_size,
                                       lm_head_precision=self.lm_head_precision)
            best = (plan, predicted)
            if predicted <= target:
                plan.reason = (f"smallest plan whose predicted decode ({predicted * 1e3:.3f} ms at context "
                               f"{self.context}, {self.precision}) meets {target * 1e3:.3f} ms on "
                               f"{ctx.profile.name} (dense {dense * 1e3:.3f} ms)")
                return plan
        reached = f"{best[1] * 1e3:.3f} ms" if best else "nothing"
        raise UserError(f"the budget of {target * 1e3:.3f} ms on {ctx.profile.name} is unreachable: the most this "
                        f"method can remove under the guards predicts {reached} (dense {dense * 1e3:.3f} ms)")

    def _arch_of(self, arch, plan: FusionPlan):
        blocks = plan.blocks(self.method)
        if self.method == "lfuc-split":
            s = self.split
            layers = parse_layers(s["layers"], arch.num_blocks) if s["layers"] is not None else None
            blocks, _ = split_plan(blocks, arch.intermediate_size, s["experts"], s["active_fraction"], s["shared"],
                                   layers)
        return dataclasses.replace(arch, blocks=tuple(b.spec for b in blocks))


def _check_top_k(plan: FusionPlan) -> None:
    for g in plan.groups:
        routed = len(g) - (1 if plan.shared_expert else 0)
        if routed > 1 and plan.top_k > routed:
            raise UserError(f"--top-k {plan.top_k} is more than the {routed} routed experts of group "
                            f"{g[0]}-{g[-1]}")
