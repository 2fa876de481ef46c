"""The quantize step: every Linear of a dense or converted PyTorch model to block-wise int4/int8, once, for both
lowerings.

:func:`quantize_model` returns a :class:`QuantizedModel`: the codes of every quantized Linear by module name (what
the lowerings emit) and a copy of the model carrying the weights those codes stand for (what verification and
perplexity run). In a block with several experts each expert's post-attention norm weight is first folded into its
gate and up projections (the lowering folds it there too, and integer codes cannot be rescaled afterwards), so
its norm becomes weightless.

``rtn`` and ``hqq`` quantize each weight on its own (the LM head, which a tied embedding reads through
``GatherBlockQuantized`` and its integer zero points, always by round-to-nearest; so are the matrices mixed
precision moves to int8). Calibrated mixed precision (:mod:`d2mc.quantize.sensitivity`) first scores every group of
Linears on the calibration text with the float weights and records the matrices it moves to int8 in the options
the result carries. ``gptq`` runs GPTQModel's GPTQ (:mod:`d2mc.quantize.gptq`) layer by
layer, in order: each block is run on the calibration activations that the already quantized blocks before it
produce, and within a block the projections are quantized in the order they compute (q/k/v, o, every expert's
gate/up, every expert's down), each from the inputs it sees after the ones before it were quantized; an expert sees
only the tokens its router sends it. The LM head comes last, from the final norm's outputs.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from d2mc.activations import batches, first_tensor, hooks, output_tensor
from d2mc.errors import OptionError
from d2mc.quantize.hqq import quantize_hqq
from d2mc.quantize.linear import QuantizedLinear, quantize_rtn
from d2mc.quantize.options import QuantizeOptions, block_leaf
from d2mc.quantize.sensitivity import choose_int8, fisher_diagonal, fisher_sequences, group_costs

log = logging.getLogger(__name__)

# the order a block computes its projections in; Linears of one stage that share a parent read the same input
ATTENTION_STAGES = (("q_proj", "k_proj", "v_proj"), ("o_proj",))
STAGES = (*ATTENTION_STAGES, ("gate_proj", "up_proj"), ("down_proj",))
BATCH = 4  # calibration sequences per forward


@dataclass(frozen=True)
class QuantizedModel:
    """A model with block-wise quantized weights: ``model`` carries the dequantized weights, ``linears`` the codes of
    each quantized Linear by module name; ``fallbacks`` names the experts' matrices no calibration token reached
    (quantized by round-to-nearest instead)."""

    model: nn.Module
    linears: dict[str, QuantizedLinear]
    options: QuantizeOptions
    calibration: str
    seconds: float
    fallbacks: tuple[str, ...] = field(default_factory=tuple)

    @property
    def precision(self) -> str:
        return self.options.precision

    def by_module(self) -> dict[nn.Module, QuantizedLinear]:
        """The quantized weight of each module of :attr:`model` that has one."""
        modules = dict(self.model.named_modules())
        return {modules[name]: q for name, q in self.linears.items()}

    def nbytes(self) -> int:
        """Bytes of every quantized matrix as deployed (packed codes, scales, zero points)."""
        return sum(q.nbytes() for q in self.linears.values())

    def to_dict(self) -> dict:
        """What an artifact and a report record of the quantization: its options (enough to redo it:
        :meth:`QuantizeOptions.from_dict`) and what it produced."""
        return {**self.options.to_dict(), "bits": self.options.bits,
                "symmetric": all(q.symmetric for q in self.linears.values()),
                "calibration": self.calibration, "quantized_linears": len(self.linears),
                "quantized_bytes": self.nbytes(), "seconds": round(self.seconds, 2), "fallbacks": list(self.fallbacks)}


def quantize_model(model, options: QuantizeOptions, tokenizer=None,
                   progress: Callable[[str], None] | None = None) -> QuantizedModel:
    """Quantize a copy of ``model`` (dense or converted) as ``options`` say; ``model`` itself is left as it is.

    ``tokenizer`` reads the calibration text (``options.calib_data``, else the built-in calibration text) when the
    method or the mixed precision calibrates. Calibrated mixed precision chooses its int8 matrices unless
    ``options.int8_matrices`` already names them (a record being quantized again)."""
    from d2mc.arch import ModelArch

    options.check_installed()
    arch = ModelArch.from_config(model.config)
    options.check_divides(arch)
    options = options.fitted(arch)
    calibration, described = None, ""
    choose = options.mixed_precision == "calibrated" and options.int8_matrices is None
    if options.quant_method == "gptq" or choose:
        if tokenizer is None:
            raise OptionError(f"{{quant_method}} {options.quant_method} with {{mixed_precision}} "
                              f"{options.mixed_precision} reads calibration text, which needs the model's tokenizer: "
                              "save the tokenizer beside the weights, or choose {mixed_precision} none (and "
                              "{quant_method} rtn)")
        from d2mc.data import calibration_batch

        sequences = options.calib_sequences
        if options.quant_method != "gptq":  # read only by the choice of int8 matrices
            sequences = min(sequences, fisher_sequences(options.calib_length))
        calibration = calibration_batch(tokenizer, sequences, options.calib_length, options.calib_data, options.seed)
        described = f"{options.calib_data or 'the built-in calibration text'} ({sequences} x {options.calib_length} tokens)"
    start = time.perf_counter()
    quantized = copy.deepcopy(model).eval()
    fold_expert_norms(quantized)
    layers = [_block_linears(quantized, i, layer) for i, layer in enumerate(quantized.model.layers)]
    head = quantized.lm_head if options.lm_head_bits else None
    groups = [group for block in layers for stage in block for group in stage]
    alone: dict[tuple[str, int], QuantizedLinear] = {}

    def quantize_alone(name: str, module: nn.Linear, bits: int) -> QuantizedLinear:
        if (name, bits) not in alone:  # the choice of int8 matrices quantizes each once at both widths
            alone[name, bits] = _quantize_alone(module.weight, options, bits)
        return alone[name, bits]

    if choose:
        options = _choose_int8(quantized, groups, calibration, options, quantize_alone, progress or (lambda _: None))
    if options.quant_method != "gptq":
        linears = {name: _set(module, quantize_alone(name, module, options.bits_of(name, len(layers))))
                   for group in groups for name, module in group}
        fallbacks: list[str] = []
    else:
        linears, fallbacks = _gptq(quantized, layers, calibration, options, progress or (lambda text: None))
    if head is not None and "lm_head" not in linears:
        linears["lm_head"] = _set(head, quantize_rtn(head.weight, options.lm_head_bits,
                                                     options.lm_head_block_size(head.in_features)))
    return QuantizedModel(quantized, linears, options, described, time.perf_counter() - start, tuple(fallbacks))


def _choose_int8(model, groups, calibration: torch.Tensor, options: QuantizeOptions, quantize_alone,
                 progress) -> QuantizeOptions:
    """``options`` with the int8 matrices of calibrated mixed precision chosen on ``model``'s float weights (gptq's
    errors, unknown before it runs, scored as round-to-nearest's). Weights that also go to TensorRT keep the experts of
    blocks with a router at int4."""
    if options.tensorrt:  # the plugin takes one bit width and block size for all of a block's experts
        groups = [group for group in groups if not _routed(model, group[0][0])]
    progress("scoring the int4 matrices on the calibration text")
    fisher = fisher_diagonal(model, calibration, [module for group in groups for _, module in group])
    joint: dict[tuple, list] = {}  # every expert's matrix of one block alike, as the roofline counts them
    for group in groups:
        joint.setdefault(tuple(block_leaf(name) for name, _ in group), []).extend(group)
    int8 = choose_int8(group_costs(list(joint.values()), fisher, quantize_alone), options.int8_share)
    log.info("calibrated mixed precision: %d of %d matrices at int8", len(int8), sum(map(len, groups)))
    return dataclasses.replace(options, int8_matrices=int8)


def _routed(model, name: str) -> bool:
    """Whether the Linear ``name`` is an expert's of a block with a router (a ``D2mcMoE`` plugin node in TensorRT)."""
    index, _ = block_leaf(name)
    return ".experts." in name and getattr(model.model.layers[index], "router", None) is not None


