"""moelab-launch: compose, validate, render, create the MLflow run, run deepspeed.

moelab-launch model=tiny_moe_top2 zero=stage2 parallel=ep2
moelab-launch -m model=tiny_dense,tiny_moe_top1,tiny_moe_top2,tiny_arctic
moelab-launch ... launch.dry_run=true     # render and print, run nothing
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from launcher.compose import CONFIG_DIR, register_schema, to_schema
from launcher.render import render, write_script
from launcher.validate import ConfigError, validate
from moelab.config import MoelabConfig

register_schema()


def fail(message: str, code: int = 2) -> None:
    print(f"moelab-launch: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def launch(cfg: MoelabConfig, run_dir: Path) -> int:
    """Render, create the MLflow run, execute; returns the deepspeed exit code."""
    from launcher import tracking
    from launcher.launch import execute

    files = render(cfg, run_dir)
    if cfg.launch.dry_run:
        print(f"run dir: {run_dir}")
        print(shlex.join(files.command))
        return 0
    uri = tracking.resolve_uri(cfg)
    run_id = tracking.create_run(cfg, uri)
    files.env.update({"MLFLOW_TRACKING_URI": uri, "MLFLOW_RUN_ID": run_id})
    write_script(files)
    print(f"moelab-launch: run {run_id} in {run_dir}", flush=True)
    code = execute(files)
    tracking.end_run(uri, run_id, "FINISHED" if code == 0 else "FAILED")
    return code


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
def app(dcfg: DictConfig) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        cfg = to_schema(dcfg)
        validate(cfg)
    except ConfigError as err:
        shutil.rmtree(run_dir, ignore_errors=True)  # nothing ran: leave no run dir behind
        fail(str(err))
    code = launch(cfg, run_dir)
    if code != 0:
        fail(f"deepspeed exited with code {code}; see {run_dir / 'train.log'}", code)


def main() -> None:
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    app()


if __name__ == "__main__":
    main()
