"""TensorRT engines: the engine plan (shapes, precision, memory) from the TensorRT-flavoured ONNX and a device
profile, the build on the device, and the manifest; the ``D2mcMoE`` contract they read is :mod:`d2mc.ops.moe`."""

from d2mc.engine.build import EngineBuildResult, prepare_engine_build
from d2mc.engine.plan import EnginePlan, EngineSettings, plan_engine

__all__ = ["EngineBuildResult", "EnginePlan", "EngineSettings", "plan_engine", "prepare_engine_build"]
