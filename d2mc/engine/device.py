"""What this machine offers for engines: a TensorRT Python package and a CUDA GPU (with its SM).

Neither is imported or probed before it is needed; a machine without them gets a reason, not a traceback.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
from dataclasses import dataclass

from d2mc.errors import require_module


@dataclass(frozen=True)
class Gpu:
    name: str
    sm: str  # "8.7"


def tensorrt_version() -> str | None:
    """The installed TensorRT's version, or None when the package (or its libraries) cannot be imported."""
    if importlib.util.find_spec("tensorrt") is None:
        return None
    try:
        import tensorrt
    except Exception:  # the wheel without its CUDA libraries raises OSError/ImportError on import
        return None
    return tensorrt.__version__


def import_tensorrt(purpose: str):
    """``tensorrt``, or a one-line error saying what to install."""
    return require_module("tensorrt", purpose, "'d2mc[tensorrt]' (on a Jetson: TensorRT comes with JetPack)")


def local_gpu() -> Gpu | None:
    """The first CUDA GPU of this machine, or None (no driver, no device)."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return Gpu(torch.cuda.get_device_name(0), f"{major}.{minor}")
    except ImportError:
        pass
    return _gpu_from_cudart()


def _gpu_from_cudart() -> Gpu | None:
    """The compute capability through the CUDA runtime, for machines with TensorRT but no CUDA build of torch."""
    names = [ctypes.util.find_library("cudart"), "libcudart.so", "libcudart.so.13", "libcudart.so.12"]
    for name in filter(None, names):
        try:
            cudart = ctypes.CDLL(name)
        except OSError:
            continue
        count = ctypes.c_int(0)
        if cudart.cudaGetDeviceCount(ctypes.byref(count)) != 0 or count.value < 1:
            return None
        major, minor = ctypes.c_int(0), ctypes.c_int(0)
        # cudaDevAttrComputeCapabilityMajor = 75, ...Minor = 76
        if cudart.cudaDeviceGetAttribute(ctypes.byref(major), 75, 0) or cudart.cudaDeviceGetAttribute(
                ctypes.byref(minor), 76, 0):
            return None
        return Gpu(f"CUDA device 0 (SM {major.value}.{minor.value})", f"{major.value}.{minor.value}")
    return None


def why_not_here(sm: str | None) -> str | None:
    """Why an engine for ``sm`` cannot be built on this machine, or None when it can."""
    version = tensorrt_version()
    if version is None:
        return "TensorRT is not installed here"
    gpu = local_gpu()
    if gpu is None:
        return f"TensorRT {version} is installed but this machine has no CUDA GPU"
    if sm and gpu.sm != sm:
        return f"this machine's GPU ({gpu.name}) is SM {gpu.sm}, the target is SM {sm}: engines are specific to one SM"
    return None
