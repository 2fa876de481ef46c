"""Build a TensorRT engine from the TensorRT-flavoured ONNX, or write what the device needs to build it.

The chain follows Polygraphy's lazy loaders: ``EngineBytesFromNetwork(NetworkFromOnnxPath(onnx, strongly_typed),
config)`` does nothing until called, so the engine plan (shapes, precision, workspace) is checked and written
first.
Engines are specific to a TensorRT version and an SM, so an engine for a Jetson is built on the Jetson:
elsewhere :func:`prepare_engine_build` writes ``build.sh`` (the ``d2mc build`` command, and the equivalent
``trtexec`` command with the plugin library) and says why it did not build.
"""

from __future__ import annotations

import json
import logging
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from d2mc.artifact import onnx_context_length
from d2mc.engine.device import import_tensorrt, local_gpu, why_not_here
from d2mc.engine.graph import GraphSummary, read_graph
from d2mc.engine.manifest import (
    ENGINE_FILE,
    EngineManifest,
    load_plugin_library,
    sha256_of,
    write_manifest,
)
from d2mc.engine.plan import PHASES, EnginePlan, EngineSettings, plan_engine
from d2mc.errors import OptionError, UserError, require_module
from d2mc.outputs import atomic_output_dir
from d2mc.profiles import DeviceProfile

log = logging.getLogger(__name__)

PLUGIN_LIBRARY = "libd2mc_moe_plugin.so"
SCRIPT_FILE = "build.sh"
ENGINE_PLAN_FILE = "plan.json"
PLUGIN_SOURCE_DIR = "plugin"


@dataclass
class EngineBuildResult:
    """What the engine step did: ``built`` with the engine's paths, or not, with the reason and the script."""

    built: bool
    reason: str | None
    out_dir: Path
    script_path: Path
    engine_plan: EnginePlan
    engine_path: Path | None = None
    manifest_path: Path | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"built": self.built, "reason": self.reason, "out_dir": str(self.out_dir),
                "script": str(self.script_path), "engine": str(self.engine_path) if self.engine_path else None,
                "manifest": str(self.manifest_path) if self.manifest_path else None,
                "seconds": round(self.seconds, 2), "plan": self.engine_plan.to_dict()}

    def summary(self) -> str:
        """One line for the user."""
        if self.built:
            return (f"built {self.engine_path} for {self.engine_plan.profile.name} ({self.engine_plan.precision}) "
                    f"in "
                    f"{self.seconds:.0f} s")
        return (f"engine not built here ({self.reason}); on the {self.engine_plan.profile.name} run: "
                f"bash {self.script_path}")


def plugin_sources() -> Path:
    """The MoE plugin's CMake project, shipped inside the d2mc package."""
    import importlib.resources

    return Path(str(importlib.resources.files("d2mc.plugins") / "moe"))


def cuda_architecture(sm: str | None) -> str:
    """``"8.7"`` -> ``"87"`` (CMAKE_CUDA_ARCHITECTURES, nvcc's sm_87)."""
    if not sm:
        raise UserError("the device profile has no 'sm': add its compute capability to build the MoE plugin")
    return sm.replace(".", "")


def plan_from_onnx(onnx_path: str | Path, profile: DeviceProfile, settings: EngineSettings | None = None) -> EnginePlan:
    """Read the ONNX and plan its engine; ONNX Runtime-only ops are refused here, before any device work."""
    graph = read_graph(onnx_path)
    _refuse_unparsable(graph)
    return plan_engine(graph, profile, settings, onnx_context_length(Path(onnx_path)))


def _refuse_unparsable(graph: GraphSummary) -> None:
    if graph.unparsable_ops:
        raise UserError(f"'{graph.path}' is the onnxruntime flavour: TensorRT cannot parse "
                        f"{', '.join(graph.unparsable_ops)}; export the tensorrt flavour with "
                        "d2mc export MODEL --format tensorrt")


def trtexec_command(engine_plan: EnginePlan, onnx: str, engine: str, plugin: str | None,
                    trtexec: str = "trtexec") -> list[str]:
    """The ``trtexec`` command line that builds the same engine as :func:`build_engine`. Strongly typed: every
    precision, int4/int8 weights included, comes from the ONNX's types (its DequantizeLinear nodes and the plugin's
    quantized inputs), so no precision flag (--fp16, --int8, --best) is given; TensorRT refuses them with Q/DQ."""
    args = [trtexec, f"--onnx={onnx}", f"--saveEngine={engine}", "--stronglyTyped", "--skipInference"]
    for index, phase in enumerate(PHASES):
        args.append(f"--profile={index}")
        for which in ("min", "opt", "max"):
            spec = ",".join(f"{name}:{'x'.join(str(d) for d in getattr(shape, which))}"
                            for name, shape in engine_plan.shapes[phase].items())
            args.append(f"--{which}Shapes={spec}")
    args.append(f"--memPoolSize=workspace:{max(1, engine_plan.workspace_bytes >> 20)}M")
    if plugin:
        # dynamic plugins are the ones trtexec can serialise into the engine (--setPluginsToSerialize)
        args += [f"--dynamicPlugins={plugin}", f"--setPluginsToSerialize={plugin}"]
    return args


