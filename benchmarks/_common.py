"""Shared helpers for the benchmark scripts: tables, JSON output and the dense baseline."""

from __future__ import annotations

import json
from pathlib import Path


def print_table(columns: list[str], rows: list[list]) -> None:
    """Print a Markdown table (readable in a terminal and pasteable into notes)."""
    def cell(value):
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        print("| " + " | ".join(cell(c) for c in row) + " |")


def write_json(path: str | None, data) -> None:
    if path:
        Path(path).write_text(json.dumps(data, indent=2, default=str) + "\n")
        print(f"wrote {path}")



def dense_baseline(target: str, eval_tokens: int) -> tuple:
    """The embedded SmolLM2-135M (loaded), the device profile ``target``, held-out windows of 512 tokens of the
    built-in corpus (never used for calibration), and the dense model's predicted decode (ms, at context 512) and
    perplexity on them."""
    from d2mc.data import heldout_windows, perplexity
    from d2mc.loading import load_model
    from d2mc.profiles import load_profile
    from d2mc.roofline import predict_decode_seconds

    profile = load_profile(target)
    base = load_model("smollm2-135m")
    windows = heldout_windows(base.tokenizer, window=512, max_tokens=eval_tokens)
    return base, profile, windows, predict_decode_seconds(base.arch, profile) * 1e3, perplexity(base.model, windows)
