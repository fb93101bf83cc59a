"""The run dir is the one contract between the head node and the ranks: every file the
launcher renders, and every file a real launch leaves, is one that `moelab.rundir.RunDir`
names."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import VariantSweep
from launcher.backends import render, resolve_hosts
from launcher.compose import compose_config, to_schema
from moelab.rundir import RunDir


def named(paths: RunDir, nodes: int) -> set[Path]:
    """Every top-level path RunDir names for a run of `nodes` nodes (Slurm's job logs aside)."""
    fixed = {getattr(paths, n) for n, v in vars(RunDir).items() if isinstance(v, property)}
    per_node = {
        p
        for n in range(nodes)
        for p in (paths.node_script(n), paths.node_log(n), paths.slurm_node_hostfile(n))
    }
    return fixed | per_node


def rendered(tmp_path: Path, backend: str) -> tuple[RunDir, set[Path]]:
    hostfile = tmp_path / "hosts"
    hostfile.write_text("h1 slots=2\nh2 slots=2\n")
    extra = [f"cluster.hostfile={hostfile}"] if backend not in ("local", "slurm") else []
    cfg = to_schema(compose_config([f"cluster={backend}", *extra]))
    paths = RunDir(tmp_path / "run")
    render(cfg, paths.root, resolve_hosts(cfg))
    return paths, set(paths.root.iterdir())


EXPECTED = {
    "local": ("config", "ds_config", "script"),
    "hostfile": ("config", "ds_config", "hostfile", "deepspeed_env", "script"),
    "no_ssh": ("config", "ds_config", "hostfile", "script"),
    "openmpi": ("config", "ds_config", "hostfile", "script"),
    "slurm": ("config", "ds_config", "sbatch", "script"),
}
"""What each backend renders, by RunDir name (no_ssh adds node_1.sh)."""


@pytest.mark.parametrize("backend", sorted(EXPECTED))
def test_rendered_run_dir_holds_exactly_what_rundir_names(tmp_path: Path, backend: str) -> None:
    paths, files = rendered(tmp_path, backend)
    expected = {getattr(paths, name) for name in EXPECTED[backend]}
    if backend == "no_ssh":
        expected.add(paths.node_script(1))
    assert files == expected
    assert files <= named(paths, nodes=2)
    starts_ranks = paths.sbatch if backend == "slurm" else paths.script
    assert f"--config {paths.config}" in starts_ranks.read_text()
    assert not paths.run_ref.exists(), "rendering announces no MLflow run"


@pytest.mark.slow
def test_a_real_launch_leaves_only_what_rundir_names(variant_sweep: VariantSweep) -> None:
    """The shared sweep's 2-rank launch (no launch of its own): train.log, the run id, the
    spool and the checkpoints sit where RunDir says, and nothing else is there."""
    run = variant_sweep.run("tiny_moe_top2")
    paths = RunDir(run.data.tags["run_dir"])
    files = set(paths.root.iterdir())
    assert files <= named(paths, nodes=1), sorted(p.name for p in files - named(paths, 1))
    assert {paths.config, paths.ds_config, paths.script, paths.log, paths.run_ref} <= files
    assert paths.hydra.is_dir(), "Hydra's record, named too"
    assert paths.spool.exists()
