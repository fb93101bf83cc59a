"""GPU smoke test: the first contact of moelab with one GPU, in at most 8 minutes.

Real `moelab-launch` runs (local backend, one rank, a sqlite MLflow store in a work folder),
read back from MLflow and `moelab-plan`:
  - tiny_moe_top2, seed_600m_dense, seed_600m_moe and seed_600m_hybrid in bf16 at ZeRO-0 and
    ZeRO-2, 20 steps each: launch succeeds, the loss is finite and falls (mean of the last 5
    steps below the mean of the first 5), the run is tagged accelerator cuda, backend nccl,
    parameters on cuda; tokens/s, MFU (against the datasheet table for the GPU's name, and
    consistent with tokens/s) and peak device memory against the planner's per-device estimate;
  - telemetry off vs on: steady tokens/s of seed_600m_moe ZeRO-2 (first window left out),
    time ratio on/off <= 1.03;
  - checkpoint: tiny_moe_top2 ZeRO-2 stops after step 10 with a checkpoint and
    `moelab-launch resume` takes it to step 20, every logged step once (this is also the
    matrix's tiny_moe_top2 ZeRO-2 run);
  - fp16: tiny_moe_top2 at ZeRO-2 and ZeRO-1 (the launcher refuses fp16 at ZeRO-0) with the
    loss scale starting at 2**24, so that it overflows: the run must finish with a finite loss,
    DeepSpeed having skipped the overflowing steps.
Every figure, each check's pass/fail and the device go to one JSON (default
benchmarks/results/gpu_smoke.json), written after every run and always before the exit; the
exit status is non-zero if a check failed or was skipped. No new launch starts past
--budget-s (7.5 min from --t0, which benchmarks/gpu_smoke.sh sets before its set-up); every
launch has a timeout that ends it by --hard-limit-s.

`--device cpu` runs the same flow here with the tiny presets on 2 CPU ranks (ep_size 2):
GPU-only assertions (datasheet MFU, device memory, the telemetry-overhead target, CUDA) are
marked "n/a on cpu", never "pass".

    bash benchmarks/gpu_smoke.sh                 # on the GPU machine (set-up included)
    PYTHONPATH=src:. .venv/bin/python benchmarks/gpu_smoke.py --device cpu --out /tmp/s.json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
for _p in (BENCH_DIR, BENCH_DIR.parent / "src", BENCH_DIR.parent):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from benchlib import REPO, RESULTS_DIR, format_table, machine  # noqa: E402

from moelab.rundir import RunDir  # noqa: E402  (torch-free)

SCHEMA = "moelab.gpu_smoke/1"
PASS, FAIL, NA_CPU, SKIPPED, INFO = "pass", "fail", "n/a on cpu", "skipped", "info"
STATUSES = (PASS, FAIL, NA_CPU, SKIPPED, INFO)
"""A check's status. `info`: a figure recorded without a target (no pass/fail)."""

TELEMETRY_MAX_RATIO = 1.03
"""Step time with telemetry on / off (steady tokens/s off / on)."""
MEMORY_TOLERANCE = 0.25
"""Measured peak device memory within +-25% of moelab-plan's per-device estimate."""
MFU_TOLERANCE = 0.02
"""Logged MFU against tokens/s x FLOPs/token / peak (relative)."""
FALL_SPAN = 5
"""Falling loss: mean loss over the last FALL_SPAN steps below that of the first FALL_SPAN."""
FP16_SCALE_POWER = 24
"""fp16 run: the loss scale starts at 2**24 (DeepSpeed's default 2**16) so that it overflows."""
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


# --------------------------------------------------------------------------------------------
# Pure evaluation (tested in tests/test_benchmarks.py)


def log_steps(steps: int, log_every: int) -> list[int]:
    """The steps at which the loop logs train metrics: every log_every-th and the last."""
    return [s for s in range(1, steps + 1) if s % log_every == 0 or s == steps]


def step_windows(points: Iterable[tuple[int, float]]) -> list[tuple[int, int, float]]:
    """(first step, last step, value) of each logging window: a value logged at step s is the
    mean over the steps since the previous logged step (train/loss is a window mean)."""
    out, prev = [], 0
    for step, value in sorted(dict(points).items()):
        out.append((prev + 1, step, value))
        prev = step
    return out


