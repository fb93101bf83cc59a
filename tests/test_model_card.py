"""The export's model card: facts read from a run dir and its MLflow store (or its spool),
kept in the folder, and rewritten with moelab-eval's scores."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from helpers import free_port
from launcher.compose import compose_config, to_schema
from moelab import model_card
from moelab.eval import Runtime, save_scores
from moelab.export import EXPORT_INFO, resolve_source
from moelab.model_card import CARD, refresh_card, write_card
from moelab.models.sizing import count_params
from moelab.rundir import RunDir

STEP, WORLD = 30, 2


def make_run(root: Path, *overrides: str) -> Path:
    """A run dir as a finished 2-rank run leaves it: config, checkpoint tag and meta."""
    run_dir = root / "run"
    cfg = to_schema(compose_config(["model=tiny_moe_top2", *overrides]))
    cfg.run_dir = str(run_dir)
    (run_dir / "checkpoints" / f"global_step{STEP}").mkdir(parents=True)
    OmegaConf.save(OmegaConf.structured(cfg), RunDir(run_dir).config)
    meta = {"step": STEP, "tag": f"global_step{STEP}", "world_size": WORLD, "ep_size": 2}
    RunDir(run_dir).checkpoint_meta.write_text(json.dumps(meta))
    return run_dir


def log_eval_losses(run_dir: Path, losses: dict[int, float]) -> str:
    """An MLflow run (sqlite store) with `eval/loss` at each step; the run ref points at it."""
    uri = f"sqlite:///{run_dir.parent / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("moelab")).info.run_id
    client.log_batch(run_id, metrics=[Metric("eval/loss", v, 0, s) for s, v in losses.items()])
    RunDir(run_dir).run_ref.write_text(json.dumps({"run_id": run_id, "tracking_uri": uri}))
    return run_id


def export_dir(root: Path) -> Path:
    out = root / "hf" / "tiny_moe_top2"
    out.mkdir(parents=True)
    (out / EXPORT_INFO).write_text(json.dumps({"format": "remote", "reason": "Asked for."}))
    return out


def front_matter(card: str) -> dict[str, object]:
    head, sep, _ = card.removeprefix("---\n").partition("\n---\n")
    assert card.startswith("---\n") and sep
    meta = yaml.safe_load(head)
    assert isinstance(meta, dict)
    return meta


def test_card_states_the_run_and_how_to_load(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path)
    run_id = log_eval_losses(run_dir, {15: 3.25, STEP: 2.75, 45: 2.5})  # 45: after the export
    source = resolve_source(run_dir)
    out = export_dir(tmp_path)
    text = write_card(out, source, "remote", "Asked for.").read_text()
    meta = front_matter(text)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert meta["tags"] == ["moelab", "moe", "custom_code"]
    counts = count_params(source.cfg.model)
    facts = json.loads((out / EXPORT_INFO).read_text())["card"]
    assert (facts["params_total"], facts["params_active"]) == (counts.total, counts.active)
    assert counts.active < counts.total
    t = source.cfg.train
    assert facts["tokens_trained"] == STEP * t.micro_batch_size * t.grad_accum * WORLD * 128
    assert facts["eval_loss"] == {"value": 2.75, "step": STEP, "from": "MLflow"}
    assert f"- Final eval loss: 2.7500 (step {STEP}, from MLflow)" in text
    assert f"`{run_id}`" in text and "4 x granularity 1 = 4 per MoE layer" in text
    assert "trust_remote_code=True)" in text and "model.generate(ids" in text
    assert "Not evaluated yet" in text


def test_card_falls_back_to_the_spool_then_says_not_recorded(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, "model.moe.granularity=2")
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens: the store is unreachable
    RunDir(run_dir).run_ref.write_text(json.dumps({"run_id": "abc123", "tracking_uri": uri}))
    records = [
        {"kind": "metrics", "metrics": {"train/loss": 4.0}, "step": 10, "ts": 0},
        {"kind": "metrics", "metrics": {"eval/loss": 3.5, "eval/ppl": 33.1}, "step": STEP},
    ]
    RunDir(run_dir).spool.write_text("".join(json.dumps(r) + "\n" for r in records))
    source = resolve_source(run_dir)
    out = export_dir(tmp_path)
    text = write_card(out, source, "native", "It is exactly Mixtral.").read_text()
    assert "3.5000 (step 30, from the run's MLflow spool)" in text
    assert "top-2 x 2 = 4 active per token" in text and "`abc123`" in text
    assert "from_pretrained(path)\n" in text and "trust_remote_code=True" not in text
    assert "custom_code" not in front_matter(text)["tags"]
    RunDir(run_dir).spool.unlink()
    shutil.rmtree(out)
    text = write_card(export_dir(tmp_path), source, "native", "Exact.").read_text()
    assert "- Final eval loss: not recorded" in text


def test_eval_scores_rewrite_the_card_without_the_run_dir(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path)
    out = export_dir(tmp_path)
    write_card(out, resolve_source(run_dir), "remote", "Asked for.")
    shutil.rmtree(run_dir)  # the folder moved elsewhere: the card's facts travel with it
    results = {
        "results": {
            "sciq": {"alias": "sciq", "acc,none": 0.25, "acc_stderr,none": 0.125},
            "piqa": {"alias": "piqa", "acc_norm,none": 0.5, "acc_norm_stderr,none": "N/A"},
        }
    }
    save_scores(out, results, Runtime("cuda", "bfloat16", "auto"), 0, 100)
    text = (out / CARD).read_text()
    assert "| sciq | acc | 0.2500 | 0.1250 |" in text and "| piqa | acc_norm | 0.5000 |  |" in text
    assert "bfloat16 on cuda" in text and "Not evaluated yet" not in text
    scores = json.loads((out / "downstream.json").read_text())
    assert scores["tasks"]["sciq"] == {"acc": 0.25, "acc_stderr": 0.125}
    assert scores["batch_size"] == "auto"


def test_refresh_skips_a_folder_without_card_facts(tmp_path: Path) -> None:
    assert model_card.EXPORT_INFO == EXPORT_INFO
    out = export_dir(tmp_path)
    assert refresh_card(out) is None and not (out / CARD).exists()
    with pytest.raises(ValueError, match="no card facts"):
        write_card(out, None, "remote", "x")
