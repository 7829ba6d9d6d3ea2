"""Markdown and self-contained HTML from one list of `Section`s, so the two can never disagree."""

from __future__ import annotations

import base64
import html
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from xctsam.report.tables import markdown_table

CSS = """
body { font-family: system-ui, sans-serif; max-width: 70em; margin: 2em auto; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f0f0f0; }
img { max-width: 100%; margin: 0.5em 0; }
.note { color: #666; font-style: italic; }
"""


@dataclass
class Section:
    """One report section: a title, an optional note, an optional table and images."""

    title: str
    note: str = ""
    table: pd.DataFrame | None = None
    images: list[Path] = field(default_factory=list)


def render_markdown(sections: Sequence[Section], out_dir: Path) -> str:
    parts = ["# Study report\n"]
    for section in sections:
        parts.append(f"## {section.title}\n")
        if section.note:
            parts.append(f"_{section.note}_\n")
        if section.table is not None:
            parts.append(markdown_table(section.table) + "\n")
        # relative links: the report folder can be moved or served as a whole
        parts.extend(f"![{image.stem}]({Path(os.path.relpath(image, out_dir)).as_posix()})\n" for image in section.images)
    return "\n".join(parts)


def data_uri(png: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(png).read_bytes()).decode("ascii")


def render_html(sections: Sequence[Section]) -> str:
    body = []
    for section in sections:
        body.append(f"<h2>{html.escape(section.title)}</h2>")
        if section.note:
            body.append(f'<p class="note">{html.escape(section.note)}</p>')
        if section.table is not None:
            body.append(section.table.to_html(float_format=lambda value: f"{value:.3f}", na_rep="–"))
        body.extend(f'<img alt="{html.escape(image.stem)}" src="{data_uri(image)}">' for image in section.images)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>xctsam study report</title>'
        f"<style>{CSS}</style></head><body><h1>Study report</h1>\n" + "\n".join(body) + "\n</body></html>\n"
    )
