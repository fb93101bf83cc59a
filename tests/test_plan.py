"""moelab-plan: sizes, FLOPs and the EP layout, through the real CLI and in-process."""

from __future__ import annotations

import json
import subprocess
import sys

from launcher.compose import compose_config, to_schema
from launcher.plan import build_plan, ep_layout
from launcher.validate import validate
from moelab.telemetry.perf import Peak, table_peak


def plan_cli(*overrides: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "launcher.plan", *overrides],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_plan_json_seed_moe() -> None:
    proc = plan_cli("model=seed_600m_moe", "plan.format=json")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)  # stdout is exactly one JSON object
    assert plan["params_total"] == 520_261_632
    assert plan["params_active"] == 218_271_744
    assert plan["flops_per_token"] == 3 * plan["flops_per_token_forward"] > 0
    assert '"params_total": 520261632' in proc.stdout


def test_plan_text_and_errors() -> None:
    proc = plan_cli("model=seed_600m_dense")
    assert proc.returncode == 0 and "589,561,856" in proc.stdout
    bad = plan_cli("model=seed_600m_moe", "zero=stage3")
    assert bad.returncode == 2 and "zero=stage3 does not work" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_ep_layout_matches_deepspeed_groups() -> None:
    cfg = to_schema(compose_config(["model=moe_top2", "parallel=ep2", "cluster.nproc_per_node=4"]))
    layout = ep_layout(cfg)
    assert layout["ep_groups"] == [[0, 1], [2, 3]]
    assert layout["expert_data_parallel_groups"] == [[0, 2], [1, 3]]
    assert layout["experts_of_rank"]["1"] == [4, 5, 6, 7]
    assert layout["experts_per_rank"] == 4


def test_dense_plan_has_no_experts() -> None:
    plan = build_plan(to_schema(compose_config(["model=tiny_dense", "parallel=ep2"])))
    assert plan["params_total"] == plan["params_active"]
    assert plan["ep_layout"]["ep_size"] == 1 and plan["moe_layers"] == []


def test_serving_view_reads_the_telemetry_table() -> None:
    """plan.device takes every key of the one table, with the figures MFU uses."""
    cfg = to_schema(compose_config(["model=tiny_dense", "plan.device=h200-nvl"]))
    validate(cfg, planning=True)
    inf = build_plan(cfg)["inference"]
    assert inf["device"] == "NVIDIA H200 NVL" and inf["hbm_tb_s"] == 4.8
    assert inf["peak_tflops"] == 835.5
    assert table_peak("NVIDIA H200 NVL", "bf16") == Peak(835.5, "table:h200-nvl:bf16")
