"""Evaluation of what d2mc ships: held-out perplexity (tasks: :mod:`d2mc.tasks`).

Perplexity is measured on a PyTorch model (any MODEL that :func:`d2mc.loading.load_model` reads, dense or
converted) or on an ONNX artifact run by ONNX Runtime itself (a ``d2mc export`` or ``d2mc compile`` output, or
another exporter's directory with ``model.onnx`` and ``genai_config.json``). Both score the same token windows
the same way: each window is one sequence from an empty cache and every position's next token counts, so the two
figures of an artifact and its source agree to within :data:`PERPLEXITY_TOLERANCE`.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from d2mc.artifact import artifact_info, artifact_tokenizer, find_runnable_onnx, onnx_context_length
from d2mc.data import HELDOUT_TOKENS, heldout_ids, perplexity, read_text
from d2mc.errors import OptionError, UserError

DEFAULT_TOKENS = 4096
DEFAULT_WINDOW = 512
HELDOUT_TEXT = f"the built-in held-out text (the last {HELDOUT_TOKENS:,} tokens of the corpus, never trained on)"
# |perplexity(ONNX Runtime) / perplexity(PyTorch) - 1| accepted between an artifact and the model it was exported
# from, on the default 4,096 held-out tokens. Measured: fp32 at most 3.5e-7 on tiny models of every family (dense
# and converted) and 1.5e-8 on SmolLM2-135M; fp16 (weights and residual stream rounded) at most 1.6e-5 on the tiny
# models and 1.9e-4 on SmolLM2-135M (33.680 against 33.673).
PERPLEXITY_TOLERANCE = {"fp32": 1e-5, "fp16": 1e-3}


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


# ---- perplexity ----------------------------------------------------------------------------------------------

def evaluate_perplexity(spec: str | Path, *, data: str | Path | None = None, tokens: int | None = None,
                        window: int | None = None, threads: int | None = None, placement=None) -> PerplexityResult:
    """Held-out perplexity of MODEL (run by PyTorch) or of an ONNX artifact directory (run by ONNX Runtime).

    ``data`` is a text file (plain, or ``.jsonl`` with a ``text`` field); by default the built-in held-out text.
    ``tokens`` (default :data:`DEFAULT_TOKENS`, or all of ``data`` when it holds fewer) are scored in
    non-overlapping windows of ``window`` tokens (default :data:`DEFAULT_WINDOW`). A model is loaded where
    ``placement`` (a :class:`~d2mc.placement.Placement`) says, by default on the CPU in fp32.
    """
    _check_lengths(tokens, window)
    if find_runnable_onnx(spec) is not None:
        return evaluate_artifact_perplexity(spec, data=data, tokens=tokens, window=window, threads=threads)
    loaded = load_pytorch_model(spec, placement)
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
    from d2mc.onnx_session import OrtDecoder, runnable_onnx

    window = window or DEFAULT_WINDOW
    onnx_path = find_runnable_onnx(artifact)
    if onnx_path is None:
        raise UserError(f"'{artifact}' holds no model.onnx: export one with d2mc export")
    _check_lengths(tokens, window, onnx_context_length(onnx_path))
    windows, described = _eval_windows(artifact_tokenizer(Path(artifact).expanduser(), onnx_path), data, tokens,
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
    precision = artifact_info(onnx_path.parent).get("precision") or ("fp16" if decoder.dtype == np.float16 else "fp32")
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
    empty files (:func:`d2mc.data.read_text`) with the option named."""
    try:
        return read_text(path)
    except UserError as exc:
        raise OptionError(f"{{data}}: {exc}") from None


def load_pytorch_model(spec: str | Path, placement=None):
    """MODEL loaded for scoring (where ``placement`` says), refusing in one line a directory that is neither a model nor an artifact."""
    from d2mc.loading import load_model

    path = Path(spec).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        raise UserError(f"'{spec}' is neither a model (no config.json) nor an ONNX artifact (no model.onnx): give a "
                        "Hugging Face checkpoint directory, a d2mc convert output, or a d2mc export or compile output")
    return load_model(spec, placement=placement)
