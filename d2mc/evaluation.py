"""Evaluation of what d2mc ships: held-out perplexity and lm-evaluation-harness tasks.

Perplexity is measured on a PyTorch model (any MODEL that :func:`d2mc.loading.load_model` reads, dense or
converted) or on an ONNX artifact run by ONNX Runtime itself (a ``d2mc export`` or ``d2mc compile`` output, or
another exporter's directory with ``model.onnx`` and ``genai_config.json``). Both score the same token windows
the same way: each window is one sequence from an empty cache and every position's next token counts, so the two
figures of an artifact and its source agree to within :data:`PERPLEXITY_TOLERANCE`.

Tasks run through lm-evaluation-harness (``pip install 'd2mc[eval]'``) on the loaded PyTorch model, wrapped in
its ``HFLM``: converted models need no export and no hub access; only the tasks' own data must be at hand.
"""

from __future__ import annotations

import difflib
import functools
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from d2mc.data import HELDOUT_TOKENS, heldout_ids, perplexity, read_text
from d2mc.errors import MissingDependencyError, UserError

log = logging.getLogger(__name__)

DEFAULT_TOKENS = 4096
DEFAULT_WINDOW = 512
HELDOUT_TEXT = f"the built-in held-out text (the last {HELDOUT_TOKENS:,} tokens of the corpus, never trained on)"
# |perplexity(ONNX Runtime) / perplexity(PyTorch) - 1| accepted between an artifact and the model it was exported
# from, on the default 4,096 held-out tokens. Measured: fp32 at most 3.5e-7 on tiny models of every family (dense
# and converted) and 1.5e-8 on SmolLM2-135M; fp16 (weights and residual stream rounded) at most 1.6e-5 on the tiny
# models and 1.9e-4 on SmolLM2-135M (33.680 against 33.673).
PERPLEXITY_TOLERANCE = {"fp32": 1e-5, "fp16": 1e-3}
EVAL_INSTALL = "'d2mc[eval]'"
TASK_HINT = ("give an lm-evaluation-harness task, group or tag (e.g. hellaswag, arc_easy, mmlu), or a local "
             "task directory with --include-path DIR")


@dataclass(frozen=True)
class PerplexityResult:
    """Perplexity of ``source`` on ``tokens`` tokens cut into ``windows`` windows of ``window`` tokens."""

    source: str
    runtime: str  # "pytorch" or "onnxruntime"
    perplexity: float
    tokens: int
    window: int
    windows: int
    data: str
    seconds: float
    precision: str
    onnx: str | None = None  # the ONNX model ONNX Runtime ran

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Metric:
    """One lm-evaluation-harness metric of a task (``stderr`` is None where the harness gives none)."""

    name: str
    value: float
    stderr: float | None


@dataclass(frozen=True)
class TaskScore:
    """A task's (or a group's aggregate) metrics, on ``samples`` documents with ``num_fewshot`` examples each."""

    task: str
    metrics: tuple[Metric, ...]
    samples: int | None  # documents scored (after --limit); None for a group's aggregate
    num_fewshot: int | None
    group: bool = False


@dataclass(frozen=True)
class TaskScores:
    """The scores of every task (and group aggregate) that lm-evaluation-harness reported, in its order."""

    source: str
    tasks: tuple[TaskScore, ...]
    limit: int | None
    seconds: float
    harness: str  # lm-eval version

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class LoadedTasks:
    """Task objects of lm-evaluation-harness with their data, and the manager that found them."""

    objects: tuple
    manager: object


# ---- perplexity ----------------------------------------------------------------------------------------------

def evaluate_perplexity(spec: str | Path, *, data: str | Path | None = None, tokens: int | None = None,
                        window: int | None = None, threads: int | None = None) -> PerplexityResult:
    """Held-out perplexity of MODEL (run by PyTorch) or of an ONNX artifact directory (run by ONNX Runtime).

    ``data`` is a text file (plain, or ``.jsonl`` with a ``text`` field); by default the built-in held-out text.
    ``tokens`` (default :data:`DEFAULT_TOKENS`, or all of ``data`` when it holds fewer) are scored in
    non-overlapping windows of ``window`` tokens (default :data:`DEFAULT_WINDOW`).
    """
    _check_lengths(tokens, window)
    if find_artifact_onnx(spec) is not None:
        return evaluate_artifact_perplexity(spec, data=data, tokens=tokens, window=window, threads=threads)
    loaded = _load_pytorch(spec)
    return evaluate_model_perplexity(loaded.model, loaded.tokenizer, data=data, tokens=tokens, window=window,
                                     source=str(spec))


