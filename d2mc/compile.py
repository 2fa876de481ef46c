"""``d2mc compile``: the whole pipeline, from a dense checkpoint to a deployable artifact and its report.

import -> roofline (dense) -> analyze-redundancy -> plan-fusion -> transform -> [recovery] -> [quantize] -> lower
(ONNX) -> verify -> score the artifact -> measure (here) -> engine (device-side step) -> report. Each phase fills
its part of a :class:`CompileState`; the report is built from that state, one section per phase
(:mod:`d2mc.report`). Everything is written into a temporary directory that is renamed to the output only when
every step succeeded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from d2mc.artifact import ONNX_DIR, TENSORRT_ONNX_DIR, engine_dir
from d2mc.convert import ConvertOptions, convert, recovers, write_converted
from d2mc.errors import OptionError
from d2mc.loading import load_model
from d2mc.outputs import atomic_output_dir, check_output_path
from d2mc.profiles import DeviceProfile, load_profile
from d2mc.roofline import RooflineSettings, estimate

if TYPE_CHECKING:
    from d2mc.arch import ModelArch
    from d2mc.context import Context
    from d2mc.evaluation import PerplexityResult
    from d2mc.latency import LatencyComparison
    from d2mc.loading import LoadedModel
    from d2mc.quantize import QuantizedModel, QuantizeOptions
    from d2mc.targets.onnxruntime import ExportResult


@dataclass
class CompileOptions:
    model: str
    output: str
    target: str = "orin-agx"
    conversion: ConvertOptions = field(default_factory=lambda: ConvertOptions(method="auto", speedup=1.2))
    eval_tokens: int = 4096
    measure: bool = True
    host_profile: str | None = None  # this machine's profile for judging the measurement (d2mc.host_profile)
    prefill: int = 128
    context: int = 512
    overwrite: bool = False
    tasks: tuple[str, ...] = ()  # lm-evaluation-harness tasks scored on the final model
    include_path: str | None = None  # a directory of task YAML files for ``tasks``
    task_limit: int | None = None  # documents per task
    quantize: QuantizeOptions | None = None  # int4/int8 weights; None: the profile's float format


@dataclass
class CompileState:
    """What the phases of one compile have produced so far, in the order they run; the report is built from it."""

    options: CompileOptions
    profile: DeviceProfile
    settings: RooflineSettings  # what the roofline costs: the artifacts' prefill computes logits at every position
    conversion: ConvertOptions  # the options reconciled with the device profile
    say: Callable[[str], None]
    out: Path | None = None  # the temporary output directory
    timings: dict[str, float] = field(default_factory=dict)  # step -> seconds
    # import: the dense model, its roofline and its held-out perplexity
    loaded: LoadedModel | None = None
    dense_arch: ModelArch | None = None
    dense_cost: dict | None = None  # phase -> PhaseCost
    eval_windows: Any = None
    dense_ppl: float | None = None
    # conversion
    ctx: Context | None = None
    converted_cost: dict | None = None
    converted_ppl: float | None = None
    # recovery training
    recovery: dict | None = None  # the trainer's summary
    recovered_ppl: float | None = None
    tasks: Any = None  # d2mc.tasks.TaskScores of the final model
    # quantization: the model that ships (PyTorch, dequantized weights) and its held-out perplexity
    quantized: QuantizedModel | None = None
    quantized_ppl: PerplexityResult | None = None
    artifact_ppl: PerplexityResult | None = None  # the shipped ONNX artifact, run by ONNX Runtime
    # lowering, measurement and engine
    exported: ExportResult | None = None
    latency: LatencyComparison | None = None  # measured here, next to the roofline of this machine
    engine: dict | None = None
    blocks: list[dict] = field(default_factory=list)  # the report's table of blocks

    def step(self, name: str) -> None:
        self.say(f"{name}...")
        self.timings[name] = time.perf_counter()

    def done(self, name: str) -> None:
        self.timings[name] = time.perf_counter() - self.timings[name]

    @contextlib.contextmanager
    def timed(self, name: str):
        """Announce and time one step."""
        self.step(name)
        yield
        self.done(name)


def compile_model(options: CompileOptions, progress: Callable[[str], None] | None = None) -> dict:
    """Run every step and return the report (also written as ``report.json`` and ``report.md``)."""
    from d2mc.report import build_report, write_report

    profile = load_profile(options.target)
    settings = roofline_settings(options, profile)
    conversion = dataclasses.replace(options.conversion, target=options.conversion.target or options.target,
                                     context=options.context, precision=settings.precision,
                                     block_size=settings.block_size, lm_head_precision=settings.lm_head_precision)
    state = CompileState(options, profile, settings, conversion, progress or (lambda text: None))
    step, done = state.step, state.done

    with atomic_output_dir(options.output, overwrite=options.overwrite) as out:
        state.out = out
        _import(state)
        _convert(state)
        _recover(state)
        _score_tasks(state)
        ctx = state.ctx

        step("save model")
        write_converted(out / "model", ctx.model, ctx.tokenizer, ctx.report["conversion"])
        done("save model")

        _quantize(state)
        _lower(state)
        _score(state)
        _measure(state)
        _engine(state, Path(options.output))
        if "redundancy" in ctx.results:
            from d2mc.plots import plot_redundancy

            plot_redundancy(ctx.results["redundancy"], out / "redundancy.png", title=options.model)
        state.blocks = _block_rows(ctx, state.converted_cost)
        report = build_report(state)
        write_report(report, out)
    if state.recovery:
        from d2mc.recovery import remove_checkpoints

        remove_checkpoints(conversion.recovery)
    return report


def roofline_settings(options: CompileOptions, profile: DeviceProfile) -> RooflineSettings:
    """What the roofline costs for this compile: the weights that ship (the profile's float format, or int4/int8 in
    blocks with the LM head at its own precision), and a prefill that computes logits at every position (as the
    artifacts do). Refuses a quantized precision the target's TensorRT does not support."""
    float_format = "fp16" if profile.kind == "gpu" else "fp32"
    quantize = options.quantize
    if quantize is None:
        return RooflineSettings(prefill=options.prefill, context=options.context, precision=float_format,
                                all_logits=True)
    if profile.tensorrt_precisions and quantize.precision not in profile.tensorrt_precisions:
        raise OptionError(f"{{precision}} {quantize.precision} is not a precision {profile.name}'s TensorRT supports "
                          f"({', '.join(profile.tensorrt_precisions)}): choose one of those, or another --target")
    head = float_format if quantize.lm_head_precision == "float" else quantize.lm_head_precision
    return RooflineSettings(prefill=options.prefill, context=options.context, precision=quantize.precision,
                            block_size=quantize.block_size, lm_head_precision=head, all_logits=True)


