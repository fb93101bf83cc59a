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
import math
import os
import sys
import time
import traceback
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
for _p in (BENCH_DIR, BENCH_DIR.parent / "src", BENCH_DIR.parent):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from benchlib import RESULTS_DIR  # noqa: E402
from gpu_smoke_cases import Clock, cases_for, settings_for  # noqa: E402
from gpu_smoke_checks import FAIL, FALL_SPAN, SKIPPED, check, loss_verdict  # noqa: E402
from gpu_smoke_judge import judge, telemetry_check  # noqa: E402
from gpu_smoke_report import print_summary  # noqa: E402
from gpu_smoke_run import Smoke  # noqa: E402


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
            smoke.checks.extend(judge(r, s, smoke.device_name))
            done = ", ".join(f"{c['status']}" for c in smoke.checks[-6:] if case.name in c["name"])
            print(
                f"    rc {[x.rc for x in r.launches]} in "
                f"{sum(x.seconds for x in r.launches):.0f} s: {done}",
                flush=True,
            )
            smoke.write(out)
        smoke.checks.append(telemetry_check(smoke.results, s))
    except BaseException as err:  # still write what was measured
        smoke.checks.append(check("smoke script", FAIL, None, "", f"{type(err).__name__}: {err}"))
        traceback.print_exc()
    rep = smoke.write(out)
    print_summary(rep, out)
    return 0 if rep["summary"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
