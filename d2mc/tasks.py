"""lm-evaluation-harness tasks on the loaded PyTorch model (``pip install 'd2mc[eval]'``).

The model is wrapped in the harness's ``HFLM``: converted models need no export and no hub access; only the tasks'
own data must be at hand (offline, in the datasets cache or a local task directory given with ``--include-path``).
"""

from __future__ import annotations

import difflib
import functools
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from d2mc.artifact import artifact_info, find_runnable_onnx
from d2mc.errors import MissingDependencyError, UserError, first_line
from d2mc.evaluation import load_pytorch_model

log = logging.getLogger(__name__)

EVAL_INSTALL = "'d2mc[eval]'"
TASK_HINT = ("give an lm-evaluation-harness task, group or tag (e.g. hellaswag, arc_easy, mmlu), or a local "
             "task directory with --include-path DIR")


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


def evaluate_tasks(spec: str | Path, tasks: Sequence[str], *, include_path: str | Path | None = None,
                   limit: int | None = None, num_fewshot: int | None = None, batch_size: int = 8,
                   placement=None) -> TaskScores:
    """lm-evaluation-harness ``tasks`` on MODEL run by PyTorch (an ONNX artifact is refused: tasks score the
    model it was exported from), loaded where ``placement`` says (default: the CPU in fp32). The tasks and their
    data are found before the model is loaded."""
    onnx_path = find_runnable_onnx(spec)
    if onnx_path is not None:
        source = artifact_info(onnx_path.parent).get("source")
        hint = f" ('{source}' for this one)" if source else ""
        raise UserError(f"--tasks needs the PyTorch model, not an ONNX artifact: give the model '{spec}' was "
                        f"exported from{hint}")
    _check_task_options(limit, num_fewshot)
    loaded_tasks = load_tasks(tasks, include_path)
    loaded = load_pytorch_model(spec, placement)
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
            raise UserError(f"the data of task '{name}' (--tasks) cannot be found ({first_line(exc)}): run once "
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