def planned_settings(settings: RooflineSettings, arch: ModelArch, quantize: QuantizeOptions | None,
                     profile: DeviceProfile) -> RooflineSettings:
    """``settings`` for costing ``arch`` as the compile ships it: with quantization, each matrix as the quantize step
    will store it (:meth:`~d2mc.weight_plan.WeightPlan.from_quantization`: mixed precision's int8 matrices, HQQ's
    zero-point residuals, the LM head's own blocks), before anything is quantized."""
    if quantize is None:
        return settings
    from d2mc.weight_plan import WeightPlan

    plan = WeightPlan.from_quantization(arch, quantize, "fp16" if profile.kind == "gpu" else "fp32")
    return dataclasses.replace(settings, weights=plan, zero_points=plan.zero_points)


def _estimate(state: CompileState, arch: ModelArch, quantize: QuantizeOptions | None = None) -> dict:
    """Prefill and decode of ``arch`` on the target, with the weights the compile ships (``quantize``: the
    quantized model's own options, its block size fitted and its int8 matrices chosen; else the options asked
    for)."""
    return estimate(arch, state.profile, planned_settings(state.settings, arch, quantize or state.options.quantize,
                                                          state.profile))


def _import(state: CompileState) -> None:
    """The dense model, its predicted cost and, when asked, its held-out perplexity."""
    with state.timed("import"):
        loaded = state.loaded = load_model(state.options.model)
        state.dense_arch = loaded.arch
    state.dense_cost = _estimate(state, state.dense_arch)
    if state.options.eval_tokens:
        from d2mc.data import heldout_windows, perplexity

        with state.timed("held-out perplexity (dense)"):
            state.eval_windows = heldout_windows(loaded.tokenizer, window=512, max_tokens=state.options.eval_tokens)
            state.dense_ppl = perplexity(loaded.model, state.eval_windows)


