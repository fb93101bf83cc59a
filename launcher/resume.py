"""moelab-launch resume <run dir>: continue a run from its latest checkpoint, into its run."""

from __future__ import annotations

import json
from pathlib import Path

from launcher import tracking
from launcher.backends import backend_for
from launcher.backends.common import run_supervised
from launcher.backends.slurm import Slurm
from launcher.errors import ConfigError, fail
from launcher.render import RunFiles
from launcher.validate import validate_counts, validate_reliability
from launcher.validate_model import validate_parallel
from moelab import runref
from moelab.checkpoint import check_layout, ep_may_change, read_meta
from moelab.config import MoelabConfig, load_config
from moelab.dsconfig import build_ds_config
from moelab.rundir import RunDir

RESUMABLE = ("train.stop_after", "train.checkpoint_every", "train.keep_checkpoints")
"""Keys a resume may change: none of them changes what the checkpoint holds."""
EP_KEY = "parallel.ep_size"
"""May change too where the checkpoints load at another ep_size (`checkpoint.ep_may_change`):
the optimizer then restarts."""


def resume_config(run_dir: Path, overrides: list[str]) -> MoelabConfig:
    """The run dir's config.yaml with `overrides` (keys in RESUMABLE; EP_KEY where the
    checkpoints load at another ep_size, ds_config.json then rendered anew) applied, checked
    and saved (a refused override leaves the files as they were)."""
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    path = RunDir(run_dir).config
    if not path.exists():
        fail(f"{run_dir} is not a moelab run dir (no {path.name}).")
    node = OmegaConf.load(path)
    ep_before = OmegaConf.select(node, EP_KEY)
    for item in overrides:
        key, _, value = item.partition("=")
        if key not in (*RESUMABLE, EP_KEY):
            fail(f"{key} cannot change on resume (only {', '.join(RESUMABLE)}); start a new run.")
        try:
            OmegaConf.update(node, key, yaml.safe_load(value))  # "4" -> 4
            OmegaConf.merge(OmegaConf.structured(MoelabConfig), node)  # type-checks
        except (yaml.YAMLError, OmegaConfBaseException) as err:
            fail(f"{item} is not a valid value ({str(err).splitlines()[0]}).")
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(MoelabConfig), node))
    assert isinstance(cfg, MoelabConfig)
    new_ep = cfg.parallel.ep_size != ep_before
    if new_ep and not ep_may_change(cfg):
        fail(
            f"{EP_KEY} cannot change on resume of this run: only model.moe.impl=autoep below "
            "ZeRO-3 saves experts one file each; resume at the same ep_size or start a new run."
        )
    try:
        validate_counts(cfg)
        validate_reliability(cfg.train)
    except ConfigError as err:
        fail(str(err))
    OmegaConf.save(node, path)
    if new_ep:  # AutoEP's expert_parallel section names the ep_size
        RunDir(run_dir).ds_config.write_text(json.dumps(build_ds_config(cfg), indent=2) + "\n")
    return load_config(path)


def resume(run_dir: Path, overrides: list[str]) -> int:
    """Re-execute the run dir's scripts from its latest checkpoint, into the same run."""
    cfg = resume_config(run_dir, overrides)
    paths = RunDir(run_dir)
    meta = read_meta(run_dir)
    if meta is None:
        fail(f"{paths.checkpoints} holds no complete checkpoint; nothing to resume.")
    try:
        backend_for(cfg).resolve_hosts(cfg)  # multi-host: the world size from today's hostfile
        validate_parallel(cfg)  # a new ep_size must divide the experts and the world
        check_layout(meta, cfg.world_size, cfg.ep_size, ep_may_change(cfg))
    except (ConfigError, ValueError) as err:
        fail(str(err))
    uri, run_id = runref.read(run_dir)
    tracking.reopen_run(uri, run_id)
    run = tracking.PendingRun.existing(uri, run_id, run_dir)
    print(f"moelab-launch: resuming from step {meta['step']}", flush=True)
    backend = backend_for(cfg)
    if isinstance(backend, Slurm):  # the same job.sbatch, submitted again
        return backend.resume(cfg, RunFiles(paths, commands=[]), run)
    scripts = [paths.script, *node_scripts(paths)]
    files = RunFiles(paths, commands=[["bash", str(p)] for p in scripts])
    return run_supervised(cfg, files, run, resume=True)


def node_scripts(paths: RunDir) -> list[Path]:
    """node_1.sh, node_2.sh, ... as far as the run dir holds them (backend no_ssh)."""
    found, n = [], 1
    while paths.node_script(n).exists():
        found.append(paths.node_script(n))
        n += 1
    return found
