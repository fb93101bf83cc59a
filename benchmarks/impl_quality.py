"""Quality at equal tokens: the classic MoE layer against AutoEP (`model.moe.impl=autoep`),
same model, data, steps and seed, through real `moelab-launch` runs (2 gloo ranks, ep_size 2,
ZeRO 2). Per run, from the local MLflow store: the final eval loss, the load coefficient of
variation (std/mean of the routes per expert, mean over the MoE layers) of the last logged
window and averaged over all windows, and the fraction of routes dropped (classic's capacity;
AutoEP drops none).

    PYTHONPATH=src:. DS_ACCELERATOR=cpu .venv/bin/python benchmarks/impl_quality.py \\
        [--models tiny_moe_top1,tiny_moe_top2] [--steps 100]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchlib import RESULTS_DIR, append_jsonl, format_table, machine, note_end_load, progress
from benchlib import record as bench_record
from launch_bench import CACHE, Bench

IMPLS = ("classic", "autoep")


def overrides(model: str, impl: str, args: argparse.Namespace, work: Path) -> list[str]:
    return [
        f"model={model}",
        f"model.moe.impl={impl}",
        "parallel=ep2",
        "zero=stage2",
        f"train.steps={args.steps}",
        f"train.seed={args.seed}",
        f"train.log_every={args.log_every}",
        "train.eval_every=0",
        "train.progress=false",
        "cluster.nproc_per_node=2",
        f"data.cache_dir={CACHE}",
        f"tracking.uri=sqlite:///{work}/mlflow.db",
        f"launch.runs_root={work}/runs/{model}-{impl}",
    ]


def launch(cmd_args: list[str], work: Path) -> Path:
    """One `python -m launcher` run; its run directory."""
    env = Bench(argparse.Namespace(), work).env()
    cmd = [sys.executable, "-m", "launcher", *cmd_args]
    out = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        tail = f"{out.stdout[-3000:]}{out.stderr[-2000:]}"
        raise RuntimeError(f"{' '.join(cmd_args)} failed:\n{tail}")
    root = Path(next(a for a in cmd_args if a.startswith("launch.runs_root=")).split("=", 1)[1])
    (run_dir,) = root.glob("*/*/")
    return run_dir


def layer_mean(client: Any, run_id: str, suffix: str) -> tuple[float, float]:
    """(last window, mean over windows) of `moe/layer_<i>/<suffix>`, averaged over layers."""
    keys = [k for k in client.get_run(run_id).data.metrics if k.endswith(f"/{suffix}")]
    histories = [client.get_metric_history(run_id, k) for k in keys if k.startswith("moe/layer_")]
    if not histories:
        return float("nan"), float("nan")
    last = statistics.mean(max(h, key=lambda m: m.step).value for h in histories)
    mean = statistics.mean(statistics.mean(m.value for m in h) for h in histories)
    return last, mean


def read_run(run_dir: Path, work: Path) -> dict[str, Any]:
    """Final eval loss, load CV and drop fraction of the run in `run_dir`, from MLflow."""
    from mlflow import MlflowClient

    run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    client = MlflowClient(f"sqlite:///{work}/mlflow.db")
    metrics = client.get_run(run_id).data.metrics
    cv_last, cv_mean = layer_mean(client, run_id, "load_cv")
    _, drop_mean = layer_mean(client, run_id, "drop_fraction")
    return {
        "run_id": run_id,
        "eval_loss": metrics.get("eval/loss", float("nan")),
        "train_loss": metrics.get("train/loss", float("nan")),
        "load_cv_last": cv_last,
        "load_cv_mean": cv_mean,
        "drop_fraction_mean": drop_mean,
    }


def table(runs: dict[str, dict[str, dict[str, Any]]]) -> str:
    rows = []
    for model, by_impl in runs.items():
        for impl, r in by_impl.items():
            rows.append([model, impl, r["eval_loss"], r["train_loss"], r["load_cv_last"],
                         r["load_cv_mean"], r["drop_fraction_mean"]])  # fmt: skip
    head = ["model", "impl", "eval loss", "train loss", "load CV (last)", "load CV (mean)",
            "dropped (mean)"]  # fmt: skip
    return format_table(head, rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default="tiny_moe_top1,tiny_moe_top2")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=42)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="moelab-quality-"))
    env = machine("cpu")
    plan = [(m, i) for m in args.models.split(",") for i in IMPLS]
    runs: dict[str, dict[str, dict[str, Any]]] = {}
    for n, (model, impl) in enumerate(plan, 1):
        run_dir = launch(overrides(model, impl, args, work), work)
        runs.setdefault(model, {})[impl] = r = read_run(run_dir, work)
        progress(n, len(plan), f"{model} {impl}: eval loss {r['eval_loss']:.4f}")
    note_end_load(env)
    out = table(runs)
    print(out)
    settings = {"steps": args.steps, "seed": args.seed, "ranks": 2, "ep_size": 2, "zero": 2}
    result = {"settings": settings, "table": out, "runs": runs}
    append_jsonl(RESULTS_DIR / "impl_quality.jsonl", bench_record("impl_quality", result, env))


if __name__ == "__main__":
    main()
