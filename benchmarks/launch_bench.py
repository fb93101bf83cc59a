"""Real `moelab-launch` runs (and the plain DeepSpeed baseline), alternated A B C C B A.

Sections (each a table and one JSONL record in benchmarks/results/):
  variants  seed_cpu_{dense,moe,hybrid} on 2 ranks, ep_size 2: tokens/s and the measured
            MoE/dense and hybrid/dense ratios beside the FLOPs-predicted and the seed report's;
            moe top-1 vs top-2 and moe_layer_frequency 1 vs 2; the MoE and hybrid
            again with model.moe.impl=autoep (DeepSpeed AutoEP, dropless)  -> variants.jsonl
  overhead  moelab-launch vs benchmarks/baseline/train_plain.py (same model, data, ds_config):
            time to first step and steady step time; the plain script run twice a round
            gives the A/A control: what the same command differs by from itself -> overhead.jsonl
  scaling   1 vs 2 ranks, ep_size 1 vs 2                                 -> scaling.jsonl
            (step time vs num_experts at fixed top-k and tokens: moe_layer.py's experts table)

Step times come from wall-clock marks of the logged steps (moelab: the MLflow spool's
timestamps of rank 0's metric records; baseline: its printed marks), so both sides are
measured the same way; time to first step counts from the command's start.

    PYTHONPATH=src:. DS_ACCELERATOR=cpu .venv/bin/python benchmarks/launch_bench.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchlib import (
    BENCH_DIR,
    REPO,
    RESULTS_DIR,
    append_jsonl,
    free_port,
    machine,
    note_end_load,
    progress,
    record,
    schedule,
    steady_and_first,
)
from launch_bench_sections import SECTIONS, Measure, variants_section

from moelab.rundir import RunDir
from moelab.shapes import threads_per_rank

BIN = Path(sys.executable).parent
SEQ_LEN = 256  # the seed's 2048 / 8, like d_model
CACHE = os.environ.get("MOELAB_CACHE", str(REPO / ".cache" / "moelab"))


@dataclass(frozen=True)
class Case:
    """One launch configuration: moelab overrides (or the plain baseline) and its ranks."""

    name: str
    overrides: tuple[str, ...]
    ranks: int = 2
    baseline: bool = False
    sections: tuple[str, ...] = ()


MOE = ("model=seed_cpu_moe", "parallel.ep_size=2")
HYBRID = ("model=seed_cpu_hybrid", "parallel.ep_size=2")
AUTOEP = "model.moe.impl=autoep"
CASES = [
    Case("dense", ("model=seed_cpu_dense",), sections=("variants",)),
    Case("moe", MOE, sections=("variants", "overhead", "scaling")),
    Case("hybrid", HYBRID, sections=("variants",)),
    Case("moe_autoep", (*MOE, AUTOEP), sections=("variants",)),
    Case("hybrid_autoep", (*HYBRID, AUTOEP), sections=("variants",)),
    Case("moe_top1", (*MOE, "model.moe.top_k=1"), sections=("variants",)),
    Case("moe_freq2", (*MOE, "model.moe.moe_layer_frequency=2"), sections=("variants",)),
    Case("baseline", MOE, baseline=True, sections=("overhead",)),
    # The plain script again, in the same rounds: the A/A control (the bench's noise floor).
    Case("baseline_again", MOE, baseline=True, sections=("overhead",)),
    Case("moe_ep1", ("model=seed_cpu_moe", "parallel.ep_size=1"), sections=("scaling",)),
    Case("moe_1rank", ("model=seed_cpu_moe", "parallel.ep_size=1"), 1, sections=("scaling",)),
]


@dataclass
class Bench:
    args: argparse.Namespace
    work: Path
    results: dict[str, list[Measure]] = field(default_factory=dict)

    def common(self, case: Case) -> list[str]:
        a = self.args
        return [
            *case.overrides,
            f"data.seq_len={SEQ_LEN}",
            f"data.cache_dir={CACHE}",
            f"train.steps={a.steps}",
            f"train.micro_batch_size={a.micro_batch_size}",
            f"train.log_every={a.log_every}",
            "train.warmup_steps=2",
            "train.eval_every=0",
            "train.eval_batches=1",
            "train.progress=false",
            f"cluster.nproc_per_node={case.ranks}",
        ]

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.update(
            PATH=f"{BIN}:{env.get('PATH', '')}",
            HF_HUB_OFFLINE="1",
            PYTHONUNBUFFERED="1",
            TORCH_EXTENSIONS_DIR=env.get(
                "TORCH_EXTENSIONS_DIR", str(REPO / ".cache/torch_extensions")
            ),
        )
        return env

    def run(self, case: Case, tag: str) -> Measure:
        return self.run_baseline(case, tag) if case.baseline else self.run_moelab(case, tag)

    def run_moelab(self, case: Case, tag: str) -> Measure:
        root = self.work / "runs" / tag
        cmd = [
            sys.executable,
            "-m",
            "launcher",
            *self.common(case),
            f"tracking.uri=sqlite:///{self.work}/mlflow.db",
            f"launch.runs_root={root}",
        ]
        start = time.time()
        out = subprocess.run(cmd, cwd=self.work, env=self.env(), capture_output=True, text=True)
        total = time.time() - start
        if out.returncode != 0:
            raise RuntimeError(f"{case.name} failed:\n{out.stdout[-3000:]}{out.stderr[-2000:]}")
        (run_dir,) = root.glob("*/*/")
        spool = RunDir(run_dir).spool
        marks, extra = spool_marks(spool)
        steady, first = steady_and_first(marks, start, self.args.log_every)
        tokens = self.args.micro_batch_size * SEQ_LEN * case.ranks
        return Measure(steady, first, total, tokens, extra)

    def run_baseline(self, case: Case, tag: str) -> Measure:
        model_json, blocks = baseline_inputs(self.common(case), self.work)
        a = self.args
        cmd = [
            "deepspeed",
            f"--num_gpus={case.ranks}",
            f"--master_port={free_port()}",
            "--no_local_rank",
            str(BENCH_DIR / "baseline" / "train_plain.py"),
            f"--model-json={model_json}",
            f"--blocks={blocks}",
            "--ep-size=2",
            f"--micro-batch-size={a.micro_batch_size}",
            f"--steps={a.steps}",
            f"--log-every={a.log_every}",
        ]
        env = self.env() | {"OMP_NUM_THREADS": str(threads_per_rank(os.cpu_count(), case.ranks))}
        start = time.time()
        out = subprocess.run(cmd, cwd=self.work, env=env, capture_output=True, text=True)
        total = time.time() - start
        if out.returncode != 0:
            raise RuntimeError(f"baseline failed:\n{out.stdout[-3000:]}{out.stderr[-2000:]}")
        marks = {}
        for line in out.stdout.splitlines():
            if "BENCH_MARK " in line:
                mark = json.loads(line.split("BENCH_MARK ", 1)[1])
                marks[int(mark["step"])] = float(mark["ts"])
        steady, first = steady_and_first(marks, start, a.log_every)
        tokens = a.micro_batch_size * SEQ_LEN * case.ranks
        return Measure(steady, first, total, tokens)


def spool_marks(spool: Path) -> tuple[dict[int, float], dict[str, float]]:
    """Logged step -> unix time of rank 0's metric record; medians of a few perf metrics."""
    marks: dict[int, float] = {}
    seen: dict[str, list[float]] = {}
    for line in spool.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") != "metrics" or "perf/step_time_s" not in rec["metrics"]:
            continue
        marks.setdefault(int(rec["step"]), rec["ts"] / 1000.0)
        if marks and int(rec["step"]) != min(marks):  # the first window holds step 1
            for key in ("perf/tokens_per_s", "moe/a2a_fraction", "perf/mfu"):
                if key in rec["metrics"]:
                    seen.setdefault(key, []).append(float(rec["metrics"][key]))
    return marks, {k: statistics.median(v) for k, v in seen.items()}


