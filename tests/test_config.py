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
