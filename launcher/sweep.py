"""Sweeps (`moelab-launch -m ...`): one MLflow parent run, one child run per job.

Hydra's basic launcher runs the jobs one after another in this process. The callback
below (registered under `hydra.callbacks` in hydra_conf/config.yaml) opens the parent run
before the first job and exports its id as $MOELAB_PARENT_RUN_ID; each job's run is created
with `mlflow.parentRunId` set to it. A job records its outcome here (`record`) instead of
raising, so a failed job does not stop the sweep; after the last job the callback ends the
parent run (FAILED if any job failed) and prints one table, and `launcher.__main__.main`
turns any failure into a non-zero exit status once Hydra has returned. With a launcher that
runs the jobs in other processes (`hydra/launcher=submitit_slurm`: one Slurm job each, which
inherit $MOELAB_PARENT_RUN_ID through sbatch's environment), the outcomes are read back from
the parent's child runs in MLflow instead.
"""

from __future__ import annotations

import collections
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from launcher.jobs import JobOutcome, outcomes, record, reset

PARENT_ENV = "MOELAB_PARENT_RUN_ID"
TAIL_ARTIFACT = "logs/train_tail.txt"
TAIL_LINES = 200
SUMMARY_COLUMNS = ("job", "status", "run id", "overrides", "variant", "train loss", "eval loss")


@dataclass
class _Parent:
    uri: str
    run_id: str


_parent: list[_Parent] = []
"""The open parent run of this process's sweep (at most one)."""


def parent_run_id() -> str | None:
    """The sweep's parent run id, set by MlflowSweepCallback for the jobs of a sweep."""
    return os.environ.get(PARENT_ENV) or None


def split_override(override: str) -> tuple[str, str]:
    """'+train.steps=4' -> ('train.steps', '4'); a bare '~key' deletion -> ('key', '')."""
    key, _, value = override.partition("=")
    return key.lstrip("+~"), value


def override_tags(overrides: list[str], prefix: str) -> dict[str, str]:
    """One tag per overridden key (the last override of a key wins, as in Hydra)."""
    return {f"{prefix}{k}": v for k, v in map(split_override, overrides)}


def job_tags(num: int, overrides: list[str]) -> dict[str, str]:
    """Tags of a sweep job's run: its number and its overrides, whole and per key."""
    return {
        "moelab.sweep.job": str(num),
        "moelab.sweep.overrides": " ".join(overrides),
        **override_tags(overrides, "override."),
    }


def log_tail(path: Path, lines: int = TAIL_LINES) -> str:
    """The last `lines` lines of a log file ('' if it does not exist)."""
    if not path.exists():
        return ""
    with path.open(encoding="utf-8", errors="replace") as f:
        return "".join(collections.deque(f, maxlen=lines))


def sweep_overrides(config: DictConfig) -> list[str]:
    """The sweep as given: hydra.sweeper.params (e.g. from an experiment), then the CLI."""
    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    cli = OmegaConf.select(config, "hydra.overrides.task") or []
    return [f"{k}={v}" for k, v in params.items()] + [str(o) for o in cli]


def varying_overrides(jobs: list[JobOutcome]) -> dict[int, str]:
    """Per job, only the overrides whose values differ between jobs (all if none differ)."""
    parsed = [dict(map(split_override, o.overrides)) for o in jobs]
    keys = {k for p in parsed for k in p if len({q.get(k) for q in parsed}) > 1}
    return {
        o.num: " ".join(x for x in o.overrides if not keys or split_override(x)[0] in keys)
        for o in jobs
    }


def summary_rows(jobs: list[JobOutcome]) -> list[list[str]]:
    """One row per job; the metric columns come from launcher.summary.row."""
    from launcher.summary import COLUMNS, row
    from launcher.tracking import mlflow_client

    shown = varying_overrides(jobs)
    rows = []
    for o in jobs:
        cells = dict.fromkeys(SUMMARY_COLUMNS, "-")
        cells.update(job=str(o.num), status=o.status, overrides=shown[o.num])
        if o.run_id and o.uri:
            cells["run id"] = o.run_id
            try:
                client = mlflow_client(o.uri)
                metrics = row(client, client.get_run(o.run_id))
                cells.update((c, v) for c, v in zip(COLUMNS, metrics, strict=True) if v != "nan")
            except Exception as err:  # the table must not hide the sweep's own result
                print(f"moelab-launch: no metrics for run {o.run_id}: {err}", file=sys.stderr)
        rows.append([cells[c] for c in SUMMARY_COLUMNS])
    return rows


def remote_outcomes(parent: _Parent) -> list[JobOutcome]:
    """The outcomes of jobs run in other processes, read back from the parent's child runs."""
    from launcher.tracking import PARENT_TAG, mlflow_client

    client = mlflow_client(parent.uri)
    experiment = client.get_run(parent.run_id).info.experiment_id
    runs = client.search_runs([experiment], f"tags.`{PARENT_TAG}` = '{parent.run_id}'")
    jobs = [
        JobOutcome(
            num=int(r.data.tags.get("moelab.sweep.job", "-1")),
            overrides=r.data.tags.get("moelab.sweep.overrides", "").split(),
            status=r.info.status,
            run_id=r.info.run_id,
            uri=parent.uri,
        )
        for r in runs
    ]
    return sorted(jobs, key=lambda j: j.num)


def end_open_parent(status: str = "FAILED") -> None:
    """End a parent run left open (Hydra aborted the sweep before on_multirun_end)."""
    parent = _parent.pop() if _parent else None
    os.environ.pop(PARENT_ENV, None)
    if parent is not None:
        from launcher import tracking

        tracking.end_run(parent.uri, parent.run_id, status)


class MlflowSweepCallback(Callback):
    """One MLflow parent run per multirun; nothing at all in single-run mode."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from launcher import tracking

        reset()
        if OmegaConf.select(config, "launch.dry_run"):
            return  # a dry run creates no MLflow runs: no parent either
        uri = tracking.absolute_uri(OmegaConf.select(config, "tracking.uri"))
        sweep_dir = Path(str(OmegaConf.select(config, "hydra.sweep.dir"))).resolve()
        overrides = sweep_overrides(config)
        tags = {
            "moelab.sweep": "true",
            "moelab.sweep.overrides": " ".join(overrides),
            "moelab.sweep.dir": str(sweep_dir),
            "git_commit": tracking.git_commit(),
            **override_tags(overrides, "sweep."),
        }
        experiment = str(OmegaConf.select(config, "tracking.experiment"))
        run_id = tracking.create_parent_run(uri, experiment, sweep_dir.name, tags)
        _parent[:] = [_Parent(uri, run_id)]
        os.environ[PARENT_ENV] = run_id
        print(f"moelab-launch: sweep parent run {run_id} in {sweep_dir}", flush=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        parent = _parent[0] if _parent else None
        if parent is None:
            return
        if not outcomes():  # the jobs ran elsewhere (hydra/launcher=submitit_slurm)
            for outcome in remote_outcomes(parent):
                record(outcome)
        jobs = outcomes()
        status = "FAILED" if not jobs or any(o.failed for o in jobs) else "FINISHED"
        end_open_parent(status)
        from launcher.summary import format_table

        print(f"\nmoelab-launch: sweep {status} (parent run {parent.run_id})")
        print(format_table(summary_rows(jobs), SUMMARY_COLUMNS), flush=True)
