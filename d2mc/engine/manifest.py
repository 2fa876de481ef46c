"""``manifest.json`` beside every engine: what it was built with, so a mismatch is refused in one line.

A TensorRT engine is specific to the TensorRT version and the GPU (SM) that built it; deserialising it anywhere
else fails deep inside TensorRT or crashes. The manifest is checked first.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from d2mc.errors import UserError

MANIFEST_FILE = "manifest.json"
ENGINE_FILE = "model.engine"
FORMAT = 1


@dataclass
class EngineManifest:
    tensorrt_version: str
    device: str  # the device profile the engine was planned for
    gpu: str  # the GPU that built it
    sm: str
    precision: str
    profiles: dict  # phase -> input -> {min, opt, max}
    max_input: int
    max_kv: int
    max_batch: int
    workspace_bytes: int
    onnx: dict  # {"path": relative to the engine directory, "sha256"}
    engine: dict  # {"file", "sha256", "bytes"}
    plugin: dict | None  # {"library", "sha256", "serialized_in_engine"} or None without MoE blocks
    moe_nodes: list = field(default_factory=list)
    # weight-only quantization: {"method", "bits", "block_sizes", ..., "activations"}; None for a float engine
    quantization: dict | None = None
    build_seconds: float = 0.0
    format: int = FORMAT

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(manifest: EngineManifest, engine_dir: Path) -> Path:
    path = Path(engine_dir) / MANIFEST_FILE
    path.write_text(manifest.to_json())
    return path


def read_manifest(engine_dir: str | Path) -> EngineManifest:
    """The manifest of an engine directory; a missing or corrupt one is a one-line error."""
    engine_dir = Path(engine_dir)
    path = engine_dir / MANIFEST_FILE
    if not path.is_file():
        raise UserError(f"no {MANIFEST_FILE} in '{engine_dir}': build the engine with d2mc build")
    try:
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT:
            raise UserError(f"'{path}' has manifest format {data.get('format')}, this d2mc reads {FORMAT}: rebuild "
                            "the engine with d2mc build")
        return EngineManifest(**data)
    except (json.JSONDecodeError, TypeError) as exc:
        raise UserError(f"'{path}' is corrupt ({str(exc)[:80]}): rebuild the engine with d2mc build") from None


def check_manifest(manifest: EngineManifest, tensorrt_version: str, sm: str | None, where: str | Path) -> None:
    """Refuse an engine built by another TensorRT version or for another SM, before TensorRT touches it."""
    problems = []
    if manifest.tensorrt_version != tensorrt_version:
        problems.append(f"TensorRT {manifest.tensorrt_version}, this machine has {tensorrt_version}")
    if sm != manifest.sm:
        problems.append(f"SM {manifest.sm} ({manifest.gpu}), this machine has "
                        f"{'SM ' + sm if sm else 'no CUDA GPU'}")
    if problems:
        raise UserError(f"the engine in '{where}' was built with {' and for '.join(problems)}: rebuild it on this "
                        f"machine with d2mc build")


def check_engine_file(manifest: EngineManifest, engine_dir: Path) -> Path:
    """The engine file, checked against the manifest's hash (a truncated copy is refused, not deserialised)."""
    path = Path(engine_dir) / manifest.engine["file"]
    if not path.is_file():
        raise UserError(f"'{path}' is missing: rebuild the engine with d2mc build")
    if sha256_of(path) != manifest.engine["sha256"]:
        raise UserError(f"'{path}' does not match its manifest (sha256 differs): rebuild the engine with d2mc build")
    return path


def load_engine(engine_dir: str | Path):
    """Deserialise the engine in ``engine_dir`` after checking its manifest against this machine."""
    from d2mc.engine.device import import_tensorrt, local_gpu

    engine_dir = Path(engine_dir)
    manifest = read_manifest(engine_dir)
    trt = import_tensorrt("loading a TensorRT engine")
    gpu = local_gpu()
    check_manifest(manifest, trt.__version__, gpu.sm if gpu else None, engine_dir)
    path = check_engine_file(manifest, engine_dir)
    logger = trt.Logger(trt.Logger.WARNING)
    if manifest.plugin:
        load_plugin_library(trt, engine_dir / manifest.plugin["library"], manifest.plugin["sha256"])
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        raise UserError(f"TensorRT {trt.__version__} could not deserialise '{path}': rebuild it with d2mc build")
    return engine, manifest


def load_plugin_library(trt, path: Path, sha256: str | None = None):
    """Register the plugin library's creators with TensorRT (its ``getCreators`` entry point), checking its hash."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"the MoE plugin library '{path}' is missing: rebuild the engine with d2mc build")
    if sha256 and sha256_of(path) != sha256:
        raise UserError(f"'{path}' is not the plugin library the engine was built with (sha256 differs): rebuild "
                        "the engine with d2mc build")
    return trt.get_plugin_registry().load_library(str(path))