def evaluate_model_perplexity(model, tokenizer, *, data: str | Path | None = None, tokens: int | None = None,
                              window: int | None = None, source: str = "") -> PerplexityResult:
    """Perplexity of a loaded PyTorch model (see :func:`evaluate_perplexity`)."""
    from d2mc.arch import ModelArch

    window = window or DEFAULT_WINDOW
    _check_lengths(tokens, window, ModelArch.from_config(model.config).max_position_embeddings)
    if tokenizer is None:
        raise UserError(f"'{source or 'the model'}' has no tokenizer: perplexity needs one to read the text")
    windows, described = _eval_windows(tokenizer, data, tokens, window)
    start = time.perf_counter()
    value = perplexity(model, windows)
    precision = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(model.dtype, "fp32")
    return PerplexityResult(source, "pytorch", value, windows.numel(), window, windows.shape[0], described,
                            time.perf_counter() - start, precision)


def evaluate_artifact_perplexity(artifact: str | Path, *, data: str | Path | None = None, tokens: int | None = None,
                                 window: int | None = None, threads: int | None = None) -> PerplexityResult:
    """Perplexity of an ONNX artifact run by ONNX Runtime through its KV-cache graph: each window is one prefill
    from an empty cache, whose logits at every position are scored (see :func:`evaluate_perplexity`)."""
    from d2mc.verify import OrtDecoder, runnable_onnx

    window = window or DEFAULT_WINDOW
    onnx_path = find_artifact_onnx(artifact)
    if onnx_path is None:
        raise UserError(f"'{artifact}' holds no model.onnx: export one with d2mc export")
    _check_lengths(tokens, window, _artifact_max_positions(onnx_path))
    windows, described = _eval_windows(_artifact_tokenizer(Path(artifact).expanduser(), onnx_path), data, tokens,
                                      window)
    with runnable_onnx(onnx_path) as runnable:
        decoder = OrtDecoder(runnable, threads)
        start = time.perf_counter()
        total_nll = 0.0
        for ids in windows:
            logits, _ = decoder.step(ids[None].numpy(), decoder.empty_cache(1), 0)
            logits = torch.from_numpy(logits[0, :-1]).float()
            total_nll += torch.nn.functional.cross_entropy(logits, ids[1:], reduction="sum").item()
        seconds = time.perf_counter() - start
    scored = windows.shape[0] * (window - 1)
    precision = _artifact_info(onnx_path).get("precision") or ("fp16" if decoder.dtype == np.float16 else "fp32")
    return PerplexityResult(str(artifact), "onnxruntime", math.exp(total_nll / scored), windows.numel(), window,
                            windows.shape[0], described, seconds, precision, str(onnx_path))


def _check_lengths(tokens: int | None, window: int | None, max_positions: int | None = None) -> None:
    """Refuse token counts and windows no evaluation can use (``max_positions``: the model's maximum)."""
    if tokens is not None and tokens < 1:
        raise UserError(f"--tokens must be at least 1 (got {tokens})")
    if window is not None and window < 2:
        raise UserError(f"--window must be at least 2 tokens (got {window}): a window scores each token after "
                        "its first")
    if window is not None and max_positions is not None and window > max_positions:
        raise UserError(f"--window {window} is more than the model's maximum of {max_positions} positions: give "
                        f"--window {max_positions} or less")
    if tokens is not None and window is not None and tokens < window:
        raise UserError(f"--tokens {tokens} is less than one window of {window} tokens: give --tokens {window} or "
                        "more, or a smaller --window")


def _eval_windows(tokenizer, data: str | Path | None, tokens: int | None, window: int) -> tuple[torch.Tensor, str]:
    """``[n, window]`` token windows of the evaluation text and a description of that text.

    ``tokens`` given: exactly that many tokens are used (refused when the text holds fewer); not given:
    :data:`DEFAULT_TOKENS`, or the whole text when it holds fewer. A remainder short of a window is left out.
    """
    if data is None:
        ids, described = heldout_ids(tokenizer), HELDOUT_TEXT
    else:
        text = _read_eval_text(data)
        ids, described = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long), str(data)
    if tokens is not None and tokens > ids.numel():
        raise UserError(f"--tokens {tokens} is more than the {ids.numel():,} tokens {described} holds: give "
                        f"--tokens {ids.numel()} or less{'' if data else ', or your own text with --data FILE'}")
    count = min(tokens or DEFAULT_TOKENS, ids.numel())
    n = count // window
    if n == 0:
        raise UserError(f"{described} holds {ids.numel():,} tokens, fewer than one --window of {window}: give more "
                        "text or a smaller --window")
    return ids[: n * window].view(n, window), described


