"""Helpers the run report and the sweep report share: table cells, Markdown and HTML
tables, and the page writer (report.html + report.md)."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from longtrain.run_files import GateRecord

REPORT_HTML = "report.html"
REPORT_MD = "report.md"

Table = tuple[list[str], list[list[str]]]


def number_cell(value: Optional[float], digits: int = 2) -> str:
    """A table cell: the number to ``digits`` decimals, or – for none."""
    return "–" if value is None else f"{value:.{digits}f}"


def short_loss_cell(gate: Optional[GateRecord]) -> str:
    if gate is None:
        return ""
    limit = gate.short_loss_limit()
    if limit is None:
        return number_cell(gate.short_loss, 3)
    return f"{number_cell(gate.short_loss, 3)} {'≤' if gate.short_loss <= limit else '>'} {number_cell(limit, 3)}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


CSS = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1300px; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 14px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; white-space: nowrap; }
th { background: #f2f2f2; white-space: normal; max-width: 9em; } td:first-child, th:first-child { text-align: left; }
td.fail, td.pass, td.open { white-space: normal; max-width: 14em; text-align: left; }
td.fail { background: #fbe3e3; } td.pass { background: #e5f5e5; } td.open { background: #fff5d6; }
img { max-width: 100%; display: block; margin: 0.3em 0 1.5em; }
.meta { color: #666; }
"""


def html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def cell(text: str) -> str:
        kind = "fail" if "FAIL" in text or text == "gate failed" else "pass" if text.startswith("pass") else (
            "open" if text.startswith(("not ", "stopped")) else "")
        return f"<td class=\"{kind}\">{html.escape(text)}</td>" if kind else f"<td>{html.escape(text)}</td>"

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(c) for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


@dataclass
class Written:
    html: Path
    md: Path
    figures: dict[str, Path]  # name (file stem) -> PNG file
    tables: dict[str, Table] = field(default_factory=dict)


def write_page(out: Path, title: str, meta: str, blocks: list[tuple[str, Any]], md_text: Optional[str] = None) -> Written:
    """report.html and report.md (``md_text``, or made from the blocks) from blocks: ("p", text),
    ("h2", text), ("table", Table), ("img", (caption, path)), ("html", markup for the page only)."""
    page = [f"<h1>{html.escape(title)}</h1>", f"<p class=\"meta\">{html.escape(meta)}</p>"]
    md = [f"# {title}", "", meta, ""]
    figures = {}
    for kind, value in blocks:
        if kind == "table":
            page.append(html_table(*value))
            md += [markdown_table(*value), ""]
        elif kind == "img":
            caption, path = value
            figures[path.stem] = path
            page.append(f"<img alt=\"{html.escape(caption)}\" src=\"{_data_uri(path)}\">")
            md += [f"![{caption}]({path.relative_to(out).as_posix()})", ""]
        elif kind == "html":
            page.append(value)
        else:
            page.append(f"<{kind}>{html.escape(value)}</{kind}>")
            md += [("## " if kind == "h2" else "") + value, ""]
    document = ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                f"<title>{html.escape(title)}</title><style>{CSS}</style></head>\n<body>\n" + "\n".join(page) + "\n</body></html>\n")
    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT_HTML).write_text(document)
    (out / REPORT_MD).write_text(md_text or "\n".join(md).rstrip() + "\n")
    return Written(out / REPORT_HTML, out / REPORT_MD, figures)


