"""Launcher backends: one per cluster.backend, each rendering its run dir's files once."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from omegaconf import OmegaConf

from launcher import backends, supervisor, tracking
from launcher.backends import BACKENDS, backend_for, resolve_hosts
from launcher.backends import slurm as slurm_backend
from launcher.compose import CONFIG_DIR, compose_config, to_schema
from launcher.start import start_run
from launcher.tracking import PendingRun
from moelab.config import CLUSTER_BACKENDS, MoelabConfig


def test_the_registry_covers_every_backend_of_the_schema() -> None:
    presets = {
        yaml.safe_load(p.read_text())["backend"] for p in (CONFIG_DIR / "cluster").glob("*.yaml")
    }
    assert set(BACKENDS) == set(CLUSTER_BACKENDS) == presets


class Writes:
    """Every file written through the writers rendering uses, by path."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count: Counter[Path] = Counter()
        write_text, save, copyfile = Path.write_text, OmegaConf.save, shutil.copyfile

        def counted_write_text(path: Path, *args: Any, **kwargs: Any) -> int:
            self.count[path] += 1
            return write_text(path, *args, **kwargs)

        def counted_save(config: Any, f: Any, *args: Any, **kwargs: Any) -> None:
            self.count[Path(f)] += 1
            save(config, f, *args, **kwargs)

        def counted_copyfile(src: Any, dst: Any, *args: Any, **kwargs: Any) -> Any:
            self.count[Path(dst)] += 1
            return copyfile(src, dst, *args, **kwargs)

        monkeypatch.setattr(Path, "write_text", counted_write_text)
        monkeypatch.setattr(OmegaConf, "save", counted_save)
        monkeypatch.setattr(shutil, "copyfile", counted_copyfile)


def config(tmp_path: Path, backend: str, *extra: str) -> MoelabConfig:
    hostfile = tmp_path / "hosts"
    hostfile.write_text("h1 slots=2\nh2 slots=2\n")
    hosts = [f"cluster.hostfile={hostfile}"] if backend not in ("local", "slurm") else []
    return to_schema(compose_config([f"cluster={backend}", *hosts, *extra]))


@pytest.mark.parametrize("backend", CLUSTER_BACKENDS)
def test_a_dry_run_renders_each_file_once(
    tmp_path: Path, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = config(tmp_path, backend, "launch.dry_run=true")
    chosen = backend_for(cfg)
    resources = chosen.resolve_hosts(cfg)
    writes = Writes(monkeypatch)
    assert start_run(cfg, chosen, tmp_path / "run", resources) == 0
    run_files = {p for p in writes.count if tmp_path / "run" in p.parents}
    assert run_files == set((tmp_path / "run").iterdir())
    assert set(writes.count.values()) == {1}, writes.count


class FakeClient:
    def set_tag(self, *args: Any) -> None: ...


@pytest.mark.parametrize("backend", CLUSTER_BACKENDS)
def test_running_renders_nothing_again(
    tmp_path: Path, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What `run` does after rendering (data preparation, deepspeed, sbatch, following the
    job, ending the MLflow run) writes no rendered file: stand-ins for the processes."""
    cfg = config(tmp_path, backend)
    chosen = backend_for(cfg)
    files = chosen.render(cfg, tmp_path / "run", resolve_hosts(cfg))
    rendered = {p: p.read_bytes() for p in files.run_dir.iterdir()}
    monkeypatch.setattr(supervisor, "prepare_data", lambda files, append: 0)
    monkeypatch.setattr(supervisor, "supervise", lambda files, append=False: 0)
    monkeypatch.setattr(tracking, "end_run", lambda *args: None)
    monkeypatch.setattr(tracking, "mlflow_client", lambda uri: FakeClient())
    monkeypatch.setattr(slurm_backend, "submit", lambda script: "42")
    monkeypatch.setattr(
        slurm_backend, "follow", lambda job_id, files, append: ("COMPLETED", 0, False)
    )
    writes = Writes(monkeypatch)
    run = PendingRun.existing("sqlite:///x.db", "run-1", files.run_dir)
    assert chosen.run(cfg, files, run) == 0
    assert not [p for p in writes.count if files.run_dir in p.parents]
    assert {p: p.read_bytes() for p in rendered} == rendered


def test_the_public_render_picks_the_configs_backend(tmp_path: Path) -> None:
    cfg = config(tmp_path, "no_ssh")
    files = backends.render(cfg, tmp_path / "run", resolve_hosts(cfg))
    assert len(files.commands) == 2 and files.node_script(1).exists()
