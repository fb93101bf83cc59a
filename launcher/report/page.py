"""The report as one self-contained HTML file (every image embedded as a data URI)."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path

from launcher.report.collect import LOSS, Selection
from launcher.report.compare import COLUMNS, STEADY_NOTE, Comparison, cells, describe_x, headers
from launcher.report.figures import Figure

Section = tuple[str, str]
"""An extra part of the page: (title, HTML body). See launcher.report.EXTRA_SECTIONS."""

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
th { background: #f3f3f3; } td:first-child { text-align: left; font-weight: 600; }
figure { margin: 1.5em 0; } img { max-width: 100%; border: 1px solid #eee; }
figcaption, .note { color: #555; font-size: 0.9em; }
"""


def data_uri(png: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")


def table_html(comparison: Comparison) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers())
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
        for row in cells(comparison)
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def notes_html(comparison: Comparison) -> str:
    items = "".join(
        f"<li><b>{html.escape(c.header)}</b>: {html.escape(c.note)}</li>" for c in COLUMNS
    )
    at = "".join(f"<li>{html.escape(line)}</li>" for line in describe_x(comparison))
    return (
        "<p class='note'>'-' = not measured for that run (a dense model has no MoE figures, "
        "a one-rank run no straggler figures) "
        "or, in a loss@ column, the run's first logged point lies past the common x (e.g. its "
        f"first window took longer than another run's whole training); {STEADY_NOTE}.</p>"
        f"<ul class='note'>{items}</ul>"
        f"<p class='note'><b>Equal x.</b> Each run's {LOSS} curve (one point per logging window) "
        "is interpolated linearly at the largest x that <i>all</i> runs reached, the smallest "
        "of their last x; nothing is extrapolated. Wall-clock is training time: the sum of the "
        "windows' step times (start-up and evaluation excluded); FLOPs are model FLOPs "
        "(active experts only, forward + backward). The x values:</p>"
        f"<ul class='note'>{at}</ul>"
    )


def figure_html(fig: Figure) -> str:
    return (
        f"<figure><img alt='{html.escape(fig.title)}' src='{data_uri(fig.path)}'>"
        f"<figcaption><b>{html.escape(fig.title)}</b> ({html.escape(fig.path.name)}). "
        f"{html.escape(fig.caption)}</figcaption></figure>"
    )


def source_html(selection: Selection) -> str:
    parent = selection.parent
    origin = (
        f"sweep parent run <code>{html.escape(parent.info.run_id)}</code> "
        f"({html.escape(parent.info.run_name or '')})"
        if parent is not None
        else "the latest finished run of each variant"
    )
    runs = ", ".join(f"<code>{html.escape(r.info.run_id)}</code>" for r in selection.runs)
    skipped = "".join(
        f"<li>{html.escape(r.info.run_name or r.info.run_id)}: {html.escape(r.info.status)}</li>"
        for r in selection.skipped
    )
    left_out = f"<p class='note'>Left out (not finished):</p><ul>{skipped}</ul>" if skipped else ""
    return (
        f"<p>Experiment <b>{html.escape(selection.experiment)}</b>, {origin}. "
        f"Runs: {runs}.</p>{left_out}"
    )


def render(
    selection: Selection,
    comparison: Comparison,
    figures: Sequence[Figure],
    sections: Sequence[Section] = (),
    notes: Sequence[str] = (),
) -> str:
    title = f"moelab report: {selection.experiment}"
    parts = [
        f"<h1>{html.escape(title)}</h1>",
        source_html(selection),
        "<h2>Per variant</h2>",
        table_html(comparison),
        notes_html(comparison),
        "<h2>Plots</h2>",
        *(figure_html(f) for f in figures),
        *(f"<p class='note'>{html.escape(n)}</p>" for n in notes),
        *(f"<h2>{html.escape(t)}</h2>{body}" for t, body in sections),
    ]
    return (
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>"
        f"<body>{''.join(parts)}</body></html>\n"
    )
