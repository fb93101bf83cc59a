"""Sections added to every report page when their inputs exist (see EXTRA_SECTIONS)."""

from __future__ import annotations

import sys
from pathlib import Path

from launcher.report.collect import RunData
from launcher.report.page import Section
from moelab.checkpoint import read_meta

ROUTING_TOKENS_PER_DOC = 2048
"""Held-out tokens per document the routing analysis reads (per MoE run)."""


def routing(runs: list[RunData], out: Path) -> Section | None:
    """Expert specialisation of every MoE run whose run dir holds a checkpoint."""
    from moelab.analysis.routing import analyze, routing_section, write_outputs

    parts = []
    for run in runs:
        if not run.is_moe or not run.run_dir or read_meta(run.run_dir) is None:
            continue
        try:
            stats = analyze(run.run_dir, max_tokens_per_doc=ROUTING_TOKENS_PER_DOC)
        except (OSError, ValueError) as err:  # a moved or pruned run dir: note it, go on
            print(f"moelab-report: no routing for {run.label}: {err}", file=sys.stderr)
            continue
        write_outputs(stats, out / f"routing-{run.label}")
        parts.append(f"<h3>{run.label}</h3>\n{routing_section(stats)}")
    if not parts:
        return None
    return "Routing analysis (trained checkpoints, held-out plays)", "\n".join(parts)