def span_mean(windows: Sequence[tuple[int, int, float]], lo: int, hi: int) -> float:
    """Step-weighted mean of the windows lying within steps lo..hi (NaN if none does)."""
    inside = [(end - start + 1, v) for start, end, v in windows if start >= lo and end <= hi]
    n = sum(k for k, _ in inside)
    return sum(k * v for k, v in inside) / n if n else math.nan


def loss_verdict(
    points: Sequence[tuple[int, float]], steps: int, log_every: int, span: int = FALL_SPAN
) -> dict[str, Any]:
    """Finite, complete (each logging step exactly once) and falling loss.

    Falling: the mean loss of the last `span` steps is below that of the first `span` steps
    (with log_every == span these are the first and the last logged values)."""
    logged = sorted(s for s, _ in points)
    expected = log_steps(steps, log_every)
    windows = step_windows(points)
    first = span_mean(windows, 1, span)
    last = span_mean(windows, steps - span + 1, steps)
    finite = bool(points) and all(math.isfinite(v) for _, v in points)
    complete = logged == expected
    falling = math.isfinite(first) and math.isfinite(last) and last < first
    problems = []
    if not finite:
        problems.append("no loss logged" if not points else "non-finite loss")
    if not complete:
        problems.append(f"logged steps {logged}, expected {expected} (each once)")
    if not falling:
        problems.append(f"not falling: first {span} steps {first:.4g}, last {span} {last:.4g}")
    return {
        "ok": finite and complete and falling,
        "finite": finite,
        "complete": complete,
        "falling": falling,
        "first_mean": first,
        "last_mean": last,
        "detail": "; ".join(problems),
    }


def steady(points: Iterable[tuple[int, float]], skip: Iterable[int] = ()) -> float:
    """Median of the logged values, leaving out the windows ending at `skip` (NaN if none)."""
    left = set(skip)
    values = [v for s, v in points if s not in left and math.isfinite(v)]
    return statistics.median(values) if values else math.nan


def first_windows(launch_starts: Iterable[int], logged: Iterable[int]) -> list[int]:
    """The first logged step of each launch (`launch_starts`: the first step each one ran):
    it holds start-up effects, so steady figures leave it out."""
    steps = sorted(set(logged))
    return [next(s for s in steps if s >= start) for start in launch_starts if steps[-1] >= start]


def telemetry_ratio(tokens_on: float, tokens_off: float) -> float:
    """Step time with telemetry on over off: steady tokens/s off / on."""
    return tokens_off / tokens_on if tokens_on > 0 else math.nan


def expected_mfu(tokens_per_s: float, flops_per_token: float, world: int, peak: float) -> float:
    """MFU from throughput: model FLOP/s per device over the device's peak (TFLOP/s)."""
    return tokens_per_s * flops_per_token / world / (peak * 1e12) if peak > 0 else math.nan


def relative_gap(a: float, b: float) -> float:
    return abs(a / b - 1.0) if b and math.isfinite(a) and math.isfinite(b) else math.nan


def tag_verdict(tags: dict[str, str], device: str) -> dict[str, Any]:
    """The run ran where it should: accelerator and process-group backend of `device`
    (cuda: cuda/nccl; cpu: cpu/gloo), the rank's device and its parameters on it. A missing
    tag fails the check."""
    want = {"cuda": ("cuda", "nccl"), "cpu": ("cpu", "gloo")}[device]
    problems = []
    for key, value in zip(("accelerator", "dist_backend"), want, strict=True):
        got = tags.get(key)
        if got != value:
            problems.append(f"{key}={got!r}, expected {value!r}")
    for key in ("device", "params_device"):
        got = tags.get(key)
        if got is None and key == "params_device":
            got = tags.get("device")  # the rank's device, where its parameters are
        if got is None or not str(got).startswith(device):
            problems.append(f"{key}={got!r}, expected {device}[:N]")
    return {"ok": not problems, "detail": "; ".join(problems)}


def peak_source_expected(device_name: str | None, precision: str) -> str | None:
    """The `perf.peak_source` tag that a GPU in the datasheet table gets, e.g. table:h200:bf16."""
    if not device_name:
        return None
    try:
        from moelab.devices import device_key
    except ImportError:
        return None
    key = device_key(device_name)
    return f"table:{key}:{precision}" if key else None


