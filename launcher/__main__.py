"""moelab-launch: compose, validate, pick the backend, start the run.

moelab-launch model=tiny_moe_top2 zero=stage2 parallel=ep2
moelab-launch -m model=tiny_dense,tiny_moe_top1,tiny_moe_top2,tiny_arctic
moelab-launch ... launch.dry_run=true     # render and print, run nothing
moelab-launch resume <run dir> [train.stop_after=N]   # continue from its latest checkpoint
moelab-launch resume <sweep dir>   # every unfinished job of a sweep, under its parent run
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from launcher import jobs, sweep
from launcher.backends import backend_for
from launcher.compose import CONFIG_DIR, compose_config, register_schema, to_schema
from launcher.errors import ConfigError, fail
from launcher.resume import resume
from launcher.resume_sweep import is_sweep_dir, resume_sweep
from launcher.start import check, start_run, sweep_job
from launcher.validate import validate, validate_runs_root
from moelab import fastexit, hang
from moelab.rundir import RunDir

register_schema()


def precheck(argv: list[str]) -> None:
    """Refuse a bad config before Hydra creates a directory: a run is checked in full, a sweep
    for launch.runs_root only (each job is checked on its own). What does not compose is left
    to Hydra, which reports it; so are Hydra's informational flags."""
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    args = get_args_parser().parse_args(argv)
    own_config = args.config_path or args.config_name or args.config_dir
    informational = args.help or args.hydra_help or args.cfg or args.info
    if own_config or informational or args.shell_completion or args.experimental_rerun:
        return
    multirun = args.multirun or "hydra.mode=MULTIRUN" in args.overrides
    try:
        parsed = OverridesParser.create().parse_overrides(args.overrides)
        fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
        cfg = to_schema(compose_config([o for o in fixed if o is not None]))
    except (HydraException, OmegaConfBaseException):
        return
    try:
        if multirun:
            validate_runs_root(cfg)
        else:
            backend_for(cfg).resolve_hosts(cfg)
            validate(cfg)
    except ConfigError as err:
        fail(str(err))


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
def app(dcfg: DictConfig) -> None:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    if hc.mode == RunMode.MULTIRUN:
        sweep_job(dcfg, run_dir)
        return
    try:
        cfg = to_schema(dcfg)
        backend, resources = check(cfg)
    except ConfigError as err:
        shutil.rmtree(run_dir, ignore_errors=True)  # nothing ran: leave no run dir behind
        fail(str(err))
    started = time.time()
    code = start_run(cfg, backend, run_dir, resources)
    exit_with(run_dir, code, started, f"the run exited with code {code}")


def exit_with(run_dir: Path, code: int, started: float, message: str) -> None:
    """Fail with a hang's description, the stopping signal or `message` unless `code` is 0."""
    log = RunDir(run_dir).log
    if 128 < code < 160:
        fail(f"stopped by signal {code - 128}; see {log}", code)
    if code != 0:
        fail(hang.describe(run_dir, started) or f"{message}; see {log}", code)


def main() -> None:
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    if sys.argv[1:2] == ["resume"]:
        if len(sys.argv) < 3:
            fail("usage: moelab-launch resume <run dir | sweep dir> [train.stop_after=N ...]")
        started, run_dir = time.time(), Path(sys.argv[2]).resolve()
        if is_sweep_dir(run_dir):
            raise SystemExit(resume_sweep(run_dir, sys.argv[3:]))
        code = resume(run_dir, sys.argv[3:])
        if code != 0:
            message = f"resumed run stopped with code {code}; see {RunDir(run_dir).log}"
            fail(hang.describe(run_dir, started) or message, code)
        return
    precheck(sys.argv[1:])
    jobs.reset()
    try:
        app()
    finally:
        sweep.end_open_parent("FAILED")  # only if Hydra aborted the sweep mid-way
    # A sweep's jobs never raise (the sweep goes on); its failures set the exit status here.
    failures = jobs.failed()
    if failures:
        nums = ", ".join(str(j.num) for j in failures)
        fail(f"{len(failures)} of {len(jobs.outcomes())} sweep jobs failed (job {nums})", 1)


def cli() -> None:
    """The `moelab-launch` command: `main`, then an exit without the interpreter's teardown
    (MLflow and Hydra loaded: about a second after every launch)."""
    try:
        main()
    except SystemExit as done:
        if isinstance(done.code, str):
            print(done.code, file=sys.stderr)  # what the interpreter prints for it
        fastexit.exit_now(done.code if isinstance(done.code, int) else int(done.code is not None))
    fastexit.exit_now(0)


if __name__ == "__main__":
    cli()
