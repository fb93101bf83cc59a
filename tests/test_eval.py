"""moelab-eval: lm-evaluation-harness on an exported model, scores logged to the run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from helpers import REPO
from launcher.compose import compose_config, to_schema
from launcher.eval_cmd import main as eval_main
from launcher.eval_cmd import parse_overrides
from moelab.eval import Runtime, downstream_metrics, evaluate, parse_batch_size, pick_runtime
from moelab.export import Source, inference_config, source_tokenizer, write_folder
from moelab.models import MoelabForCausalLM
from trained_moe import TrainedMoE, trained_moe  # noqa: F401

LOCAL_TASK = {"tasks": ["moelab_tiny_qa"], "include_path": "tests/data/lm_eval"}


def test_overrides_name_the_bad_key() -> None:
    assert parse_overrides(["tasks=a,b", "limit=3"]) == {"tasks": "a,b", "limit": "3"}
    with pytest.raises(ValueError, match="'task=a' is not key=value"):
        parse_overrides(["task=a"])


def test_metric_names() -> None:
    results = {"results": {"sciq": {"alias": "sciq", "acc,none": 0.5, "acc_stderr,none": "N/A"}}}
    assert downstream_metrics(results) == {"eval/downstream/sciq_acc": 0.5}


def test_runtime_is_gpu_bf16_auto_when_cuda_is_there() -> None:
    assert pick_runtime(True) == Runtime("cuda", "bfloat16", "auto")
    assert pick_runtime(False) == Runtime("cpu", "float32", 8)
    assert pick_runtime(True, device="cpu") == Runtime("cpu", "float32", 8)
    assert pick_runtime(False, "cuda:1", "float16", 4) == Runtime("cuda:1", "float16", 4)
    with pytest.raises(ValueError, match="dtype='fp8' is not one of"):
        pick_runtime(True, dtype="fp8")
    assert [parse_batch_size(v) for v in ("16", "auto", "auto:4")] == [16, "auto", "auto:4"]
    with pytest.raises(ValueError, match="batch_size='0' is not a positive integer"):
        parse_batch_size("0")


@pytest.fixture(scope="module")
def random_export(tmp_path_factory: pytest.TempPathFactory, shared_cache: Path) -> Path:
    """An export folder of a freshly initialised tiny top-2 MoE (the run's tokenizer)."""
    cfg = to_schema(compose_config(["model=tiny_moe_top2", "model.n_layers=2"]))
    cfg.data.cache_dir = str(shared_cache)
    root = tmp_path_factory.mktemp("random-export")
    config = inference_config(Source(root, "global_step0", 0, cfg))
    torch.manual_seed(0)
    model = MoelabForCausalLM(config).eval()
    write_folder(model, source_tokenizer(cfg), root / "hf", "remote")
    return root / "hf"


def loglikelihoods(out: dict[str, Any]) -> dict[tuple[int, int], float]:
    """(doc, choice) -> lm-eval's log-likelihood of the choice."""
    return {
        (s["doc_id"], i): float(resp[0])
        for s in out["samples"]["moelab_tiny_qa"]
        for i, resp in enumerate(s["filtered_resps"])
    }


def test_batched_lm_eval_scores_equal_batch_one(
    random_export: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """lm-eval pads a batch's shorter requests on the right; the export's causal attention
    and dropless routing keep each request's log-likelihood what it is alone."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.chdir(REPO)
    runs = {
        b: evaluate(
            random_export, **LOCAL_TASK, runtime=Runtime("cpu", "float32", b), log_samples=True
        )
        for b in (1, 7)
    }
    one, many = loglikelihoods(runs[1]), loglikelihoods(runs[7])
    assert len(one) > 7 and one.keys() == many.keys()
    assert max(abs(one[k] - many[k]) for k in one) <= 1e-5
    assert len({round(v, 3) for v in one.values()}) > 1  # real, distinct scores
    assert downstream_metrics(runs[1]) == pytest.approx(downstream_metrics(runs[7]), abs=1e-9)


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
    scores = json.loads((trained_moe.hf_dir / "downstream.json").read_text())
    assert scores["tasks"]["moelab_tiny_qa"]["acc"] == acc
    assert (scores["device"], scores["dtype"], scores["batch_size"]) == ("cpu", "float32", 6)
    card = (trained_moe.hf_dir / "README.md").read_text()
    assert f"| moelab_tiny_qa | acc | {acc:.4f} |" in card and ref["run_id"] in card
