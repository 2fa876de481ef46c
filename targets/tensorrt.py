"""The ``tensorrt`` target: one engine per device profile from an artifact's TensorRT-flavoured ONNX.

An artifact may hold both ONNX flavours: the onnxruntime one (``com.microsoft`` fused ops) and the tensorrt one
(standard ops plus one ``D2mcMoE`` plugin node per MoE block). ``d2mc build ARTIFACT --target orin-agx``
writes ``ARTIFACT/engine-orin-agx/``: ``plan.json``, ``build.sh``, the plugin sources, and, where this machine has
TensorRT and a GPU of the profile's SM, ``model.engine`` with its ``manifest.json``. Elsewhere it says in one
line why it did not build and which script the device runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from d2mc.artifact import artifact_arch, engine_dir, find_onnx
from d2mc.engine.build import EngineBuildResult, prepare_engine_build
from d2mc.engine.plan import EngineSettings, check_precision
from d2mc.profiles import load_profile

if TYPE_CHECKING:
    from d2mc.latency import LatencyComparison


def build(artifact: str | Path, target: str = "orin-agx", settings: EngineSettings | None = None,
          plugin: str | Path | None = None, build_here: bool = True) -> EngineBuildResult:
    """Build (or prepare on the device) the engine of ``artifact`` for device profile ``target``."""
    profile = load_profile(target)
    if settings is not None and settings.precision:
        check_precision(profile, settings.precision)  # the device's reason comes first
    onnx_path = find_onnx(artifact, "tensorrt")
    return prepare_engine_build(onnx_path.parent, profile, engine_dir(artifact, target), settings, plugin,
                                artifact=Path(artifact), build_here=build_here)


def verify(artifact: str | Path, target: str = "orin-agx", prefill: int = 16, context: int = 64) -> dict:
    """The engine against ONNX Runtime on the same inputs, per phase (Polygraphy); runs on the device."""
    from d2mc.engine.run import require_engine_machine, verify_engine

    directory = engine_dir(artifact, target)
    require_engine_machine(directory, "verify --backend tensorrt")
    ort_onnx = find_onnx(artifact, "onnxruntime")
    return verify_engine(directory, ort_onnx, artifact_arch(artifact).vocab_size, prefill, context).to_dict()


def measure(artifact: str | Path, target: str = "orin-agx", prefill: int = 128, context: int = 512,
            repeats: int = 5) -> LatencyComparison:
    """Engine time per phase next to the roofline prediction for the profile (runs on the device)."""
    from d2mc.engine.run import TrtMeasurer
    from d2mc.latency import compare_latency

    arch = artifact_arch(artifact)
    measurer = TrtMeasurer(engine_dir(artifact, target), arch.vocab_size)
    measurement = measurer.measure(prefill, context, repeats=repeats)
    return compare_latency(arch, load_profile(target), measurement, measurer.manifest.precision,
                           measurer.all_logits)