def d2mc_build_command(artifact: str, engine_plan: EnginePlan) -> list[str]:
    """The ``d2mc build`` command that builds this engine plan on the device."""
    p = engine_plan
    return ["d2mc", "build", artifact, "--target", p.profile.name, "--precision", p.precision,
            "--max-input", str(p.max_input), "--max-kv", str(p.max_kv), "--max-batch", str(p.max_batch)]


def write_build_script(engine_plan: EnginePlan, out_dir: Path, artifact: Path | None = None) -> Path:
    """``build.sh`` in ``out_dir``: builds the plugin with CMake, then the engine with d2mc or trtexec."""
    out_dir = Path(out_dir)
    onnx = _relative(engine_plan.graph.path, out_dir)
    artifact_rel = _relative(artifact, out_dir) if artifact else str(Path(onnx).parent)
    plugin = f"{PLUGIN_SOURCE_DIR}/build/{PLUGIN_LIBRARY}" if engine_plan.graph.moe_nodes else None
    d2mc = d2mc_build_command(artifact_rel, engine_plan)
    trtexec = trtexec_command(engine_plan, onnx, ENGINE_FILE, plugin, "\"$TRTEXEC\"")
    lines = [
        "#!/usr/bin/env bash",
        f"# Build the TensorRT engine for {engine_plan.profile.name} (SM {engine_plan.profile.sm}, "
        f"{_precision_words(engine_plan)}) on the device.",
        "# Engines are specific to the TensorRT version and GPU that build them.",
        "# Usage: bash build.sh            (d2mc build when d2mc is installed, trtexec otherwise)",
        "#        bash build.sh --trtexec  (trtexec only; d2mc verify/profile need the manifest d2mc build writes)",
        "set -euo pipefail",
        'cd "$(dirname "$0")"',
        'TRTEXEC="${TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}"',
    ]
    if plugin:
        lines += [
            "build_plugin() {",
            f"  cmake -S {PLUGIN_SOURCE_DIR} -B {PLUGIN_SOURCE_DIR}/build -DCMAKE_BUILD_TYPE=Release "
            f"-DCMAKE_CUDA_ARCHITECTURES={cuda_architecture(engine_plan.profile.sm)}",
            f"  cmake --build {PLUGIN_SOURCE_DIR}/build -j",
            "}",
        ]
    lines += [
        'if [ "${1:-}" != "--trtexec" ] && command -v d2mc >/dev/null; then',
        "  exec " + " ".join(shlex.quote(a) for a in d2mc),
        "fi",
    ]
    if plugin:
        lines.append("build_plugin")
    lines.append(" \\\n  ".join(a if a.startswith('"$TRTEXEC"') else shlex.quote(a) for a in trtexec))
    script = out_dir / SCRIPT_FILE
    script.write_text("\n".join(lines) + "\n")
    script.chmod(0o755)
    return script


def _precision_words(engine_plan: EnginePlan) -> str:
    """``fp16``, or for a weight-only engine what its weights and activations are."""
    quantization = engine_plan.quantization()
    if quantization is None:
        return engine_plan.precision
    blocks = "/".join(map(str, quantization["block_sizes"])) or "per row"
    return (f"{engine_plan.precision} weight-only: int{'/int'.join(map(str, quantization['bits']))} codes in "
            f"blocks of {blocks}, {quantization['activations']} activations, from the ONNX's types")


def _relative(path: Path, start: Path) -> str:
    import os

    return os.path.relpath(Path(path).resolve(), Path(start).resolve())


def build_plugin(sm: str, build_dir: Path, source: Path | None = None) -> Path:
    """Compile the MoE plugin for ``sm`` with CMake (on the device); returns the library."""
    source = source or plugin_sources()
    if shutil.which("cmake") is None:
        raise UserError("building the MoE plugin needs cmake (apt install cmake) and the CUDA toolkit")
    for args in (["cmake", "-S", str(source), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
                  f"-DCMAKE_CUDA_ARCHITECTURES={cuda_architecture(sm)}"],
                 ["cmake", "--build", str(build_dir), "-j"]):
        result = subprocess.run(args, capture_output=True, text=True)
        if result.returncode:
            tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["(no output)"]
            raise UserError(f"building the MoE plugin failed ({' '.join(args[:2])}): {tail[0][:200]}")
    library = build_dir / PLUGIN_LIBRARY
    if not library.is_file():
        raise UserError(f"the plugin build did not produce {library}")
    return library


