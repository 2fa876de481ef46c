"""TensorRT engines: plan (shapes, precision, memory) from the TensorRT-flavoured ONNX and a device profile,
build on the device, manifest, and the ``D2mcMoE`` plugin contract."""

from d2mc.engine.build import EngineBuildResult, prepare_engine_build
from d2mc.engine.plan import EnginePlan, EngineSettings, plan_engine
from d2mc.engine.plugin_spec import PLUGIN_NAME, MoePluginAttributes

__all__ = ["PLUGIN_NAME", "EngineBuildResult", "EnginePlan", "EngineSettings", "MoePluginAttributes", "plan_engine",
           "prepare_engine_build"]
