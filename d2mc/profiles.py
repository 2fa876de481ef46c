"""Device profiles: datasheet figures of one device, kept as TOML data and validated on load.

A profile file looks like::

    name = "orin-agx"
    aliases = ["jetson-agx-orin-64gb"]
    description = "NVIDIA Jetson AGX Orin 64GB (GPU, MAXN power mode)"
    kind = "gpu"
    memory_bandwidth_gbps = 204.8
    memory_gb = 64
    sm = "8.7"
    tensorrt_precisions = ["fp32", "fp16", "int8"]
    bandwidth_efficiency = 0.8
    compute_efficiency = 0.6
    kernel_overhead_us = 6.0

    [peak_tflops]
    fp32 = 5.3
    fp16 = 42.5

    [source]
    memory_bandwidth_gbps = "NVIDIA Jetson AGX Orin Series Data Sheet (DS-10662-001)"
    ...

Every figure needs an entry in ``[source]`` saying where it came from (a datasheet, or a measurement).

The efficiencies and the per-kernel overhead describe one runtime on the device (``runtime``, optional: TensorRT on
a Jetson, ONNX Runtime on a host CPU). A calibrated profile may add others that reach the same memory and compute
differently, each a table of overrides read by :meth:`DeviceProfile.for_runtime`::

    runtime = "onnxruntime-cpu"
    [runtimes.pytorch-cpu]
    bandwidth_efficiency = 0.55
    kernel_overhead_us = 68.0

Kernels whose weights are stored at a precision of their own (the GEMVs of int4 weights, which dequantize as they
read) may stream and launch differently from the float kernels. A ``[precisions.NAME]`` table holds their figures,
read by :meth:`DeviceProfile.for_precision` for the operators whose weights are at that precision; every other
operator keeps the profile's own figures. Such kernels may also compute at a precision of their own whatever their
activations are (ONNX Runtime's ``MatMulNBits`` at accuracy level 4 quantizes its input to int8):
``compute_precision`` names the ``peak_tflops`` entry their ``compute_efficiency`` is a fraction of::

    [precisions.int4]
    bandwidth_efficiency = 0.7
    kernel_overhead_us = 8.0
    compute_efficiency = 0.3
    compute_precision = "int8"

The top-level ``[precisions.NAME]`` tables describe the profile's own runtime. Another runtime's come inside its
table, ``[runtimes.NAME.precisions.PRECISION]``; a runtime without them uses its own figures for every operator.

A profile measured on a machine (``d2mc profile --measure-host``) says which in an optional ``[machine]`` table
(CPU model, cores, memory, runtime versions, when), so that a profile measured elsewhere is recognised as such::

    [machine]
    cpu = "AMD EPYC"
    cores = 2
    measured = "2026-12-01 11:50"
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from d2mc.arch import BYTES_PER_ELEMENT
from d2mc.errors import UserError

KINDS = ("gpu", "cpu")
_NUMBERS = ("memory_bandwidth_gbps", "memory_gb", "bandwidth_efficiency", "compute_efficiency", "kernel_overhead_us")
_EFFICIENCIES = ("bandwidth_efficiency", "compute_efficiency")
OP_CLASSES = ("embedding", "norm", "qkv_proj", "attention", "o_proj", "router", "mlp", "lm_head")
# what a [runtimes.NAME] table may override (its precisions: tables [runtimes.NAME.precisions.PRECISION])
RUNTIME_FIELDS = ("bandwidth_efficiency", "compute_efficiency", "kernel_overhead_us", "op_bandwidth_efficiency",
                  "precisions")
# what a [precisions.NAME] table may override
PRECISION_FIELDS = ("bandwidth_efficiency", "compute_efficiency", "kernel_overhead_us", "compute_precision")


@dataclass(frozen=True)
class DeviceProfile:
    """One device, as the roofline and the engine builder see it."""

    name: str
    description: str
    kind: str
    memory_bandwidth_gbps: float
    memory_gb: float
    peak_tflops: dict[str, float]
    bandwidth_efficiency: float
    compute_efficiency: float
    kernel_overhead_us: float
    source: dict[str, str]
    aliases: tuple[str, ...] = ()
    sm: str | None = None
    tensorrt_precisions: tuple[str, ...] = ()
    # per operator class, a fraction of achievable_bandwidth for kernels that stream worse than a GEMV (optional)
    op_bandwidth_efficiency: dict[str, float] = field(default_factory=dict)
    runtime: str | None = None  # the runtime the efficiencies and the overhead describe
    runtimes: dict[str, dict] = field(default_factory=dict)  # other runtimes: overrides of RUNTIME_FIELDS
    # kernels whose weights are at a precision of their own: overrides of PRECISION_FIELDS per precision
    precisions: dict[str, dict[str, float | str]] = field(default_factory=dict)
    machine: dict[str, str | int | float] = field(default_factory=dict)  # where a measured profile was measured
    # the precision every matrix product runs at, whatever its activations (set only by a precision's table)
    compute_precision: str | None = None
    path: Path | None = field(default=None, compare=False)

    def for_runtime(self, runtime: str) -> DeviceProfile:
        """The profile as ``runtime`` sees it: its own fitted efficiencies, overhead and per-precision tables where
        the profile has them, else the profile's (which describe ``self.runtime``). The top-level per-precision
        tables describe the profile's own runtime, so another runtime's view has only the ones in its own table."""
        override = self.runtimes.get(runtime)
        if not override:
            return self
        return dataclasses.replace(self, runtime=runtime, **{"precisions": {}, **override})

    def for_precision(self, precision: str) -> DeviceProfile:
        """The profile as kernels with weights at ``precision`` see it: the ``[precisions.NAME]`` figures where
        the profile has them, else its own."""
        override = self.precisions.get(precision)
        if not override:
            return self
        return dataclasses.replace(self, **override)

    @property
    def achievable_bandwidth(self) -> float:
        """Bytes per second the roofline assumes a streaming kernel reaches."""
        return self.memory_bandwidth_gbps * 1e9 * self.bandwidth_efficiency

    def bandwidth_for(self, op: str) -> float:
        """Bytes per second the roofline assumes for operator class ``op``."""
        return self.achievable_bandwidth * self.op_bandwidth_efficiency.get(op, 1.0)

    def achievable_flops(self, precision: str) -> float:
        """FLOP/s the roofline assumes a matrix kernel reaches at ``precision`` (at ``compute_precision`` instead
        when this view of the profile has one: kernels that compute at a precision of their own)."""
        return self.peak_for(self.compute_precision or precision) * 1e12 * self.compute_efficiency

    def peak_for(self, precision: str) -> float:
        """Peak TFLOP/s at ``precision``; int4/fp8 weights compute at the fastest listed precision they map to."""
        for candidate in _COMPUTE_FALLBACK.get(precision, (precision,)):
            if candidate in self.peak_tflops:
                return self.peak_tflops[candidate]
        raise UserError(f"device '{self.name}' has no throughput for {precision}: it lists "
                        f"{', '.join(self.peak_tflops)}")


# Weight-only formats are dequantized and computed at a higher precision when the device lacks the format.
_COMPUTE_FALLBACK = {
    "fp32": ("fp32",),
    "fp16": ("fp16", "bf16", "fp32"),
    "bf16": ("bf16", "fp16", "fp32"),
    "int8": ("int8", "fp16", "fp32"),
    "fp8": ("fp8", "fp16", "fp32"),
    "int4": ("int4", "int8", "fp16", "fp32"),
}


def _profiles_dir():
    return importlib.resources.files("d2mc.device_profiles")


def builtin_profiles() -> list[DeviceProfile]:
    """Every profile shipped with d2mc, sorted by name."""
    profiles = []
    for entry in _profiles_dir().iterdir():
        if entry.name.endswith(".toml"):
            with importlib.resources.as_file(entry) as path:
                profiles.append(load_profile_file(path))
    return sorted(profiles, key=lambda p: p.name)


def load_profile(name_or_path: str | Path) -> DeviceProfile:
    """A built-in profile by name or alias, or a profile TOML file by path."""
    text = str(name_or_path)
    if text.endswith(".toml") or Path(text).expanduser().is_file():  # a directory named like a profile is not one
        return load_profile_file(Path(text).expanduser())
    profiles = builtin_profiles()
    for profile in profiles:
        if text == profile.name or text in profile.aliases:
            return profile
    names = ", ".join(p.name for p in profiles)
    raise UserError(f"unknown device profile '{text}': choose one of {names}, or give a .toml file")


def load_profile_file(path: Path) -> DeviceProfile:
    """Parse and validate one profile file; any problem is a one-line error naming the file and the field."""
    if not path.is_file():
        what = "is a directory, not a .toml file" if path.is_dir() else "does not exist"
        raise UserError(f"device profile '{path}' {what}")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"device profile '{path}': not valid TOML ({exc})") from None
    return _validate(data, path)


def _validate(data: dict, path: Path) -> DeviceProfile:
    def fail(field_name: str, why: str):
        raise UserError(f"device profile '{path}': field '{field_name}' {why}")

    known = {f.name for f in fields(DeviceProfile)} - {"path", "compute_precision"}
    for key in data:
        if key not in known:
            fail(key, f"is not a profile field (known: {', '.join(sorted(known))})")
    optional = {"aliases", "sm", "tensorrt_precisions", "op_bandwidth_efficiency", "runtime", "runtimes",
                "precisions", "machine"}
    for key in sorted(known - optional):
        if key not in data:
            fail(key, "is missing")

    for key in ("name", "description", "kind"):
        if not isinstance(data[key], str) or not data[key]:
            fail(key, "must be a non-empty string")
    if data["kind"] not in KINDS:
        fail("kind", f"must be one of {', '.join(KINDS)}")
    for key in _NUMBERS:
        _check_number(data[key], key, fail)
    _check_efficiencies(data, "", fail)
    if "runtime" in data and (not isinstance(data["runtime"], str) or not data["runtime"]):
        fail("runtime", "must be a runtime name such as \"onnxruntime-cpu\"")
    peaks = data["peak_tflops"]
    if not isinstance(peaks, dict) or not peaks:
        fail("peak_tflops", "must be a table of precision = TFLOP/s")
    for precision, value in peaks.items():
        if precision not in BYTES_PER_ELEMENT:
            fail(f"peak_tflops.{precision}", f"is not a precision (known: {', '.join(BYTES_PER_ELEMENT)})")
        _check_number(value, f"peak_tflops.{precision}", fail)
    _check_precision_tables(data.get("precisions", {}), "precisions", peaks, fail)
    runtimes = data.get("runtimes", {})
    if not isinstance(runtimes, dict) or not all(isinstance(v, dict) for v in runtimes.values()):
        fail("runtimes", "must be tables [runtimes.NAME] of " + ", ".join(RUNTIME_FIELDS))
    for runtime, override in runtimes.items():
        for key in override:
            if key not in RUNTIME_FIELDS:
                fail(f"runtimes.{runtime}.{key}", f"cannot be set per runtime (known: {', '.join(RUNTIME_FIELDS)})")
        for key in ("kernel_overhead_us", *_EFFICIENCIES):
            if key in override:
                _check_number(override[key], f"runtimes.{runtime}.{key}", fail)
        _check_efficiencies(override, f"runtimes.{runtime}.", fail)
        _check_precision_tables(override.get("precisions", {}), f"runtimes.{runtime}.precisions", peaks, fail)
    machine = data.get("machine", {})
    if not isinstance(machine, dict) or not all(isinstance(v, str | int | float) and not isinstance(v, bool)
                                                for v in machine.values()):
        fail("machine", "must be a table of the machine's description = text or number")
    precisions = data.get("tensorrt_precisions", [])
    if not isinstance(precisions, list) or any(p not in BYTES_PER_ELEMENT for p in precisions):
        fail("tensorrt_precisions", f"must be a list drawn from {', '.join(BYTES_PER_ELEMENT)}")
    if "sm" in data and not (isinstance(data["sm"], str) and _is_sm(data["sm"])):
        fail("sm", "must be a compute capability string such as \"8.7\"")
    aliases = data.get("aliases", [])
    if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
        fail("aliases", "must be a list of strings")

    source = data["source"]
    if not isinstance(source, dict):
        fail("source", "must be a table naming where each figure comes from")
    sourced = [k for k in (*_NUMBERS, "peak_tflops", "sm", "tensorrt_precisions", "op_bandwidth_efficiency",
                           "runtime", "runtimes", "precisions") if k in data]
    for key in sourced:
        if not isinstance(source.get(key), str) or not source[key].strip():
            fail(f"source.{key}", "is missing: say which datasheet or measurement the figure comes from")

    return DeviceProfile(
        name=data["name"], description=data["description"], kind=data["kind"],
        memory_bandwidth_gbps=float(data["memory_bandwidth_gbps"]), memory_gb=float(data["memory_gb"]),
        peak_tflops={k: float(v) for k, v in peaks.items()},
        bandwidth_efficiency=float(data["bandwidth_efficiency"]),
        compute_efficiency=float(data["compute_efficiency"]),
        kernel_overhead_us=float(data["kernel_overhead_us"]), source=dict(source),
        aliases=tuple(aliases), sm=data.get("sm"), tensorrt_precisions=tuple(precisions),
        op_bandwidth_efficiency=_op_efficiency(data), runtime=data.get("runtime"),
        runtimes={name: _runtime_override(o) for name, o in runtimes.items()},
        precisions=_precision_overrides(data.get("precisions", {})), machine=dict(machine), path=path,
    )


def _runtime_override(table: dict) -> dict:
    """A ``[runtimes.NAME]`` table as :meth:`DeviceProfile.for_runtime` applies it."""
    override = {k: float(v) for k, v in table.items() if k in ("kernel_overhead_us", *_EFFICIENCIES)}
    if "op_bandwidth_efficiency" in table:
        override["op_bandwidth_efficiency"] = _op_efficiency(table)
    if "precisions" in table:
        override["precisions"] = _precision_overrides(table["precisions"])
    return override


def _precision_overrides(tables: dict) -> dict[str, dict[str, float | str]]:
    return {name: {k: v if k == "compute_precision" else float(v) for k, v in table.items()}
            for name, table in tables.items()}


def _check_precision_tables(tables, prefix: str, peaks: dict, fail) -> None:
    """``[precisions.NAME]`` tables (at ``prefix``): known precisions, known fields, numbers and fractions, and a
    ``compute_precision`` the profile has a peak for."""
    if not isinstance(tables, dict) or not all(isinstance(v, dict) for v in tables.values()):
        fail(prefix, f"must be tables [{prefix}.NAME] of " + ", ".join(PRECISION_FIELDS))
    for precision, override in tables.items():
        if precision not in BYTES_PER_ELEMENT:
            fail(f"{prefix}.{precision}", f"is not a precision (known: {', '.join(BYTES_PER_ELEMENT)})")
        for key, value in override.items():
            if key not in PRECISION_FIELDS:
                fail(f"{prefix}.{precision}.{key}",
                     f"cannot be set per precision (known: {', '.join(PRECISION_FIELDS)})")
            if key == "compute_precision":
                if not isinstance(value, str) or value not in peaks:
                    fail(f"{prefix}.{precision}.{key}",
                         f"must name a precision of peak_tflops ({', '.join(peaks)}), not {value!r}")
            else:
                _check_number(value, f"{prefix}.{precision}.{key}", fail)
        _check_efficiencies(override, f"{prefix}.{precision}.", fail)


def _check_efficiencies(data: dict, prefix: str, fail) -> None:
    """The efficiencies present in ``data`` (top level or a runtime's table) are fractions in (0, 1]."""
    for key in _EFFICIENCIES:
        if key in data and not 0 < data[key] <= 1:
            fail(f"{prefix}{key}", "must be a fraction in (0, 1]")
    op_efficiency = data.get("op_bandwidth_efficiency", {})
    if not isinstance(op_efficiency, dict):
        fail(f"{prefix}op_bandwidth_efficiency", "must be a table of operator class = fraction")
    for op, value in op_efficiency.items():
        if op not in OP_CLASSES:
            fail(f"{prefix}op_bandwidth_efficiency.{op}", f"is not an operator class (known: {', '.join(OP_CLASSES)})")
        _check_number(value, f"{prefix}op_bandwidth_efficiency.{op}", fail)
        if value > 1:
            fail(f"{prefix}op_bandwidth_efficiency.{op}", "must be a fraction in (0, 1]")


def _op_efficiency(data: dict) -> dict[str, float]:
    return {k: float(v) for k, v in data.get("op_bandwidth_efficiency", {}).items()}


def _check_number(value, key: str, fail) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        fail(key, f"must be a number, not {value!r}")
    if not math.isfinite(value):
        fail(key, f"must be a finite number, not {value}")
    if value < 0 or (value == 0 and not key.endswith("kernel_overhead_us")):
        fail(key, f"must be positive, not {value}")


def _is_sm(text: str) -> bool:
    major, _, minor = text.partition(".")
    return major.isdigit() and minor.isdigit()
