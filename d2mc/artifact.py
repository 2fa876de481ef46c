"""The layout of an artifact directory, for both ONNX flavours: where its ONNX files, its config and its engines are.

An artifact is what ``d2mc export`` writes (``model.onnx`` + ``model.onnx.data``, ``config.json``,
``d2mc_artifact.json``, and for the onnxruntime flavour ``genai_config.json`` and the tokenizer) or what
``d2mc compile`` writes around such exports: ``model/`` (the converted model), ``onnx/`` (the onnxruntime flavour),
``onnx-tensorrt/`` (the tensorrt flavour) and ``engine-<profile>/`` per device profile. One directory may hold
both ONNX flavours, in any of :data:`ONNX_PLACES`; each file's flavour is read from its operators.
"""

from __future__ import annotations

import json
from pathlib import Path

from d2mc.errors import UserError

ARTIFACT_FILE = "d2mc_artifact.json"  # what was exported, with the verification figure
MODEL_DIR = "model"  # d2mc compile: the converted model in Hugging Face format
ONNX_DIR = "onnx"  # d2mc compile: the onnxruntime flavour
TENSORRT_ONNX_DIR = "onnx-tensorrt"  # d2mc compile: the tensorrt flavour
# where an artifact's ONNX files may be, in the order they are looked for
ONNX_PLACES = (".", "tensorrt", TENSORRT_ONNX_DIR, ONNX_DIR)
# where the config.json of the exported model may be, in the order it is looked for
CONFIG_PLACES = (".", MODEL_DIR, "tensorrt")


def is_artifact(spec: str | Path) -> bool:
    """An exported ONNX artifact directory (``d2mc export`` or ``d2mc compile`` output)."""
    path = Path(spec).expanduser()
    return path.is_dir() and any((path / place / "model.onnx").exists() for place in ONNX_PLACES)


def onnx_flavour(onnx_path: Path) -> str:
    """``tensorrt`` (no ONNX Runtime-only ops) or ``onnxruntime``, read from the graph's operator domains."""
    import onnx

    from d2mc.engine.graph import CONTRIB_DOMAINS

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    domains = {n.domain for n in graph.node}
    if domains & set(CONTRIB_DOMAINS):
        return "onnxruntime"
    return "tensorrt"


def _candidates(artifact: Path) -> list[tuple[Path, str]]:
    artifact = Path(artifact).expanduser()
    if not artifact.is_dir():
        raise UserError(f"no artifact directory at '{artifact}': export one with d2mc export --format tensorrt")
    found = []
    for place in ONNX_PLACES:
        path = artifact / place / "model.onnx"
        if path.is_file():
            found.append((path, onnx_flavour(path)))
    if not found:
        raise UserError(f"'{artifact}' holds no model.onnx: export one with d2mc export --format tensorrt")
    return found


def find_onnx(artifact: str | Path, flavour: str) -> Path:
    """The artifact's ``model.onnx`` of ``flavour`` (``tensorrt`` or ``onnxruntime``)."""
    found = _candidates(Path(artifact))
    for path, kind in found:
        if kind == flavour:
            return path
    have = ", ".join(f"{p.relative_to(Path(artifact).expanduser())} ({k})" for p, k in found)
    raise UserError(f"'{artifact}' has no {flavour}-flavoured ONNX (it has {have}): add one with "
                    f"d2mc export MODEL --format {flavour}")


def find_config(artifact: str | Path) -> Path:
    """The ``config.json`` of the model an artifact was exported from (ONNX files hold no architecture summary)."""
    for place in CONFIG_PLACES:
        candidate = Path(artifact) / place / "config.json"
        if candidate.is_file():
            return candidate
    raise UserError(f"'{artifact}' has no config.json: export the artifact again")


def artifact_arch(artifact: str | Path):
    """The :class:`~d2mc.arch.ModelArch` of the model an artifact was exported from."""
    from d2mc.loading import load_model

    return load_model(str(find_config(artifact)), config_only=True, tokenizer=False).arch


