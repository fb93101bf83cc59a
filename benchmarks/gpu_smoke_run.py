"""The GPU smoke test's launches: the launcher commands, run with a timeout, and `Smoke`, which
prepares the data and plans, runs each case (and its resume) and reads it back from MLflow."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchlib import REPO, machine
from gpu_smoke_cases import (
    METRICS,
    TAG_KEYS,
    TELEMETRY_ON,
    Case,
    Clock,
    Launch,
    RunResult,
    Settings,
    case_overrides,
)
from gpu_smoke_checks import (
    FAIL,
    FP16_SCALE_POWER,
    NA_CPU,
    PASS,
    check,
    count_overflows,
    expected_mfu,
    first_windows,
    loss_verdict,
    memory_ratio,
    steady,
)
from gpu_smoke_report import SCHEMA, summarize, write_report

from moelab.rundir import RunDir  # torch-free


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
    """One smoke session: its work folder, data cache, runs, checks and skipped cases."""

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
        write_report(path, rep)
        return rep
