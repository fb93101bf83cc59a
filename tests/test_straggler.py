"""The straggler view: each rank's own time, the slowest rank and its lag, in MLflow and the
report, from a real 2-rank MoE launch with one rank slowed on purpose."""

from __future__ import annotations

import contextlib
import io
import re
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from helpers import run_launcher
from launcher import report
from launcher.compose import compose_config, to_schema
from launcher.errors import ConfigError
from launcher.report import compare
from launcher.validate import validate
from moelab.guard import StepGuard, injected_slow_s
from moelab.telemetry.perf import OwnClock, straggler_metrics

SLOW_MS = 300
"""Rank 1 sleeps this long before each micro-batch: ~100x the own time of a tiny model's rank
up to its first MoE layer, and well above what a busy 2-core machine adds to it."""
STEPS, LOG_EVERY = 6, 2


# --- the metric, on hand-made per-rank own times ---------------------------------------------


def test_slowest_rank_and_its_lag_over_the_median() -> None:
    assert straggler_metrics([0.1, 0.4]) == {"perf/slowest_rank": 1.0, "perf/straggler_lag": 3.0}
    # Four ranks: the median rank is the lower middle one (0.2), not the mean of the two.
    four = straggler_metrics([0.2, 0.1, 0.25, 0.3])
    assert four["perf/slowest_rank"] == 3.0
    assert four["perf/straggler_lag"] == pytest.approx(0.3 / 0.2 - 1)
    # Equal ranks: no lag, the lowest rank named; nothing measured: no lag either.
    assert straggler_metrics([0.5, 0.5, 0.5]) == {
        "perf/slowest_rank": 0.0,
        "perf/straggler_lag": 0.0,
    }
    assert straggler_metrics([0.0, 0.0])["perf/straggler_lag"] == 0.0
    assert straggler_metrics([0.3]) == {}, "one rank has no straggler"


class Sleep(torch.nn.Module):
    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds)
        return x


def toy() -> torch.nn.Sequential:
    """0.05 s of work before the (stand-in) MoE layer, 0.2 s after it."""
    return torch.nn.Sequential(Sleep(0.05), torch.nn.Identity(), Sleep(0.2))


def test_own_time_ends_at_the_first_moe_layer_or_the_dense_forward() -> None:
    x = torch.zeros(1)
    moe = toy()
    clock = OwnClock(moe, moe[1], torch.device("cpu"))
    moe(x)  # no span open (a recomputed forward under activation checkpointing): not counted
    clock.open()
    moe(x)
    moe(x)  # the span closed at the first MoE layer: the second forward adds nothing
    own = clock.read_s()
    assert 0.05 <= own < 0.2, own
    assert clock.read_s() == 0.0, "read resets"
    dense = toy()
    clock = OwnClock(dense, None, torch.device("cpu"))
    clock.open()
    dense(x)
    dense.eval()
    clock.open()
    dense(x)  # an eval forward is not training
    own = clock.read_s()
    assert 0.25 <= own < 0.45, own


def test_the_injected_straggler_sleeps_on_its_rank_only() -> None:
    assert injected_slow_s(1, 300.0, 1) == 0.3
    assert injected_slow_s(1, 300.0, 0) == 0.0 and injected_slow_s(-1, 300.0, 0) == 0.0
    guard = StepGuard(False, 0, "fp32", slow_s=0.1)
    start = time.perf_counter()
    guard.straggle()
    assert time.perf_counter() - start >= 0.1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.inject_slow_rank=2"], "train.inject_slow_rank=2 is not a rank of this 2-rank"),
        (["train.inject_slow_rank=-2"], "train.inject_slow_rank=-2 is not a rank"),
        (["train.inject_slow_ms=-1"], "train.inject_slow_ms=-1 is negative; use 0 or more"),
    ],
)
def test_bad_straggler_injection_is_one_sentence(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        validate(to_schema(compose_config(overrides)))
    text = str(err.value)
    assert message in text and text.count(". ") == 0 and text.endswith("."), text


# --- one real launch: rank 1 slowed -----------------------------------------------------------


@dataclass
class Slowed:
    client: MlflowClient
    run_id: str
    report: str
    page: str


@pytest.fixture(scope="module")
def slowed(tmp_path_factory: pytest.TempPathFactory, shared_cache: Path) -> Slowed:
    """A 2-rank ep2 MoE run whose rank 1 sleeps SLOW_MS before each micro-batch, and the
    report built from it."""
    work = tmp_path_factory.mktemp("straggler")
    run = ("model=tiny_moe_top1", "parallel.ep_size=2", "train=smoke", "train.eval_every=0")
    fault = ("train.inject_slow_rank=1", f"train.inject_slow_ms={SLOW_MS}")
    steps = (f"train.steps={STEPS}", f"train.log_every={LOG_EVERY}", "train.checkpoint_every=0")
    proc = run_launcher(work, shared_cache, *run, *steps, *fault)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    uri = f"sqlite:///{work / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    (found,) = client.search_runs([client.get_experiment_by_name("moelab").experiment_id])
    out, stdout = work / "report", io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = report.main(["--experiment", "moelab", "--tracking-uri", uri, "--out", str(out)])
    assert code == 0, stdout.getvalue()
    page = (out / report.PAGE).read_text()
    return Slowed(client, found.info.run_id, stdout.getvalue(), page)


@pytest.mark.slow
def test_every_window_names_the_slowed_rank(slowed: Slowed) -> None:
    def history(key: str) -> dict[int, float]:
        return {m.step: m.value for m in slowed.client.get_metric_history(slowed.run_id, key)}

    windows = list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
    slowest, lag = history("perf/slowest_rank"), history("perf/straggler_lag")
    assert sorted(slowest) == sorted(lag) == windows
    assert set(slowest.values()) == {1.0}, slowest
    # Rank 1's own time holds SLOW_MS per step; rank 0's is the forward up to the first MoE
    # layer (a few ms): lag > 1 fails only if that took rank 0 longer than SLOW_MS.
    assert min(lag.values()) > 1.0, lag


@pytest.mark.slow
def test_the_report_shows_the_straggler(slowed: Slowed) -> None:
    lines = slowed.report.splitlines()
    header = re.split(r"\s{2,}", lines[0].strip())
    assert header == list(compare.headers()), header
    row = dict(zip(header, re.split(r"\s{2,}", lines[2].strip()), strict=True))
    assert row["slowest rank"] == "1", row
    lag_max, lag_mean = (float(row[k].rstrip("%")) for k in ("lag max", "lag mean"))
    assert lag_max >= lag_mean > 100, row
    assert "<th>slowest rank</th>" in slowed.page and "<th>lag max</th>" in slowed.page
    assert f"<td>{row['lag max']}</td>" in slowed.page
