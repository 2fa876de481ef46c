"""Text for calibration, recovery training and held-out evaluation.

The built-in corpus is the Lee news corpus shipped inside gensim's wheel (about 75k SmolLM2 tokens of English
news prose): d2mc fetches that one file through pip into its cache. The split is fixed for the whole project:
the last :data:`HELDOUT_TOKENS` tokens are held out for evaluation and never used for calibration or training;
everything before them is calibration/training text.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from d2mc.errors import UserError
from d2mc.loading import cache_dir

log = logging.getLogger(__name__)

CORPUS_NAME = "lee_background.cor"
CORPUS_MEMBER = "gensim/test/test_data/lee_background.cor"
HELDOUT_TOKENS = 12288
# tokens in a row that a calibration/training text may not share with the held-out text (a copied sentence)
OVERLAP_SPAN = 32


def corpus_path() -> Path:
    """The built-in corpus file, fetched once (through pip, from gensim's wheel) into the d2mc cache."""
    target = cache_dir() / "data" / CORPUS_NAME
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                                 "--only-binary=:all:", "gensim", "-d", tmp], capture_output=True, text=True)
        wheels = list(Path(tmp).glob("gensim-*.whl"))
        if result.returncode != 0 or not wheels:
            raise UserError("cannot fetch the built-in corpus (pip download gensim failed): give your own text "
                            "with --calib-data, or place lee_background.cor in " + str(target.parent))
        partial = target.with_suffix(".partial")
        partial.write_bytes(zipfile.ZipFile(wheels[0]).read(CORPUS_MEMBER))
        partial.rename(target)
    return target


# the most characters of a text file that may be undecodable or control characters (a stray byte of another
# encoding is tolerated; a binary file is not text)
MAX_NON_TEXT = 0.01


def read_text(path: str | Path) -> str:
    """Plain UTF-8 text, or the ``text`` field of each line of a ``.jsonl`` file; a binary or empty file is
    refused."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"no such text file: '{path}'")
    if not path.is_file():
        raise UserError(f"'{path}' is a directory: give a .txt or .jsonl file")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read '{path}' ({exc.strerror})") from None
    text = raw.decode("utf-8", errors="replace")
    non_text = text.count("\ufffd") + sum(1 for c in text if c < " " and c not in "\n\r\t\f")
    if b"\0" in raw or non_text > MAX_NON_TEXT * len(text):
        raise UserError(f"'{path}' is not text ({non_text} of {len(text)} characters are binary or not UTF-8): give "
                        "a UTF-8 .txt or .jsonl file")
    if path.suffix == ".jsonl":
        try:
            text = "\n\n".join(json.loads(line)["text"] for line in text.splitlines() if line.strip())
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"'{path}': each line of a .jsonl file must be an object with a 'text' field") from None
    if not text.strip():
        raise UserError(f"'{path}' holds no text")
    return text


def _corpus_ids(tokenizer) -> torch.Tensor:
    return torch.tensor(tokenizer(read_text(corpus_path()))["input_ids"], dtype=torch.long)


def heldout_ids(tokenizer) -> torch.Tensor:
    """The held-out evaluation tokens: the last :data:`HELDOUT_TOKENS` of the corpus."""
    return _corpus_ids(tokenizer)[-HELDOUT_TOKENS:]


def training_ids(tokenizer, source: str | Path | None = None) -> torch.Tensor:
    """Calibration/training tokens: a user file, or the corpus before the held-out part.

    The evaluation file itself is refused as a source, so nothing evaluated is ever trained on.
    """
    if source is not None:
        if Path(source).expanduser().resolve() == corpus_path().resolve():
            raise UserError(f"'{source}' holds the evaluation text: give calibration/training text that does "
                            "not overlap it")
        ids = torch.tensor(tokenizer(read_text(source))["input_ids"], dtype=torch.long)
        overlap = first_overlap(ids, heldout_ids(tokenizer))
        if overlap is not None:
            raise UserError(f"'{source}' repeats the held-out evaluation text (from its token {overlap}): give "
                            "calibration/training text that does not overlap it")
        return ids
    return _corpus_ids(tokenizer)[:-HELDOUT_TOKENS]


def first_overlap(ids: torch.Tensor, heldout: torch.Tensor, span: int = OVERLAP_SPAN) -> int | None:
    """The first position of ``ids`` where ``span`` tokens in a row repeat a stretch of ``heldout``, else None."""
    windows = {heldout[i: i + span].numpy().tobytes() for i in range(max(heldout.numel() - span + 1, 0))}
    return next((i for i in range(ids.numel() - span + 1) if ids[i: i + span].numpy().tobytes() in windows), None)


def heldout_windows(tokenizer, window: int = 512, max_tokens: int | None = None) -> torch.Tensor:
    """Held-out tokens cut into ``[n, window]`` non-overlapping windows."""
    ids = heldout_ids(tokenizer)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n = ids.numel() // window
    return ids[: n * window].view(n, window)


def calibration_batch(tokenizer, n_sequences: int, seq_len: int, source: str | Path | None = None,
                      seed: int = 0) -> torch.Tensor:
    """``[n_sequences, seq_len]`` token windows drawn from the training text at seeded random offsets."""
    if n_sequences < 1 or seq_len < 2:
        raise UserError("calibration needs at least one sequence of at least two tokens")
    ids = training_ids(tokenizer, source)
    if ids.numel() < seq_len + 1:
        raise UserError(f"the calibration text has {ids.numel()} tokens, fewer than one {seq_len}-token sequence")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (n_sequences,), generator=generator)
    return torch.stack([ids[s: s + seq_len] for s in starts.tolist()])


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 4) -> float:
    """Perplexity of ``model`` on ``[n, window]`` token windows (each window scored on its own)."""
    total_nll, total_tokens = 0.0, 0
    device = next(model.parameters()).device
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start: start + batch_size].to(device)
        logits = model(batch, use_cache=False).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                                reduction="sum")
        total_nll += nll.item()
        total_tokens += batch[:, 1:].numel()
    return float(torch.exp(torch.tensor(total_nll / total_tokens)))
