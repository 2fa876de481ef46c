"""The device profile of the machine d2mc runs on: measured here, cached per machine, and chosen for judging.

A measurement made here (``d2mc profile --measure``, ``d2mc compile``) is judged on a profile of this machine. The
shipped ``host-cpu`` profile was measured on one machine and does not transfer to another, even of the same kind,
so by default (:func:`host_profile`, choice ``auto``) d2mc measures the machine on first use and keeps the result in
``$D2MC_CACHE/host-profiles/`` under a key of the CPU model, cores, memory and runtime versions
(:func:`machine_key`); ``measure`` measures again, ``shipped`` takes the shipped profile, and a ``.toml`` path takes
that file. ``--host-profile`` on ``profile`` and ``compile`` chooses, else the ``D2MC_HOST_PROFILE`` environment
variable, else ``auto``.

What :func:`measure_host` measures (a few minutes on a 2-core machine; :mod:`d2mc.host_timing`), each figure the way
the roofline uses it:

- memory bandwidth: the faster of a plain streaming read and the rate at which matrix-vector products stream weight
  matrices of decoder shapes, over a working set far larger than the caches;
- matrix throughput: torch matrix products of prefill shapes per float precision, and ONNX Runtime's
  ``MatMulNBits`` products with int8 weights at accuracy level 4 (int8 activations) for ``int8``;
- per runtime (ONNX Runtime, which runs d2mc's artifacts here, and PyTorch eager): the efficiencies and the
  per-kernel overhead, fitted (:mod:`d2mc.host_fit`) to decode steps and prefills of three random fit models shaped
  like the models d2mc judges, at lengths the accuracy benchmark does not judge. On ONNX Runtime the same models are
  measured with int4 and int8 weights too (``MatMulNBits``: round-to-nearest, symmetric, blocks of 32, accuracy
  level 4), which gives the profile its ``[precisions.int4]`` and ``[precisions.int8]`` tables.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import platform
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from d2mc.errors import OptionError, UserError
from d2mc.host_fit import (
    ACCURACY_LEVEL,
    FIT_POINTS,
    QUANTIZED_BLOCK,
    QUANTIZED_COMPUTE,
    QUIET_QUANTILE,
    RUNTIMES,
    FitPoint,
    RuntimeFit,
    fit_error,
    fit_runtime,
)
from d2mc.host_timing import (
    FIT_ROUNDS,
    GEMM_SHAPES,
    GEMV_SHAPES,
    MEASURED_PRECISIONS,
    measure_fit_points,
    measure_gemv_bandwidth,
    measure_matmul_tflops,
    measure_nbits_tflops,
    measure_stream_bandwidth,
)
from d2mc.profiles import DeviceProfile, load_profile, load_profile_file

log = logging.getLogger(__name__)

HOST_PROFILE = "host-cpu"  # the shipped profile of a machine like the one d2mc was developed on
HOST_PROFILE_ENV = "D2MC_HOST_PROFILE"
HOST_PROFILE_CHOICES = ("auto", "measure", "shipped")  # or the path of a profile .toml
# what is measured and how it is fitted: a cached profile of another version is measured again
MEASUREMENT_VERSION = 2
FIT_ERROR_WARNING = 0.10  # a fit that misses its own points by more describes the load more than the machine


@dataclass
class HostMeasurement:
    """What :func:`measure_host` measured: the machine's raw figures, one fit per runtime (``fits``, in the order of
    :data:`RUNTIMES`: the first becomes the profile's own figures), the points they were fitted on, and the machine
    (:func:`machine_key`) with the time of the measurement."""

    bandwidth_gbps: float
    tflops: dict[str, float]
    memory_gb: float
    threads: int
    stream_gbps: float  # a plain reduction over a large buffer
    fits: list[RuntimeFit] = field(default_factory=list)
    points: list[FitPoint] = field(default_factory=list)
    machine: dict = field(default_factory=dict)
    seconds: float = 0.0
    other_cores: float = 0.0  # CPU other processes used while it ran, in cores

    def _efficiencies(self, fit: RuntimeFit) -> dict[str, float]:
        return {"bandwidth_efficiency": min(1.0, fit.bandwidth_gbps / self.bandwidth_gbps),
                "compute_efficiency": min(1.0, fit.tflops / self.tflops["fp32"]),
                "kernel_overhead_us": fit.overhead_us, "attention": fit.attention_fraction}

    def _precision_tables(self, fit: RuntimeFit, prefix: str) -> str:
        tables = ""
        for precision, q in fit.precisions.items():
            tables += (f"\n[{prefix}{precision}]\n"
                       f"bandwidth_efficiency = {min(1.0, q.bandwidth_gbps / self.bandwidth_gbps):.4f}\n"
                       f"compute_efficiency = {min(1.0, q.tflops / self.tflops[QUANTIZED_COMPUTE]):.4f}\n"
                       f"kernel_overhead_us = {q.overhead_us:.2f}\n"
                       f'compute_precision = "{QUANTIZED_COMPUTE}"\n')
        return tables

    def to_toml(self, name: str = HOST_PROFILE) -> str:
        peaks = "\n".join(f"{p} = {v:.4f}" for p, v in self.tflops.items())
        shapes = ", ".join(f"{o}x{i}" for o, i in GEMV_SHAPES)
        main, others = self.fits[0], self.fits[1:]
        e = self._efficiencies(main)
        tables = self._precision_tables(main, "precisions.")
        for fit in others:
            o = self._efficiencies(fit)
            tables += (f"\n[runtimes.{fit.runtime}]\nbandwidth_efficiency = {o['bandwidth_efficiency']:.4f}\n"
                       f"compute_efficiency = {o['compute_efficiency']:.4f}\n"
                       f"kernel_overhead_us = {o['kernel_overhead_us']:.2f}\n"
                       f"op_bandwidth_efficiency = {{ attention = {o['attention']:.4f} }}\n")
            tables += self._precision_tables(fit, f"runtimes.{fit.runtime}.precisions.")
        machine = "".join(f"{k} = {json.dumps(v)}\n" for k, v in self.machine.items())
        fits = ("decode steps and prefills of random fit models (hidden x layers: not the models the roofline is "
                "judged on): " + "; ".join(f"{m} at " + ", ".join(f"{phase} {n}" for phase, n in points)
                                            for m, points in FIT_POINTS.items())
                + f"; {QUIET_QUANTILE * 100:.0f}th percentile of {FIT_ROUNDS} interleaved rounds")
        quantized = (f"MatMulNBits weights (round-to-nearest, symmetric, blocks of {QUANTIZED_BLOCK}, accuracy level "
                     f"{ACCURACY_LEVEL}: {QUANTIZED_COMPUTE} products)")
        fit_source = ("fit = \"the fitted figures reproduce their own fit points within "
                      + ", ".join(f"{fit_error(f, self.points) * 100:.1f}% ({f.runtime})" for f in self.fits)
                      + '"\n') if self.points else ""
        runtimes_source = (f'runtimes = "fitted like the figures above, on {", ".join(f.runtime for f in others)} '
                           f'runs of the same models"\n') if others else ""
        precisions_source = (f'precisions = "fitted with the figures above on {main.runtime} runs of the same models '
                             f'with {", ".join(main.precisions)} {quantized}: bandwidth and per-kernel overhead of the '
                             f'kernels that read them from decode steps, their throughput from prefills"\n'
                             if main.precisions else "")
        return f'''name = "{name}"
aliases = ["cpu"]
description = "{platform.machine()} host ({self.machine.get("cpu", "CPU")}, {os.cpu_count()} cores), measured by d2mc on {self.machine.get("measured", "")} ({self.threads} threads)"
kind = "cpu"
runtime = "{main.runtime}"
memory_bandwidth_gbps = {self.bandwidth_gbps:.2f}
memory_gb = {self.memory_gb:.0f}
tensorrt_precisions = []
bandwidth_efficiency = {e['bandwidth_efficiency']:.4f}
compute_efficiency = {e['compute_efficiency']:.4f}
kernel_overhead_us = {e['kernel_overhead_us']:.2f}

[peak_tflops]
{peaks}

[op_bandwidth_efficiency]
attention = {e['attention']:.4f}
{tables}
[machine]
{machine}
[source]
runtime = "the runtime d2mc's artifacts run on here; the efficiencies and the overhead above are its own"
machine = "the machine the figures were measured on, in {self.seconds:.0f} s while other processes used {self.other_cores:.1f} of its {os.cpu_count()} cores"
{fit_source}memory_bandwidth_gbps = "measured: the faster of a plain reduction over 512 MB ({self.stream_gbps:.1f} GB/s) and fp32 matrix-vector products streaming 256 MB of {shapes} weights, medians, {self.threads} threads"
memory_gb = "measured: physical memory reported by the operating system"
tensorrt_precisions = "TensorRT does not run on CPUs"
peak_tflops = "measured: torch matrix products of 128 and 512 tokens against 512-2816 wide MLP weights (int8: ONNX Runtime MatMulNBits with int8 weights at accuracy level {ACCURACY_LEVEL}), {self.threads} threads, median; raised to a runtime's fitted throughput where that is higher"
bandwidth_efficiency = "fitted: least squares over {main.runtime} fp32 {fits}"
compute_efficiency = "fitted: {main.runtime} fp32 prefills of the same models, median"
kernel_overhead_us = "fitted with bandwidth_efficiency (per modeled kernel)"
op_bandwidth_efficiency = "fitted with bandwidth_efficiency: decode steps at two contexts separate the KV-cache reads of the attention kernel"
{precisions_source}{runtimes_source}'''


def measure_host(progress=None, runtimes: tuple[str, ...] = RUNTIMES) -> HostMeasurement:
    """Measure this machine (memory bandwidth, matrix throughput per precision) and fit the roofline's efficiencies
    and per-kernel overheads to runs of the fit models on each runtime (see the module text)."""
    from d2mc.measure import OtherLoad

    say = progress or log.info
    start = time.perf_counter()
    with OtherLoad() as load:
        say("memory bandwidth (matrix-vector products and a streaming read)")
        stream = measure_stream_bandwidth()
        bandwidth = max(measure_gemv_bandwidth(), stream)
        tflops = {}
        for name, dtype in MEASURED_PRECISIONS.items():
            say(f"matrix throughput ({name})")
            # half precisions run far slower than fp32 on most CPUs: their shorter prompts are enough
            tflops[name] = measure_matmul_tflops(dtype, GEMM_SHAPES if name == "fp32" else GEMM_SHAPES[:4])
        if "onnxruntime-cpu" in runtimes:
            say(f"matrix throughput ({QUANTIZED_COMPUTE}, MatMulNBits)")
            tflops[QUANTIZED_COMPUTE] = measure_nbits_tflops()
        points = measure_fit_points(runtimes, say)
    cores = os.cpu_count() or 1
    if load.cores > cores / 2:
        log.warning("other processes used %.1f of %d cores while this machine was measured: its profile may be too "
                    "slow; measure again when it is quieter (--host-profile measure)", load.cores, cores)
    fits = [fit_runtime(runtime, points) for runtime in runtimes]
    worst = max(fits, key=lambda f: fit_error(f, points))
    if fit_error(worst, points) > FIT_ERROR_WARNING:
        log.warning("the fitted %s figures miss their own fit points by up to %.0f%%: this machine was too busy to "
                    "describe; measure again when it is quieter (--host-profile measure)", worst.runtime,
                    fit_error(worst, points) * 100)
    # the profile keeps the raw figures and each runtime's fraction of them: a fit above a raw figure raises it
    bandwidth = max([bandwidth] + [f.bandwidth_gbps for f in fits]
                    + [q.bandwidth_gbps for f in fits for q in f.precisions.values()])
    tflops["fp32"] = max([tflops["fp32"]] + [f.tflops for f in fits])
    if QUANTIZED_COMPUTE in tflops:
        tflops[QUANTIZED_COMPUTE] = max([tflops[QUANTIZED_COMPUTE]]
                                        + [q.tflops for f in fits for q in f.precisions.values()])
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    machine = {**machine_key(), "measured": datetime.datetime.now().strftime("%Y-%m-%d %H:%M")}
    return HostMeasurement(bandwidth, tflops, memory_gb, torch.get_num_threads(), stream, fits, points, machine,
                           time.perf_counter() - start, load.cores)


def write_profile(measurement: HostMeasurement | str, path: str | Path, name: str = HOST_PROFILE) -> Path:
    """Write a measured profile (or its TOML text) and validate it by loading it back."""
    from d2mc.outputs import atomic_output_file

    text = measurement if isinstance(measurement, str) else measurement.to_toml(name)
    path = Path(path)
    with atomic_output_file(path) as tmp:
        tmp.write_text(text)
        load_profile_file(tmp)
    return path


# ---- which profile of this machine ---------------------------------------------------------------------------------


def machine_key() -> dict[str, str | int]:
    """What a cached profile must share with this machine to be used here: CPU model, cores, memory (GB), the
    versions of the runtimes it was fitted on, and :data:`MEASUREMENT_VERSION`."""
    import onnxruntime

    return {"cpu": _cpu_model(), "cores": os.cpu_count() or 1,
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9),
            "onnxruntime": onnxruntime.__version__, "torch": torch.__version__.split("+")[0],
            "method": MEASUREMENT_VERSION}


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def cached_profile_path(key: dict | None = None) -> Path:
    """Where the profile measured on a machine with ``key`` (default: this one) is cached."""
    from d2mc.loading import cache_dir

    key = key or machine_key()
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", f"{key['cpu']}-{key['cores']}cores-{key['memory_gb']}gb-"
                                           f"ort{key['onnxruntime']}-torch{key['torch']}-v{key['method']}")
    return cache_dir() / "host-profiles" / f"{slug.strip('-')}.toml"


@dataclass(frozen=True)
class HostProfile:
    """The profile of this machine that measurements here are judged on, and where it comes from: ``measured`` (just
    now, and cached), ``cached`` (measured here before), ``shipped`` (d2mc's own, measured elsewhere) or ``file``."""

    profile: DeviceProfile
    origin: str

    def describe(self) -> str:
        """One phrase for reports: which profile, measured where and when."""
        p = self.profile
        machine = {k: v for k, v in p.machine.items() if k != "measured"}
        when = p.machine.get("measured", "an unknown date")
        if self.origin == "measured":
            return f"{p.name} measured on this machine now ({when}; cached in {p.path})"
        if self.origin == "cached":
            return f"{p.name} measured on this machine on {when} (cached in {p.path})"
        where = "this machine" if machine == machine_key() else (
            f"{machine['cpu']}, {machine['cores']} cores" if "cpu" in machine else "another machine")
        if self.origin == "shipped":
            return f"{p.name} shipped with d2mc (measured on {where}, {when})"
        return f"{p.path} (measured on {where}, {when})"


def check_host_profile(choice: str | None) -> str:
    """``choice`` (default: ``$D2MC_HOST_PROFILE``, else ``auto``), refused in one line if it is neither a choice of
    :data:`HOST_PROFILE_CHOICES` nor a readable device profile file: checked before any work, measuring nothing."""
    if choice is None and os.environ.get(HOST_PROFILE_ENV):
        choice = os.environ[HOST_PROFILE_ENV]
        if choice not in HOST_PROFILE_CHOICES and not Path(choice).expanduser().is_file():
            raise UserError(f"{HOST_PROFILE_ENV} must be {', '.join(HOST_PROFILE_CHOICES)} or a device profile .toml "
                            f"file, not '{choice}'")
    choice = choice or "auto"
    if choice not in HOST_PROFILE_CHOICES:
        if not (choice.endswith(".toml") or Path(choice).expanduser().is_file()):
            raise OptionError(f"{{host_profile}} must be {', '.join(HOST_PROFILE_CHOICES)} or a device profile .toml "
                              f"file, not '{choice}'")
        load_profile_file(Path(choice).expanduser())
    return choice


def host_profile(choice: str | HostProfile | None = None, *, measure_missing: bool = True,
                 progress: Callable[[str], None] | None = None) -> HostProfile:
    """The profile of this machine for ``choice`` (``auto``, ``measure``, ``shipped`` or a ``.toml`` path; default:
    ``$D2MC_HOST_PROFILE``, else ``auto``; a :class:`HostProfile` chosen before is returned as it is). ``auto``
    takes this machine's cached profile, else measures the machine (a few minutes) and caches it, or without
    ``measure_missing`` falls back to the shipped profile."""
    if isinstance(choice, HostProfile):
        return choice
    choice = check_host_profile(choice)
    if choice == "shipped":
        return HostProfile(load_profile(HOST_PROFILE), "shipped")
    if choice not in HOST_PROFILE_CHOICES:
        return HostProfile(load_profile_file(Path(choice).expanduser()), "file")
    path = cached_profile_path()
    if choice == "auto":
        cached = _load_cached(path)
        if cached is not None:
            return HostProfile(cached, "cached")
        if not measure_missing:
            return HostProfile(load_profile(HOST_PROFILE), "shipped")
    say = progress or log.info
    say("measuring this machine for its device profile (once per machine; a few minutes)")
    write_profile(measure_host(progress=say), path)
    return HostProfile(load_profile_file(path), "measured")


def _load_cached(path: Path) -> DeviceProfile | None:
    """The profile cached at ``path`` if it is valid and was measured on this machine, else None."""
    if not path.is_file():
        return None
    try:
        profile = load_profile_file(path)
    except UserError as exc:
        log.warning("ignoring the cached host profile (%s): measuring again", exc)
        return None
    if {k: v for k, v in profile.machine.items() if k != "measured"} != machine_key():
        return None
    return profile
