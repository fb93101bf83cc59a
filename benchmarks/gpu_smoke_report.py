"""The GPU smoke test's report: its JSON schema, the summary of the checks, the printed tables."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchlib import format_table
from gpu_smoke_checks import FAIL, NA_CPU, SKIPPED, STATUSES

SCHEMA = "moelab.gpu_smoke/1"


def summarize(checks: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Counts by status; ok when nothing failed and nothing was skipped."""
    counts = {s: sum(1 for c in checks if c["status"] == s) for s in STATUSES}
    return {**counts, "checks": len(checks), "ok": counts[FAIL] == 0 and counts[SKIPPED] == 0}


REPORT_KEYS = {
    "schema": str,
    "time": str,
    "device": str,
    "device_name": str,
    "machine": dict,
    "settings": dict,
    "elapsed_s": float,
    "runs": list,
    "checks": list,
    "skipped": list,
    "summary": dict,
}
CHECK_KEYS = {"name": str, "status": str, "value": object, "target": str, "detail": str}


def validate_report(report: dict[str, Any]) -> list[str]:
    """Problems with a report's shape (empty when it follows the schema)."""
    problems = [
        f"{k}: missing or not {t.__name__}"
        for k, t in REPORT_KEYS.items()
        if not isinstance(report.get(k), t)
    ]
    if report.get("schema") not in (None, SCHEMA):
        problems.append(f"schema {report.get('schema')!r} is not {SCHEMA}")
    for i, check in enumerate(report.get("checks") or []):
        problems += [
            f"checks[{i}].{k}: missing or not {t.__name__}"
            for k, t in CHECK_KEYS.items()
            if not isinstance(check.get(k), t) or (t is object and k not in check)
        ]
        if check.get("status") not in STATUSES:
            problems.append(f"checks[{i}].status {check.get('status')!r} unknown")
    summary = report.get("summary") or {}
    if report.get("checks") is not None and summary != summarize(report["checks"]):
        problems.append("summary does not match the checks")
    return problems


def write_report(path: Path, rep: dict[str, Any]) -> None:
    """Write `rep` to `path` as JSON, replacing the file in one step."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rep, indent=1) + "\n")
    tmp.replace(path)


def print_summary(rep: dict[str, Any], path: Path) -> None:
    rows = []
    for r in rep["runs"]:
        loss = r.get("loss") or {}
        rows.append(
            [
                r["name"],
                ",".join(str(x["rc"]) for x in r["launches"]),
                f"{_num(loss.get('first_mean'))} -> {_num(loss.get('last_mean'))}",
                _num(r.get("tokens_per_s")),
                _num(r.get("mfu")),
                _num(r.get("peak_mem_gib")),
                _num(r.get("plan_mem_gib")),
                _num(r.get("mem_ratio")),
                sum(x["seconds"] for x in r["launches"]),
            ]
        )
    head = [
        "run",
        "rc",
        "loss first5 -> last5",
        "tok/s",
        "MFU",
        "peak GiB",
        "plan GiB",
        "mem ratio",
        "launch s",
    ]
    print("\n## Runs\n" + format_table(head, rows))
    crow = [
        [c["name"], c["status"], _short(c["value"]), c["target"], c["detail"][:90]]
        for c in rep["checks"]
    ]
    print("\n## Checks\n" + format_table(["check", "status", "value", "target", "detail"], crow))
    for sk in rep["skipped"]:
        print(f"skipped: {sk['name']}: {sk['reason']}")
    s = rep["summary"]
    print(
        f"\n{rep['device']} ({rep['device_name']}): {s['pass']} passed, {s['fail']} failed, "
        f"{s['skipped']} skipped, {s[NA_CPU]} n/a on cpu, {s['info']} info; "
        f"{rep['elapsed_s']:.0f} s; {path}"
    )


def _num(x: Any) -> str:
    if isinstance(x, float | int) and not isinstance(x, bool):
        return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"
    return "-" if x is None else str(x)


def _short(value: Any) -> str:
    if isinstance(value, dict):
        return " ".join(f"{k}={_num(v)}" for k, v in value.items() if not isinstance(v, list))
    return _num(value)