def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def compose(overrides: list[str]) -> Any:
    from launcher.compose import compose_config, to_schema

    return to_schema(compose_config(overrides))


def baseline_inputs(overrides: list[str], work: Path) -> tuple[Path, Path]:
    """The model config as JSON and the cached blocks directory, for the plain script."""
    from moelab.datakeys import blocks_dir

    cfg = compose(overrides)
    path = work / f"model-{cfg.model.name}.json"
    path.write_text(json.dumps(dataclasses.asdict(cfg.model)))
    return path, blocks_dir(cfg.data)


def prepare(work: Path, overrides: list[str]) -> None:
    """Tokenized blocks and the MLflow store exist before anything is timed."""
    from moelab.data import prepare_data

    prepare_data(compose(overrides).data)
    from mlflow import MlflowClient

    MlflowClient(f"sqlite:///{work}/mlflow.db").search_experiments()


def predicted_ratio(num: str, den: str, steps: int) -> float:
    """Throughput ratio num/den predicted by training FLOPs per token (den's / num's)."""
    from moelab.flops import flops_per_token

    def flops(name: str) -> int:
        case = next(c for c in CASES if c.name == name)
        cfg = compose([*case.overrides, f"data.seq_len={SEQ_LEN}", f"train.steps={steps}"])
        return flops_per_token(cfg.model, SEQ_LEN).training

    return flops(den) / flops(num)


