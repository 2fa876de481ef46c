"""The compile report: ``report.json`` for scripts and ``report.md`` for people, from one dictionary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_report(report: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.md`` into ``out_dir``; return their paths."""
    json_path = out_dir / "report.json"
    md_path = out_dir / "report.md"
    json_path.write_text(json.dumps(report, indent=2, default=_jsonable) + "\n")
    md_path.write_text(render_markdown(report))
    return json_path, md_path


def _jsonable(value):
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if hasattr(value, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(value)
    return str(value)


def markdown_table(columns: list[str], rows: list[list[Any]]) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def render_markdown(report: dict[str, Any]) -> str:
    """Each section of the report is a title and either a paragraph, a table (columns + rows) or key/values."""
    parts = [f"# {report.get('title', 'd2mc report')}\n"]
    for section in report.get("sections", []):
        parts.append(f"\n## {section['title']}\n")
        if section.get("text"):
            parts.append(section["text"].rstrip() + "\n")
        if section.get("columns"):
            parts.append("\n" + markdown_table(section["columns"], section["rows"]))
        if section.get("values"):
            parts.append("\n" + markdown_table(["", ""], [[k, v] for k, v in section["values"].items()]))
        if section.get("image"):
            parts.append(f"\n![{section['title']}]({section['image']})\n")
    return "".join(parts)
