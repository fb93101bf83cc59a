"""The GPU smoke test's checks of a finished run, by its role, and of the telemetry pair."""

from __future__ import annotations

import math
from typing import Any

from gpu_smoke_cases import TAG_KEYS, TELEMETRY_ON, RunResult, Settings
from gpu_smoke_checks import (
    FAIL,
    FALL_SPAN,
    FP16_SCALE_POWER,
    INFO,
    MEMORY_TOLERANCE,
    MFU_TOLERANCE,
    NA_CPU,
    PASS,
    SKIPPED,
    TELEMETRY_MAX_RATIO,
    check,
    log_steps,
    peak_source_expected,
    relative_gap,
    tag_verdict,
    telemetry_ratio,
)


def judge(r: RunResult, s: Settings, device_name: str) -> list[dict[str, Any]]:
    """The checks of one run (by its role)."""
    c, name = r.case, r.case.name
    out = []
    launched = r.launched_ok and r.status == "FINISHED"
    detail = "" if launched else failure(r)
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
    if c.role == "fp16":
        return out + fp16_checks(r, s, launched, detail)
    return out + matrix_checks(r, s, device_name)


def fp16_checks(r: RunResult, s: Settings, launched: bool, detail: str) -> list[dict[str, Any]]:
    """An fp16 run: it survived its loss-scale overflows; its loss is recorded only."""
    f, name, loss = r.figures, r.case.name, r.figures["loss"]
    out = []
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
    if overflows >= s.steps:
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
        check(f"{name}: loss finite and falling", INFO, _loss_value(loss), "", loss["detail"])
    )
    return out


def matrix_checks(r: RunResult, s: Settings, device_name: str) -> list[dict[str, Any]]:
    """A matrix run: falling loss, device tags, MFU, memory and, if stopped, the resume."""
    c, f, name, gpu = r.case, r.figures, r.case.name, s.device == "cuda"
    loss = f["loss"]
    out = []
    out.append(
        check(
            f"{name}: loss finite and falling",
            PASS if loss["ok"] else FAIL,
            _loss_value(loss),
            f"mean of last {FALL_SPAN} < first {FALL_SPAN}",
            loss["detail"],
        )
    )
    tags = tag_verdict(r.tags, s.device)
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
        mfu_table_check(r, device_name)
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
    out.append(memory_check(r, s))
    if c.stop_after:
        out.append(resume_check(r, s))
    return out


def mfu_table_check(r: RunResult, device_name: str) -> dict[str, Any]:
    f, name = r.figures, r.case.name
    source = r.tags.get("perf.peak_source")
    want = peak_source_expected(r.tags.get("device_name") or device_name, r.case.precision)
    problems = []
    if want is None:
        problems.append(f"device {device_name!r} not in moelab.devices' table")
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


def memory_check(r: RunResult, s: Settings) -> dict[str, Any]:
    f, name = r.figures, r.case.name
    ratio = f.get("mem_ratio", math.nan)
    value = {"peak_gib": f["peak_mem_gib"], "plan_gib": f.get("plan_mem_gib"), "ratio": ratio}
    label = f"{name}: peak device memory vs moelab-plan"
    target = f"ratio within 1 +- {MEMORY_TOLERANCE}"
    if s.device != "cuda":
        return check(label, NA_CPU, value, target)
    if "seed" not in r.case.model:  # a tiny model: the CUDA context's share dominates
        return check(label, INFO, value, "", "tiny model: recorded only")
    if not math.isfinite(ratio):
        why = f.get("plan_error") or "perf/device_mem_peak_gib not logged"
        return check(label, FAIL, value, target, why)
    ok = abs(ratio - 1) <= MEMORY_TOLERANCE
    return check(label, PASS if ok else FAIL, value, target)


def resume_check(r: RunResult, s: Settings) -> dict[str, Any]:
    f, c = r.figures, r.case
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
        problems.append(f"last checkpoint at step {f.get('checkpoint_step')}, expected {s.steps}")
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


def telemetry_check(results: list[RunResult], s: Settings) -> dict[str, Any]:
    on_name = TELEMETRY_ON[s.device]
    by = {r.case.name: r for r in results}
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
    if s.device != "cuda":
        return check(label, NA_CPU, value, target, "a GPU target; 2 shared cores are noise")
    if not math.isfinite(ratio):
        return check(label, FAIL, value, target, "tokens/s missing on a side")
    return check(label, PASS if ratio <= TELEMETRY_MAX_RATIO else FAIL, value, target)


def failure(r: RunResult) -> str:
    parts = [f"rc {x.rc}{' (timed out)' if x.timed_out else ''}" for x in r.launches]
    if r.error:
        parts.append(r.error)
    errors = [ln for ln in r.log_tail if "rror" in ln][-3:]
    return "; ".join(parts + errors)


def _loss_value(loss: dict[str, Any]) -> dict[str, Any]:
    return {"first_mean": loss["first_mean"], "last_mean": loss["last_mean"]}
