"""Text for recovery training: where it comes from, how it is cut into windows, and what it must not contain.

A source is one of: nothing (the built-in corpus before its held-out tail), a text file, a ``.jsonl`` file
(``text`` field of each line), a ``datasets`` name (``NAME`` or ``NAME:CONFIG``, read through the optional
``datasets`` package), or ``generate``: the dense parent writes its own training text, sampled continuations
of short prompts, so recovery needs no data at all. The evaluation text is never trained on: the same file
for both is refused, and so is training text that contains passages of the evaluation text.
"""

from __future__ import annotations

import copy
import json
import logging
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch

from d2mc.data import heldout_ids, read_text, training_ids
from d2mc.errors import UserError, require_module

log = logging.getLogger(__name__)

STREAM_POSITION = "d2mc_stream.json"  # where a checkpoint keeps the position of a streamed source

TEXT_SUFFIXES = (".txt", ".text", ".md", ".jsonl", ".cor")

# Openings for self-generated training text: plain prose of several registers, no chat template.
PROMPTS = (
    "The", "In", "A new study", "The government said", "Scientists have found that", "Yesterday",
    "According to", "The history of", "When I was", "One of the most", "Police said", "The company",
    "In the early", "Researchers at", "The city council", "It was", "How to", "The best way to",
    "Many people", "The new law", "During the", "After the", "This year", "The report",
)


def is_file_source(source: str) -> bool:
    """Whether ``source`` names a text file (existing, or written like a file path) rather than a ``datasets``
    name (a hub name, or a local dataset directory)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return False
    return path.exists() or source.startswith((".", "/", "~")) or path.suffix in TEXT_SUFFIXES


def open_stream(source: str, split: str = "train"):
    """The rows of ``source`` as a ``datasets`` stream: a datasets name (``NAME`` or ``NAME:CONFIG``), a local dataset
    directory, or a text file (a row per line; a ``.jsonl`` file, a row per object)."""
    datasets = require_module("datasets", f"training on the dataset '{source}'", "datasets")
    try:
        if is_file_source(source):
            path = Path(source).expanduser()
            builder = "json" if path.suffix == ".jsonl" else "text"
            return datasets.load_dataset(builder, data_files=str(path), split="train", streaming=True)
        name, _, config = source.partition(":")
        return datasets.load_dataset(name, config or None, split=split, streaming=True)
    except Exception as exc:  # datasets raises many kinds for a bad name, split or config
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load the dataset '{source}' split '{split}' ({first[:160]}): give a text file, "
                        "a .jsonl file, a datasets name (NAME or NAME:CONFIG) or 'generate'") from None


def row_text(row: dict, field: str, source: str) -> str:
    """The training text of one dataset row."""
    if field not in row:
        raise UserError(f"the dataset '{source}' has no field '{field}' (it has {', '.join(row)}): choose "
                        "one with --data-field")
    return str(row[field])


def source_text(source: str, split: str = "train", field: str = "text", max_chars: int | None = None) -> str:
    """The text of a file or a ``datasets`` name (``NAME`` or ``NAME:CONFIG``)."""
    if is_file_source(source):
        return read_text(source)
    parts, size = [], 0
    for row in open_stream(source, split):
        parts.append(row_text(row, field, source))
        size += len(parts[-1])
        if max_chars is not None and size >= max_chars:
            break
    if not parts:
        raise UserError(f"the dataset '{source}' split '{split}' is empty")
    return "\n\n".join(parts)


def check_no_overlap(train_source: str | None, eval_source: str | None, train_text: str, tokenizer) -> None:
    """Refuse the evaluation file as training data, and training text that contains evaluation passages."""
    if train_source and eval_source and is_file_source(train_source) and is_file_source(eval_source):
        a, b = Path(train_source).expanduser(), Path(eval_source).expanduser()
        if a.resolve() == b.resolve() or (a.exists() and b.exists() and a.samefile(b)):
            raise UserError(f"'{train_source}' is both the training data and the evaluation text: train on text "
                            "that does not overlap the evaluation text")
    normalised = normalise_text(train_text)
    for snippet in evaluation_snippets(tokenizer, eval_source):
        if normalise_text(snippet) in normalised:
            raise UserError(f"the training text contains the evaluation passage '{snippet[:40].strip()}...': "
                            "train on text that does not overlap the evaluation text")


def normalise_text(text: str) -> str:
    """Text compared for overlap: case folded, every run of whitespace one space (a reflowed or re-cased copy
    of the evaluation text is still the evaluation text)."""
    return " ".join(text.casefold().split())


def evaluation_snippets(tokenizer, eval_source: str | None, count: int = 8, tokens: int = 24) -> list[str]:
    """A few passages spread over the evaluation text, as text, for the overlap check."""
    ids = evaluation_ids(tokenizer, eval_source)
    step = max(ids.numel() // count, tokens)
    snippets = []
    for start in range(tokens, ids.numel() - tokens, step):  # skip the first tokens: a file may open with a title
        text = tokenizer.decode(ids[start: start + tokens].tolist(), clean_up_tokenization_spaces=False).strip()
        if len(text) >= 40:
            snippets.append(text)
    return snippets[:count]


def evaluation_ids(tokenizer, eval_source: str | None) -> torch.Tensor:
    """Token ids of the evaluation text: a file, or (by default) the built-in corpus's held-out tail."""
    if eval_source is None:
        return heldout_ids(tokenizer)
    return torch.tensor(tokenizer(read_text(eval_source))["input_ids"], dtype=torch.long)


