"""Hydra composition of hydra_conf/ against the dataclass schema (no torch needed)."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from launcher import gpus
from moelab.config import ClusterConfig, MoelabConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "hydra_conf"
SCHEMA_NAME = "moelab_schema"


def register_schema() -> None:
    """Make `moelab_schema` (the root defaults entry) the structured config MoelabConfig."""
    ConfigStore.instance().store(name=SCHEMA_NAME, node=MoelabConfig)


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    """Compose the root config with command-line style overrides (e.g. for moelab-plan)."""
    register_schema()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides or []))


def to_schema(cfg: DictConfig) -> MoelabConfig:
    """The composed DictConfig as a typed MoelabConfig object, its rank count resolved."""
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, MoelabConfig)
    resolve_ranks(obj.cluster)
    return obj


def resolve_ranks(c: ClusterConfig) -> None:
    """cluster.nproc_per_node=0 (auto, cluster=local's default): one rank per GPU visible on
    this host (CUDA_VISIBLE_DEVICES respected), 2 CPU processes without GPUs. A count set on
    the command line (nproc_per_node or gpus_per_node) is kept; validation checks it fits."""
    if c.nproc_per_node == 0:
        local = c.backend == "local"
        c.nproc_per_node = gpus.auto_ranks(len(gpus.local_gpus()) if local else 0)
