"""Shared parts of the benchmarks: A/B schedules, paired ratios, tables, result records.

Pure functions (no torch import) so they are cheap to test; every benchmark script appends
one `record(...)` per result to `benchmarks/results/<name>.jsonl`.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Iterable, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from moelab.telemetry.perf import cpu_model  # torch-free

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
VERSIONED = ("torch", "deepspeed", "transformers", "mlflow")


def schedule(names: Sequence[str], rounds: int) -> list[tuple[int, str]]:
    """(round, name) in the order A B C A B C ...: every round runs each name once."""
    return [(r, name) for r in range(rounds) for name in names]


def paired_ratios(num: Sequence[float], den: Sequence[float]) -> list[float]:
    """num[i] / den[i] for each round i (both measured in the same round)."""
    if len(num) != len(den):
        raise ValueError(f"paired ratios need equal rounds, got {len(num)} and {len(den)}")
    return [n / d for n, d in zip(num, den, strict=True) if d]


def median_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Median over rounds of the per-round ratio (robust to a noisy round)."""
    ratios = paired_ratios(num, den)
    return statistics.median(ratios) if ratios else float("nan")


def verdict(value: float, target: float, higher_is_better: bool = True) -> str:
    """'ok' when `value` meets `target`, else 'MISS'."""
    if value != value:  # NaN: nothing measured
        return "n/a"
    ok = value >= target if higher_is_better else value <= target
    return "ok" if ok else "MISS"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if value != value:
            return "n/a"
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table (also readable as plain text), floats to 3 significant digits."""
    body = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in body)]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in body)])


def git_commit(repo: Path = REPO) -> str:
    """HEAD's commit (with '+dirty' when the tree has changes), or 'unknown'."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in VERSIONED:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "missing"
    return out


def machine(device: str = "cpu") -> dict[str, Any]:
    """Where a result was measured: host, CPU, cores, device, load average, versions, commit."""
    return {
        "host": platform.node(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "device": device,
        "load_avg": [round(x, 2) for x in os.getloadavg()],
        "versions": versions(),
        "git_commit": git_commit(),
    }


def progress(i: int, total: int, text: str) -> None:
    """One progress line per measurement, with the load average (a busy machine shows)."""
    print(f"[{i}/{total}] {text}  load {os.getloadavg()[0]:.1f}", flush=True)


def note_end_load(env: dict[str, Any]) -> None:
    """Add the load average at the end of the measurements to `env`."""
    env["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]


def record(bench: str, result: dict[str, Any], env: dict[str, Any]) -> dict[str, Any]:
    """One JSONL record: benchmark name, UTC time, the machine and the result."""
    return {
        "bench": bench,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **env,
        **result,
    }


def append_jsonl(path: Path, rec: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(rec, sort_keys=False) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def steady_and_first(
    marks: dict[int, float], start: float, first_logged: int
) -> tuple[float, float]:
    """Steady seconds per step and time to the end of step 1 from wall-clock step marks.

    `marks` maps logged steps (every `first_logged` steps) to the time that step ended.
    Steady = (t(last) - t(first logged)) / steps between; step 1 ended at about
    t(first logged) - (first_logged - 1) * steady (an upper bound when early steps are slow).
    """
    steps = sorted(marks)
    if len(steps) < 2 or steps[0] != first_logged:
        raise ValueError(f"need step marks from step {first_logged} on, got {steps}")
    steady = (marks[steps[-1]] - marks[steps[0]]) / (steps[-1] - steps[0])
    first = marks[steps[0]] - (first_logged - 1) * steady - start
    return steady, first


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