def evaluation_windows(tokenizer, eval_source: str | None, window: int = 512,
                       max_tokens: int | None = None) -> torch.Tensor:
    """The evaluation text cut into ``[n, window]`` windows (at most ``max_tokens`` tokens)."""
    ids = evaluation_ids(tokenizer, eval_source)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n = ids.numel() // window
    if n == 0:
        raise UserError(f"the evaluation text has {ids.numel()} tokens, fewer than one {window}-token window")
    return ids[: n * window].view(n, window)


def training_windows(tokenizer, source: str | None, seq_len: int, *, eval_source: str | None = None,
                     split: str = "train", field: str = "text", max_tokens: int | None = None) -> torch.Tensor:
    """Non-overlapping ``[n, seq_len]`` windows of the training text (not for ``generate``: see
    :func:`generate_windows`). Checks the text against the evaluation text first."""
    if source is None:
        ids = training_ids(tokenizer)  # the built-in corpus minus its held-out tail
        if eval_source is not None:
            check_no_overlap(None, eval_source, tokenizer.decode(ids.tolist()), tokenizer)
    else:
        if is_file_source(source) and not Path(source).expanduser().exists():
            raise UserError(f"no such text file: '{source}'")
        max_chars = None if max_tokens is None else 8 * max_tokens
        text = source_text(source, split, field, max_chars)
        check_no_overlap(source, eval_source, text, tokenizer)
        ids = training_ids(tokenizer, source) if is_file_source(source) else torch.tensor(
            tokenizer(text)["input_ids"], dtype=torch.long)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n = ids.numel() // seq_len
    if n == 0:
        raise UserError(f"the training text has {ids.numel()} tokens, fewer than one {seq_len}-token sequence")
    return ids[: n * seq_len].view(n, seq_len)


@torch.no_grad()
def generate_windows(teacher, tokenizer, sequences: int, seq_len: int, seed: int = 0, temperature: float = 1.0,
                     top_p: float = 0.95, batch_size: int = 8, progress=None) -> torch.Tensor:
    """``[sequences, seq_len]`` token windows the teacher writes itself: each a short prompt from
    :data:`PROMPTS` and its sampled continuation (end-of-text suppressed, so every window is full)."""
    if sequences < 1:
        raise UserError("generating training text needs at least one sequence")
    device = next(teacher.parameters()).device
    windows = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        while len(windows) < sequences:
            prompt = PROMPTS[len(windows) // batch_size % len(PROMPTS)]
            ids = torch.tensor([tokenizer(prompt)["input_ids"]], device=device)
            n = min(batch_size, sequences - len(windows))
            new = seq_len - ids.shape[1]
            out = teacher.generate(ids, do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
                                   max_new_tokens=new, min_new_tokens=new, num_return_sequences=n,
                                   pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
            windows.extend(out[:, :seq_len].cpu())
            if progress:
                progress(f"generated {len(windows)}/{sequences} training sequences")
    return torch.stack(windows)


@dataclass
class TeacherTopK:
    """The teacher's ``k`` most likely next tokens at every position of every training window, computed once:
    their log-probabilities at the distillation temperature (``[N, S, k]``) and token ids (``[N, S, k]``).
    The rest of the vocabulary is one bucket holding the remaining probability, so the KL computed from this
    is exact on the coarsened distribution and approaches the full KL as ``k`` grows."""

    logprobs: torch.Tensor
    indices: torch.Tensor
    temperature: float

    @property
    def k(self) -> int:
        return self.logprobs.shape[-1]


@torch.no_grad()
def cache_teacher_topk(teacher, windows: torch.Tensor, k: int, temperature: float = 1.0, batch_size: int = 4,
                       progress=None) -> TeacherTopK:
    """Run the teacher once over ``windows`` and keep its top-``k`` log-probabilities per position."""
    device = next(teacher.parameters()).device
    logprobs, indices = [], []
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start: start + batch_size].to(device)
        logits = teacher(batch, use_cache=False).logits.float() / temperature
        top, idx = logits.topk(k, dim=-1)
        logprobs.append((top - logits.logsumexp(-1, keepdim=True)).cpu())
        indices.append(idx.to(torch.int32).cpu())
        if progress:
            progress(f"teacher logits {min(start + batch_size, windows.shape[0])}/{windows.shape[0]} sequences")
    return TeacherTopK(torch.cat(logprobs), torch.cat(indices), temperature)


class WindowDataset(torch.utils.data.Dataset):
    """Training windows for the Trainer, with the cached teacher top-k beside each window when there is one."""

    def __init__(self, windows: torch.Tensor, teacher: TeacherTopK | None = None):
        if teacher is not None and teacher.logprobs.shape[:2] != windows.shape:
            raise ValueError(f"teacher cache {tuple(teacher.logprobs.shape[:2])} does not match the windows "
                             f"{tuple(windows.shape)}")
        self.windows, self.teacher = windows, teacher

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, i: int) -> dict:
        item = {"input_ids": self.windows[i]}
        if self.teacher is not None:
            item["teacher_logprobs"] = self.teacher.logprobs[i]
            item["teacher_indices"] = self.teacher.indices[i].long()
        return item


