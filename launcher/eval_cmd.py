"""moelab-eval: lm-evaluation-harness on an exported model, scores logged to MLflow.

moelab-eval hf/<name>                                   # the seed report's 11 tasks
moelab-eval hf/<name> tasks=sciq,piqa limit=200 batch_size=16
moelab-eval hf/<name> device=cpu dtype=float32          # override the GPU defaults
moelab-eval hf/<name> tasks=my_task include_path=tasks/ # a task YAML of your own
moelab-eval hf/<name> run_id=<id> tracking_uri=http://127.0.0.1:5000

On a GPU the model runs in bfloat16 with lm-eval's automatic batch size; on the CPU in
float32, 8 a batch. Scores go to `eval/downstream/{task}_{metric}` of the source run (from the
folder's moelab_export.json), or of `run_id`, or of a new run in `experiment`, and into the
folder (downstream.json and the README model card).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

KEYS = {
    "tasks": "comma-separated lm-eval task names",
    "include_path": "a folder of extra task YAMLs",
    "num_fewshot": "few-shot examples (default 0)",
    "batch_size": "HFLM batch size: N, auto or auto:N (default auto on a GPU, 8 on the CPU)",
    "device": "torch device (default cuda when available, else cpu)",
    "dtype": "bfloat16, float16 or float32 (default bfloat16 on a GPU, float32 on the CPU)",
    "limit": "examples per task (default: all)",
    "run_id": "MLflow run to log into",
    "experiment": "MLflow experiment for a new run",
    "tracking_uri": "MLflow tracking URI",
}


def parse_overrides(items: list[str]) -> dict[str, str]:
    """`key=value` arguments; a ValueError names a malformed or unknown key."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in KEYS:
            raise ValueError(f"{item!r} is not key=value with a key in {sorted(KEYS)}; fix it.")
        out[key] = value
    return out


def main(argv: list[str] | None = None) -> int:
    epilog = "\n".join(f"  {k}=...  {v}" for k, v in KEYS.items())
    parser = argparse.ArgumentParser(
        prog="moelab-eval",
        description=__doc__.splitlines()[0],
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model_dir", type=Path, help="a moelab-export folder")
    parser.add_argument("overrides", nargs="*", help="key=value (see below)")
    args = parser.parse_args(argv)
    import torch

    from moelab import eval as ev

    try:
        o = parse_overrides(args.overrides)
        tasks = o["tasks"].split(",") if "tasks" in o else list(ev.SEED_REPORT_TASKS)
        batch = ev.parse_batch_size(o["batch_size"]) if "batch_size" in o else None
        runtime = ev.pick_runtime(torch.cuda.is_available(), o.get("device"), o.get("dtype"), batch)
        shots, limit = int(o.get("num_fewshot", 0)), int(o["limit"]) if "limit" in o else None
        results = ev.evaluate(
            args.model_dir,
            tasks,
            include_path=o.get("include_path"),
            num_fewshot=shots,
            runtime=runtime,
            limit=limit,
        )
    except ValueError as err:
        print(f"moelab-eval: {err}", file=sys.stderr)
        return 2
    metrics = ev.downstream_metrics(results)
    print(json.dumps(metrics, indent=2))
    saved = ev.save_scores(args.model_dir, results, runtime, shots, limit)
    print(f"moelab-eval: {runtime}; scores in {saved}")
    target = ev.EvalTarget(o.get("tracking_uri"), o.get("run_id"), o.get("experiment"))
    run_id = ev.log_to_mlflow(
        ev.resolve_target(args.model_dir, target), metrics, results, ev.export_step(args.model_dir)
    )
    print(f"moelab-eval: logged to MLflow run {run_id}" if run_id else "moelab-eval: not logged")
    return 0


if __name__ == "__main__":
    sys.exit(main())
