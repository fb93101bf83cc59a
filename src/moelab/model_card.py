"""The exported folder's model card (`README.md`, Hugging Face's format).

`write_card` gathers what the card states from the source run (variant, parameters total and
active, tokens trained, the final eval loss, the MLflow run) and keeps those facts in the
folder's `moelab_export.json` under "card", so `moelab-eval` can rewrite the card with its
downstream scores (`downstream.json` in the folder) without the run dir at hand.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moelab.checkpoint import read_meta
from moelab.config import ModelConfig
from moelab.models.sizing import count_params
from moelab.rundir import RunDir

if TYPE_CHECKING:  # moelab.export calls write_card: no import of it at run time
    from moelab.export import Source

EXPORT_INFO = "moelab_export.json"
"""The folder's export record, `moelab.export.EXPORT_INFO`; the card's facts go under "card"."""

CARD = "README.md"
DOWNSTREAM = "downstream.json"
"""In the exported folder: the scores of the last `moelab-eval` (`moelab.eval.save_scores`)."""


def variant(model: ModelConfig) -> dict[str, Any]:
    """The model's shape as the card lists it."""
    out: dict[str, Any] = {"name": model.name, "ffn": model.ffn, "d_model": model.d_model}
    out |= {"n_layers": model.n_layers, "n_heads": model.n_heads, "vocab_size": model.vocab_size}
    if model.is_moe:
        moe = model.moe
        out |= {"num_experts": moe.num_experts, "top_k": moe.top_k, "granularity": moe.granularity}
        out |= {"total_experts": moe.total_experts, "active_experts": moe.active_experts}
        out |= {"moe_layers": len(model.moe_layer_indices()), "impl": moe.impl}
    return out


def tokens_trained(source: Source) -> int | None:
    """Steps x micro-batch x grad accumulation x world size x sequence length (the world size
    of the run's checkpoints); None when the run has no checkpoint metadata."""
    meta = read_meta(source.run_dir)
    if meta is None or source.step < 0:
        return None
    t = source.cfg.train
    per_step = t.micro_batch_size * t.grad_accum * int(meta["world_size"]) * source.cfg.data.seq_len
    return source.step * per_step


def mlflow_ref(run_dir: Path) -> dict[str, str]:
    """The run dir's `mlflow_run.json` ({} when the run had no MLflow run)."""
    path = RunDir(run_dir).run_ref
    ref = json.loads(path.read_text()) if path.exists() else {}
    return ref if isinstance(ref, dict) and "run_id" in ref else {}


def _last_at_or_before(points: list[tuple[int, float]], step: int) -> dict[str, Any] | None:
    kept = [p for p in points if p[0] <= step]
    if not kept:
        return None
    at, value = max(kept, key=lambda p: p[0])
    return {"value": value, "step": at}


def _mlflow_eval_loss(ref: dict[str, str]) -> list[tuple[int, float]] | None:
    if not ref:
        return None
    from mlflow.tracking import MlflowClient

    # An unreachable server fails at once (MLflow's defaults retry for minutes): the spool
    # still has the values.
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    saved = {k: os.environ.get(k) for k in quick}
    os.environ.update({k: v for k, v in quick.items() if saved[k] is None})
    try:
        client = MlflowClient(tracking_uri=ref["tracking_uri"])
        history = client.get_metric_history(ref["run_id"], "eval/loss")
    except Exception:  # any store error: fall back to the spool
        return None
    finally:
        for k in [k for k, v in saved.items() if v is None]:
            os.environ.pop(k, None)
    return [(m.step, m.value) for m in history]


def _spool_eval_loss(run_dir: Path) -> list[tuple[int, float]]:
    path = RunDir(run_dir).spool
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
    return [
        (int(r["step"]), float(r["metrics"]["eval/loss"]))
        for r in records
        if r.get("kind") == "metrics" and "eval/loss" in r.get("metrics", {})
    ]


def final_eval_loss(source: Source, ref: dict[str, str]) -> dict[str, Any] | None:
    """The last `eval/loss` the run logged at or before the exported step, with its step and
    where it was read (the MLflow store, else the run dir's MLflow spool); None if neither."""
    history = _mlflow_eval_loss(ref)
    where = "MLflow"
    if not history:
        history, where = _spool_eval_loss(source.run_dir), "the run's MLflow spool"
    found = _last_at_or_before(history, source.step if source.step >= 0 else 1 << 62)
    return found | {"from": where} if found else None


def card_facts(source: Source) -> dict[str, Any]:
    """Everything the card says about the run, JSON-serialisable."""
    counts = count_params(source.cfg.model)
    ref = mlflow_ref(source.run_dir)
    return {
        "variant": variant(source.cfg.model),
        "params_total": counts.total,
        "params_active": counts.active,
        "tokens_trained": tokens_trained(source),
        "step": source.step,
        "tag": source.tag,
        "run_dir": str(source.run_dir),
        "mlflow_run_id": ref.get("run_id"),
        "tracking_uri": ref.get("tracking_uri"),
        "eval_loss": final_eval_loss(source, ref),
    }