def memory_ratio(peak_gib: float, plan_bytes: float) -> float:
    """Measured peak device memory over the planner's per-device estimate."""
    return peak_gib * 2**30 / plan_bytes if plan_bytes > 0 else math.nan


def count_overflows(log_text: str) -> int:
    """DeepSpeed's loss-scale overflow lines (rank 0 logs one per skipped fp16 step)."""
    return sum(1 for line in log_text.splitlines() if "OVERFLOW!" in line)


def summarize(checks: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Counts by status; ok when nothing failed and nothing was skipped."""
    counts = {s: sum(1 for c in checks if c["status"] == s) for s in STATUSES}
    return {**counts, "checks": len(checks), "ok": counts[FAIL] == 0 and counts[SKIPPED] == 0}


REPORT_KEYS = {
    "schema": str,
    "time": str,
    "device": str,
    "device_name": str,
    "machine": dict,
    "settings": dict,
    "elapsed_s": float,
    "runs": list,
    "checks": list,
    "skipped": list,
    "summary": dict,
}
CHECK_KEYS = {"name": str, "status": str, "value": object, "target": str, "detail": str}


def validate_report(report: dict[str, Any]) -> list[str]:
    """Problems with a report's shape (empty when it follows the schema)."""
    problems = [
        f"{k}: missing or not {t.__name__}"
        for k, t in REPORT_KEYS.items()
        if not isinstance(report.get(k), t)
    ]
    if report.get("schema") not in (None, SCHEMA):
        problems.append(f"schema {report.get('schema')!r} is not {SCHEMA}")
    for i, check in enumerate(report.get("checks") or []):
        problems += [
            f"checks[{i}].{k}: missing or not {t.__name__}"
            for k, t in CHECK_KEYS.items()
            if not isinstance(check.get(k), t) or (t is object and k not in check)
        ]
        if check.get("status") not in STATUSES:
            problems.append(f"checks[{i}].status {check.get('status')!r} unknown")
    summary = report.get("summary") or {}
    if report.get("checks") is not None and summary != summarize(report["checks"]):
        problems.append("summary does not match the checks")
    return problems


def check(
    name: str, status: str, value: Any = None, target: str = "", detail: str = ""
) -> dict[str, Any]:
    assert status in STATUSES, status
    return {
        "name": name,
        "status": status,
        "value": _plain(value),
        "target": target,
        "detail": detail,
    }


def _plain(value: Any) -> Any:
    """JSON-safe: NaN/inf become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------
# The runs


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
        return _plain(
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


def child_env(device: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    path = [str(REPO / "src"), str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(":") if p]
    env.update(
        DS_ACCELERATOR=device,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=":".join(dict.fromkeys(path)),
        PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
        TORCH_EXTENSIONS_DIR=env.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache/torch_extensions")),
    )
    return env


def run_command(cmd: list[str], log: Path, env: dict[str, str], timeout: float) -> Launch:
    """One launcher command, its output appended to `log`; stopped at `timeout` the way a user
    would: SIGTERM (the ranks stop after their step), again (the ranks are killed), then kill."""
    start = time.monotonic()
    timed_out = False
    with log.open("ab") as out:
        out.write(f"\n$ {' '.join(cmd)}\n".encode())
        out.flush()
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            for sig in (signal.SIGTERM, signal.SIGTERM):
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)
                try:
                    proc.wait(timeout=5)
                    break
                except subprocess.TimeoutExpired:
                    continue
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    rc = proc.returncode if proc.returncode is not None else -9
    return Launch(cmd, rc, round(time.monotonic() - start, 2), timed_out, str(log))


def checkpoint_fp16_state(run_dir: Path) -> dict[str, Any]:
    """DeepSpeed's count of skipped updates (fp16: loss-scale overflows) and, where the model
    states hold the optimizer (ZeRO-0), the loss scale, from rank 0's model states in the
    run's newest checkpoint (the ranks log overflows only at INFO level, which they hide)."""
    from moelab.checkpoint import read_meta
    from moelab.dscompat import NON_EXPERT_FILE

    meta = read_meta(run_dir)
    path = RunDir(run_dir).checkpoints / str(meta["tag"]) / NON_EXPERT_FILE if meta else None
    if path is None or not path.exists():
        return {}
    import torch

    state = torch.load(path, map_location="cpu", weights_only=False)
    out: dict[str, Any] = {}
    if "skipped_steps" in state:
        out["skipped_steps"] = int(state["skipped_steps"])
    opt = state.get("optimizer")
    if isinstance(opt, dict) and "cur_scale" in opt:
        out["final_loss_scale"] = float(opt["cur_scale"])
    return out


def plan_json(overrides: list[str]) -> dict[str, Any]:
    """`moelab-plan <overrides> plan.format=json`, in this process (its entry point)."""
    from launcher import plan

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        plan.main([*overrides, "plan.format=json"])
    return json.loads(buf.getvalue())


class Smoke:
    def __init__(self, args: argparse.Namespace, s: Settings, clock: Clock) -> None:
        self.args, self.s, self.clock = args, s, clock
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.work = Path(args.work or REPO / "runs" / f"gpu_smoke-{s.device}-{stamp}").resolve()
        self.cache = Path(args.cache_dir or REPO / ".cache" / "moelab").resolve()
        self.env = child_env(s.device)
        self.results: list[RunResult] = []
        self.checks: list[dict[str, Any]] = []
        self.skipped: list[dict[str, str]] = []
        self.plans: dict[str, dict[str, Any]] = {}
        self.device_name = "cpu"
        self.client: Any = None

    # -- set-up ----------------------------------------------------------------------------

    def environment(self) -> None:
        import torch

        if self.s.device == "cuda":
            ok = torch.cuda.is_available()
            self.device_name = torch.cuda.get_device_name(0) if ok else "no CUDA device"
            self.checks.append(
                check(
                    "environment: CUDA device",
                    PASS if ok else FAIL,
                    self.device_name,
                    "torch.cuda.is_available()",
                    f"torch {torch.__version__}, CUDA {torch.version.cuda}",
                )
            )
            if not ok:
                raise SystemExit("no CUDA device")
        else:
            from moelab.telemetry.perf import cpu_model

            self.device_name = cpu_model()
            self.checks.append(check("environment: CUDA device", NA_CPU, self.device_name))

    def prepare(self, cases: list[Case]) -> None:
        """Tokenized blocks in the cache, one plan per matrix run, the MLflow store: before
        anything is timed."""
        from launcher.compose import compose_config, to_schema
        from moelab.data import prepare_data

        self.work.mkdir(parents=True, exist_ok=True)
        (self.work / "logs").mkdir(exist_ok=True)
        t = time.time()
        prepare_data(to_schema(compose_config(case_overrides(cases[0], *self._where()))).data)
        print(f"gpu_smoke: data ready in {time.time() - t:.0f} s", flush=True)
        for case in cases:
            if case.role == "matrix":
                try:
                    self.plans[case.name] = plan_json(case_overrides(case, *self._where()))
                except BaseException as err:  # moelab-plan exits (SystemExit) on a bad config
                    self.plans[case.name] = {"error": f"{type(err).__name__}: {err}"}
        from mlflow import MlflowClient

        self.client = MlflowClient(f"sqlite:///{self.work / 'mlflow.db'}")
        self.client.search_experiments()  # creates the store's tables now, not in a timed run

    def _where(self) -> tuple[Settings, Path, Path]:
        return self.s, self.work, self.cache

    # -- one case --------------------------------------------------------------------------

    def new_result(self, case: Case) -> RunResult:
        return RunResult(case, case_overrides(case, *self._where()))

    def run(self, r: RunResult) -> None:
        """Launch (and resume) one case, then read its run back from MLflow into `r`."""
        case = r.case
        log = self.work / "logs" / f"{case.name}.log"
        cmd = [sys.executable, "-m", "launcher", *r.overrides]
        r.launches.append(self._launch(cmd, log))
        run_dir = self._run_dir(case)
        if case.stop_after and run_dir is not None and r.launches[0].rc == 0:
            r.figures["status_after_stop"] = self._status(run_dir)
            r.figures["checkpoint_step_after_stop"] = self._meta_step(run_dir)
            resume = [sys.executable, "-m", "launcher", "resume", str(run_dir)]
            r.launches.append(self._launch(resume, log))
        if run_dir is not None:
            r.run_dir = str(run_dir)
            self._collect(r, run_dir)
        if not r.launched_ok:
            r.log_tail = log.read_text(errors="replace").splitlines()[-40:]

    def _launch(self, cmd: list[str], log: Path) -> Launch:
        launch = run_command(cmd, log, self.env, self.clock.timeout())
        self.clock.durations.append(launch.seconds)
        return launch

    def _run_dir(self, case: Case) -> Path | None:
        found = sorted((self.work / "runs" / case.name).glob(f"*/*/{RunDir('.').run_ref.name}"))
        return found[-1].parent if found else None

    def _status(self, run_dir: Path) -> str | None:
        ref = json.loads(RunDir(run_dir).run_ref.read_text())
        return str(self.client.get_run(ref["run_id"]).info.status)

    def _meta_step(self, run_dir: Path) -> int | None:
        from moelab.checkpoint import read_meta

        meta = read_meta(run_dir)
        return int(meta["step"]) if meta else None

    def _collect(self, r: RunResult, run_dir: Path) -> None:
        ref = json.loads(RunDir(run_dir).run_ref.read_text())
        r.run_id = ref["run_id"]
        run = self.client.get_run(r.run_id)
        r.status = str(run.info.status)
        r.tags = {k: run.data.tags[k] for k in TAG_KEYS if k in run.data.tags}
        for key in METRICS:
            hist = self.client.get_metric_history(r.run_id, key)
            r.history[key] = [(int(m.step), float(m.value)) for m in hist]
        r.figures["checkpoint_step"] = self._meta_step(run_dir)
        if r.case.role == "fp16":
            train_log = RunDir(run_dir).log
            logged = count_overflows(train_log.read_text(errors="replace"))
            state = checkpoint_fp16_state(run_dir)
            r.figures["overflow_lines"] = logged
            r.figures.update(state)
            r.figures["overflows"] = max(logged, state.get("skipped_steps") or 0)

    # -- figures and checks ----------------------------------------------------------------

    def figures(self, r: RunResult) -> None:
        s = self.s
        loss = r.history.get("train/loss", [])
        tps = r.history.get("perf/tokens_per_s", [])
        starts = [1] + ([r.case.stop_after + 1] if r.case.stop_after else [])
        skip = first_windows(starts, [p for p, _ in tps]) if tps else []
        f = r.figures
        f["loss"] = loss_verdict(loss, s.steps, s.log_every)
        f["tokens_per_s"] = steady(tps, skip)
        f["mfu"] = steady(r.history.get("perf/mfu", []), skip)
        mem = [v for _, v in r.history.get("perf/device_mem_peak_gib", [])]
        f["peak_mem_gib"] = max(mem) if mem else math.nan
        plan = self.plans.get(r.case.name, {})
        if "memory_per_device" in plan:
            f["plan_mem_gib"] = plan["memory_per_device"]["total"] / 2**30
            f["mem_ratio"] = memory_ratio(f["peak_mem_gib"], plan["memory_per_device"]["total"])
            f["flops_per_token"] = plan["flops_per_token"]
        elif plan:
            f["plan_error"] = plan.get("error", "")
        peak = float(r.tags.get("perf.peak_tflops", "nan"))
        if "flops_per_token" in f:
            f["mfu_expected"] = expected_mfu(f["tokens_per_s"], f["flops_per_token"], s.ranks, peak)

    def judge(self, r: RunResult) -> list[dict[str, Any]]:
        """The checks of one run (by its role)."""
        c, f, name, gpu = r.case, r.figures, r.case.name, self.s.device == "cuda"
        out = []
        launched = r.launched_ok and r.status == "FINISHED"
        detail = "" if launched else self._failure(r)
        out.append(
            check(
                f"{name}: launch",
                PASS if launched else FAIL,
                r.status,
                "exit 0, MLflow run FINISHED",
                detail,
            )
        )
        if c.role == "telemetry_off":
            return out
        loss = f["loss"]
        if c.role == "fp16":
            overflows = f.get("overflows", 0)
            losses = r.history.get("train/loss", [])
            final = losses[-1][1] if losses else math.nan
            why = [] if launched else [detail]
            if not math.isfinite(final):
                why.append("no finite final loss")
            if overflows < 1:
                scale = f.get("final_loss_scale")
                why.append(
                    "no loss-scale overflow happened"
                    + (f" (loss scale still {scale:.4g} at the end)" if scale else "")
                )
            if overflows >= self.s.steps:
                why.append("every step overflowed: no update was applied")
            out.append(
                check(
                    f"{name}: survives loss-scale overflows",
                    FAIL if why else PASS,
                    {
                        "overflows": overflows,
                        "final_loss": final,
                        "final_loss_scale": f.get("final_loss_scale"),
                    },
                    f">= 1 overflow skipped (loss scale from 2**{FP16_SCALE_POWER}), "
                    "finished with a finite loss",
                    "; ".join(why),
                )
            )
            out.append(
                check(
                    f"{name}: loss finite and falling", INFO, _loss_value(loss), "", loss["detail"]
                )
            )
            return out
        out.append(
            check(
                f"{name}: loss finite and falling",
                PASS if loss["ok"] else FAIL,
                _loss_value(loss),
                f"mean of last {FALL_SPAN} < first {FALL_SPAN}",
                loss["detail"],
            )
        )
        tags = tag_verdict(r.tags, self.s.device)
        want = "cuda, nccl, parameters on cuda" if gpu else "cpu, gloo, parameters on cpu"
        out.append(
            check(
                f"{name}: device tags",
                PASS if tags["ok"] else FAIL,
                {k: r.tags.get(k) for k in TAG_KEYS[:6]},
                want,
                tags["detail"],
            )
        )
        out.append(
            self._mfu_table(r)
            if gpu
            else check(
                f"{name}: MFU against the datasheet table",
                NA_CPU,
                f["mfu"],
                "perf.peak_source table:<gpu>:<precision>",
                r.tags.get("perf.peak_source", ""),
            )
        )
        gap = relative_gap(f["mfu"], f.get("mfu_expected", math.nan))
        out.append(
            check(
                f"{name}: MFU matches tokens/s",
                PASS if gap <= MFU_TOLERANCE else FAIL,
                {"mfu": f["mfu"], "from_tokens_per_s": f.get("mfu_expected")},
                f"within {MFU_TOLERANCE:.0%}",
                ""
                if gap <= MFU_TOLERANCE
                else f"gap {gap:.3g} (tags perf.peak_tflops={r.tags.get('perf.peak_tflops')})",
            )
        )
        out.append(self._memory(r))
        if c.stop_after:
            out.append(self._resume(r))
        return out

    def _mfu_table(self, r: RunResult) -> dict[str, Any]:
        f, name = r.figures, r.case.name
        source = r.tags.get("perf.peak_source")
        want = peak_source_expected(r.tags.get("device_name") or self.device_name, r.case.precision)
        problems = []
        if want is None:
            problems.append(f"device {self.device_name!r} not in moelab.devices' table")
        elif source != want:
            problems.append(f"perf.peak_source={source!r}, expected {want!r}")
        if not 0 < f["mfu"] < 1:
            problems.append(f"MFU {f['mfu']} outside (0, 1)")
        return check(
            f"{name}: MFU against the datasheet table",
            FAIL if problems else PASS,
            f["mfu"],
            f"perf.peak_source {want}",
            "; ".join(problems),
        )

    def _memory(self, r: RunResult) -> dict[str, Any]:
        f, name = r.figures, r.case.name
        ratio = f.get("mem_ratio", math.nan)
        value = {"peak_gib": f["peak_mem_gib"], "plan_gib": f.get("plan_mem_gib"), "ratio": ratio}
        label = f"{name}: peak device memory vs moelab-plan"
        target = f"ratio within 1 +- {MEMORY_TOLERANCE}"
        if self.s.device != "cuda":
            return check(label, NA_CPU, value, target)
        if "seed" not in r.case.model:  # a tiny model: the CUDA context's share dominates
            return check(label, INFO, value, "", "tiny model: recorded only")
        if not math.isfinite(ratio):
            why = f.get("plan_error") or "perf/device_mem_peak_gib not logged"
            return check(label, FAIL, value, target, why)
        ok = abs(ratio - 1) <= MEMORY_TOLERANCE
        return check(label, PASS if ok else FAIL, value, target)

    def _resume(self, r: RunResult) -> dict[str, Any]:
        f, c, s = r.figures, r.case, self.s
        steps = [p for p, _ in r.history.get("train/loss", [])]
        after = [p for p in steps if p > c.stop_after]
        want_after = [p for p in log_steps(s.steps, s.log_every) if p > c.stop_after]
        problems = []
        if len(r.launches) < 2:
            problems.append("the stopped run did not launch cleanly, no resume ran")
        if f.get("checkpoint_step_after_stop") != c.stop_after:
            problems.append(
                f"checkpoint after the stop at step "
                f"{f.get('checkpoint_step_after_stop')}, expected {c.stop_after}"
            )
        if f.get("status_after_stop") != "KILLED":
            problems.append(
                f"MLflow status after the stop {f.get('status_after_stop')}, expected KILLED"
            )
        if f.get("checkpoint_step") != s.steps:
            problems.append(
                f"last checkpoint at step {f.get('checkpoint_step')}, expected {s.steps}"
            )
        if sorted(after) != want_after:
            problems.append(
                f"losses logged after the resume at steps {sorted(after)}, "
                f"expected {want_after} once each"
            )
        if r.status != "FINISHED":
            problems.append(f"MLflow status {r.status}, expected FINISHED")
        return check(
            f"{c.name}: checkpoint save and resume",
            FAIL if problems else PASS,
            {"logged_steps": steps, "launch_rcs": [x.rc for x in r.launches]},
            f"stop at {c.stop_after} with a checkpoint, resume to {s.steps}",
            "; ".join(problems),
        )

    def telemetry_check(self) -> dict[str, Any]:
        on_name = TELEMETRY_ON[self.s.device]
        by = {r.case.name: r for r in self.results}
        on, off = by.get(on_name), by.get(f"{on_name}-telemetry_off")
        label = "telemetry overhead (steady tokens/s off / on)"
        target = f"<= {TELEMETRY_MAX_RATIO}"
        if on is None or off is None:
            return check(label, SKIPPED, None, target, "a side of the pair did not run")
        ratio = telemetry_ratio(on.figures["tokens_per_s"], off.figures["tokens_per_s"])
        value = {
            "ratio": ratio,
            "tokens_per_s_on": on.figures["tokens_per_s"],
            "tokens_per_s_off": off.figures["tokens_per_s"],
        }
        if self.s.device != "cuda":
            return check(label, NA_CPU, value, target, "a GPU target; 2 shared cores are noise")
        if not math.isfinite(ratio):
            return check(label, FAIL, value, target, "tokens/s missing on a side")
        return check(label, PASS if ratio <= TELEMETRY_MAX_RATIO else FAIL, value, target)

    def _failure(self, r: RunResult) -> str:
        parts = [f"rc {x.rc}{' (timed out)' if x.timed_out else ''}" for x in r.launches]
        if r.error:
            parts.append(r.error)
        errors = [ln for ln in r.log_tail if "rror" in ln][-3:]
        return "; ".join(parts + errors)

    # -- report ----------------------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        s = self.s
        return {
            "schema": SCHEMA,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "device": s.device,
            "device_name": self.device_name,
            "machine": machine(self.device_name),
            "settings": asdict(s)
            | {
                "work": str(self.work),
                "data_cache": str(self.cache),
                "fp16_initial_scale_power": FP16_SCALE_POWER,
                "telemetry_pair": TELEMETRY_ON[s.device],
            },
            "elapsed_s": round(self.clock.elapsed(), 1),
            "runs": [r.as_json() for r in self.results],
            "checks": self.checks,
            "skipped": self.skipped,
            "summary": summarize(self.checks),
        }

    def write(self, path: Path) -> dict[str, Any]:
        rep = self.report()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(rep, indent=1) + "\n")
        tmp.replace(path)
        return rep


