"""The grid and tables of moe_layer.py: which cells run, and the per-cell, side-by-side and
experts tables made from their records (pure functions of the cells).

A cell is (tokens, experts, top_k, variant), variant one of ("classic", True) (capacity
factor 1.25, overflow dropped), ("classic", False) (capacity raised to the fullest expert) and
("autoep", None) (dropless).
"""

from __future__ import annotations

import statistics
from typing import Any

from benchlib import format_table, verdict

AUTOEP_TARGET = 1.15
"""AutoEP layer / equal-active-FLOPs dense, fwd+bwd time: target at most this."""
IMPLS = ("classic", "autoep")
QUICK_FROM_TOKENS = 16384

Variant = tuple[str, "bool | None"]
Cell = tuple[int, int, int, Variant]


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def variants(impls: str, drops: str) -> list[Variant]:
    """(impl, drop_tokens) pairs: classic once per drop setting, autoep (dropless) once."""
    names = [v for v in impls.split(",") if v]
    bad = [v for v in names if v not in IMPLS]
    if bad:
        raise ValueError(f"--impls {','.join(bad)}: expected a comma list of {', '.join(IMPLS)}")
    drop_values = {"on": True, "off": False}
    if any(d not in drop_values for d in drops.split(",")):
        raise ValueError(f"--drop {drops}: expected a comma list of on, off")
    out: list[Variant] = []
    for impl in names:
        if impl == "autoep":
            out.append(("autoep", None))
        else:
            out += [("classic", drop_values[d]) for d in drops.split(",")]
    return out


def grid(tokens: str, experts: str, top_k: str, vs: list[Variant], quick: bool) -> list[Cell]:
    """Every (tokens, experts, top_k, variant); `quick` keeps only top-2, with classic drop on
    and autoep, from QUICK_FROM_TOKENS tokens up."""
    return [
        (t, e, k, v)
        for t in ints(tokens)
        for e in ints(experts)
        for k in ints(top_k)
        for v in vs
        if not (quick and t >= QUICK_FROM_TOKENS and (k != 2 or v[1] is False))
    ]


def variant_label(impl: str, drop: bool | None) -> str:
    return "autoep" if impl == "autoep" else f"classic drop {'on' if drop else 'off'}"


def impl_table(cells: list[dict[str, Any]]) -> str:
    """Per (tokens, experts, top_k): the layer/dense time ratio of each variant side by side,
    autoep against classic (drop on), and autoep against its target."""
    by_key: dict[tuple[int, int, int], dict[str, dict[str, Any]]] = {}
    for c in cells:
        key = (c["tokens"], c["experts"], c["top_k"])
        by_key.setdefault(key, {})[variant_label(c["impl"], c["drop_tokens"])] = c
    labels = ("classic drop on", "classic drop off", "autoep")
    rows = []
    for (t, e, k), got in sorted(by_key.items()):
        ratios = [got[lb]["time_ratio"] if lb in got else float("nan") for lb in labels]
        auto, classic = got.get("autoep"), got.get("classic drop on")
        vs_classic = (
            statistics.median(auto["moe_s"]) / statistics.median(classic["moe_s"])
            if auto and classic
            else float("nan")
        )
        target = verdict(ratios[2], AUTOEP_TARGET, higher_is_better=False)
        rows.append([t, e, k, *ratios, vs_classic, target])
    head = ["tokens", "experts", "top_k", *(f"{lb} / dense" for lb in labels)]
    head += ["autoep / classic on", f"autoep <= {AUTOEP_TARGET}"]
    return format_table(head, rows)


def expert_scaling(cells: list[dict[str, Any]]) -> str:
    """MoE time at each expert count relative to the fewest, per (impl, tokens, top-k, drop):
    the token count is fixed, so the expert FLOPs are too; growth is per-expert overhead."""
    groups: dict[tuple[str, int, int, str], dict[int, float]] = {}
    for c in cells:
        impl, drop = c.get("impl", "classic"), c["drop_tokens"]
        key = (impl, c["tokens"], c["top_k"], "-" if drop is None else ("on" if drop else "off"))
        groups.setdefault(key, {})[c["experts"]] = statistics.median(c["moe_s"])
    counts = sorted({c["experts"] for c in cells})
    rows = []
    for (impl, tokens, k, drop), by_e in sorted(groups.items()):
        if len(by_e) < 2:
            continue
        base = by_e[min(by_e)]
        cols = [f"x{by_e[e] / base:.2f}" if e in by_e else "-" for e in counts]
        rows.append([impl, tokens, k, drop, base * 1e3, *cols])
    head = ["impl", "tokens", "top_k", "drop", f"ms at {counts[0]} experts"]
    return format_table(head + [f"{e}" for e in counts], rows)


def classic_profile_line(p: dict[str, Any]) -> str:
    """One table cell for a classic profile: the forward's split and the top operators."""
    ph = p["phases_ms"]
    fwd = ph.get("forward", 0.0) or 1.0
    parts = ", ".join(
        f"{k} {100 * ph.get(k, 0.0) / fwd:.0f}%" for k in ("gate", "dispatch", "experts", "combine")
    )
    ops = ", ".join(f"{name} {ms:.0f} ms" for name, ms in p["top_ops_self_ms"][:3])
    fwd_ms, bwd_ms = ph.get("forward", 0.0), ph.get("backward", 0.0)
    return f"fwd {fwd_ms:.0f} ms ({parts}; a2a 0), bwd {bwd_ms:.0f} ms; top ops: {ops}"