def use_gpu_presets() -> None:
    """benchmarks/gpu.sh: the seed report's real shapes, bf16, one GPU (ep_size 1)."""
    global SEQ_LEN, CASES
    SEQ_LEN = 2048
    gpu = ("cluster.gpus_per_node=1", "parallel.ep_size=1", "train.precision=bf16")
    moe = ("model=seed_600m_moe", *gpu)
    CASES = [
        Case("dense", ("model=seed_600m_dense", *gpu), 1, sections=("variants",)),
        Case("moe", moe, 1, sections=("variants",)),
        Case("hybrid", ("model=seed_600m_hybrid", *gpu), 1, sections=("variants",)),
        Case("moe_autoep", (*moe, AUTOEP), 1, sections=("variants",)),
        Case("hybrid_autoep", ("model=seed_600m_hybrid", *gpu, AUTOEP), 1, sections=("variants",)),
        Case("moe_top1", (*moe, "model.moe.top_k=1"), 1, sections=("variants",)),
        Case("moe_freq2", (*moe, "model.moe.moe_layer_frequency=2"), 1, sections=("variants",)),
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=2, help="A B C ... rounds (ratios per round)")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per launch")
    p.add_argument("--log-every", type=int, default=4, help="steps between step-time marks")
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--sections", default="variants,overhead,scaling")
    p.add_argument("--cases", default="", help="only these cases (comma list; subsampling)")
    p.add_argument("--gpu", action="store_true", help="seed_600m presets, bf16, 1 GPU (variants)")
    args = p.parse_args()
    if args.gpu:
        use_gpu_presets()
        args.sections = "variants"
    sections = [s for s in args.sections.split(",") if s]
    cases = [c for c in CASES if set(c.sections) & set(sections)]
    if args.cases:
        cases = [c for c in cases if c.name in args.cases.split(",")]
    work = Path(tempfile.mkdtemp(prefix="moelab-bench-"))
    bench = Bench(args, work)
    prepare(work, [*cases[0].overrides, f"data.seq_len={SEQ_LEN}", f"data.cache_dir={CACHE}"])
    env = machine(gpu_name() if args.gpu else "cpu")
    plan = schedule([c.name for c in cases], args.rounds)
    by_name = {c.name: c for c in cases}
    for i, (rnd, name) in enumerate(plan, 1):
        m = bench.run(by_name[name], f"r{rnd}-{name}")
        bench.results.setdefault(name, []).append(m)
        progress(
            i,
            len(plan),
            f"round {rnd} {name:10s} {m.tokens_per_s:9.0f} tok/s  "
            f"steady {m.steady_s:.3f} s  first step {m.first_step_s:.1f} s",
        )
    note_end_load(env)
    settings = {
        "cases": [c.name for c in cases],
        "rounds": args.rounds,
        "steps": args.steps,
        "log_every": args.log_every,
        "micro_batch_size": args.micro_batch_size,
        "seq_len": SEQ_LEN,
    }
    for name in sections:
        table, result = (
            SECTIONS[name](bench.results)
            if name != "variants"
            else variants_section(bench.results, lambda a, b: predicted_ratio(a, b, args.steps))
        )
        print(f"\n## {name}\n{table}")
        append_jsonl(
            RESULTS_DIR / f"{name}{'_gpu' if args.gpu else ''}.jsonl",
            record(name, {"settings": settings, "table": table, **result}, env),
        )


if __name__ == "__main__":
    main()