def onnx_context_length(onnx_path: Path) -> int | None:
    """The model's context length from the ``config.json`` beside an ONNX file (or in the artifact above it), else
    from a ``genai_config.json`` beside it (another exporter's directory)."""
    for directory in (onnx_path.parent, onnx_path.parent.parent):
        config = directory / "config.json"
        if config.is_file():
            data = json.loads(config.read_text())
            value = data.get("max_position_embeddings") or (data.get("base_config") or {}).get(
                "max_position_embeddings")
            if value:
                return int(value)
    genai = onnx_path.parent / "genai_config.json"
    if genai.is_file():
        return json.loads(genai.read_text())["model"].get("context_length")
    return None


def engine_dir(artifact: str | Path, target: str) -> Path:
    """Where the engine for device profile ``target`` lives inside the artifact."""
    from d2mc.profiles import load_profile

    return Path(artifact).expanduser() / f"engine-{load_profile(target).name}"


def write_artifact_info(out_dir: Path, info: dict) -> Path:
    """Write ``d2mc_artifact.json`` (what was exported, and how it verified) into ``out_dir``."""
    path = out_dir / ARTIFACT_FILE
    path.write_text(json.dumps(info, indent=2) + "\n")
    return path


def artifact_info(onnx_dir: Path) -> dict:
    """``d2mc_artifact.json`` beside an ONNX file, or an empty dict where there is none."""
    path = Path(onnx_dir) / ARTIFACT_FILE
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        info = None
    if not isinstance(info, dict):
        raise UserError(f"'{path}' is corrupt: export the artifact again")
    return info


def read_artifact(path: str | Path) -> dict:
    """The description of an exported artifact, refusing directories that are not complete artifacts."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise UserError(f"no artifact directory at '{path}': export one with d2mc export")
    if not (path / ARTIFACT_FILE).is_file():
        raise UserError(f"'{path}' is not a complete d2mc artifact (missing {ARTIFACT_FILE}): export it again")
    try:
        info = json.loads((path / ARTIFACT_FILE).read_text())
    except json.JSONDecodeError:
        info = None
    if not isinstance(info, dict):
        raise UserError(f"'{path / ARTIFACT_FILE}' is corrupt: export the artifact again")
    if "target" in info:  # the key's name before "target" came to mean a device profile only
        info["flavour"] = info.pop("target")
    flavour = info.get("flavour", "onnxruntime")
    needed = ("model.onnx", "model.onnx.data") + (("genai_config.json",) if flavour == "onnxruntime" else ())
    missing = [f for f in needed if not (path / f).exists()]
    if missing:
        raise UserError(f"'{path}' is not a complete d2mc artifact (missing {', '.join(missing)}): export it again")
    return info


def find_runnable_onnx(spec: str | Path) -> Path | None:
    """The ``model.onnx`` ONNX Runtime runs for an artifact directory, or None when ``spec`` is not one.

    Another exporter's directory counts too. The onnxruntime flavour (the one with a ``genai_config.json``) is
    preferred; a tensorrt-flavoured graph runs with its plugin nodes expanded into standard ops
    (:func:`d2mc.onnx_session.runnable_onnx`). An incomplete d2mc artifact is refused in one line.
    """
    path = Path(spec).expanduser()
    if not path.is_dir():
        return None
    found = [path / place / "model.onnx" for place in ONNX_PLACES if (path / place / "model.onnx").is_file()]
    if not found:
        return None
    chosen = next((p for p in found if (p.parent / "genai_config.json").is_file()), found[0])
    if (chosen.parent / ARTIFACT_FILE).is_file():
        read_artifact(chosen.parent)
    return chosen


def artifact_tokenizer(artifact: Path, onnx_path: Path):
    """The tokenizer saved with an artifact: beside its ONNX, at its top, or in a compile output's ``model/``."""
    from transformers import AutoTokenizer

    for place in (onnx_path.parent, artifact, artifact / MODEL_DIR):
        if (place / "tokenizer.json").is_file() or (place / "tokenizer_config.json").is_file():
            return AutoTokenizer.from_pretrained(place)
    raise UserError(f"'{artifact}' has no tokenizer files: export it again from a model with a tokenizer")
