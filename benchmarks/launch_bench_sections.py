"""The sections of launch_bench.py: each turns the measured launches into a table and a record.

variants  measured throughput ratios beside the FLOPs-predicted and the seed report's
overhead  moelab-launch against the plain DeepSpeed script
scaling   1 vs 2 ranks, ep_size 1 vs 2
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from benchlib import format_table, median_ratio, paired_ratios, verdict

SEED_RATIOS = {"moe": 1.9, "hybrid": 1.5}
FIRST_STEP_SLACK_S = 2.0
STEADY_SLACK = 0.03
MIN_OF_PREDICTED = 0.8


@dataclass
class Measure:
    """One launch: steady seconds per step, seconds to the end of step 1, tokens per step."""

    steady_s: float
    first_step_s: float
    total_s: float
    tokens_per_step: int
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.steady_s


def tps(r: dict[str, list[Measure]], name: str) -> list[float]:
    return [m.tokens_per_s for m in r[name]]


def steady(r: dict[str, list[Measure]], name: str) -> list[float]:
    return [m.steady_s for m in r[name]]


def variants_section(
    r: dict[str, list[Measure]], predict: Callable[[str, str], float]
) -> tuple[str, dict[str, Any]]:
    """Measured throughput ratios; `predict(num, den)` gives the FLOPs-predicted one."""
    rows, out = [], {}
    pairs = [
        ("moe", "dense", SEED_RATIOS["moe"]),
        ("hybrid", "dense", SEED_RATIOS["hybrid"]),
        ("moe_autoep", "dense", SEED_RATIOS["moe"]),
        ("hybrid_autoep", "dense", SEED_RATIOS["hybrid"]),
        ("moe_autoep", "moe", None),
        ("hybrid_autoep", "hybrid", None),
        ("moe_top1", "moe", None),
        ("moe_freq2", "moe", None),
    ]
    for num, den, seed in pairs:
        if num not in r or den not in r:
            continue
        measured = median_ratio(tps(r, num), tps(r, den))
        predicted = predict(num, den)
        share = measured / predicted
        rows.append(
            [
                f"{num}/{den}",
                statistics.median(tps(r, num)),
                statistics.median(tps(r, den)),
                measured,
                predicted,
                share,
                seed if seed else "-",
                verdict(share, MIN_OF_PREDICTED),
            ]
        )
        out[f"{num}/{den}"] = {
            "measured": measured,
            "predicted": predicted,
            "of_predicted": share,
            "seed": seed,
            "num_tokens_per_s": tps(r, num),
            "den_tokens_per_s": tps(r, den),
        }
    variants = ("dense", "moe", "hybrid", "moe_autoep", "hybrid_autoep", "moe_top1", "moe_freq2")
    names = [n for n in variants if n in r]
    extra = {n: [m.extra for m in r[n]] for n in names}
    tel_rows = [
        [n, statistics.median(tps(r, n))]
        + [
            _median_extra(r[n], key)
            for key in ("perf/tokens_per_s", "perf/mfu", "moe/a2a_fraction")
        ]
        for n in names
    ]
    tel = format_table(
        ["variant", "tok/s (wall)", "tok/s (telemetry)", "MFU", "a2a fraction"], tel_rows
    )
    head = [
        "ratio",
        "tok/s num",
        "tok/s den",
        "measured",
        "FLOPs-predicted",
        "measured/pred",
        "seed report",
        "target >= 0.8",
    ]
    table = format_table(head, rows) + "\n\n" + tel
    return table, {"ratios": out, "telemetry": extra}


def _median_extra(ms: list[Measure], key: str) -> float:
    values = [m.extra[key] for m in ms if key in m.extra]
    return statistics.median(values) if values else float("nan")


def overhead_section(r: dict[str, list[Measure]]) -> tuple[str, dict[str, Any]]:
    m, b = r["moe"], r["baseline"]
    steady_ratio = median_ratio(steady(r, "moe"), steady(r, "baseline"))
    first_delta = median_delta(m, b, "first_step_s")
    total_delta = median_delta(m, b, "total_s")
    rows = [
        [
            "steady step time (s)",
            statistics.median(steady(r, "moe")),
            statistics.median(steady(r, "baseline")),
            f"x{steady_ratio:.3f}",
            verdict(steady_ratio, 1 + STEADY_SLACK, higher_is_better=False),
        ],
        [
            "time to first step (s)",
            statistics.median(x.first_step_s for x in m),
            statistics.median(x.first_step_s for x in b),
            f"{first_delta:+.2f} s",
            verdict(first_delta, FIRST_STEP_SLACK_S, higher_is_better=False),
        ],
        [
            "whole command (s)",
            statistics.median(x.total_s for x in m),
            statistics.median(x.total_s for x in b),
            f"{total_delta:+.2f} s",
            "-",
        ],
    ]
    out: dict[str, Any] = {
        "steady_ratio": steady_ratio,
        "steady_ratios": paired_ratios(steady(r, "moe"), steady(r, "baseline")),
        "first_step_delta_s": first_delta,
        "total_delta_s": total_delta,
        "moelab": [dataclasses.asdict(x) for x in m],
        "baseline": [dataclasses.asdict(x) for x in b],
    }
    if "baseline_again" in r:
        rows += control_rows(r, out)
    table = format_table(["", "moelab-launch", "plain DeepSpeed", "difference", "target"], rows)
    return table, out


def paired_deltas(a: list[Measure], b: list[Measure], key: str) -> list[float]:
    """a[i].key - b[i].key for each round i (both measured in the same round)."""
    return [getattr(x, key) - getattr(y, key) for x, y in zip(a, b, strict=True)]


def median_delta(a: list[Measure], b: list[Measure], key: str) -> float:
    """Median over rounds of a[i].key - b[i].key."""
    return statistics.median(paired_deltas(a, b, key))


def control_rows(r: dict[str, list[Measure]], out: dict[str, Any]) -> list[list[Any]]:
    """The A/A rows: the plain script against itself, measured as moelab is against it. A
    moelab difference inside their spread is not resolved by this many rounds."""
    again, b = r["baseline_again"], r["baseline"]
    ratios = paired_ratios(steady(r, "baseline_again"), steady(r, "baseline"))
    deltas = paired_deltas(again, b, "first_step_s")
    out |= {
        "aa_steady_ratio": statistics.median(ratios),
        "aa_steady_ratios": ratios,
        "aa_first_step_delta_s": statistics.median(deltas),
        "aa_first_step_deltas_s": deltas,
        "baseline_again": [dataclasses.asdict(x) for x in again],
    }
    spread = f"rounds {min(ratios):.3f}-{max(ratios):.3f}"
    return [
        [
            "A/A: steady step, plain again (s)",
            "-",
            statistics.median(steady(r, "baseline_again")),
            f"x{statistics.median(ratios):.3f}",
            spread,
        ],
        [
            "A/A: first step, plain again (s)",
            "-",
            statistics.median(x.first_step_s for x in again),
            f"{statistics.median(deltas):+.2f} s",
            f"rounds {min(deltas):+.1f} to {max(deltas):+.1f} s",
        ],
    ]


def scaling_section(r: dict[str, list[Measure]]) -> tuple[str, dict[str, Any]]:
    rows, out = [], {}
    comparisons = [
        ("2 ranks vs 1 (ep 1), tokens/s", "moe_ep1", "moe_1rank", tps),
        ("ep_size 2 vs 1 (2 ranks), tokens/s", "moe", "moe_ep1", tps),
    ]
    for label, num, den, metric in comparisons:
        ratio = median_ratio(metric(r, num), metric(r, den))
        rows.append(
            [label, statistics.median(metric(r, num)), statistics.median(metric(r, den)), ratio]
        )
        out[f"{num}/{den}"] = {"ratio": ratio, "num": metric(r, num), "den": metric(r, den)}
    return format_table(["comparison", "A", "B", "A/B"], rows), out


SECTIONS: dict[str, Callable[..., tuple[str, dict[str, Any]]]] = {
    "variants": variants_section,
    "overhead": overhead_section,
    "scaling": scaling_section,
}