class StreamedWindows(torch.utils.data.IterableDataset):
    """Training windows read from a ``datasets`` stream while training runs (:func:`open_stream`): rows are
    tokenised on the fly, each followed by the end-of-text token, and the token stream is cut into ``seq_len``-token
    windows. Nothing is read ahead of what the steps consume, so the source may hold any number of tokens.

    The stream is read in order and its position is resumable: :meth:`position` gives, for a number of windows
    already trained on, the stream's state at the row that holds the next window's first token (the checkpoint
    keeps it in :data:`STREAM_POSITION`), and ``start`` begins there, so a resumed run trains on exactly the
    windows an uninterrupted one would, without reading the stream from its beginning. Each row is checked
    against the evaluation passages (``snippets``) before it is trained on."""

    def __init__(self, source: str, tokenizer, seq_len: int, *, split: str = "train", field: str = "text",
                 snippets: list[str] = (), start: dict | None = None):
        super().__init__()
        self.source, self.tokenizer, self.seq_len = source, tokenizer, seq_len
        self.split, self.field, self.snippets, self.start = split, field, list(snippets), start
        self.end_token = tokenizer.eos_token_id
        self._rows: deque = deque()  # (global index of its first token, stream state before it) of recent rows
        self._epoch_start = 0

    def __iter__(self):
        rows = open_stream(self.source, self.split)
        first, skip = self._epoch_start, 0  # the global index of the next row's first token; tokens to drop
        if self.start is not None:
            rows.load_state_dict(self.start["stream"])
            first, skip = self.start["row_first_token"], self.start["skip"]
            self.start = None  # a later epoch reads the stream from its beginning
        window_start = first + skip  # the global index of the buffer's first token: always a window boundary
        buffer: list[int] = []
        produced = False
        iterator = iter(rows)
        while True:
            state = copy.deepcopy(rows.state_dict())
            try:
                row = next(iterator)
            except StopIteration:
                break
            text = row_text(row, self.field, self.source)
            for snippet in self.snippets:
                if snippet in text:
                    raise UserError(f"the training text contains the evaluation passage '{snippet[:40].strip()}...': "
                                    "train on text that does not overlap the evaluation text")
            ids = self.tokenizer(text)["input_ids"] + ([self.end_token] if self.end_token is not None else [])
            self._rows.append((first, state))
            first += len(ids)
            buffer.extend(ids[skip:])
            skip = 0
            while len(buffer) >= self.seq_len:
                window, buffer = buffer[: self.seq_len], buffer[self.seq_len:]
                window_start += self.seq_len
                produced = True
                yield {"input_ids": torch.tensor(window, dtype=torch.long)}
        if not produced:
            raise UserError(f"the dataset '{self.source}' holds fewer tokens than one {self.seq_len}-token window")
        self._epoch_start = window_start  # the tail short of a window is dropped; the next epoch starts aligned

    def position(self, windows: int) -> dict:
        """Where the stream stands once ``windows`` windows (of every process) are trained on: the state before
        the row holding the next window's first token, and how many of that row's tokens to skip. Rows before it
        are forgotten."""
        token = windows * self.seq_len
        while len(self._rows) > 1 and self._rows[1][0] <= token:
            self._rows.popleft()
        if not self._rows or self._rows[0][0] > token:
            raise RuntimeError(f"the stream position of window {windows} was not kept")
        first, state = self._rows[0]
        return {"stream": state, "row_first_token": first, "skip": token - first, "windows": windows}


def read_stream_position(checkpoint: str | Path | None) -> dict | None:
    """The stream position a checkpoint kept (None when there is none)."""
    path = Path(checkpoint) / STREAM_POSITION if checkpoint else None
    return json.loads(path.read_text()) if path is not None and path.is_file() else None
