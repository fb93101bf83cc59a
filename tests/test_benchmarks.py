"""The benchmark harness's pure parts: A/B schedule, paired ratios, tables, result records."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import benchlib


def test_schedule_alternates_every_round() -> None:
    assert benchlib.schedule(["a", "b"], 3) == [
        (0, "a"),
        (0, "b"),
        (1, "a"),
        (1, "b"),
        (2, "a"),
        (2, "b"),
    ]


def test_ratios_are_paired_per_round_and_median() -> None:
    # Round 2 is slow for both (a noisy machine): the paired ratio stays 2.
    assert benchlib.paired_ratios([2.0, 20.0, 4.0], [1.0, 10.0, 2.0]) == [2.0, 2.0, 2.0]
    assert benchlib.median_ratio([3.0, 2.0, 100.0], [1.0, 1.0, 1.0]) == 3.0
    with pytest.raises(ValueError, match="equal rounds"):
        benchlib.paired_ratios([1.0], [1.0, 2.0])


def test_verdict() -> None:
    assert benchlib.verdict(0.85, 0.8) == "ok"
    assert benchlib.verdict(0.7, 0.8) == "MISS"
    assert benchlib.verdict(1.05, 1.03, higher_is_better=False) == "MISS"
    assert benchlib.verdict(float("nan"), 1.0) == "n/a"


def test_format_table_is_markdown() -> None:
    table = benchlib.format_table(["name", "x"], [["moe", 1.23456], ["dense", 12345.6]])
    lines = table.splitlines()
    assert lines[0].startswith("| name") and set(lines[1]) <= {"|", "-"}
    assert "1.23" in lines[2] and "1.2346" not in lines[2]
    assert "12,346" in lines[3]
    assert len({len(line) for line in lines}) == 1  # aligned columns
    assert benchlib.format_table(["a", "bb"], []).splitlines() == ["| a | bb |", "|---|----|"]


def test_steady_and_first_from_step_marks() -> None:
    # Logged every 4 steps; steps take 0.5 s once steady; started at t=100.
    marks = {4: 112.0, 8: 114.0, 12: 116.0}
    steady, first = benchlib.steady_and_first(marks, start=100.0, first_logged=4)
    assert steady == pytest.approx(0.5)
    assert first == pytest.approx(12.0 - 1.5)
    with pytest.raises(ValueError, match="from step 4"):
        benchlib.steady_and_first({8: 1.0, 12: 2.0}, 0.0, 4)


def test_record_appends_jsonl_with_machine(tmp_path: Path) -> None:
    env = benchlib.machine()
    assert {"host", "cpu", "cores", "device", "load_avg", "versions", "git_commit"} <= set(env)
    assert env["versions"]["torch"] != "missing"
    path = tmp_path / "results" / "x.jsonl"
    benchlib.append_jsonl(path, benchlib.record("x", {"ratio": 1.5}, env))
    benchlib.append_jsonl(path, benchlib.record("x", {"ratio": 2.5}, env))
    rows = benchlib.read_jsonl(path)
    assert [r["ratio"] for r in rows] == [1.5, 2.5]
    assert rows[0]["bench"] == "x" and rows[0]["time"].endswith("Z")
    assert json.loads(path.read_text().splitlines()[0])["git_commit"] == env["git_commit"]


def test_layer_peak_memory_counts_freed_temporaries_and_gradients() -> None:
    """The CPU peak is malloc's bytes in use after each op: a 32 MiB temporary freed before the
    end still sets the peak, and gradients are counted from none."""
    import torch
    from moe_layer import peak_bytes

    lin = torch.nn.Linear(1024, 1024, bias=False)  # 4 MiB of weights, 4 MiB of gradient
    x = torch.randn(8, 1024)

    def step() -> None:
        big = torch.ones(8 * 2**20)  # 32 MiB, freed at once
        del big
        lin(x).sum().backward()

    peak = peak_bytes(step, lin, x)
    assert 32 * 2**20 <= peak < 48 * 2**20, peak / 2**20
    assert lin.weight.grad is not None
    without = peak_bytes(lambda: lin(x).sum().backward(), lin, x)
    assert 4 * 2**20 <= without < 8 * 2**20, without / 2**20


def test_expert_scaling_table_is_relative_to_the_fewest_experts() -> None:
    from moe_layer import expert_scaling

    cells = [
        {"tokens": 1024, "top_k": 2, "drop_tokens": True, "experts": e, "moe_s": [s]}
        for e, s in ((8, 0.010), (32, 0.015), (64, 0.030))
    ]
    table = expert_scaling(cells)
    assert "| 1024   | 2     | on   | 10" in table and "x1.50" in table and "x3.00" in table
