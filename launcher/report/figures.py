"""The report's PNGs, drawn with matplotlib's object API (Agg canvas: no pyplot state)."""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.report.collect import LOSS, RunData
from launcher.report.compare import AXES, Axis, Comparison, curve, steady

DPI = 100


@dataclass(frozen=True)
class Figure:
    """A PNG of the report and what it shows."""

    path: Path
    title: str
    caption: str


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    return [colormaps["tab10"](i % 10) for i in range(n)]


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "run"


def loss_plot(runs: list[RunData], axis: Axis, at: float | None, out: Path) -> Figure:
    """Every run's training LM loss (lines) and eval loss (markers) against one x axis."""
    fig = _figure(7, 4.2)
    ax = fig.add_subplot()
    for run, color in zip(runs, _colors(len(runs)), strict=True):
        ax.plot(*curve(run, axis.key), color=color, label=run.label)
        ex, ey = curve(run, axis.key, "eval/loss")
        ax.plot(ex, ey, "o", color=color, markersize=5, markerfacecolor="none")
    if at is not None:
        ax.axvline(at, color="grey", linestyle="--", linewidth=1, label="equal x (table)")
    ax.set_xlabel(f"{axis.title} ({axis.unit})")
    ax.set_ylabel(f"{LOSS} (lines), eval/loss (circles)")
    ax.set_title(f"loss vs {axis.title}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    path = out / f"loss_vs_{axis.key}.png"
    fig.savefig(path, dpi=DPI)
    caption = f"{LOSS} per logging window and eval/loss against {axis.title}."
    return Figure(path, f"Loss vs {axis.title}", caption)


def _bars(ax: Any, labels: list[str], values: list[float | None], fmt: str) -> None:
    shown = [v or 0.0 for v in values]
    bars = ax.bar(range(len(labels)), shown, color=_colors(len(labels)))
    ax.bar_label(bars, [("-" if v is None else fmt.format(v)) for v in values], fontsize="small")
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize="small")
    ax.grid(axis="y", alpha=0.3)


def throughput_plot(comparison: Comparison, out: Path) -> Figure:
    """Tokens/s and MFU per run, side by side."""
    fig = _figure(9, 4)
    left, right = fig.subplots(1, 2)
    rows = comparison.values
    _bars(left, comparison.labels, [r["tokens/s"] for r in rows], "{:,.0f}")
    left.set_title("training throughput (tokens/s, all ranks)")
    _bars(right, comparison.labels, [_pct(r["MFU"]) for r in rows], "{:.2f}%")
    right.set_title("MFU (% of device peak)")
    fig.tight_layout()
    path = out / "throughput.png"
    fig.savefig(path, dpi=DPI)
    caption = "Mean over logging windows, the first (start-up) left out."
    return Figure(path, "Throughput", caption)


def _pct(v: float | None) -> float | None:
    return None if v is None else 100 * v


def layer_shares(run: RunData) -> dict[int, float]:
    """Layer -> its forward all-to-all time as a share of the step time (window means)."""
    step = steady(run.history.get("perf/step_time_s", []))
    shares = {}
    for layer, series in sorted(run.layers.items()):
        a2a = steady(series.get("a2a_ms", []))
        if step and a2a is not None:
            shares[layer] = a2a / (1e3 * step)
    return shares


def a2a_plot(runs: list[RunData], out: Path) -> Figure | None:
    """Grouped bars: per MoE layer, each MoE run's forward all-to-all share of the step."""
    colors = _colors(len(runs))  # a run keeps its color from the other plots
    moe = [(r, layer_shares(r), c) for r, c in zip(runs, colors, strict=True) if r.is_moe]
    if not moe:
        return None
    layers = sorted({layer for _, s, _ in moe for layer in s})
    fig = _figure(max(6, 1.2 * len(layers) + 3), 4)
    ax = fig.add_subplot()
    width = 0.8 / len(moe)
    for i, (run, shares, color) in enumerate(moe):
        xs = [j + i * width for j in range(len(layers))]
        total = steady(run.history.get("moe/a2a_fraction", []))
        label = run.label if total is None else f"{run.label} (all layers, fwd+bwd: {total:.1%})"
        ax.bar(xs, [100 * shares.get(la, 0.0) for la in layers], width, color=color, label=label)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(layers))], [str(la) for la in layers])
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("% of step time")
    ax.set_title("forward all-to-all share of the step, per layer")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    path = out / "a2a_share_per_layer.png"
    fig.savefig(path, dpi=DPI)
    caption = (
        "moe/layer_i/a2a_ms (the layer's two forward all-to-alls, max over ranks) over "
        "perf/step_time_s; the legend gives moe/a2a_fraction (all layers, forward + backward). "
        "With ep_size 1 no all-to-all runs and the bars are 0."
    )
    return Figure(path, "All-to-all share per layer", caption)


def heatmaps(runs: list[RunData], out: Path) -> list[Figure]:
    """The runs' latest expert-load heatmaps (logged by the ranks), copied next to the page."""
    figs = []
    for run in runs:
        if run.heatmap is None:
            continue
        path = out / f"expert_load_{slug(run.label)}.png"
        shutil.copyfile(run.heatmap, path)
        caption = f"{run.label}: share of routed tokens per layer and expert ({run.heatmap.name})."
        figs.append(Figure(path, f"Expert load: {run.label}", caption))
    return figs


def missing_heatmaps(runs: list[RunData]) -> list[str]:
    """A note per MoE run that logged no heatmap (telemetry.heatmap_every > its steps)."""
    return [
        f"{r.label}: no expert-load heatmap was logged (one is drawn every "
        "telemetry.heatmap_every steps; the run was shorter)."
        for r in runs
        if r.is_moe and r.heatmap is None
    ]


def draw_all(runs: list[RunData], comparison: Comparison, out: Path) -> list[Figure]:
    figs = [loss_plot(runs, a, comparison.at[a.key], out) for a in AXES]
    figs.append(throughput_plot(comparison, out))
    a2a = a2a_plot(runs, out)
    return figs + ([a2a] if a2a else []) + heatmaps(runs, out)