def write_card(out: Path, source: Source | None, fmt: str, reason: str) -> Path:
    """Write `<out>/README.md`; `source` None reuses the facts an earlier call kept in the
    folder's `moelab_export.json` (as `moelab-eval` does). Downstream scores are shown when
    `<out>/downstream.json` exists."""
    out = Path(out)
    info_path = out / EXPORT_INFO
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    facts = card_facts(source) if source is not None else info.get("card")
    if facts is None:
        raise ValueError(f"{out} has no card facts in {EXPORT_INFO}; export it with moelab-export.")
    info["card"] = facts
    _write_atomic(info_path, json.dumps(info, indent=2) + "\n")
    scores_path = out / DOWNSTREAM
    scores = json.loads(scores_path.read_text()) if scores_path.exists() else None
    card = out / CARD
    _write_atomic(card, render(out.name, facts, fmt, reason, scores))
    return card


def refresh_card(out: Path) -> Path | None:
    """Rewrite the card of an exported folder from its kept facts and current scores; None
    when the folder has no card facts (not written by moelab-export)."""
    info_path = Path(out) / EXPORT_INFO
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    if "card" not in info:
        return None
    return write_card(
        Path(out), None, str(info.get("format", "remote")), str(info.get("reason", ""))
    )


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


def _count(n: int | None) -> str:
    if n is None:
        return "not recorded"
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.2f}{unit} ({n:,})"
    return f"{n:,}"


def front_matter(facts: dict[str, Any], fmt: str) -> str:
    """YAML front matter the Hub reads (library, pipeline, tags)."""
    v = facts["variant"]
    tags = ["moelab", "moe" if "total_experts" in v else "dense", v["ffn"]]
    if fmt == "remote":
        tags.append("custom_code")
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation", "tags:"]
    lines += [f"  - {t}" for t in dict.fromkeys(tags)]
    return "\n".join([*lines, "---", ""])


def variant_lines(v: dict[str, Any]) -> list[str]:
    shape = (
        f"- Shape: d_model {v['d_model']}, {v['n_layers']} layers, {v['n_heads']} heads, "
        f"vocabulary {v['vocab_size']}"
    )
    lines = [f"- Variant: `{v['name']}` (ffn `{v['ffn']}`)", shape]
    if "total_experts" in v:
        lines.append(
            f"- Experts: {v['num_experts']} x granularity {v['granularity']} = "
            f"{v['total_experts']} per MoE layer ({v['moe_layers']} MoE layers), top-{v['top_k']}"
            f" x {v['granularity']} = {v['active_experts']} active per token; "
            f"implementation `{v['impl']}` (the export routes dropless)"
        )
    return lines


def run_lines(facts: dict[str, Any]) -> list[str]:
    loss = facts.get("eval_loss")
    loss_text = (
        f"{loss['value']:.4f} (step {loss['step']}, from {loss['from']})"
        if loss
        else "not recorded"
    )
    run_id = facts.get("mlflow_run_id")
    return [
        f"- Parameters: {_count(facts['params_total'])} total, "
        f"{_count(facts['params_active'])} active per token",
        f"- Checkpoint: `{facts['tag']}` (step {facts['step']}) of `{facts['run_dir']}`",
        f"- Tokens trained: {_count(facts.get('tokens_trained'))}",
        f"- Final eval loss: {loss_text}",
        f"- MLflow run: `{run_id}` ({facts.get('tracking_uri')})"
        if run_id
        else "- MLflow run: none",
    ]


def scores_lines(scores: dict[str, Any] | None) -> list[str]:
    if not scores:
        return ["Not evaluated yet: `moelab-eval <this folder>` adds the scores here."]
    lines = [
        f"`moelab-eval` ({scores.get('num_fewshot', 0)}-shot, limit {scores.get('limit')}, "
        f"{scores.get('dtype', '?')} on {scores.get('device', '?')}):",
        "",
        "| Task | Metric | Value | Stderr |",
        "|---|---|---|---|",
    ]
    for task, metrics in sorted(scores["tasks"].items()):
        for name, value in sorted(metrics.items()):
            if name.endswith("_stderr"):
                continue
            err = metrics.get(f"{name}_stderr")
            lines.append(
                f"| {task} | {name} | {value:.4f} | {'' if err is None else f'{err:.4f}'} |"
            )
    return lines


def usage_lines(name: str, fmt: str) -> list[str]:
    remote = ", trust_remote_code=True" if fmt == "remote" else ""
    return [
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'path = "{name}"  # this folder',
        f"model = AutoModelForCausalLM.from_pretrained(path{remote})",
        "tok = AutoTokenizer.from_pretrained(path)",
        'ids = tok("To be, or not to be", return_tensors="pt").input_ids',
        "out = model.generate(ids, max_new_tokens=40, do_sample=False)",
        "print(tok.decode(out[0, ids.shape[1]:]))",
        "```",
    ]


def render(
    name: str, facts: dict[str, Any], fmt: str, reason: str, scores: dict[str, Any] | None
) -> str:
    """The card's Markdown."""
    how = (
        "transformers' own classes: no `trust_remote_code`"
        if fmt == "native"
        else "moelab's modeling code in the folder: load with `trust_remote_code=True`"
    )
    parts = [
        front_matter(facts, fmt),
        f"# {name}",
        "",
        f"A `{facts['variant']['name']}` model trained with moelab, exported by `moelab-export`.",
        "",
        "## Model",
        "",
        *variant_lines(facts["variant"]),
        *run_lines(facts),
        "",
        "## Format",
        "",
        f"`{fmt}`: {how}. {reason}",
        "",
        "## Downstream scores",
        "",
        *scores_lines(scores),
        "",
        "## How to load",
        "",
        *usage_lines(name, fmt),
        "",
    ]
    return "\n".join(parts)
