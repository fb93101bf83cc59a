"""Fine-tuning: trainable specs, checkpoint paths, freezing, and a real 2-rank fine-tune."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from trained_autoep import AutoEPRuns, autoep_runs  # noqa: F401

from helpers import REPO, run_launcher
from launcher.compose import compose_config, to_schema
from launcher.errors import ConfigError
from launcher.validate import validate
from moelab.config import to_container
from moelab.finetune import freeze, parse_trainable, resolve_init
from moelab.models import build_model
from trained_moe import TrainedMoE, trained_moe  # noqa: F401

STEPS = 4
RUN = (
    "model=tiny_moe_top2",
    "train=smoke",
    f"train.steps={STEPS}",
    "train.eval_every=0",
    f"train.checkpoint_every={STEPS}",
    "telemetry.enabled=false",
)


def test_parse_trainable() -> None:
    assert parse_trainable("router").router and not parse_trainable("router").dense
    spec = parse_trainable("router+experts:0,3", total_experts=4)
    assert spec.expert_ids == {0, 3} and spec.expert(3) and not spec.expert(1)
    assert parse_trainable("all").expert(7) and not parse_trainable("dense_only").router
    with pytest.raises(ValueError, match=r"train.trainable='experts' is not valid; use one of"):
        parse_trainable("experts")
    with pytest.raises(ValueError, match=r"names expert 4, but MoE layers hold 4 experts"):
        parse_trainable("router+experts:1,4", total_experts=4)


def fake_run(root: Path, *overrides: str) -> Path:
    """A run dir as the launcher writes it, with an empty checkpoint `global_step2`."""
    cfg = to_schema(compose_config(["model=tiny_moe_top2", *overrides]))
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(yaml.safe_dump(to_container(cfg)))
    tag = root / "checkpoints" / "global_step2"
    tag.mkdir(parents=True)
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"")
    (root / "checkpoints" / "latest").write_text("global_step2\n")
    return root


def test_init_from_paths_and_shape_check(tmp_path: Path) -> None:
    run = fake_run(tmp_path / "run")
    ckpts = run / "checkpoints"
    assert resolve_init(str(run)) == resolve_init(str(ckpts)) == (ckpts, "global_step2")
    assert resolve_init(str(ckpts / "global_step2")) == (ckpts, "global_step2")
    with pytest.raises(ValueError, match=r"train.init_from=.* holds no checkpoint"):
        resolve_init(str(tmp_path))
    ok = to_schema(compose_config(["model=tiny_moe_top2", f"train.init_from={run}"]))
    validate(ok)
    other = ["model=tiny_moe_top2", "model.d_model=64", f"train.init_from={run}"]
    with pytest.raises(ConfigError, match=r"another model shape \(d_model=128 vs 64\)"):
        validate(to_schema(compose_config(other)))
    zero2 = ["model=tiny_moe_top2", "parallel=ep2", "zero=stage2", "-"]
    for fine in ("router", "dense_only", "'router+experts:1,2'"):
        validate(to_schema(compose_config([*zero2[:-1], f"train.trainable={fine}"])))
    with pytest.raises(ConfigError, match=r"leaves EP rank 1 without a trainable expert while"):
        validate(to_schema(compose_config([*zero2[:-1], "train.trainable='router+experts:0,1'"])))
    with pytest.raises(ConfigError, match=r"leaves EP rank 0 without a trainable expert while"):
        validate(to_schema(compose_config([*zero2[:-1], "train.trainable='router+experts:3'"])))
    bad = ["model=tiny_dense", "train.trainable=router"]
    with pytest.raises(ConfigError, match=r"train.trainable=router needs an MoE model"):
        validate(to_schema(compose_config(bad)))


def test_freeze_counts_and_requires_grad() -> None:
    cfg = to_schema(compose_config(["model=tiny_moe_top2"])).model
    # EP rank 1 of 2 holds global experts 2 and 3 of every layer.
    model = build_model(cfg, ep_size=2, ep_rank=1)
    total = sum(p.numel() for p in build_model(cfg).parameters())
    router = cfg.n_layers * cfg.d_model * cfg.moe.num_experts
    expert = 3 * cfg.d_model * cfg.expert_hidden
    summary = freeze(model, parse_trainable("router"), ep_size=2)
    assert summary.trainable == router and summary.trainable + summary.frozen == total
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(".gate.wg." in n for n in names)
    summary = freeze(model, parse_trainable("router+experts:0,2"), ep_size=2)
    assert summary.trainable == router + 2 * cfg.n_layers * expert
    names = {n for n, p in model.named_parameters() if p.requires_grad and "experts" in n}
    assert names and all("deepspeed_experts.0." in n for n in names)  # global 2 = local 0
    summary = freeze(model, parse_trainable("dense_only"), ep_size=2)
    assert summary.frozen == router + 4 * cfg.n_layers * expert
    assert summary.tags()["finetune.trainable"] == "dense_only"


def test_freeze_autoep_fused_experts_whole() -> None:
    """AutoEP's block before deepspeed.initialize holds every expert in fused tensors: they
    freeze or train whole, counted once; a choice of some experts is refused."""
    cfg = to_schema(compose_config(["model=tiny_moe_top2", "model.moe.impl=autoep"])).model
    model = build_model(cfg, ep_size=2, ep_rank=1)
    total = sum(p.numel() for p in model.parameters())
    router = cfg.n_layers * cfg.d_model * cfg.moe.num_experts
    summary = freeze(model, parse_trainable("router"), ep_size=2)
    assert summary.trainable == router and summary.frozen == total - router
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(names) == cfg.n_layers and all(n.endswith(".block.gate.weight") for n in names)
    summary = freeze(model, parse_trainable("router+experts:0,1,2,3"), ep_size=2)
    expert = 3 * cfg.d_model * cfg.expert_hidden
    assert summary.trainable == router + 4 * cfg.n_layers * expert
    assert all(p.requires_grad for n, p in model.named_parameters() if ".experts." in n)
    with pytest.raises(ValueError, match=r"router\+experts:0,2 trains some experts of a layer"):
        freeze(model, parse_trainable("router+experts:0,2"), ep_size=2)
    summary = freeze(model, parse_trainable("dense_only"), ep_size=2)
    assert summary.frozen == router + 4 * cfg.n_layers * expert


def model_states(run_dir: Path, by_file: bool = False) -> dict[str, torch.Tensor]:
    """Every model tensor of the run's last checkpoint: non-expert and expert files (keyed
    `file/key` with `by_file`: AutoEP's expert files name their tensors alike)."""
    ckpts = run_dir / "checkpoints"
    tag = ckpts / (ckpts / "latest").read_text().strip()
    out: dict[str, torch.Tensor] = {}
    for f in sorted(tag.glob("*model_states.pt")):
        sd = torch.load(f, map_location="cpu", weights_only=False)
        for k, v in (sd.get("module") or sd).items():
            if isinstance(v, torch.Tensor):
                out[f"{f.name}/{k}" if by_file else k] = v
    return out


