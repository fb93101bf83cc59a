"""moelab-eval: lm-evaluation-harness on an exported model, scores logged to the run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import REPO
from launcher.eval_cmd import main as eval_main
from launcher.eval_cmd import parse_overrides
from moelab.eval import downstream_metrics
from trained_moe import TrainedMoE, trained_moe  # noqa: F401


def test_overrides_name_the_bad_key() -> None:
    assert parse_overrides(["tasks=a,b", "limit=3"]) == {"tasks": "a,b", "limit": "3"}
    with pytest.raises(ValueError, match="'task=a' is not key=value"):
        parse_overrides(["task=a"])


def test_metric_names() -> None:
    results = {"results": {"sciq": {"alias": "sciq", "acc,none": 0.5, "acc_stderr,none": "N/A"}}}
    assert downstream_metrics(results) == {"eval/downstream/sciq_acc": 0.5}


@pytest.mark.slow
def test_local_task_scores_logged_to_source_run(
    trained_moe: TrainedMoE,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.chdir(REPO)  # the task YAML names its data file relative to the repo root
    args = [str(trained_moe.hf_dir), "tasks=moelab_tiny_qa", "include_path=tests/data/lm_eval"]
    assert eval_main([*args, "batch_size=6"]) == 0
    assert '"eval/downstream/moelab_tiny_qa_acc"' in capsys.readouterr().out
    from mlflow.tracking import MlflowClient

    ref = json.loads((trained_moe.run_dir / "mlflow_run.json").read_text())
    run = MlflowClient(ref["tracking_uri"]).get_run(ref["run_id"])
    acc = run.data.metrics["eval/downstream/moelab_tiny_qa_acc"]
    assert 0.0 <= acc <= 1.0 and abs(acc * 6 - round(acc * 6)) < 1e-9  # 6 questions
    assert "eval/downstream/moelab_tiny_qa_acc_norm" in run.data.metrics
