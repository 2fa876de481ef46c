"""Checks of what the user asked for that can run before any heavy work: option ranges, and the inputs of a
conversion against the model's own limits (its layers and its maximum positions)."""

from __future__ import annotations

import math
from pathlib import Path

from d2mc.errors import OptionError, UserError


def check_number(value: float | int | None, option: str, *, minimum: float | None = None,
                 above: float | None = None, maximum: float | None = None) -> None:
    """Refuse a value that is not a finite number within its range (``None`` means unset and passes).

    ``minimum`` and ``maximum`` are inclusive bounds, ``above`` an exclusive lower bound. ``option`` is a flag
    (``--prefill``) or an option key in braces (``{workspace_gb}``), which the CLI turns into its flag.
    """
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise OptionError(f"{option} must be a finite number, not {value!r}")
    if minimum is not None and value < minimum:
        raise OptionError(f"{option} must be at least {minimum:g}, not {value:g}")
    if above is not None and value <= above:
        raise OptionError(f"{option} must be above {above:g}, not {value:g}")
    if maximum is not None and value > maximum:
        raise OptionError(f"{option} must be at most {maximum:g}, not {value:g}")


def check_sequence_length(length: int, max_positions: int, option: str) -> None:
    """A sequence of ``length`` tokens must fit the model's positions."""
    check_number(length, option, minimum=2)
    if length > max_positions:
        raise UserError(f"{option} {length} is longer than the model's {max_positions} positions: give at most "
                        f"{max_positions}")


def check_conversion_inputs(options, model: str):
    """What a conversion (``ConvertOptions``) will need of ``model``, checked from its config before its weights
    are read: the plan and layer ranges against its layers, the calibration and recovery lengths against its
    positions, the calibration text, the device profile. Returns the model's ``ModelArch``."""
    from d2mc.data import read_text
    from d2mc.loading import load_model
    from d2mc.plan import parse_layers, parse_plan
    from d2mc.profiles import load_profile

    loaded = load_model(model, config_only=True, tokenizer=False)
    arch = loaded.arch
    if options.plan is not None and loaded.config.model_type != "d2mc_moe":
        parse_plan(options.plan, arch.num_blocks)
    if options.layers is not None:
        parse_layers(options.layers, arch.num_blocks)
    if options.remove_attention is not None and options.remove_attention > arch.num_blocks - 2:
        raise UserError(f"--remove-attention {options.remove_attention}: the model has {arch.num_blocks} layers "
                        f"and the first and last stay dense; ask for at most {max(arch.num_blocks - 2, 0)}")
    if options.recipe is None and (options.budget_ms is not None or options.speedup is not None) and (
            options.target is None):
        raise UserError("--budget-ms and --speedup need a device profile: add --target")
    check_number(options.reconstruct_steps, "--reconstruct-steps", minimum=0)
    check_number(options.top_k, "--top-k", minimum=1)
    check_number(options.max_group, "--max-group", minimum=2)
    check_number(options.calib_sequences, "--calib-sequences", minimum=1)
    check_sequence_length(options.calib_length, arch.max_position_embeddings, "--calib-length")
    if options.recovery is not None:
        check_recovery_options(options.recovery, arch, prefix="--recover-")
    if options.calib_data is not None:
        read_text(options.calib_data)
    if options.target is not None:
        profile = load_profile(options.target)
        if options.budget_ms is not None or options.speedup is not None:
            check_context(options.context, arch.max_position_embeddings)
            if options.method == "auto":
                check_budget_reachable(options, arch, profile)
    return arch


def check_context(context: int, positions: int) -> None:
    """A decode step after ``context`` cached tokens must fit the model's positions."""
    check_number(context, "{context}", minimum=1)
    if context >= positions:
        raise OptionError(f"{{context}} {context} is past the model's maximum of {positions} positions (the decode "
                          f"step needs one more: use {{context}} {positions - 1} or less)")


def check_budget_reachable(options, arch, profile) -> None:
    """Refuse a latency budget (or speed-up) that no plan ``auto`` may choose can meet: even with every layer but the
    first and the last dropped, the predicted decode is slower."""
    from dataclasses import replace

    from d2mc.arch import BlockSpec
    from d2mc.roofline import predict_decode_seconds

    settings = dict(block_size=options.block_size, lm_head_precision=options.lm_head_precision)
    dense = predict_decode_seconds(arch, profile, options.context, options.precision, **settings)
    edges = replace(arch, blocks=(BlockSpec(), BlockSpec()) if arch.num_blocks > 1 else arch.blocks)
    fastest = predict_decode_seconds(edges, profile, options.context, options.precision, **settings)
    target = options.budget_ms * 1e-3 if options.budget_ms is not None else dense / options.speedup
    if target < fastest:
        given = "{budget_ms} " + f"{options.budget_ms:g}" if options.budget_ms is not None else \
            "{speedup} " + f"{options.speedup:g}"
        raise OptionError(f"{given} is out of reach on {profile.name} at context {options.context}: even with every "
                          f"layer but the first and last dropped the predicted decode is {fastest * 1e3:.3f} ms "
                          f"(dense {dense * 1e3:.3f} ms); ask for at most {{speedup}} "
                          f"{math.floor(dense / fastest * 100) / 100:.2f} or at least {{budget_ms}} "
                          f"{math.ceil(fastest * 1e6) / 1e3:.3f}")


def check_compile_inputs(options) -> None:
    """:func:`check_conversion_inputs` for ``d2mc compile`` (``CompileOptions``), and its phases against the
    model's positions."""
    from dataclasses import replace

    check_number(options.eval_tokens, "--eval-tokens", minimum=0)
    conversion = replace(options.conversion, target=options.conversion.target or options.target,
                         context=options.context)
    arch = check_conversion_inputs(conversion, options.model)
    positions = arch.max_position_embeddings
    if options.quantize is not None:
        options.quantize.check_installed()
        options.quantize.check_divides(arch)
    if options.measure:
        from d2mc.host_profile import check_host_profile

        check_host_profile(options.host_profile)
    if options.prefill > positions:
        raise UserError(f"--prefill {options.prefill} is longer than the model's {positions} positions")
    check_context(options.context, positions)
    if options.tasks:
        from d2mc.tasks import load_tasks

        check_number(options.task_limit, "--task-limit", minimum=1)
        load_tasks(options.tasks, options.include_path)


def check_recovery_options(options, arch, prefix: str = "--") -> None:
    """Recovery options (``RecoveryOptions``) that its own checks let through: numbers that are not finite, and
    sequences longer than the model's positions."""
    from dataclasses import fields

    for f in fields(options):
        value = getattr(options, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{prefix}{f.name.replace('_', '-')} must be a finite number, not {value}")
    check_sequence_length(options.seq_len, arch.max_position_embeddings, f"{prefix}seq-len")


def check_recovery_inputs(options, converted: str) -> None:
    """:func:`check_recovery_options` for ``d2mc recover``, against the converted model's config."""
    from d2mc.loading import load_model

    check_recovery_options(options, load_model(converted, config_only=True, tokenizer=False).arch)


def is_profile_file(path: Path) -> bool:
    """Whether ``path`` is a valid device profile (what ``profile --calibrate --overwrite`` may replace)."""
    from d2mc.profiles import load_profile_file

    try:
        load_profile_file(path)
    except UserError:
        return False
    return True
