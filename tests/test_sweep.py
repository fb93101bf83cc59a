"""Sweeps (`moelab-launch -m`): one MLflow parent run, a child run per job, failures kept going."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import SWEEP_EXPERIMENT, VARIANTS, VariantSweep
from helpers import run_launcher
from launcher import sweep
from launcher.compose import compose_config
from launcher.jobs import JobOutcome

TINY = ["zero=stage2", "parallel=ep2", "train=smoke", "train.steps=4"]


def sweep_runs(workdir: Path, experiment: str = "moelab") -> tuple[MlflowClient, Any, list[Any]]:
    """The parent run and its children (by job number) of the only sweep in `experiment`."""
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("moelab.sweep") == "true"]
    children = [r for r in runs if r is not parent]
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    return client, parent, sorted(children, key=lambda r: int(r.data.tags["moelab.sweep.job"]))


def tail_artifact(client: MlflowClient, run_id: str, dst: Path) -> str:
    return Path(client.download_artifacts(run_id, sweep.TAIL_ARTIFACT, str(dst))).read_text()


def summary_lines(stdout: str) -> list[str]:
    """The table printed after the sweep: header, rule, one line per job."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("job  status"))
    end = next((i for i in range(start, len(lines)) if not lines[i].strip()), len(lines))
    return lines[start:end]


# --- fast: no deepspeed process is started -------------------------------------------------


def test_single_run_opens_no_parent_run(tmp_path: Path, shared_cache: Path) -> None:
    """Without -m the callback stays out: a config error leaves no MLflow store at all."""
    proc = run_launcher(tmp_path, shared_cache, "model=tiny_moe_top2", "zero=stage3")
    assert proc.returncode == 2, proc.stderr
    assert "zero=stage3 does not work with model.ffn=moe" in proc.stderr
    assert "sweep" not in proc.stdout
    assert not (tmp_path / "mlflow.db").exists()


def test_callback_is_registered_and_inert_in_run_mode(tmp_path: Path, monkeypatch: Any) -> None:
    from hydra import compose, initialize_config_dir

    from launcher.compose import CONFIG_DIR, register_schema

    register_schema()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True)
    target = cfg.hydra.callbacks.mlflow_sweep._target_
    assert target == "launcher.sweep.MlflowSweepCallback"
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(sweep.PARENT_ENV, raising=False)
    callback = sweep.MlflowSweepCallback()
    callback.on_run_start(config=cfg)
    callback.on_run_end(config=cfg)
    assert sweep.parent_run_id() is None
    assert not (tmp_path / "mlflow.db").exists()


def test_invalid_jobs_fail_and_the_sweep_goes_on(tmp_path: Path, shared_cache: Path) -> None:
    """Both jobs fail validation: each gets a FAILED child run holding the message."""
    proc = run_launcher(
        tmp_path, shared_cache, "-m", "model=tiny_moe_top1,tiny_moe_top2", "zero=stage3"
    )
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 of 2 sweep jobs failed (job 0, 1)" in proc.stderr
    client, parent, children = sweep_runs(tmp_path)
    assert parent.info.status == "FAILED"
    assert parent.data.tags["sweep.model"] == "tiny_moe_top1,tiny_moe_top2"
    assert parent.data.tags["sweep.zero"] == "stage3"
    assert [c.data.tags["override.model"] for c in children] == ["tiny_moe_top1", "tiny_moe_top2"]
    for child in children:
        assert child.info.status == "FAILED"
        tail = tail_artifact(client, child.info.run_id, tmp_path / child.info.run_id)
        assert "deepspeed.moe supports ZeRO stages 0-2" in tail
    table = summary_lines(proc.stdout)
    assert len(table) == 4 and all("FAILED" in line for line in table[2:])