def _quantize_alone(weight: torch.Tensor, options: QuantizeOptions, bits: int) -> QuantizedLinear:
    """``weight`` at ``bits`` by the method the options give it (:meth:`QuantizeOptions.method_for`) without
    calibration data."""
    if options.method_for(bits) == "hqq":
        return quantize_hqq(weight, bits, options.block_size)
    return quantize_rtn(weight, bits, _block_size(options, bits, weight.shape[1]))


def _block_size(options: QuantizeOptions, bits: int, in_features: int) -> int:
    """The block size of a matrix at ``bits`` reading ``in_features`` inputs: one block per row for per-channel
    scales (:meth:`QuantizeOptions.block_size_for`)."""
    return options.block_size_for(bits) or in_features


def fold_expert_norms(model) -> None:
    """In every block with several experts, multiply each expert's post-attention norm weight into its gate and up
    projections and leave the norm weightless (ones): the same function, in the form the lowering emits."""
    if model.config.model_type != "d2mc_moe":
        return
    with torch.no_grad():
        for block in model.model.layers:
            if len(block.experts) < 2:
                continue
            for expert in block.experts:
                gamma = expert.post_attention_layernorm.weight
                expert.mlp.gate_proj.weight.mul_(gamma[None, :])
                expert.mlp.up_proj.weight.mul_(gamma[None, :])
                gamma.fill_(1.0)