def _convert(state: CompileState) -> None:
    """The conversion's passes, the converted model's predicted cost and held-out perplexity."""
    with state.timed("convert"):
        state.ctx = convert(state.loaded, state.conversion, progress=lambda text: state.say(f"  {text}"),
                            recover=False)
    state.converted_cost = _estimate(state, state.ctx.arch)
    if state.eval_windows is not None:
        from d2mc.data import perplexity

        with state.timed("held-out perplexity (converted)"):
            state.converted_ppl = perplexity(state.ctx.model, state.eval_windows)


def _recover(state: CompileState) -> None:
    """Recovery training when the options ask for it; its summary and the held-out perplexity after it. A
    recipe's own ``recover`` pass has already run inside the conversion (its perplexity is the converted one)."""
    from d2mc.recovery import brief, write_recovery_outputs

    ctx = state.ctx
    if "recovery" in ctx.results:
        write_recovery_outputs(ctx.results["recovery"], state.out)
        state.recovery = ctx.results["recovery"]
        return
    if not recovers(state.conversion):
        return
    from d2mc.pipeline import PassManager, create_pass

    with state.timed("recovery training"):
        PassManager([create_pass("recover", options=state.conversion.recovery,
                                 progress=lambda text: state.say(f"  {text}"))]).run(ctx)
    state.recovery = ctx.results["recovery"]
    ctx.report["conversion"]["recovery"] = brief(state.recovery)
    write_recovery_outputs(state.recovery, state.out)
    if state.eval_windows is not None:
        from d2mc.data import perplexity

        with state.timed("held-out perplexity (after recovery)"):
            state.recovered_ppl = perplexity(ctx.model, state.eval_windows)


def _score_tasks(state: CompileState) -> None:
    """lm-evaluation-harness tasks on the final PyTorch model, when asked (their names were checked up front)."""
    options = state.options
    if not options.tasks:
        return
    from d2mc.tasks import evaluate_model_tasks

    with state.timed("tasks (lm-evaluation-harness)"):
        state.tasks = evaluate_model_tasks(state.ctx.model, state.ctx.tokenizer, options.tasks,
                                           include_path=options.include_path, limit=options.task_limit,
                                           source=options.model)
def _quantize(state: CompileState) -> None:
    """int4/int8 weights, when asked for: the quantized model (what ships) and its held-out perplexity."""
    options = state.options.quantize
    if options is None:
        return
    from d2mc.quantize import quantize_model

    ctx = state.ctx
    with state.timed(f"quantize ({options.precision}, {options.quant_method})"):
        state.quantized = quantize_model(ctx.model, options, ctx.tokenizer, progress=lambda t: state.say(f"  {t}"))
    state.converted_cost = _estimate(state, ctx.arch, state.quantized.options)
    if state.options.eval_tokens:
        from d2mc.evaluation import evaluate_model_perplexity

        with state.timed("held-out perplexity (quantized, PyTorch)"):
            state.quantized_ppl = evaluate_model_perplexity(state.quantized.model, ctx.tokenizer,
                                                            tokens=state.options.eval_tokens)


