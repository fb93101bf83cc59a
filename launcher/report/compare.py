"""The comparison: loss curves on three x axes, losses at equal x, one table row per run."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from launcher.report.collect import LOSS, RunData, Series


@dataclass(frozen=True)
class Axis:
    """An x axis the loss curves are compared on."""

    key: str
    title: str
    unit: str


AXES = (
    Axis("tokens", "training tokens", "tokens"),
    Axis("wall", "training wall-clock", "s"),
    Axis("flops", "training model FLOPs", "FLOP"),
)


def train_seconds(run: RunData) -> Callable[[float], float]:
    """Step -> cumulative training wall time (s): each logging window's step time x its steps.

    perf/step_time_s is the mean optimizer-step time of the window (max over ranks); start-up,
    evaluation and checkpointing are not in it.
    """
    windows = run.history.get("perf/step_time_s", [])
    steps = [0.0] + [float(s) for s, _ in windows]
    elapsed = [0.0]
    for (s, t), prev in zip(windows, steps, strict=False):
        elapsed.append(elapsed[-1] + t * (s - prev))
    return lambda step: float(np.interp(step, steps, elapsed))


def curve(run: RunData, axis: str, key: str = LOSS) -> tuple[list[float], list[float]]:
    """(x, loss) of a run on `axis` (tokens | wall | flops)."""
    points = run.history.get(key, [])
    to_x: Callable[[float], float]
    if axis == "tokens":
        to_x = lambda s: s * run.tokens_per_step  # noqa: E731
    elif axis == "flops":
        to_x = lambda s: s * run.tokens_per_step * run.train_flops_per_token  # noqa: E731
    else:
        to_x = train_seconds(run)
    return [to_x(s) for s, _ in points], [v for _, v in points]


def common_x(curves: Sequence[tuple[Sequence[float], Sequence[float]]]) -> float | None:
    """The largest x every curve reached (the smallest of their last x); None if one is empty."""
    ends = [max(xs) for xs, _ in curves if len(xs)]
    return min(ends) if ends and len(ends) == len(curves) else None


def value_at(xs: Sequence[float], ys: Sequence[float], x: float) -> float | None:
    """Linear interpolation of the curve at x; None outside the curve's range (no extrapolation)."""
    if not len(xs) or x < xs[0] or x > xs[-1]:
        return None
    return float(np.interp(x, xs, ys))


def equal_x(
    curves: Sequence[tuple[Sequence[float], Sequence[float]]],
) -> tuple[float | None, list[float | None]]:
    """Every curve's value at the largest x that all of them reached."""
    x = common_x(curves)
    if x is None:
        return None, [None] * len(curves)
    return x, [value_at(xs, ys, x) for xs, ys in curves]


def steady(series: Series) -> float | None:
    """Mean over the logging windows, the first (start-up, compilation) left out when possible."""
    values = [v for _, v in series][1:] or [v for _, v in series]
    return statistics.fmean(values) if values else None


def last(series: Series) -> float | None:
    return series[-1][1] if series else None


def layer_mean(run: RunData, key: str, reduce: Callable[[Series], float | None]) -> float | None:
    """`reduce` of each MoE layer's series, averaged over layers (None for a dense run)."""
    values = [v for s in run.layers.values() if (v := reduce(s.get(key, []))) is not None]
    return statistics.fmean(values) if values else None


def mean_all(series: Series) -> float | None:
    return statistics.fmean(v for _, v in series) if series else None


def max_all(series: Series) -> float | None:
    return max(v for _, v in series) if series else None


def most_often(series: Series) -> float | None:
    """The value logged in the most windows (the lowest on a tie): the usual slowest rank."""
    values = [v for _, v in series]
    return min(set(values), key=lambda v: (-values.count(v), v)) if values else None


@dataclass(frozen=True)
class Column:
    """A table column: header, how it is shown, what it means (the page's notes)."""

    header: str
    fmt: Callable[[float], str]
    note: str


def _si(n: float) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{suffix}"
    return f"{n:.3g}"


