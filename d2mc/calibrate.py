"""Measure the machine d2mc runs on and write a device profile for it (``d2mc profile --calibrate``)."""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path

import torch


def _best(fn, repeats: int = 5) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def measure_bandwidth(megabytes: int = 512) -> float:
    """Streaming read bandwidth in GB/s (a reduction over a buffer much larger than the caches)."""
    buffer = torch.ones(megabytes * 1024 * 1024 // 4, dtype=torch.float32)
    seconds = _best(lambda: buffer.sum())
    return buffer.numel() * 4 / seconds / 1e9


def measure_matmul_tflops(dtype=torch.float32, size: int = 1024) -> float:
    """Dense matrix throughput in TFLOP/s at ``dtype``."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    seconds = _best(lambda: a @ b)
    return 2 * size ** 3 / seconds / 1e12


def measure_overhead_us() -> float:
    """Cost of one tiny operator call, in microseconds."""
    x = torch.ones(8)
    seconds = _best(lambda: [x.add(1.0) for _ in range(1000)])
    return seconds / 1000 * 1e6


def calibrate_host(name: str = "host-cpu") -> str:
    """A device profile TOML of this machine from fresh measurements."""
    bandwidth = measure_bandwidth()
    fp32 = measure_matmul_tflops()
    overhead = measure_overhead_us()
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    threads = torch.get_num_threads()
    return f'''name = "{name}"
aliases = ["cpu"]
description = "{platform.machine()} host, {os.cpu_count()} cores, measured by d2mc profile --calibrate (fp32, {threads} threads)"
kind = "cpu"
memory_bandwidth_gbps = {bandwidth:.2f}
memory_gb = {memory_gb:.0f}
tensorrt_precisions = []
bandwidth_efficiency = 1.0
compute_efficiency = 1.0
kernel_overhead_us = {overhead:.2f}

[peak_tflops]
fp32 = {fp32:.4f}

[source]
memory_bandwidth_gbps = "measured: torch sum over a 512 MiB fp32 buffer, median of 5"
memory_gb = "measured: physical memory reported by the operating system"
tensorrt_precisions = "TensorRT does not run on CPUs"
peak_tflops = "measured: torch fp32 1024x1024 matmul, {threads} threads, median of 5"
bandwidth_efficiency = "measured figures are already achievable rates"
compute_efficiency = "measured figures are already achievable rates"
kernel_overhead_us = "measured: one tiny torch operator call"
'''


def write_profile(text: str, path: str | Path) -> Path:
    """Write and validate a calibrated profile."""
    from d2mc.profiles import load_profile_file

    path = Path(path)
    path.write_text(text)
    load_profile_file(path)
    return path