def _lower(state: CompileState) -> None:
    """The onnxruntime-flavoured artifact, verified against the model it ships (quantized, when it is)."""
    from d2mc.targets.onnxruntime import export_onnx

    with state.timed("lower to ONNX and verify"):
        state.exported = export_onnx(state.ctx.model, state.ctx.tokenizer, state.out / ONNX_DIR,
                                     source=state.options.model, quantized=state.quantized)


def _score(state: CompileState) -> None:
    """The held-out perplexity of the artifact itself, run by ONNX Runtime."""
    if not state.options.eval_tokens:
        return
    from d2mc.evaluation import evaluate_artifact_perplexity

    with state.timed("held-out perplexity (artifact, ONNX Runtime)"):
        state.artifact_ppl = evaluate_artifact_perplexity(state.out / ONNX_DIR, tokens=state.options.eval_tokens)


def _measure(state: CompileState) -> None:
    """The artifact timed here on ONNX Runtime, next to the roofline of this machine."""
    if not state.options.measure:
        return
    from d2mc.latency import compare_latency
    from d2mc.measure import measure_onnx

    arch = state.ctx.arch
    with state.timed("measure (ONNX Runtime, this machine)"):
        measurement = measure_onnx(state.out / ONNX_DIR / "model.onnx", state.options.prefill,
                                   state.options.context, vocab=arch.vocab_size)
        settings = state.settings
        state.latency = compare_latency(arch, state.profile, measurement, precision=settings.precision,
                                        all_logits=True, block_size=settings.block_size,
                                        lm_head_precision="fp32" if settings.lm_head == "fp16" else settings.lm_head,
                                        host=state.options.host_profile, progress=state.say)


def _engine(state: CompileState, final: Path) -> None:
    """The TensorRT step: the TensorRT-flavoured ONNX (verified) and the engine for the profile, built here when
    this machine has TensorRT and the profile's GPU, else the device-side build script (``engine-<profile>/``)."""
    profile, out = state.profile, state.out
    if not profile.tensorrt_precisions:
        state.engine = {"built": False, "reason": f"{profile.name} has no TensorRT",
                        "summary": "no TensorRT on the target"}
        return
    from d2mc.engine.build import prepare_engine_build
    from d2mc.engine.plan import EngineSettings
    from d2mc.targets.onnxruntime import export_onnx

    precision = "fp16" if "fp16" in profile.tensorrt_precisions else "fp32"
    quantized = state.quantized
    with state.timed("lower to ONNX (TensorRT flavour) and verify"):
        exported = export_onnx(state.ctx.model, None, out / TENSORRT_ONNX_DIR, flavour="tensorrt",
                               precision=precision, quantized=quantized)
    with state.timed(f"engine for {profile.name}"):
        result = prepare_engine_build(out / TENSORRT_ONNX_DIR, profile, engine_dir(out, profile.name),
                                      EngineSettings(precision=quantized.precision if quantized else precision),
                                      artifact=out)
    script = engine_dir(final, profile.name) / result.script_path.name
    summary = (f"built {engine_dir(final, profile.name)} in {result.seconds:.0f} s" if result.built else
               f"not built here ({result.reason}); on the {profile.name} run: bash {script}")
    state.engine = {**result.to_dict(), "summary": summary, "script": str(script),
                    "precision": result.engine_plan.precision,
                    "onnx_verify": exported.verify}


def _block_rows(ctx, converted_cost) -> list[dict]:
    """Each block of the converted model with its share of the predicted decode time."""
    decode_share = converted_cost["decode"].per_block()
    total_decode = converted_cost["decode"].seconds
    blocks = []
    for i, block in enumerate(ctx.model.config.blocks):
        blocks.append({"block": i, "attention_layer": block.attention_layer, "experts": list(block.expert_layers),
                       "top_k": block.top_k if len(block.expert_layers) > 1 else None,
                       "decode_share": decode_share.get(i, 0.0) / total_decode})
    return blocks


def check_output_free(path: str, overwrite: bool) -> None:
    check_output_path(path, overwrite)
