"""Print the latest finished run of each variant in an experiment as one table.

python -m launcher.summary --experiment demo
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from moelab.config import MoelabConfig

COLUMNS = ("variant", "params", "active", "train loss", "eval loss", "tokens/s", "wall s")


def latest_per_variant(client: Any, experiment: str) -> list[Any]:
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"no MLflow experiment named {experiment!r}")
    runs = client.search_runs(
        [exp.experiment_id],
        "attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
    )
    seen: dict[str, Any] = {}
    for run in runs:
        seen.setdefault(run.data.tags.get("variant", run.info.run_name), run)
    return list(seen.values())


def steady_tokens_per_s(client: Any, run_id: str) -> float:
    """Mean over logged windows, skipping the first (start-up)."""
    hist = [m.value for m in client.get_metric_history(run_id, "perf/tokens_per_s")]
    hist = hist[1:] or hist
    return statistics.fmean(hist) if hist else float("nan")


def row(client: Any, run: Any) -> list[str]:
    m, t = run.data.metrics, run.data.tags
    wall = (run.info.end_time - run.info.start_time) / 1000 if run.info.end_time else float("nan")
    return [
        t.get("variant", "?"),
        f"{int(t.get('params_total', 0)):,}",
        f"{int(t.get('params_active', 0)):,}",
        f"{m.get('train/loss', float('nan')):.3f}",
        f"{m.get('eval/loss', float('nan')):.3f}",
        f"{steady_tokens_per_s(client, run.info.run_id):,.0f}",
        f"{wall:.0f}",
    ]


def format_table(rows: list[list[str]], columns: tuple[str, ...] = COLUMNS) -> str:
    widths = [max(len(r[i]) for r in [list(columns), *rows]) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def mean_load_cv(run: Any) -> float:
    """Mean over MoE layers of the last logged `moe/layer_{i}/load_cv`."""
    cvs = [v for k, v in run.data.metrics.items() if k.endswith("/load_cv")]
    return statistics.fmean(cvs) if cvs else float("nan")


def knob_row(client: Any, run: Any, keys: list[str]) -> list[str]:
    """The swept values, then the metrics a MoE knob sweep compares."""
    m, p = run.data.metrics, run.data.params
    return [p.get(k, "?") for k in keys] + [
        f"{int(run.data.tags.get('params_total', 0)):,}",
        f"{int(run.data.tags.get('params_active', 0)):,}",
        f"{mean_load_cv(run):.3f}",
        f"{m.get('moe/dead_experts', float('nan')):.0f}",
        f"{m.get('train/z_loss', float('nan')):.2f}",
        f"{m.get('train/lm_loss', float('nan')):.3f}",
        f"{m.get('eval/loss', float('nan')):.3f}",
        f"{steady_tokens_per_s(client, run.info.run_id):,.0f}",
    ]


KNOB_COLUMNS = ("params", "active", "load cv", "dead", "z-loss", "train lm", "eval loss", "tok/s")


class KnobTableCallback(Callback):
    """After a sweep, one row per finished job: the swept `keys` beside load CV and eval loss.

    Registered by an experiment (`hydra.callbacks`), after the MLflow sweep callback.
    """

    def __init__(self, keys: list[str]) -> None:
        self.keys = list(keys)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from launcher.jobs import outcomes
        from launcher.tracking import mlflow_client

        rows = []
        for job in outcomes():
            if job.run_id and job.uri and not job.failed:
                client = mlflow_client(job.uri)
                rows.append(knob_row(client, client.get_run(job.run_id), self.keys))
        if rows:
            print(format_table(rows, (*self.keys, *KNOB_COLUMNS)), flush=True)


def main(argv: list[str] | None = None) -> None:
    from mlflow.tracking import MlflowClient

    from launcher.tracking import resolve_uri

    parser = argparse.ArgumentParser(description="Table of the latest run per variant")
    parser.add_argument("--experiment", default="moelab")
    parser.add_argument("--tracking-uri", default=None)
    args = parser.parse_args(argv)
    cfg = MoelabConfig()
    cfg.tracking.uri = args.tracking_uri
    uri = resolve_uri(cfg)
    client = MlflowClient(tracking_uri=uri)
    runs = latest_per_variant(client, args.experiment)
    print(format_table([row(client, r) for r in runs]))
    print(
        f"\nOpen the MLflow UI on these runs:  make mlflow-ui   (or: mlflow ui "
        f"--backend-store-uri {uri}) and browse to http://127.0.0.1:5000"
    )


if __name__ == "__main__":
    main()