def _loss_value(loss: dict[str, Any]) -> dict[str, Any]:
    return {"first_mean": loss["first_mean"], "last_mean": loss["last_mean"]}


def print_summary(rep: dict[str, Any], path: Path) -> None:
    rows = []
    for r in rep["runs"]:
        loss = r.get("loss") or {}
        rows.append(
            [
                r["name"],
                ",".join(str(x["rc"]) for x in r["launches"]),
                f"{_num(loss.get('first_mean'))} -> {_num(loss.get('last_mean'))}",
                _num(r.get("tokens_per_s")),
                _num(r.get("mfu")),
                _num(r.get("peak_mem_gib")),
                _num(r.get("plan_mem_gib")),
                _num(r.get("mem_ratio")),
                sum(x["seconds"] for x in r["launches"]),
            ]
        )
    head = [
        "run",
        "rc",
        "loss first5 -> last5",
        "tok/s",
        "MFU",
        "peak GiB",
        "plan GiB",
        "mem ratio",
        "launch s",
    ]
    print("\n## Runs\n" + format_table(head, rows))
    crow = [
        [c["name"], c["status"], _short(c["value"]), c["target"], c["detail"][:90]]
        for c in rep["checks"]
    ]
    print("\n## Checks\n" + format_table(["check", "status", "value", "target", "detail"], crow))
    for sk in rep["skipped"]:
        print(f"skipped: {sk['name']}: {sk['reason']}")
    s = rep["summary"]
    print(
        f"\n{rep['device']} ({rep['device_name']}): {s['pass']} passed, {s['fail']} failed, "
        f"{s['skipped']} skipped, {s[NA_CPU]} n/a on cpu, {s['info']} info; "
        f"{rep['elapsed_s']:.0f} s; {path}"
    )