def _block_linears(model, index: int, layer) -> list[list[list[tuple[str, nn.Linear]]]]:
    """The Linears of one block to quantize, per stage (:data:`STAGES`), grouped by the input they read."""
    prefix = f"model.layers.{index}."
    stages: list[dict[str, list]] = [{} for _ in STAGES]
    for name, module in layer.named_modules():
        if not isinstance(module, nn.Linear) or name.endswith("router"):
            continue
        parent, _, leaf = name.rpartition(".")
        stage = next((s for s, leaves in enumerate(STAGES) if leaf in leaves), None)
        if stage is None:
            raise ValueError(f"no quantization stage for the Linear '{prefix}{name}'")
        stages[stage].setdefault(parent, []).append((prefix + name, module))
    return [list(groups.values()) for groups in stages]


def _set(module: nn.Linear, q: QuantizedLinear) -> QuantizedLinear:
    """Give ``module`` the weight ``q`` stands for (in place: a tied embedding follows its LM head)."""
    with torch.no_grad():
        module.weight.copy_(q.dequantize().to(module.weight.dtype))
    return q


@torch.no_grad()
def _gptq(model, layers, calibration: torch.Tensor, options: QuantizeOptions, progress) -> tuple[dict, list]:
    from d2mc.quantize.gptq import GptqMatrix

    linears, fallbacks = {}, []
    hidden, calls = _layer_calls(model, calibration)
    for index, (layer, stages) in enumerate(zip(model.model.layers, layers, strict=True)):
        progress(f"GPTQ block {index + 1}/{len(layers)}")
        for number, stage in enumerate(stages):
            if not stage:
                continue
            # a group's Linears read one input, and mixed precision gives them one bit width
            tasks = []
            for group in stage:
                bits = options.bits_of(group[0][0], len(layers))
                tasks.append(GptqMatrix(torch.cat([m.weight for _, m in group]), bits,
                                        _block_size(options, bits, group[0][1].in_features)))
            # the attention's projections run once per forward: the block need not run past them
            stop = number < len(ATTENTION_STAGES)
            handles = [group[0][1].register_forward_pre_hook(_feeding(task, stop))
                       for group, task in zip(stage, tasks, strict=True)]
            with hooks(handles):
                for h, call in zip(hidden, calls[index], strict=True):
                    with contextlib.suppress(_Stop):
                        _run(layer, h, call)
            for group, task in zip(stage, tasks, strict=True):
                if task.tokens == 0:  # an expert the router never chose on the calibration text
                    parts = [quantize_rtn(m.weight, task.bits, task.block_size) for _, m in group]
                    fallbacks += [name for name, _ in group]
                else:
                    stacked = task.quantize()
                    parts = _split_rows(stacked, [m.out_features for _, m in group])
                for (name, module), q in zip(group, parts, strict=True):
                    linears[name] = _set(module, q)
        hidden = [output_tensor(_run(layer, h, call)) for h, call in zip(hidden, calls[index], strict=True)]
    if options.lm_head_bits:
        progress("GPTQ LM head")
        task = GptqMatrix(model.lm_head.weight, options.lm_head_bits,
                          options.lm_head_block_size(model.lm_head.in_features))
        for h in hidden:
            task.add(model.model.norm(h))
        linears["lm_head"] = _set(model.lm_head, task.quantize())
    if fallbacks:
        log.warning("no calibration token reached %d expert matrices; round-to-nearest quantized them", len(fallbacks))
    return linears, fallbacks


def _feeding(task, stop: bool):
    """A pre-hook that feeds a module's input to ``task`` (and, with ``stop``, ends the forward there)."""
    def hook(_module, args):
        task.add(args[0])
        if stop:
            raise _Stop
    return hook


def _split_rows(q: QuantizedLinear, sizes: list[int]) -> list[QuantizedLinear]:
    codes, scales = q.codes.split(sizes), q.scales.split(sizes)
    return [QuantizedLinear(q.bits, q.block_size, c.contiguous(), s.contiguous()) for c, s in zip(codes, scales, strict=True)]


class _Stop(Exception):
    pass


def _layer_calls(model, calibration: torch.Tensor) -> tuple[list[torch.Tensor], list[list[tuple]]]:
    """The first block's input hidden states per calibration batch, and how the model calls each block per batch
    (``(positional args after the hidden state, keyword args)``: masks and rotary tables), from one forward."""
    layers = model.model.layers
    hidden: list[torch.Tensor] = []
    calls: list[list[tuple]] = [[] for _ in layers]

    def record(index):
        def hook(_module, args, kwargs):
            if index == 0:
                hidden.append(first_tensor(args, kwargs))
            calls[index].append((args[1:], {k: v for k, v in kwargs.items() if k != "hidden_states"}))
            if index == len(layers) - 1:
                raise _Stop
        return hook

    handles = [layer.register_forward_pre_hook(record(i), with_kwargs=True) for i, layer in enumerate(layers)]
    with hooks(handles):
        for batch in batches(calibration, BATCH):
            try:
                model(batch, use_cache=False)
            except _Stop:
                pass
    return hidden, calls


def _run(layer, hidden: torch.Tensor, call: tuple):
    rest, kwargs = call
    return layer(hidden, *rest, **kwargs)
