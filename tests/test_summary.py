"""Recipe sweeps: the experiment configs compose and validate; the knob table after a sweep."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from launcher import jobs
from launcher.compose import CONFIG_DIR, compose_config, register_schema, to_schema
from launcher.summary import KnobTableCallback
from launcher.validate import validate


@pytest.mark.parametrize(
    ("experiment", "key", "values"),
    [
        ("granularity_sweep", "model.moe.granularity", [1, 2, 3, 4]),
        ("aux_loss_sweep", "model.moe.aux_loss_coeff", [0, 0.001, 0.01, 0.1, 1.0]),
    ],
)
def test_recipe_sweeps_compose_and_validate(experiment: str, key: str, values: list[float]) -> None:
    register_schema()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        dcfg = compose("config", [f"experiment={experiment}"], return_hydra_config=True)
    swept = OmegaConf.select(dcfg, "hydra.sweeper.params")[key]
    assert [float(v) for v in str(swept).split(",")] == [float(v) for v in values]
    callback = OmegaConf.select(dcfg, "hydra.callbacks.knob_table")
    assert callback._target_ == "launcher.summary.KnobTableCallback" and key in callback["keys"]
    for value in values:
        cfg = to_schema(compose_config([f"experiment={experiment}", f"{key}={value}"]))
        validate(cfg)
        assert cfg.world_size == 2 and cfg.parallel.ep_size == 2 and cfg.zero.stage == 2


def test_granularity_sweep_is_the_seed_shape_scaled_down() -> None:
    for g, hidden in ((1, 512), (2, 256), (3, 176), (4, 128)):
        over = ["experiment=granularity_sweep", f"model.moe.granularity={g}"]
        m = to_schema(compose_config(over)).model
        assert (m.n_heads, m.kv_heads, m.moe.num_experts, m.moe.top_k) == (8, 2, 6, 2)
        assert (m.moe.total_experts, m.moe.active_experts, m.expert_hidden) == (
            6 * g,
            2 * g,
            hidden,
        )


def test_knob_table_puts_load_cv_beside_eval_loss(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("aux", artifact_location=str(tmp_path / "art"))
    jobs.reset()
    for num, (coeff, cvs, loss) in enumerate([(0.0, (0.9, 0.7), 5.5), (1.0, (0.1, 0.3), 5.7)]):
        run = client.create_run(exp, tags={"params_total": "1000", "params_active": "600"})
        rid = run.info.run_id
        client.log_param(rid, "model.moe.aux_loss_coeff", str(coeff))
        for i, cv in enumerate(cvs):
            client.log_metric(rid, f"moe/layer_{i}/load_cv", cv, step=60)
        client.log_metric(rid, "eval/loss", loss, step=60)
        client.set_terminated(rid)
        jobs.record(jobs.JobOutcome(num, [], "FINISHED", rid, uri=uri))
    jobs.record(jobs.JobOutcome(2, [], "FAILED", None))
    KnobTableCallback(["model.moe.aux_loss_coeff"]).on_multirun_end(OmegaConf.create({}))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["model.moe.aux_loss_coeff", "params", "active", "load"]
    rows = [line.split() for line in lines[2:]]
    assert [r[0] for r in rows] == ["0.0", "1.0"]  # the failed job has no row
    assert rows[0][3] == "0.800" and rows[1][3] == "0.200"  # mean over layers
    assert rows[0][-2] == "5.500" and rows[1][-2] == "5.700"
    jobs.reset()
