"""The ``tensorrt`` target: one engine per device profile from an artifact's TensorRT-flavoured ONNX.

An artifact may hold both ONNX flavours: the onnxruntime one (``com.microsoft`` fused ops) and the tensorrt one
(standard ops plus one ``D2mcMoE`` plugin node per MoE block). ``d2mc build ARTIFACT --target orin-agx``
writes ``ARTIFACT/engine-orin-agx/``: ``plan.json``, ``build.sh``, the plugin sources, and, where this machine has
TensorRT and a GPU of the profile's SM, ``model.engine`` with its ``manifest.json``. Elsewhere it says in one
line why it did not build and which script the device runs.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from d2mc.engine.build import EngineBuildResult, prepare_engine_build
from d2mc.engine.graph import CONTRIB_DOMAINS
from d2mc.engine.plan import EngineSettings, check_precision
from d2mc.engine.plugin_spec import PLUGIN_DOMAIN
from d2mc.errors import UserError
from d2mc.profiles import load_profile

# where an artifact's ONNX files may be, in the order they are looked for
TENSORRT_ONNX_DIR = "onnx-tensorrt"  # where d2mc compile writes the TensorRT flavour
ONNX_PLACES = (".", "tensorrt", TENSORRT_ONNX_DIR, "onnx")


def _flavour(onnx_path: Path) -> str:
    """``tensorrt`` (no ONNX Runtime-only ops) or ``onnxruntime``."""
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    domains = {n.domain for n in graph.node}
    if domains & set(CONTRIB_DOMAINS):
        return "onnxruntime"
    return "tensorrt"


def _candidates(artifact: Path) -> list[tuple[Path, str]]:
    artifact = Path(artifact).expanduser()
    if not artifact.is_dir():
        raise UserError(f"no artifact directory at '{artifact}': export one with d2mc export --target tensorrt")
    found = []
    for place in ONNX_PLACES:
        path = artifact / place / "model.onnx"
        if path.is_file():
            found.append((path, _flavour(path)))
    if not found:
        raise UserError(f"'{artifact}' holds no model.onnx: export one with d2mc export --target tensorrt")
    return found


def find_onnx(artifact: str | Path, flavour: str) -> Path:
    """The artifact's ``model.onnx`` of ``flavour`` (``tensorrt`` or ``onnxruntime``)."""
    found = _candidates(Path(artifact))
    for path, kind in found:
        if kind == flavour:
            return path
    have = ", ".join(f"{p.relative_to(Path(artifact).expanduser())} ({k})" for p, k in found)
    hint = "d2mc export MODEL --target tensorrt" if flavour == "tensorrt" else "d2mc export MODEL --target onnxruntime"
    raise UserError(f"'{artifact}' has no {flavour}-flavoured ONNX (it has {have}): add one with {hint}")


def engine_dir(artifact: str | Path, target: str) -> Path:
    """Where the engine for device profile ``target`` lives inside the artifact."""
    return Path(artifact).expanduser() / f"engine-{load_profile(target).name}"


def build(artifact: str | Path, target: str = "orin-agx", settings: EngineSettings | None = None,
          plugin: str | Path | None = None, build_here: bool = True) -> EngineBuildResult:
    """Build (or prepare on the device) the engine of ``artifact`` for device profile ``target``."""
    profile = load_profile(target)
    check_precision(profile, (settings or EngineSettings()).precision)  # the device's reason comes first
    onnx_path = find_onnx(artifact, "tensorrt")
    return prepare_engine_build(onnx_path.parent, profile, engine_dir(artifact, target), settings, plugin,
                                artifact=Path(artifact), build_here=build_here)


def has_plugin_nodes(onnx_path: str | Path) -> bool:
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return any(n.domain == PLUGIN_DOMAIN for n in graph.node)


def verify(artifact: str | Path, target: str = "orin-agx", prefill: int = 16, context: int = 64) -> dict:
    """The engine against ONNX Runtime on the same inputs, per phase (Polygraphy); runs on the device."""
    from d2mc.engine.run import require_engine_machine, verify_engine

    directory = engine_dir(artifact, target)
    require_engine_machine(directory, "verify --backend tensorrt")
    ort_onnx = find_onnx(artifact, "onnxruntime")
    return verify_engine(directory, ort_onnx, _vocab(artifact), prefill, context).to_dict()


def measure(artifact: str | Path, target: str = "orin-agx", prefill: int = 128, context: int = 512,
            repeats: int = 5) -> dict:
    """Engine time per phase next to the roofline prediction for the profile (runs on the device)."""
    from d2mc.engine.run import TrtMeasurer
    from d2mc.roofline import RooflineSettings, estimate

    profile = load_profile(target)
    measurer = TrtMeasurer(engine_dir(artifact, target), _vocab(artifact))
    m = measurer.measure(prefill, context, repeats=repeats)
    predicted = estimate(_arch(artifact), profile.for_runtime(measurer.runtime), RooflineSettings(
        prefill=prefill, context=context, precision=measurer.manifest.precision, all_logits=True))
    return {"runtime": m.runtime, "profile": profile.name, "precision": measurer.manifest.precision,
            "phases": {phase: {"predicted_s": predicted[phase].seconds, "measured_s": m.seconds(phase),
                               "error": (predicted[phase].seconds - m.seconds(phase)) / m.seconds(phase)}
                       for phase in ("prefill", "decode")}}


def _arch(artifact: str | Path):
    from d2mc.loading import load_model

    for candidate in (Path(artifact) / "config.json", Path(artifact) / "model" / "config.json",
                      Path(artifact) / "tensorrt" / "config.json"):
        if candidate.is_file():
            return load_model(str(candidate), config_only=True, tokenizer=False).arch
    raise UserError(f"'{artifact}' has no config.json: export the artifact again")


def _vocab(artifact: str | Path) -> int:
    return _arch(artifact).vocab_size
