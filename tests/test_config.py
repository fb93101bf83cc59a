"""Every option of every Hydra group composes against the schema."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from launcher.compose import CONFIG_DIR, compose_config, to_schema
from launcher.validate import validate
from moelab.config import MoelabConfig, load_config, to_container

GROUPS = [
    "model",
    "zero",
    "parallel",
    "data",
    "train",
    "cluster",
    "tracking",
    "telemetry",
    "experiment",
]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


ALL = [(g, o) for g in GROUPS for o in options(g)]


def test_every_group_has_options() -> None:
    for g in GROUPS:
        assert options(g), f"hydra_conf/{g} is empty"
    assert {"dense", "moe_top1", "moe_top2", "arctic", "pr_moe"} <= set(options("model"))
    assert {"seed_600m_dense", "seed_600m_moe", "seed_600m_hybrid", "arctic_480b"} <= set(
        options("model")
    )
    assert options("zero") == ["stage0", "stage1", "stage2", "stage3"]


@pytest.mark.parametrize(("group", "option"), ALL, ids=[f"{g}={o}" for g, o in ALL])
def test_option_composes(group: str, option: str) -> None:
    cfg = to_schema(compose_config([f"{group}={option}"]))
    assert isinstance(cfg, MoelabConfig)
    if group == "model":
        assert cfg.model.name == option
    if group in ("zero", "parallel", "train", "cluster", "tracking"):
        composed = OmegaConf.load(CONFIG_DIR / group / f"{option}.yaml")
        section = to_container(getattr(cfg, group))
        for key, value in composed.items():
            if key != "defaults":
                assert section[str(key)] == value, f"{group}.{key}"


def test_default_config_is_valid_and_runnable() -> None:
    cfg = to_schema(compose_config())
    validate(cfg)
    assert cfg.model.name == "tiny_dense" and cfg.world_size == 2


def test_presets_inherit() -> None:
    cfg = to_schema(compose_config(["model=seed_600m_hybrid"]))
    assert cfg.model.ffn == "arctic" and cfg.model.d_model == 1024
    assert cfg.model.moe.num_experts == 6 and cfg.model.moe.top_k == 2


def test_unknown_key_rejected() -> None:
    with pytest.raises(ConfigCompositionException):
        compose_config(["model.not_a_key=3"])


def test_wrong_type_rejected() -> None:
    with pytest.raises(ConfigCompositionException):
        compose_config(["model.d_model=big"])


def test_resolved_yaml_round_trip(tmp_path: Path) -> None:
    cfg = to_schema(compose_config(["model=tiny_moe_top2", "parallel=ep2"]))
    path = tmp_path / "config.yaml"
    OmegaConf.save(OmegaConf.structured(cfg), path)
    again = load_config(path)
    assert again == cfg


def test_train_gpu_preset() -> None:
    """train=gpu: bf16, a larger micro-batch, TF32 for fp32 matmuls; the rest is the default."""
    from moelab.dsconfig import build_ds_config

    cfg = to_schema(compose_config(["train=gpu"]))
    validate(cfg)
    t = cfg.train
    assert (t.precision, t.micro_batch_size, t.allow_tf32) == ("bf16", 16, True)
    assert t.steps == to_schema(compose_config()).train.steps
    assert not to_schema(compose_config()).train.allow_tf32
    assert build_ds_config(cfg)["bf16"]["enabled"] is True


def test_set_matmul_precision() -> None:
    import torch

    from moelab import engine

    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        engine.set_matmul_precision(True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        engine.set_matmul_precision(False)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_auto_local_rank_count() -> None:
    """cluster=local leaves nproc_per_node to the launcher (0): one rank per visible GPU, 2
    without GPUs; a count given on the command line is kept."""
    from launcher import gpus

    assert gpus.visible(0, "2,3") == []  # no GPU: CUDA_VISIBLE_DEVICES means nothing
    assert gpus.visible(4, None) == ["0", "1", "2", "3"]
    assert gpus.visible(4, "2, 3") == ["2", "3"]
    assert gpus.visible(4, "") == []
    assert [gpus.auto_ranks(n) for n in (0, 1, 4)] == [2, 1, 4]
    assert gpus.not_indices(["1", "4", "GPU-ab"], 4) == ["4", "GPU-ab"]
    assert compose_config().cluster.nproc_per_node == 0
    assert gpus.gpu_count() == 0, "this test expects a host without GPUs"
    assert to_schema(compose_config()).cluster.nproc_per_node == 2
    assert to_schema(compose_config(["cluster.nproc_per_node=3"])).cluster.nproc_per_node == 3
    assert to_schema(compose_config(["cluster.gpus_per_node=1"])).cluster.nproc_per_node == 1
