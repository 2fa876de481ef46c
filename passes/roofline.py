"""roofline: predicted prefill and decode cost of the model in hand on the device profile."""

from __future__ import annotations

import logging

from d2mc.context import Context
from d2mc.pipeline import Pass, PassResult, register_pass
from d2mc.roofline import RooflineSettings, analyze

log = logging.getLogger(__name__)


@register_pass
class Roofline(Pass):
    """FLOPs, bytes and predicted time per block and operator class for a prefill of ``prefill`` tokens and one
    decode step at ``context`` (batch ``batch``), with weights at ``precision`` (default: fp16 on a GPU profile,
    fp32 on a CPU one) and the KV cache at ``kv_precision``. ``expert_load`` (block -> how often each routed expert
    is chosen) replaces the uniform-routing assumption for MoE blocks.

    Provides ``roofline``: a :class:`d2mc.roofline.RooflineReport`; its ``to_dict()`` goes to the report.
    """

    name = "roofline"
    requires = ("arch", "profile")
    provides = ("roofline",)

    def __init__(self, prefill: int = 128, context: int = 512, batch: int = 1, precision: str | None = None,
                 kv_precision: str | None = None, expert_load: dict[int, list[float]] | None = None):
        self.prefill, self.context, self.batch = prefill, context, batch
        self.precision, self.kv_precision, self.expert_load = precision, kv_precision, expert_load
        if precision is not None:  # check the settings now, before any pass runs
            self._settings(precision)

    def _settings(self, precision: str) -> RooflineSettings:
        return RooflineSettings(prefill=self.prefill, context=self.context, batch=self.batch, precision=precision,
                                kv_precision=self.kv_precision)

    def run(self, ctx: Context) -> PassResult:
        precision = self.precision or ("fp16" if ctx.profile.kind == "gpu" else "fp32")
        report = analyze(ctx.arch, ctx.profile, self._settings(precision), self.expert_load)
        ctx.results["roofline"] = report
        ctx.report["roofline"] = report.to_dict()
        for phase, cost in report.phases.items():
            log.info("%s on %s: %.3f ms predicted, %.1f MB moved, %s-bound", phase, ctx.profile.name,
                     cost.seconds * 1e3, cost.bytes / 1e6, cost.bound)
        return PassResult(summary={"prefill_ms": report.prefill.seconds * 1e3,
                                   "decode_ms": report.decode.seconds * 1e3, "precision": precision})