def _read_eval_text(path: str | Path) -> str:
    """The text of an evaluation file (plain UTF-8, or ``.jsonl`` with a ``text`` field), refusing binary and
    empty files."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"no such text file: '{path}' (--data)")
    if not path.is_file():
        raise UserError(f"--data '{path}' is not a file: give a text file")
    raw = path.read_bytes()
    try:
        raw.decode("utf-8")
        binary = b"\x00" in raw
    except UnicodeDecodeError:
        binary = True
    if binary:
        raise UserError(f"--data '{path}' is not UTF-8 text (a binary file?): give a plain text or .jsonl "
                        "file")
    text = read_text(path)
    if not text.strip():
        raise UserError(f"--data '{path}' holds no text: give a file with the text to score")
    return text


def _load_pytorch(spec: str | Path):
    from d2mc.loading import load_model

    path = Path(spec).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        raise UserError(f"'{spec}' is neither a model (no config.json) nor an ONNX artifact (no model.onnx): give a "
                        "Hugging Face checkpoint directory, a d2mc convert output, or a d2mc export or compile output")
    return load_model(spec)


# ---- artifacts -----------------------------------------------------------------------------------------------

def find_artifact_onnx(spec: str | Path) -> Path | None:
    """The ``model.onnx`` ONNX Runtime runs for an artifact directory, or None when ``spec`` is not one.

    An artifact is a ``d2mc export`` output (``model.onnx`` at its top), a ``d2mc compile`` output (``onnx/`` and
    ``onnx-tensorrt/``) or another exporter's directory. The ONNX Runtime flavour (the one with a
    ``genai_config.json``) is preferred; a TensorRT-flavoured graph runs with its plugin nodes expanded into
    standard ops (:func:`d2mc.verify.runnable_onnx`).
    """
    from d2mc.targets.onnxruntime import ARTIFACT_FILE, read_artifact
    from d2mc.targets.tensorrt import ONNX_PLACES

    path = Path(spec).expanduser()
    if not path.is_dir():
        return None
    found = [path / place / "model.onnx" for place in ONNX_PLACES if (path / place / "model.onnx").is_file()]
    if not found:
        return None
    chosen = next((p for p in found if (p.parent / "genai_config.json").is_file()), found[0])
    if (chosen.parent / ARTIFACT_FILE).is_file():
        read_artifact(chosen.parent)  # refuses an incomplete d2mc artifact in one line
    return chosen


def _artifact_info(onnx_path: Path) -> dict:
    from d2mc.targets.onnxruntime import ARTIFACT_FILE

    info = onnx_path.parent / ARTIFACT_FILE
    return json.loads(info.read_text()) if info.is_file() else {}


def _artifact_max_positions(onnx_path: Path) -> int | None:
    """The longest sequence the artifact's model was made for (its genai_config or its config.json)."""
    genai = onnx_path.parent / "genai_config.json"
    if genai.is_file():
        return json.loads(genai.read_text())["model"].get("context_length")
    if (onnx_path.parent / "config.json").is_file():
        from transformers import AutoConfig

        from d2mc.arch import ModelArch

        return ModelArch.from_config(AutoConfig.from_pretrained(onnx_path.parent)).max_position_embeddings
    return None


def _artifact_tokenizer(artifact: Path, onnx_path: Path):
    """The tokenizer saved with the artifact: beside its ONNX, at its top, or in a compile output's ``model/``."""
    from transformers import AutoTokenizer

    for place in (onnx_path.parent, artifact, artifact / "model"):
        if (place / "tokenizer.json").is_file() or (place / "tokenizer_config.json").is_file():
            return AutoTokenizer.from_pretrained(place)
    raise UserError(f"'{artifact}' has no tokenizer files: export it again from a model with a tokenizer")


# ---- lm-evaluation-harness tasks -----------------------------------------------------------------------------

def evaluate_tasks(spec: str | Path, tasks: Sequence[str], *, include_path: str | Path | None = None,
                   limit: int | None = None, num_fewshot: int | None = None, batch_size: int = 8) -> TaskScores:
    """lm-evaluation-harness ``tasks`` on MODEL run by PyTorch (an ONNX artifact is refused: tasks score the
    model it was exported from). The tasks and their data are found before the model is loaded."""
    onnx_path = find_artifact_onnx(spec)
    if onnx_path is not None:
        source = _artifact_info(onnx_path).get("source")
        hint = f" ('{source}' for this one)" if source else ""
        raise UserError(f"--tasks needs the PyTorch model, not an ONNX artifact: give the model '{spec}' was "
                        f"exported from{hint}")
    _check_task_options(limit, num_fewshot)
    loaded_tasks = load_tasks(tasks, include_path)
    loaded = _load_pytorch(spec)
    return _run_tasks(loaded.model, loaded.tokenizer, loaded_tasks, limit, num_fewshot, batch_size, str(spec))


def evaluate_model_tasks(model, tokenizer, tasks: Sequence[str], *, include_path: str | Path | None = None,
                         limit: int | None = None, num_fewshot: int | None = None, batch_size: int = 8,
                         source: str = "") -> TaskScores:
    """lm-evaluation-harness ``tasks`` on a loaded PyTorch model (see :func:`evaluate_tasks`)."""
    _check_task_options(limit, num_fewshot)
    loaded_tasks = load_tasks(tasks, include_path)
    return _run_tasks(model, tokenizer, loaded_tasks, limit, num_fewshot, batch_size, source)