def build_engine(engine_plan: EnginePlan, out_dir: Path, plugin_library: Path | None) -> EngineManifest:
    """Build and write ``model.engine`` + ``manifest.json`` into ``out_dir`` (needs TensorRT and the GPU)."""
    trt = import_tensorrt("building a TensorRT engine")
    require_module("polygraphy", "building a TensorRT engine", "polygraphy")
    from polygraphy.backend.trt import (
        CreateConfig,
        EngineBytesFromNetwork,
        NetworkFromOnnxPath,
        PostprocessConfig,
    )
    from polygraphy.exception import PolygraphyException

    out_dir = Path(out_dir)
    plugin = None
    if engine_plan.graph.moe_nodes:
        if plugin_library is None:
            raise OptionError("the ONNX has D2mcMoE nodes: give the plugin library ({plugin}) or let d2mc build it")
        plugin = out_dir / PLUGIN_LIBRARY
        if Path(plugin_library).resolve() != plugin.resolve():
            shutil.copy2(plugin_library, plugin)
        load_plugin_library(trt, plugin)  # the parser finds D2mcMoE's creator in the registry
    network = NetworkFromOnnxPath(str(engine_plan.graph.path), strongly_typed=True)
    config = CreateConfig(profiles=engine_plan.polygraphy_profiles(),
                          memory_pool_limits={trt.MemoryPoolType.WORKSPACE: engine_plan.workspace_bytes},
                          profiling_verbosity=trt.ProfilingVerbosity.DETAILED)
    if plugin is not None:
        config = PostprocessConfig(config, lambda builder, net, cfg: setattr(cfg, "plugins_to_serialize", [str(plugin)]))
    start = time.perf_counter()
    try:
        engine_bytes = EngineBytesFromNetwork(network, config)()
    except PolygraphyException as exc:
        raise UserError(f"TensorRT could not build the engine: {str(exc).strip().splitlines()[-1][:300]}") from None
    seconds = time.perf_counter() - start
    engine_path = out_dir / ENGINE_FILE
    engine_path.write_bytes(bytes(engine_bytes))
    gpu = local_gpu()
    manifest = EngineManifest(
        tensorrt_version=trt.__version__, device=engine_plan.profile.name, gpu=gpu.name if gpu else "unknown",
        sm=gpu.sm if gpu else (engine_plan.profile.sm or ""), precision=engine_plan.precision,
        profiles=engine_plan.to_dict()["profiles"], max_input=engine_plan.max_input, max_kv=engine_plan.max_kv,
        max_batch=engine_plan.max_batch,
        workspace_bytes=engine_plan.workspace_bytes,
        onnx={"path": _relative(engine_plan.graph.path, out_dir), "sha256": sha256_of(engine_plan.graph.path)},
        engine={"file": ENGINE_FILE, "sha256": sha256_of(engine_path), "bytes": engine_path.stat().st_size},
        plugin={"library": PLUGIN_LIBRARY, "sha256": sha256_of(plugin), "serialized_in_engine": True} if plugin else None,
        moe_nodes=engine_plan.to_dict()["moe_nodes"], quantization=engine_plan.quantization(),
        build_seconds=round(seconds, 2))
    write_manifest(manifest, out_dir)
    return manifest


def prepare_engine_build(onnx_dir: str | Path, profile: DeviceProfile, out_dir: str | Path,
                         settings: EngineSettings | None = None, plugin_library: str | Path | None = None,
                         artifact: str | Path | None = None, build_here: bool = True) -> EngineBuildResult:
    """Plan the engine for ``profile``, write the device-side build script, and build it when this machine can.

    ``onnx_dir`` holds the TensorRT-flavoured ``model.onnx``. ``out_dir`` (replaced atomically) receives
    ``plan.json``, ``build.sh`` and the plugin sources, plus ``model.engine`` and ``manifest.json`` when built.
    Without TensorRT or without a GPU of the profile's SM the result says why (``built=False``), no traceback.
    """
    onnx_path = Path(onnx_dir) / "model.onnx"
    engine_plan = plan_from_onnx(onnx_path, profile, settings)
    reason = why_not_here(profile.sm) if build_here else "asked not to build here"
    out_dir = Path(out_dir)
    with atomic_output_dir(out_dir, overwrite=True) as tmp:
        (tmp / ENGINE_PLAN_FILE).write_text(json.dumps(engine_plan.to_dict(), indent=2) + "\n")
        if engine_plan.graph.moe_nodes:
            shutil.copytree(plugin_sources(), tmp / PLUGIN_SOURCE_DIR,
                            ignore=shutil.ignore_patterns("build", "__pycache__"))
        # the temporary directory is a sibling of out_dir: relative paths written from it stay true
        write_build_script(engine_plan, tmp, Path(artifact) if artifact else None)
        if reason is not None:
            return_value = EngineBuildResult(False, reason, out_dir, out_dir / SCRIPT_FILE, engine_plan)
        else:
            library = Path(plugin_library) if plugin_library else None
            if engine_plan.graph.moe_nodes and library is None:
                library = build_plugin(profile.sm, tmp / PLUGIN_SOURCE_DIR / "build", tmp / PLUGIN_SOURCE_DIR)
            start = time.perf_counter()
            build_engine(engine_plan, tmp, library)
            return_value = EngineBuildResult(True, None, out_dir, out_dir / SCRIPT_FILE, engine_plan,
                                             out_dir / ENGINE_FILE, out_dir / "manifest.json",
                                             time.perf_counter() - start)
    log.info("engine step for %s: %s", profile.name, return_value.summary())
    return return_value

