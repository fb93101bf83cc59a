"""moelab-report: compare the runs of a sweep in one HTML page, PNGs and a terminal table.

    moelab-report --experiment demo          # the experiment's latest sweep
    moelab-report --parent-run <run id>      # one sweep, by its parent run
    moelab-report ... --out DIR --tracking-uri URI --no-log

The page (report.html, images embedded) and the PNGs go to --out (default
runs/<experiment>/report/<sweep name>/) and, for a sweep, to the parent run's artifacts
under report/.

Extra sections: append a function to EXTRA_SECTIONS; it gets the runs read from MLflow and the
output folder, and returns a (title, html) section or None. They follow the plots in order.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.report import sections
from launcher.report.collect import RunData, Selection, read_runs, select_experiment, select_parent
from launcher.report.compare import Comparison, build_comparison, cells, describe_x, headers
from launcher.report.figures import Figure, draw_all, missing_heatmaps
from launcher.report.page import Section, render

PAGE = "report.html"
ARTIFACT_DIR = "report"

SectionHook = Callable[[list[RunData], Path], Section | None]
EXTRA_SECTIONS: list[SectionHook] = [sections.routing]
"""Hooks for further sections (e.g. routing analysis, an aux-loss table): see the docstring."""


@dataclass
class Report:
    """What one report run produced."""

    selection: Selection
    runs: list[RunData]
    comparison: Comparison
    figures: list[Figure]
    page: Path


def default_out(selection: Selection, runs_root: Path = Path("runs")) -> Path:
    name = selection.parent.info.run_name if selection.parent is not None else "latest"
    return runs_root / selection.experiment / "report" / name


def build_report(
    client: Any, selection: Selection, out: Path, sections: Sequence[Section] = ()
) -> Report:
    """Read the runs, draw the PNGs and write the page into `out` (created)."""
    out.mkdir(parents=True, exist_ok=True)
    runs = read_runs(client, selection)
    comparison = build_comparison(runs)
    figures = draw_all(runs, comparison, out)
    hooked = [s for hook in EXTRA_SECTIONS if (s := hook(runs, out)) is not None]
    page = out / PAGE
    notes = missing_heatmaps(runs)
    page.write_text(render(selection, comparison, figures, [*sections, *hooked], notes))
    return Report(selection, runs, comparison, figures, page)


def terminal_table(comparison: Comparison) -> str:
    from launcher.summary import format_table

    lines = [
        format_table(cells(comparison), headers()),
        "'-': not measured (dense: no MoE figures; one rank: no straggler figures), or the "
        "run's loss curve starts past that x",
        "",
        "losses read at equal x:",
    ]
    return "\n".join(lines + [f"  {line}" for line in describe_x(comparison)])


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="moelab-report", description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--experiment", help="report the latest sweep of this MLflow experiment")
    which.add_argument("--parent-run", help="report the child runs of this sweep parent run")
    parser.add_argument("--out", type=Path, help="output folder (default runs/<exp>/report/...)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default as moelab-launch)")
    parser.add_argument(
        "--no-log", action="store_true", help="do not log the report to the parent run"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from launcher.tracking import absolute_uri, mlflow_client

    args = parse(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar: ours
    client = mlflow_client(absolute_uri(args.tracking_uri))
    try:
        if args.parent_run:
            selection = select_parent(client, args.parent_run)
        else:
            selection = select_experiment(client, args.experiment)
    except ValueError as err:
        print(f"moelab-report: error: {err}", file=sys.stderr)
        return 2
    report = build_report(client, selection, args.out or default_out(selection))
    print(terminal_table(report.comparison))
    print(f"\nreport: {report.page.resolve()}")
    if selection.parent is not None and not args.no_log:
        client.log_artifacts(selection.parent.info.run_id, str(report.page.parent), ARTIFACT_DIR)
        print(f"logged to parent run {selection.parent.info.run_id} under {ARTIFACT_DIR}/")
    return 0