def test_dry_run_sweep_of_compare_variants(tmp_path: Path, shared_cache: Path) -> None:
    """experiment=compare_variants: four variants, same train settings, ZeRO-2, ep 2."""
    proc = run_launcher(
        tmp_path, shared_cache, "-m", "experiment=compare_variants", "launch.dry_run=true"
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not (tmp_path / "mlflow.db").exists(), "a dry run creates no MLflow run, no parent"
    (sweep_dir,) = (tmp_path / "runs" / "compare_variants").iterdir()
    stamp = sweep_dir.name.removeprefix("sweep-")  # variant first, then the sweep's time
    jobs = sorted((p.name for p in sweep_dir.iterdir() if p.is_dir()), key=lambda n: n[-1])
    variants = ["tiny_dense", "tiny_moe_top1", "tiny_moe_top2", "tiny_arctic"]
    assert jobs == [f"{v}-{stamp}-{n}" for n, v in enumerate(variants)]
    assert re.fullmatch(r"\d{8}-\d{6}", stamp), sweep_dir.name
    cfgs = [yaml.safe_load((sweep_dir / j / "config.yaml").read_text()) for j in jobs]
    assert all(c["train"] == cfgs[0]["train"] for c in cfgs), "equal token budget"
    assert all(c["data"] == cfgs[0]["data"] for c in cfgs)
    assert {(c["zero"]["stage"], c["parallel"]["ep_size"]) for c in cfgs} == {(2, 2)}
    assert {c["tracking"]["experiment"] for c in cfgs} == {"compare_variants"}


def test_compare_variants_composes() -> None:
    cfg = compose_config(["experiment=compare_variants"])
    assert cfg.tracking.experiment == "compare_variants"
    assert cfg.zero.stage == 2 and cfg.parallel.ep_size == 2


def test_varying_overrides_and_tags() -> None:
    jobs = [
        JobOutcome(0, ["model=tiny_dense", "zero=stage2"]),
        JobOutcome(1, ["model=tiny_moe_top2", "zero=stage2"]),
    ]
    assert sweep.varying_overrides(jobs) == {0: "model=tiny_dense", 1: "model=tiny_moe_top2"}
    assert sweep.varying_overrides(jobs[:1]) == {0: "model=tiny_dense zero=stage2"}
    tags = sweep.job_tags(3, ["+train.steps=4", "~data.path"])
    assert tags["override.train.steps"] == "4" and tags["override.data.path"] == ""
    assert tags["moelab.sweep.job"] == "3"


def test_log_tail(tmp_path: Path) -> None:
    log = tmp_path / "train.log"
    log.write_text("".join(f"line {i}\n" for i in range(500)))
    tail = sweep.log_tail(log)
    assert tail.splitlines()[0] == "line 300" and tail.splitlines()[-1] == "line 499"
    assert sweep.log_tail(tmp_path / "missing.log") == ""


# --- slow: real 2-rank deepspeed launches ------------------------------------------------


@pytest.mark.slow
def test_sweep_parent_and_child_runs(variant_sweep: VariantSweep) -> None:
    """The shared sweep of the four variants (conftest.VARIANT_SWEEP)."""
    _, parent, children = sweep_runs(variant_sweep.work, SWEEP_EXPERIMENT)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["sweep.model"] == ",".join(VARIANTS)
    assert Path(parent.data.tags["moelab.sweep.dir"]).is_dir()
    assert [c.data.tags["variant"] for c in children] == list(VARIANTS)
    for child in children:
        assert child.info.status == "FINISHED"
        assert "train/loss" in child.data.metrics
        assert child.data.tags["override.train.steps"] == "16"
        assert Path(child.data.tags["run_dir"]).parent == Path(parent.data.tags["moelab.sweep.dir"])
    table = summary_lines(variant_sweep.proc.stdout)
    assert len(table) == 2 + len(VARIANTS)
    for child, line in zip(children, table[2:], strict=True):
        assert child.info.run_id in line and "FINISHED" in line
        assert f"{child.data.metrics['train/loss']:.3f}" in line


@pytest.mark.slow
def test_sweep_runtime_failure_continues(tmp_path: Path, shared_cache: Path) -> None:
    """Job 0 passes validation but its data preparation fails (no full batch); job 1 runs."""
    proc = run_launcher(
        tmp_path,
        shared_cache,
        "-m",
        "model=tiny_dense",
        "train.micro_batch_size=50000,4",
        *TINY,
    )
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "1 of 2 sweep jobs failed (job 0)" in proc.stderr
    client, parent, (bad, good) = sweep_runs(tmp_path)
    assert parent.info.status == "FAILED"
    assert (
        bad.info.status == "FAILED" and bad.data.tags["override.train.micro_batch_size"] == "50000"
    )
    tail = tail_artifact(client, bad.info.run_id, tmp_path / "tail")
    assert "fewer than train.micro_batch_size x world size = 100000" in tail
    assert good.info.status == "FINISHED" and "train/loss" in good.data.metrics
    table = summary_lines(proc.stdout)
    assert len(table) == 4
    assert bad.info.run_id in table[2] and "FAILED" in table[2]
    assert "train.micro_batch_size=50000" in table[2]
    assert good.info.run_id in table[3] and "FINISHED" in table[3]
