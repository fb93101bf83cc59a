"""Downstream evaluation of an exported model with lm-evaluation-harness, logged to MLflow.

`lm_eval.simple_evaluate` runs `HFLM` on the `moelab-export` folder (on a GPU in bf16 with
lm-eval's automatic batch size when one is there, fp32 on the CPU); every numeric metric
of every task becomes `eval/downstream/{task}_{metric}` in the MLflow run of the source run
dir (recorded in the folder's `moelab_export.json`), or in a run given explicitly. The scores
are also kept in the folder (`downstream.json`) and shown in its model card.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moelab.export import EXPORT_INFO

SEED_REPORT_TASKS = (
    "sciq",
    "arc_easy",
    "hellaswag",
    "piqa",
    "openbookqa",
    "sst2",
    "cb",
    "copa",
    "winogrande",
    "mrpc",
    "rte",
)
METRIC_PREFIX = "eval/downstream/"
CPU_BATCH_SIZE = 8
DTYPES = ("bfloat16", "float16", "float32")


@dataclass(frozen=True)
class Runtime:
    """Where and how the model runs: torch device, weight dtype, HFLM batch size."""

    device: str
    dtype: str
    batch_size: int | str


def parse_batch_size(value: str) -> int | str:
    """A positive integer, `auto` or `auto:N` (lm-eval re-detects N times)."""
    if value == "auto" or (value.startswith("auto:") and value[5:].isdigit()):
        return value
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"batch_size={value!r} is not a positive integer or auto; fix it.")
    return int(value)


def pick_runtime(
    cuda: bool,
    device: str | None = None,
    dtype: str | None = None,
    batch_size: int | str | None = None,
) -> Runtime:
    """cuda, bfloat16 and batch size auto when a GPU is there (`cuda`), else cpu, float32 and
    a fixed batch; each given value wins."""
    device = device or ("cuda" if cuda else "cpu")
    on_gpu = device.startswith("cuda")
    dtype = dtype or ("bfloat16" if on_gpu else "float32")
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {DTYPES}; pick one of them.")
    if batch_size is None:
        batch_size = "auto" if on_gpu else CPU_BATCH_SIZE
    return Runtime(device, dtype, batch_size)


@dataclass(frozen=True)
class EvalTarget:
    """Where the scores go: an existing run, or a new run in `experiment`; None = nowhere."""

    tracking_uri: str | None = None
    run_id: str | None = None
    experiment: str | None = None


def task_manager(tasks: list[str], include_path: str | None) -> Any:
    """lm-eval's TaskManager; with `include_path` alone when it defines every task (the
    14k built-in tasks take seconds to index)."""
    from lm_eval.tasks import TaskManager

    if include_path:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    tm = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in tm.all_tasks]
    if unknown:
        raise ValueError(f"tasks={','.join(unknown)} are unknown to lm-eval; check the names.")
    return tm


def evaluate(
    model_dir: str | Path,
    tasks: list[str],
    *,
    include_path: str | None = None,
    num_fewshot: int = 0,
    runtime: Runtime | None = None,
    limit: int | None = None,
    log_samples: bool = False,
) -> dict[str, Any]:
    """lm-eval's results dict (`results[task][metric,filter]`; `samples` with `log_samples`)
    for the exported model, run as `runtime` says (default: `pick_runtime` for this host)."""
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rt = runtime or pick_runtime(torch.cuda.is_available())
    tm = task_manager(tasks, include_path)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, trust_remote_code=True, dtype=getattr(torch, rt.dtype), device_map=rt.device
    )
    tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
    lm = HFLM(pretrained=model.eval(), tokenizer=tok, batch_size=rt.batch_size)
    with torch.inference_mode():
        out = simple_evaluate(
            model=lm,
            tasks=tasks,
            task_manager=tm,
            num_fewshot=num_fewshot,
            limit=limit,
            log_samples=log_samples,
        )
    assert out is not None  # None only on non-zero ranks of a distributed evaluation
    return dict(out)


def task_scores(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} for every finite numeric metric (`acc,none` -> acc)."""
    out: dict[str, dict[str, float]] = {}
    for task, scores in results["results"].items():
        for key, value in scores.items():
            if "," not in key or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            metric, filt = key.split(",", 1)
            name = metric if filt == "none" else f"{metric}_{filt}"
            if math.isfinite(value):
                out.setdefault(task, {})[name] = float(value)
    return out


def downstream_metrics(results: dict[str, Any]) -> dict[str, float]:
    """`eval/downstream/{task}_{metric}` for every finite numeric metric (`acc,none` -> acc)."""
    return {
        f"{METRIC_PREFIX}{task}_{name}": value
        for task, scores in task_scores(results).items()
        for name, value in scores.items()
    }


def save_scores(
    model_dir: str | Path, results: dict[str, Any], runtime: Runtime, num_fewshot: int,
    limit: int | None,
) -> Path:  # fmt: skip
    """Write the scores to `<model_dir>/downstream.json` and show them in the folder's model
    card (when moelab-export wrote one)."""
    from moelab.model_card import DOWNSTREAM, refresh_card

    path = Path(model_dir) / DOWNSTREAM
    payload = {"tasks": task_scores(results), "num_fewshot": num_fewshot, "limit": limit}
    payload |= {"device": runtime.device, "dtype": runtime.dtype}
    payload["batch_size"] = runtime.batch_size
    path.write_text(json.dumps(payload, indent=2) + "\n")
    refresh_card(Path(model_dir))
    return path


def resolve_target(model_dir: str | Path, target: EvalTarget) -> EvalTarget:
    """An explicit run or experiment wins; else the source run recorded by moelab-export."""
    if target.run_id or target.experiment:
        return target
    info_path = Path(model_dir) / EXPORT_INFO
    ref = json.loads(info_path.read_text()).get("mlflow") if info_path.exists() else None
    if ref:
        return EvalTarget(target.tracking_uri or ref["tracking_uri"], ref["run_id"])
    return target


def log_to_mlflow(
    target: EvalTarget, metrics: dict[str, float], results: dict[str, Any], step: int
) -> str | None:
    """Log the metrics and the results JSON; return the run id (None if no target)."""
    if not (target.run_id or target.experiment):
        return None
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=target.tracking_uri)
    run_id = target.run_id
    if run_id is None:
        assert target.experiment is not None
        exp = client.get_experiment_by_name(target.experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(target.experiment)
        run_id = client.create_run(exp_id, run_name="downstream-eval").info.run_id
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])
    summary = {"results": results["results"], "config": results.get("config", {})}
    client.log_text(run_id, json.dumps(summary, indent=2, default=str), "eval/downstream.json")
    return str(run_id)


def export_step(model_dir: str | Path) -> int:
    info_path = Path(model_dir) / EXPORT_INFO
    return int(json.loads(info_path.read_text()).get("step", 0)) if info_path.exists() else 0