def _num(x: Any) -> str:
    if isinstance(x, float | int) and not isinstance(x, bool):
        return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"
    return "-" if x is None else str(x)


def _short(value: Any) -> str:
    if isinstance(value, dict):
        return " ".join(f"{k}={_num(v)}" for k, v in value.items() if not isinstance(v, list))
    return _num(value)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON path (default benchmarks/results/gpu_smoke.json; "
        "gpu_smoke_cpu.json with --device cpu)",
    )
    p.add_argument("--t0", type=float, default=None, help="start time (unix s) of the budget")
    p.add_argument(
        "--budget-s",
        type=float,
        default=0.0,
        help="no launch starts after this (default 450 on cuda, 1200 on cpu)",
    )
    p.add_argument(
        "--hard-limit-s",
        type=float,
        default=0.0,
        help="every launch ends by this (default 480 on cuda, 1320 on cpu)",
    )
    p.add_argument("--launch-timeout-s", type=float, default=240.0)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--log-every", type=int, default=FALL_SPAN)
    p.add_argument("--seq-len", type=int, default=0, help="default 2048 on cuda, 128 on cpu")
    p.add_argument("--micro-batch-size", type=int, default=0, help="default 4")
    p.add_argument("--cases", default="", help="only these runs (comma list of names)")
    p.add_argument("--work", default="", help="work folder (default runs/gpu_smoke-<time>)")
    p.add_argument("--cache-dir", default="", help="data cache (default .cache/moelab)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    s = settings_for(args.device, args)
    os.environ["DS_ACCELERATOR"] = s.device  # also for the planner and the data in-process
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    out = args.out or RESULTS_DIR / (
        "gpu_smoke.json" if s.device == "cuda" else "gpu_smoke_cpu.json"
    )
    smoke = Smoke(args, s, Clock(args.t0 or time.time(), s))
    cases = cases_for(s.device)
    if args.cases:
        cases = [c for c in cases if c.name in args.cases.split(",")]
    try:
        smoke.environment()
        smoke.prepare(cases)
        for i, case in enumerate(cases, 1):
            ok, why = smoke.clock.may_start(2 if case.stop_after else 1)
            if not ok:
                smoke.skipped.append({"name": case.name, "reason": why})
                smoke.checks.append(check(f"{case.name}: launch", SKIPPED, None, "", why))
                continue
            print(f"[{i}/{len(cases)}] {case.name} ({smoke.clock.elapsed():.0f} s)", flush=True)
            r = smoke.new_result(case)
            try:
                smoke.run(r)
                smoke.figures(r)
            except Exception as err:  # one case's crash fails that case only
                r.error = f"{type(err).__name__}: {err}"
                traceback.print_exc()
                r.figures.setdefault("loss", loss_verdict([], s.steps, s.log_every))
                for key in ("tokens_per_s", "mfu", "peak_mem_gib"):
                    r.figures.setdefault(key, math.nan)
            smoke.results.append(r)
            smoke.checks.extend(smoke.judge(r))
            done = ", ".join(f"{c['status']}" for c in smoke.checks[-6:] if case.name in c["name"])
            print(
                f"    rc {[x.rc for x in r.launches]} in "
                f"{sum(x.seconds for x in r.launches):.0f} s: {done}",
                flush=True,
            )
            smoke.write(out)
        smoke.checks.append(smoke.telemetry_check())
    except BaseException as err:  # still write what was measured
        smoke.checks.append(check("smoke script", FAIL, None, "", f"{type(err).__name__}: {err}"))
        traceback.print_exc()
    rep = smoke.write(out)
    print_summary(rep, out)
    return 0 if rep["summary"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
