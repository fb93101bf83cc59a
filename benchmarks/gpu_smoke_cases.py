"""The GPU smoke test's runs: the case table of each device, the launch overrides of a case,
what one run yields (`RunResult`) and the time guard (`Clock`)."""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gpu_smoke_checks import FP16_SCALE_POWER, json_safe

EXPERIMENT = "gpu_smoke"
TAG_KEYS = (
    "device",
    "device_name",
    "accelerator",
    "dist_backend",
    "params_device",
    "moelab.optimizer",
    "perf.peak_source",
    "perf.peak_tflops",
    "moelab.stopped_at_step",
    "version.torch",
    "version.deepspeed",
)
METRICS = ("train/loss", "perf/tokens_per_s", "perf/mfu", "perf/device_mem_peak_gib")


@dataclass(frozen=True)
class Case:
    """One run: a model at a ZeRO stage and precision, launched once (or stopped and resumed)."""

    name: str
    model: str
    zero: int
    precision: str = "bf16"
    role: str = "matrix"
    """matrix (all per-run checks), telemetry_off (the overhead pair's other side) or fp16."""
    stop_after: int = 0
    """> 0: stop after this step with a checkpoint, then `moelab-launch resume` to the end."""
    extra: tuple[str, ...] = ()

    @property
    def is_moe(self) -> bool:
        return "dense" not in self.model


@dataclass(frozen=True)
class Settings:
    device: str
    steps: int
    log_every: int
    seq_len: int
    micro_batch: int
    ranks: int
    ep_size: int
    budget_s: float
    hard_limit_s: float
    launch_timeout_s: float


def settings_for(device: str, args: argparse.Namespace) -> Settings:
    gpu = device == "cuda"
    return Settings(
        device=device,
        steps=args.steps,
        log_every=args.log_every,
        seq_len=args.seq_len or (2048 if gpu else 128),
        micro_batch=args.micro_batch_size or 4,
        ranks=1 if gpu else 2,
        ep_size=1 if gpu else 2,
        budget_s=args.budget_s or (450.0 if gpu else 1200.0),
        hard_limit_s=args.hard_limit_s or (480.0 if gpu else 1320.0),
        launch_timeout_s=args.launch_timeout_s,
    )


TELEMETRY_ON = {"cuda": "seed_600m_moe-z2", "cpu": "tiny_moe_top2-z0"}
"""The matrix run that is the telemetry-on side of the overhead pair."""


def cases_for(device: str) -> list[Case]:
    """All runs, most important first (the time guard skips from the end)."""
    tiny = "tiny_moe_top2"
    fp16 = (f"train.fp16_initial_scale_power={FP16_SCALE_POWER}",)
    ckpt = Case(f"{tiny}-z2", tiny, 2, stop_after=10)
    if device == "cuda":
        seeds = ("seed_600m_moe", "seed_600m_dense", "seed_600m_hybrid")
        matrix = [Case(f"{m}-z{z}", m, z) for m in seeds for z in (2, 0)]
        on = next(c for c in matrix if c.name == TELEMETRY_ON[device])
        return [
            on,
            Case(
                f"{on.name}-telemetry_off",
                on.model,
                on.zero,
                role="telemetry_off",
                extra=("telemetry.enabled=false",),
            ),
            *[c for c in matrix if c is not on],
            ckpt,
            Case(f"{tiny}-z2-fp16", tiny, 2, "fp16", role="fp16", extra=fp16),
            Case(f"{tiny}-z0", tiny, 0),
            Case(f"{tiny}-z1-fp16", tiny, 1, "fp16", role="fp16", extra=fp16),
        ]
    on = Case(f"{tiny}-z0", tiny, 0)
    return [
        on,
        Case(
            f"{on.name}-telemetry_off",
            tiny,
            0,
            role="telemetry_off",
            extra=("telemetry.enabled=false",),
        ),
        ckpt,
        Case("tiny_dense-z0", "tiny_dense", 0),
        Case("tiny_dense-z2", "tiny_dense", 2),
        Case(f"{tiny}-z2-fp16", tiny, 2, "fp16", role="fp16", extra=fp16),
        Case(f"{tiny}-z1-fp16", tiny, 1, "fp16", role="fp16", extra=fp16),
    ]


