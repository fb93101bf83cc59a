"""moelab-eval: lm-evaluation-harness on an exported model, scores logged to the run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import REPO
from launcher.eval import parse_overrides
from moelab.eval import downstream_metrics
from trained_moe import TrainedMoE, subprocess_env, trained_moe  # noqa: F401


def test_overrides_name_the_bad_key() -> None:
    assert parse_overrides(["tasks=a,b", "limit=3"]) == {"tasks": "a,b", "limit": "3"}
    with pytest.raises(ValueError, match="'task=a' is not key=value"):
        parse_overrides(["task=a"])


def test_metric_names() -> None:
    results = {"results": {"sciq": {"alias": "sciq", "acc,none": 0.5, "acc_stderr,none": "N/A"}}}
    assert downstream_metrics(results) == {"eval/downstream/sciq_acc": 0.5}


@pytest.mark.slow
def test_local_task_scores_logged_to_source_run(trained_moe: TrainedMoE) -> None:  # noqa: F811
    work = trained_moe.workdir
    proc = subprocess.run(
        [sys.executable, "-m", "launcher.eval", str(trained_moe.hf_dir), "tasks=moelab_tiny_qa"]
        + ["include_path=tests/data/lm_eval", "batch_size=6"],
        cwd=REPO,  # the task YAML names its data file relative to the repo root
        env=subprocess_env(work),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    from mlflow.tracking import MlflowClient

    ref = json.loads((trained_moe.run_dir / "mlflow_run.json").read_text())
    run = MlflowClient(ref["tracking_uri"]).get_run(ref["run_id"])
    acc = run.data.metrics["eval/downstream/moelab_tiny_qa_acc"]
    assert 0.0 <= acc <= 1.0 and acc * 6 == round(acc * 6)  # 6 questions
    assert "eval/downstream/moelab_tiny_qa_acc_norm" in run.data.metrics
