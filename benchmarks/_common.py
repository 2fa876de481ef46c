"""Shared helpers for the benchmark scripts: tables and JSON output."""

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