def load_tasks(names: Sequence[str], include_path: str | Path | None = None) -> LoadedTasks:
    """Find ``names`` (tasks, groups or tags, or YAML files) and load their data, refusing in one line an unknown
    name or data that cannot be found (offline, the hub tasks' data must already be in the datasets cache)."""
    _require_harness()
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise UserError(f"--tasks names no task: {TASK_HINT}")
    include = None
    if include_path is not None:
        include = Path(include_path).expanduser().resolve()
        if not include.is_dir():
            raise UserError(f"--include-path '{include_path}' is not a directory: give the directory of your task "
                            "YAML files")
    manager = _task_manager(include, include_defaults=False) if include else None
    if manager is None or not all(_is_known(manager, n) for n in names):
        manager = _task_manager(include, include_defaults=True)
    for name in names:
        if not _is_known(manager, name):
            close = difflib.get_close_matches(name, manager.all_tasks, n=3)
            suggestion = f" (close: {', '.join(close)})" if close else ""
            raise UserError(f"unknown task '{name}' for --tasks{suggestion}: {TASK_HINT}")
    objects = []
    for name in names:
        try:
            loaded = manager.load([name])
        except OSError as exc:  # datasets: no network, not in its cache, or a missing local file
            raise UserError(f"the data of task '{name}' (--tasks) cannot be found ({_first_line(exc)}): run once "
                            "with network access so that the datasets cache holds it, or give a local task "
                            "whose data is on disk with --include-path DIR") from None
        objects.extend(_top_level(loaded, name))
    return LoadedTasks(tuple(objects), manager)


def _check_task_options(limit: int | None, num_fewshot: int | None) -> None:
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1 document per task (got {limit})")
    if num_fewshot is not None and num_fewshot < 0:
        raise UserError(f"--num-fewshot must be 0 or more (got {num_fewshot})")


def _top_level(loaded: dict, name: str) -> list:
    """What ``name`` stands for: its group (which holds its subtasks), else its task or a tag's tasks."""
    if name in loaded["groups"]:
        return [loaded["groups"][name]]
    return list(loaded["tasks"].values())


def _is_known(manager, name: str) -> bool:
    return name in manager.all_tasks or (name.endswith((".yaml", ".yml")) and Path(name).expanduser().is_file())


@functools.lru_cache(maxsize=4)
def _task_manager(include: Path | None, include_defaults: bool):
    """lm-evaluation-harness's index of tasks (about 12 s with its built-in tasks here; kept per process)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(include) if include else None, include_defaults=include_defaults)


def _run_tasks(model, tokenizer, tasks: LoadedTasks, limit: int | None, num_fewshot: int | None, batch_size: int,
               source: str) -> TaskScores:
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    if tokenizer is None:
        raise UserError(f"'{source or 'the model'}' has no tokenizer: tasks need one to read their text")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size)
    start = time.perf_counter()
    results = lm_eval.simple_evaluate(lm, tasks=list(tasks.objects), task_manager=tasks.manager,
                                      num_fewshot=num_fewshot, limit=limit, log_samples=False)
    seconds = time.perf_counter() - start
    return TaskScores(source, _task_scores(results), limit, seconds, lm_eval.__version__)


def _task_scores(results: dict) -> tuple[TaskScore, ...]:
    """The harness's ``results`` (keys ``metric,filter`` and ``metric_stderr,filter``) as typed scores."""
    subtasks = results.get("group_subtasks", {})
    scores = []
    for task, entry in results["results"].items():
        metrics = []
        for key, value in entry.items():
            metric, _, filter_name = key.partition(",")
            if not filter_name or metric.endswith("_stderr") or not isinstance(value, int | float):
                continue
            stderr = entry.get(f"{metric}_stderr,{filter_name}")
            name = metric if filter_name == "none" else f"{metric} ({filter_name})"
            metrics.append(Metric(name, float(value), float(stderr) if isinstance(stderr, int | float) else None))
        samples = results.get("n-samples", {}).get(task, {}).get("effective")
        scores.append(TaskScore(task, tuple(metrics), samples, results.get("n-shot", {}).get(task),
                                bool(subtasks.get(task))))
    return tuple(scores)


def _require_harness() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise MissingDependencyError("lm-eval", "d2mc eval --tasks", EVAL_INSTALL) from None
    if not log.isEnabledFor(logging.INFO):
        # the harness warns about what d2mc does on purpose (a model passed as an object, a task's own loader)
        logging.getLogger("lm_eval").setLevel(logging.ERROR)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
