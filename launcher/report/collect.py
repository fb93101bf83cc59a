"""Read the runs of a sweep (or an experiment) from MLflow into plain per-run curves."""

from __future__ import annotations

import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from launcher.sweep import split_override
from launcher.tracking import PARENT_TAG
from moelab.config import MoelabConfig, load_config
from moelab.flops import flops_per_token

LOSS = "train/lm_loss"
"""The loss every comparison uses: the LM loss without the aux loss, so dense and MoE compare."""
HISTORY_KEYS = (
    LOSS,
    "train/loss",
    "eval/loss",
    "perf/step_time_s",
    "perf/tokens_per_s",
    "perf/tflops_per_device",
    "perf/mfu",
    "moe/a2a_fraction",
    "perf/slowest_rank",
    "perf/straggler_lag",
)
LAYER_KEY = re.compile(r"moe/layer_(\d+)/(a2a_ms|load_cv|drop_fraction)$")
HEATMAP = re.compile(r"plots/expert_load_step(\d+)\.png$")

Series = list[tuple[int, float]]
"""(step, value) in step order."""


@dataclass
class RunData:
    """One run as the report needs it: identity, sizes and metric histories."""

    run_id: str
    label: str
    tags: dict[str, str]
    tokens_per_step: int
    """Tokens of one optimizer step, all ranks (micro batch x grad accum x seq_len x world)."""
    train_flops_per_token: int
    """Model FLOPs of one training token (forward + backward), MoE-aware."""
    history: dict[str, Series] = field(default_factory=dict)
    layers: dict[int, dict[str, Series]] = field(default_factory=dict)
    """MoE layer index -> {a2a_ms | load_cv | drop_fraction: series}; empty for dense runs."""
    heatmap: Path | None = None
    """The run's latest plots/expert_load_step{N}.png, downloaded (None if it logged none)."""
    run_dir: str = ""
    """The run directory it trained in (checkpoints for the routing section)."""

    @property
    def is_moe(self) -> bool:
        return bool(self.layers)


@dataclass
class Selection:
    """The runs a report covers and the parent run it belongs to (None: no sweep)."""

    experiment: str
    runs: list[Any]
    parent: Any | None
    skipped: list[Any] = field(default_factory=list)
    """Children that did not finish (failed, killed or still running): left out, listed."""


def _experiment_id(client: Any, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is None:
        raise ValueError(f"--experiment {name!r} does not exist in MLflow; pass an existing name.")
    return str(exp.experiment_id)


def select_parent(client: Any, parent_id: str) -> Selection:
    """The children of sweep parent run `parent_id`."""
    parent = client.get_run(parent_id)
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.`{PARENT_TAG}` = '{parent_id}'"
    )
    if not children:
        raise ValueError(f"--parent-run {parent_id} has no child runs; pass a sweep's parent run.")
    name = client.get_experiment(parent.info.experiment_id).name
    done = [r for r in children if r.info.status == "FINISHED"]
    rest = [r for r in children if r.info.status != "FINISHED"]
    if not done:
        raise ValueError(
            f"--parent-run {parent_id} has no finished child run ({len(rest)} did not finish); "
            "rerun the sweep or pass another parent run."
        )
    return Selection(name, sorted(done, key=_job_order), parent, rest)


def select_experiment(client: Any, experiment: str) -> Selection:
    """The latest sweep of `experiment`; without any sweep, the latest finished run per variant."""
    exp_id = _experiment_id(client, experiment)
    parents = client.search_runs(
        [exp_id], "tags.`moelab.sweep` = 'true'", order_by=["attributes.start_time DESC"]
    )
    if parents:
        return select_parent(client, parents[0].info.run_id)
    runs = client.search_runs(
        [exp_id], "attributes.status = 'FINISHED'", order_by=["attributes.start_time DESC"]
    )
    latest: dict[str, Any] = {}
    for run in runs:
        latest.setdefault(run.data.tags.get("variant", run.info.run_name), run)
    if not latest:
        raise ValueError(f"--experiment {experiment!r} has no finished run; train one first.")
    return Selection(experiment, list(latest.values())[::-1], None)


def _job_order(run: Any) -> int:
    return int(run.data.tags.get("moelab.sweep.job", 0))


def labels(runs: list[Any]) -> list[str]:
    """The variant name, plus the overrides that differ between runs of the same variant."""
    variants = [r.data.tags.get("variant", r.info.run_name) for r in runs]
    out = []
    for run, variant in zip(runs, variants, strict=True):
        if variants.count(variant) == 1:
            out.append(variant)
            continue
        mine = dict(map(split_override, run.data.tags.get("moelab.sweep.overrides", "").split()))
        peers = [
            dict(map(split_override, r.data.tags.get("moelab.sweep.overrides", "").split()))
            for r, v in zip(runs, variants, strict=True)
            if v == variant
        ]
        differ = [f"{k}={v}" for k, v in mine.items() if any(p.get(k) != v for p in peers)]
        out.append(" ".join([variant, *differ]) if differ else run.info.run_name)
    return out


def run_config(client: Any, run_id: str, tmp: Path) -> MoelabConfig:
    """The resolved config the ranks trained with (artifact config/resolved.yaml)."""
    path = client.download_artifacts(run_id, "config/resolved.yaml", str(tmp / run_id))
    return load_config(path)


def _history(client: Any, run_id: str, key: str) -> Series:
    points = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
    return list({m.step: m.value for m in points}.items())  # a resumed step: its last value


def latest_heatmap(client: Any, run_id: str, out: Path) -> Path | None:
    """Download the expert-load heatmap of the latest step the run logged, if any."""
    found = [
        (int(m.group(1)), a.path)
        for a in client.list_artifacts(run_id, "plots")
        if (m := HEATMAP.search(a.path))
    ]
    if not found:
        return None
    _, path = max(found)
    return Path(client.download_artifacts(run_id, path, str(out / run_id)))


def read_run(client: Any, run: Any, label: str, tmp: Path) -> RunData:
    run_id = run.info.run_id
    cfg = run_config(client, run_id, tmp)
    world = int(run.data.tags.get("world_size", cfg.world_size))
    t = cfg.train
    data = RunData(
        run_id=run_id,
        label=label,
        tags=dict(run.data.tags),
        tokens_per_step=t.micro_batch_size * t.grad_accum * cfg.data.seq_len * world,
        train_flops_per_token=flops_per_token(cfg.model, cfg.data.seq_len).training,
        run_dir=cfg.run_dir,
    )
    data.history = {k: _history(client, run_id, k) for k in HISTORY_KEYS if k in run.data.metrics}
    for key in run.data.metrics:
        if m := LAYER_KEY.match(key):
            series = data.layers.setdefault(int(m.group(1)), {})
            series[m.group(2)] = _history(client, run_id, key)
    data.heatmap = latest_heatmap(client, run_id, tmp)
    return data


def read_runs(client: Any, selection: Selection, tmp: Path | None = None) -> list[RunData]:
    """Every selected run with its histories (one MLflow call per metric key)."""
    tmp = tmp or Path(tempfile.mkdtemp(prefix="moelab-report-"))
    names = labels(selection.runs)
    bar = tqdm(selection.runs, desc="reading runs", unit="run", file=sys.stderr, leave=False)
    return [read_run(client, run, name, tmp) for run, name in zip(bar, names, strict=True)]