def ok(proc: object) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def finetuned(
    tmp_path_factory: pytest.TempPathFactory,
    shared_cache: Path,
    trained_moe: TrainedMoE,  # noqa: F811
) -> dict[str, object]:
    """A router-only ep_size 1 ZeRO-2 fine-tune, on other text (Python sources), of the
    session's reference run (ep_size 2): another expert layout, every expert frozen under ZeRO."""
    work = tmp_path_factory.mktemp("finetune")
    source = trained_moe.run_dir
    code = work / "code"
    code.mkdir()
    for f in sorted((REPO / "src" / "moelab").glob("*.py")):
        shutil.copy(f, code / f"{f.stem}.txt")
    (tokenizer,) = (shared_cache / "tokenizers").glob("bpe4096-*")
    new_data = ("data=text_files", f"data.data_files=[{code}/*.txt]", f"data.tokenizer={tokenizer}")
    proc = run_launcher(
        work, shared_cache, *RUN, "parallel=ep1", *new_data, "zero=stage2",
        "tracking.experiment=finetune",
        f"train.init_from={source}", "train.trainable=router",
    )  # fmt: skip
    ok(proc)
    (tuned,) = (work / "runs" / "finetune").iterdir()
    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("finetune").experiment_id])
    return {"source": model_states(source), "tuned": model_states(tuned), "run": run, "dir": source}


@pytest.mark.slow
def test_router_only_fine_tune_changes_only_router_weights(finetuned: dict[str, object]) -> None:
    src, tuned = finetuned["source"], finetuned["tuned"]
    assert isinstance(src, dict) and isinstance(tuned, dict)
    assert src.keys() == tuned.keys() and any("deepspeed_experts" in k for k in src)
    changed = {k for k in src if not torch.equal(src[k], tuned[k])}
    routers = {k for k in src if ".gate.wg." in k}
    assert changed == routers and len(routers) == 4, sorted(changed)


@pytest.mark.slow
def test_fine_tune_run_records_what_trained(finetuned: dict[str, object]) -> None:
    run = finetuned["run"]
    tags, params = run.data.tags, run.data.params  # type: ignore[attr-defined]
    assert tags["finetune.trainable"] == "router"
    assert int(tags["finetune.trainable_params"]) == 4 * 128 * 4  # layers x d_model x experts
    assert int(tags["finetune.frozen_params"]) + 4 * 128 * 4 == int(tags["params_total"])
    assert params["train.trainable"] == "router"
    assert params["train.init_from"] == str(finetuned["dir"])


@pytest.fixture(scope="module")
def autoep_finetuned(
    tmp_path_factory: pytest.TempPathFactory,
    shared_cache: Path,
    autoep_runs: AutoEPRuns,  # noqa: F811
) -> dict[str, object]:
    """A router-only ep_size 1 ZeRO-2 fine-tune of an AutoEP run trained at ep_size 2: the
    experts, frozen before deepspeed.initialize, must stay as loaded."""
    work = tmp_path_factory.mktemp("finetune-autoep")
    source = autoep_runs.reference.run_dir
    proc = run_launcher(
        work, shared_cache, *RUN, "model.moe.impl=autoep", "parallel=ep1", "zero=stage2",
        f"train.init_from={source}", "train.trainable=router",
    )  # fmt: skip
    ok(proc)
    (tuned,) = (work / "runs" / "moelab").iterdir()
    return {"source": model_states(source, True), "tuned": model_states(tuned, True)}


@pytest.mark.slow
def test_autoep_router_only_fine_tune_keeps_the_experts(
    autoep_finetuned: dict[str, object],
) -> None:
    """The expert files (one per global expert, at ep_size 2 and at 1) hold the same tensors
    after training; the routers changed; nothing else did."""
    src, tuned = autoep_finetuned["source"], autoep_finetuned["tuned"]
    assert isinstance(src, dict) and isinstance(tuned, dict)
    assert src.keys() == tuned.keys(), sorted(src.keys() ^ tuned.keys())[:6]
    experts = {k for k in src if "_expert_" in k.split("/")[0]}
    assert len(experts) >= 4 * 4, sorted(src)  # layers x experts files, w1/w2/w3 each
    changed = {k for k in src if not torch.equal(src[k], tuned[k])}
    routers = {k for k in src if k.endswith(".router.gate.weight")}
    assert changed == routers and len(routers) == 4, sorted(changed)
