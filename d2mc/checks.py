"""Checks of what the user asked for that can run before any heavy work: option ranges, and the inputs of a
conversion against the model's own limits (its layers and its maximum positions)."""

from __future__ import annotations

import math
from pathlib import Path

from d2mc.errors import UserError


def check_number(value: float | int | None, option: str, *, minimum: float | None = None,
                 above: float | None = None, maximum: float | None = None) -> None:
    """Refuse a value that is not a finite number within its range (``None`` means unset and passes).

    ``minimum`` and ``maximum`` are inclusive bounds, ``above`` an exclusive lower bound.
    """
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise UserError(f"{option} must be a finite number, not {value!r}")
    if minimum is not None and value < minimum:
        raise UserError(f"{option} must be at least {minimum:g}, not {value:g}")
    if above is not None and value <= above:
        raise UserError(f"{option} must be above {above:g}, not {value:g}")
    if maximum is not None and value > maximum:
        raise UserError(f"{option} must be at most {maximum:g}, not {value:g}")


def check_sequence_length(length: int, max_positions: int, option: str) -> None:
    """A sequence of ``length`` tokens must fit the model's positions."""
    check_number(length, option, minimum=2)
    if length > max_positions:
        raise UserError(f"{option} {length} is longer than the model's {max_positions} positions: give at most "
                        f"{max_positions}")


def check_conversion_inputs(options, loaded) -> None:
    """What a conversion (``ConvertOptions``) will need of ``loaded``, checked before calibration and analysis:
    the plan and layer ranges against its layers, the calibration and recovery lengths against its positions, the
    calibration text, the device profile."""
    from d2mc.data import read_text
    from d2mc.plan import parse_layers, parse_plan
    from d2mc.profiles import load_profile

    arch = loaded.arch
    if options.plan is not None and loaded.config.model_type != "d2mc_moe":
        parse_plan(options.plan, arch.num_blocks)
    if options.layers is not None:
        parse_layers(options.layers, arch.num_blocks)
    check_number(options.calib_sequences, "--calib-sequences", minimum=1)
    check_sequence_length(options.calib_length, arch.max_position_embeddings, "--calib-length")
    recovery = getattr(options, "recovery", None)
    if recovery is not None:
        check_sequence_length(recovery.seq_len, arch.max_position_embeddings, "--recover-seq-len")
    if options.calib_data is not None:
        read_text(options.calib_data)
    if options.target is not None:
        load_profile(options.target)


def is_profile_file(path: Path) -> bool:
    """Whether ``path`` is a valid device profile (what ``profile --calibrate --overwrite`` may replace)."""
    from d2mc.profiles import load_profile_file

    try:
        load_profile_file(path)
    except UserError:
        return False
    return True