def case_overrides(case: Case, s: Settings, work: Path, cache: Path) -> list[str]:
    """Hydra overrides of one launch (also what moelab-plan sizes)."""
    o = [
        f"model={case.model}",
        f"zero=stage{case.zero}",
        f"train.precision={case.precision}",
        f"data.seq_len={s.seq_len}",
        f"model.max_seq_len={s.seq_len}",
        f"data.cache_dir={cache}",
        f"train.steps={s.steps}",
        f"train.micro_batch_size={s.micro_batch}",
        f"train.log_every={s.log_every}",
        "train.warmup_steps=2",
        "train.eval_every=0",
        "train.eval_batches=1",
        "train.progress=false",
        f"tracking.uri=sqlite:///{work / 'mlflow.db'}",
        f"tracking.experiment={EXPERIMENT}",
        f"tracking.run_name={case.name}",
        f"launch.runs_root={work / 'runs' / case.name}",
        "cluster.gpus_per_node=1" if s.device == "cuda" else f"cluster.nproc_per_node={s.ranks}",
    ]
    if case.is_moe:
        o.append(f"parallel.ep_size={s.ep_size}")
    if case.stop_after:
        o += [f"train.checkpoint_every={case.stop_after}", f"train.stop_after={case.stop_after}"]
    if case.role == "fp16":  # a checkpoint at the end holds DeepSpeed's skipped-step count
        o.append(f"train.checkpoint_every={s.steps}")
    return o + list(case.extra)


@dataclass
class Launch:
    cmd: list[str]
    rc: int
    seconds: float
    timed_out: bool
    log: str


@dataclass
class RunResult:
    case: Case
    overrides: list[str]
    launches: list[Launch] = field(default_factory=list)
    run_dir: str | None = None
    run_id: str | None = None
    status: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    log_tail: list[str] = field(default_factory=list)

    @property
    def launched_ok(self) -> bool:
        return bool(self.launches) and all(x.rc == 0 for x in self.launches)

    def as_json(self) -> dict[str, Any]:
        return json_safe(
            {
                "name": self.case.name,
                **{k: v for k, v in asdict(self.case).items() if k != "name"},
                "overrides": self.overrides,
                "launches": [asdict(x) for x in self.launches],
                "run_dir": self.run_dir,
                "run_id": self.run_id,
                "mlflow_status": self.status,
                "tags": self.tags,
                "history": {k: [list(p) for p in v] for k, v in self.history.items()},
                **self.figures,
                "error": self.error,
                "log_tail": self.log_tail,
            }
        )


class Clock:
    """The smoke's time guard, counted from --t0 (the wrapper's start, set-up included)."""

    def __init__(self, t0: float, s: Settings) -> None:
        self.t0, self.s = t0, s
        self.durations: list[float] = []

    def elapsed(self) -> float:
        return time.time() - self.t0

    def estimate(self, launches: int) -> float:
        each = statistics.median(self.durations) if self.durations else 30.0
        return each * launches

    def may_start(self, launches: int) -> tuple[bool, str]:
        e, need = self.elapsed(), self.estimate(launches)
        if e >= self.s.budget_s:
            return False, f"{e:.0f} s elapsed, past the {self.s.budget_s:.0f} s launch budget"
        if e + need > self.s.hard_limit_s:
            return False, (
                f"{e:.0f} s elapsed + ~{need:.0f} s needed > {self.s.hard_limit_s:.0f} s limit"
            )
        return True, ""

    def timeout(self) -> float:
        return max(10.0, min(self.s.launch_timeout_s, self.s.hard_limit_s - self.elapsed()))
