"""analyze-redundancy: how much each layer, its attention and its MLP change the residual stream."""

from __future__ import annotations

import logging

import torch

from d2mc.activations import batches, first_tensor, hooks, model_device, output_tensor
from d2mc.context import Context
from d2mc.pipeline import Pass, PassResult, register_pass

log = logging.getLogger(__name__)


@register_pass
class AnalyzeRedundancy(Pass):
    """Per layer, on calibration text: block influence ``1 - cos(h_in, h_out)`` (ShortGPT), attention
    influence ``1 - cos(h_in, h_in + attn)`` and MLP influence ``1 - cos(h_mid, h_out)``, averaged over tokens.
    Low influence means the layer barely changes its input: a candidate for pruning or fusion."""

    name = "analyze-redundancy"
    requires = ("model", "calibration")
    provides = ("redundancy",)

    def __init__(self, batch_size: int = 4):
        self.batch_size = batch_size

    @torch.no_grad()
    def run(self, ctx: Context) -> PassResult:
        layers = ctx.model.model.layers
        n = len(layers)
        sums = {k: torch.zeros(n, dtype=torch.float64) for k in ("block", "attention", "mlp")}
        seen = {}
        count = 0

        def record_in(i):
            def hook(module, args, kwargs):
                seen[("in", i)] = first_tensor(args, kwargs)
            return hook

        def record_mid(i):
            def hook(module, args):
                seen[("mid", i)] = args[0]
            return hook

        def record_out(i):
            def hook(module, args, kwargs, output):
                h_in, h_mid, h_out = seen.pop(("in", i)), seen.pop(("mid", i)), output_tensor(output)
                sums["block"][i] += _influence(h_in, h_out)
                sums["attention"][i] += _influence(h_in, h_mid)
                sums["mlp"][i] += _influence(h_mid, h_out)
            return hook

        handles = []
        for i, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(record_in(i), with_kwargs=True))
            handles.append(layer.post_attention_layernorm.register_forward_pre_hook(record_mid(i)))
            handles.append(layer.register_forward_hook(record_out(i), with_kwargs=True))
        with hooks(handles):
            for batch in batches(ctx.calibration, self.batch_size, model_device(ctx.model)):
                ctx.model(batch, use_cache=False)
                count += batch.numel()
        result = {k: (v / count).tolist() for k, v in sums.items()}
        ctx.results["redundancy"] = result
        order = sorted(range(n), key=lambda i: result["block"][i])
        log.info("most redundant layers by block influence: %s", order[:8])
        return PassResult(summary={"tokens": count, "most_redundant": order[:8]})


def _influence(before: torch.Tensor, after: torch.Tensor) -> float:
    """Sum over tokens of 1 - cos(before, after)."""
    cos = torch.nn.functional.cosine_similarity(before.double(), after.double(), dim=-1)
    return float((1 - cos).sum())