COLUMNS = (
    Column("params", _si, "total parameters (tag params_total)"),
    Column("active", _si, "parameters one token goes through (top_k experts; params_active)"),
    Column("tokens/s", "{:,.0f}".format, "perf/tokens_per_s, all ranks, mean of the windows"),
    Column("TFLOP/s/dev", "{:.3g}".format, "perf/tflops_per_device, model FLOPs, mean"),
    Column("MFU", "{:.2%}".format, "perf/mfu: TFLOP/s per device over the device peak, mean"),
    Column("eval loss", "{:.3f}".format, "final eval/loss on the held-out split"),
    Column("loss@tokens", "{:.3f}".format, f"{LOSS} at equal training tokens (see x below)"),
    Column("loss@wall", "{:.3f}".format, f"{LOSS} at equal training wall-clock"),
    Column("loss@FLOPs", "{:.3f}".format, f"{LOSS} at equal training model FLOPs"),
    Column("a2a %", "{:.1%}".format, "moe/a2a_fraction: all-to-all share of step time, mean"),
    Column("load CV", "{:.3f}".format, "moe/layer_i/load_cv, last window, mean over layers"),
    Column("dropped", "{:.2%}".format, "moe/layer_i/drop_fraction, mean over windows and layers"),
    Column("slowest rank", "{:.0f}".format, "perf/slowest_rank in the most windows (1 rank: -)"),
    Column("lag max", "{:.0%}".format, "perf/straggler_lag: slowest rank over median, max"),
    Column("lag mean", "{:.0%}".format, "perf/straggler_lag, mean over all windows"),
)
STEADY_NOTE = "means over logging windows leave out the first one (start-up)"


@dataclass
class Comparison:
    """Table values (None = not measured, shown '-') and the common x of each axis."""

    labels: list[str]
    values: list[dict[str, float | None]]
    at: dict[str, float | None]
    """Axis key -> the x the 'loss@' columns are read at."""
    impls: list[str] = field(default_factory=list)
    """Each run's MoE implementation (tag moe_impl: classic, autoep; '-' for dense)."""


def _row(run: RunData) -> dict[str, float | None]:
    h = run.history

    def tag(key: str) -> float | None:
        return float(run.tags[key]) if key in run.tags else None

    return {
        "params": tag("params_total"),
        "active": tag("params_active"),
        "tokens/s": steady(h.get("perf/tokens_per_s", [])),
        "TFLOP/s/dev": steady(h.get("perf/tflops_per_device", [])),
        "MFU": steady(h.get("perf/mfu", [])),
        "eval loss": last(h.get("eval/loss", [])),
        "a2a %": steady(h.get("moe/a2a_fraction", [])) if run.is_moe else None,
        "load CV": layer_mean(run, "load_cv", last),
        "dropped": layer_mean(run, "drop_fraction", mean_all),
        "slowest rank": most_often(h.get("perf/slowest_rank", [])),
        "lag max": max_all(h.get("perf/straggler_lag", [])),
        "lag mean": mean_all(h.get("perf/straggler_lag", [])),
    }


def build_comparison(runs: list[RunData]) -> Comparison:
    rows = [_row(r) for r in runs]
    at: dict[str, float | None] = {}
    for axis, col in zip(AXES, ("loss@tokens", "loss@wall", "loss@FLOPs"), strict=True):
        at[axis.key], losses = equal_x([curve(r, axis.key) for r in runs])
        for row, loss in zip(rows, losses, strict=True):
            row[col] = loss
    impls = [r.tags.get("moe_impl", "-") for r in runs]
    return Comparison([r.label for r in runs], rows, at, impls)


def cells(comparison: Comparison) -> list[list[str]]:
    """The table as strings: '-' where a value does not apply (dense: no MoE figures)."""
    out = []
    impls = comparison.impls or ["-"] * len(comparison.labels)
    for label, impl, row in zip(comparison.labels, impls, comparison.values, strict=True):
        shown = [label, impl]
        for col in COLUMNS:
            v = row.get(col.header)
            shown.append("-" if v is None or math.isnan(v) else col.fmt(v))
        out.append(shown)
    return out


def headers() -> tuple[str, ...]:
    return ("variant", "impl", *(c.header for c in COLUMNS))


def describe_x(comparison: Comparison) -> list[str]:
    """One line per axis: the x at which every run's loss was read."""
    fmt = {"tokens": "{:,.0f} tokens", "wall": "{:.1f} s", "flops": "{:.3g} FLOP"}
    return [
        f"{a.title}: " + ("-" if x is None else fmt[a.key].format(x))
        for a in AXES
        for x in [comparison.at[a.key]]
    ]
