"""moelab-report: the comparison page, PNGs and table built from a real four-variant sweep."""

from __future__ import annotations

import base64
import contextlib
import io
import re
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from conftest import SWEEP_EXPERIMENT, VARIANTS, VariantSweep
from launcher import report
from launcher.report import collect, compare
from launcher.report.collect import LOSS, RunData

EXPERIMENT = SWEEP_EXPERIMENT
PLOTS = ("loss_vs_tokens", "loss_vs_wall", "loss_vs_flops", "throughput", "a2a_share_per_layer")
MOE_COLUMNS = ("impl", "a2a %", "load CV", "dropped")


@dataclass
class Built:
    client: MlflowClient
    out: Path
    stdout: str
    code: int


@pytest.fixture(scope="module")
def built(variant_sweep: VariantSweep) -> Built:
    """`moelab-report --experiment` on the shared sweep of the four variants."""
    work, uri = variant_sweep.work, variant_sweep.uri
    out = work / "report-out"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = report.main(["--experiment", EXPERIMENT, "--tracking-uri", uri, "--out", str(out)])
    return Built(MlflowClient(uri), out, stdout.getvalue(), code)


class Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.srcs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.srcs.append(dict(attrs)["src"] or "")


def table_rows(stdout: str) -> dict[str, list[str]]:
    """The printed table: variant -> its cells (columns split on two or more spaces)."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("variant"))
    rows = {}
    for line in lines[start + 2 : start + 2 + len(VARIANTS)]:
        cells = re.split(r"\s{2,}", line.strip())
        rows[cells[0]] = cells
    return rows


@pytest.mark.slow
def test_table_has_every_column_and_variant(built: Built) -> None:
    assert built.code == 0, built.stdout
    header = built.stdout.splitlines()[0]
    for column in compare.headers():
        assert column in header
    rows = table_rows(built.stdout)
    assert set(rows) == set(VARIANTS)
    moe_at = [compare.headers().index(c) for c in MOE_COLUMNS]
    wall_at = compare.headers().index("loss@wall")  # checked in the next test
    for variant, cells in rows.items():
        assert len(cells) == len(compare.headers()), cells
        moe_cells = [cells[i] for i in moe_at]
        if variant == "tiny_dense":
            assert moe_cells == ["-"] * len(MOE_COLUMNS)  # no MoE layers: shown, not a crash
        else:
            assert "-" not in moe_cells, cells
            assert cells[compare.headers().index("impl")] == "classic", cells
        others = [c for i, c in enumerate(cells) if i not in moe_at and i != wall_at]
        assert "-" not in others, f"{variant}: {cells}"
    assert "training tokens: 16,384 tokens" in built.stdout  # 16 steps x 2 ranks x 4 x 128


@pytest.mark.slow
def test_loss_at_equal_wall_clock_only_where_the_curve_reaches(built: Built) -> None:
    """A run whose first logged window ended after the common x has no value there: '-'."""
    common = float(re.search(r"training wall-clock: ([\d.]+) s", built.stdout).group(1))
    rows = table_rows(built.stdout)
    column = compare.headers().index("loss@wall")
    shown = 0
    for run in collect.select_experiment(built.client, EXPERIMENT).runs:
        (first, *_) = built.client.get_metric_history(run.info.run_id, "perf/step_time_s")
        first_x = first.value * first.step  # the first window's steps, each step_time_s long
        cell = rows[run.data.tags["variant"]][column]
        if cell == "-":
            assert first_x > common - 0.05, (cell, first_x, common)
        else:
            assert first_x <= common + 0.05 and float(cell) > 0
            shown += 1
    assert shown >= 1, "the run that trained fastest defines the common x and has a value"


@pytest.mark.slow
def test_equal_token_loss_is_each_runs_final_train_loss(built: Built) -> None:
    """Same token budget for every run: the common x is the last step of each."""
    selection = collect.select_experiment(built.client, EXPERIMENT)
    rows = table_rows(built.stdout)
    column = compare.headers().index("loss@tokens")
    for run in selection.runs:
        final = run.data.metrics[LOSS]
        assert rows[run.data.tags["variant"]][column] == f"{final:.3f}"


@pytest.mark.slow
def test_every_plot_is_written_opens_and_is_embedded(built: Built) -> None:
    pngs = {p.stem: p for p in built.out.glob("*.png")}
    for name in PLOTS:
        assert name in pngs, sorted(pngs)
    heatmaps = [n for n in pngs if n.startswith("expert_load_")]
    assert sorted(heatmaps) == sorted(f"expert_load_{v}" for v in VARIANTS[1:])
    page = (built.out / report.PAGE).read_text()
    parser = Images()
    parser.feed(page)
    assert len(parser.srcs) == len(pngs)
    embedded = {base64.b64decode(s.split(",", 1)[1]) for s in parser.srcs}
    for png in pngs.values():
        with Image.open(png) as img:
            img.verify()
            assert img.format == "PNG" and img.size[0] > 100
        assert png.read_bytes() in embedded, f"{png.name} is not embedded"
    for column in compare.headers():
        assert f"<th>{column}</th>" in page.replace("&amp;", "&")
    assert "largest x that <i>all</i> runs reached" in page


@pytest.mark.slow
def test_report_logged_to_the_sweep_parent(built: Built) -> None:
    selection = collect.select_experiment(built.client, EXPERIMENT)
    assert selection.parent is not None and len(selection.runs) == len(VARIANTS)
    same = collect.select_parent(built.client, selection.parent.info.run_id)
    assert [r.info.run_id for r in same.runs] == [r.info.run_id for r in selection.runs]
    artifacts = built.client.list_artifacts(selection.parent.info.run_id, "report")
    logged = {Path(a.path).name for a in artifacts}
    assert logged == {p.name for p in built.out.iterdir()}
    assert report.PAGE in logged


@pytest.mark.slow
def test_unknown_experiment_is_one_sentence(
    built: Built, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = str(built.client.tracking_uri)
    assert report.main(["--experiment", "nope", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert "--experiment 'nope' does not exist in MLflow" in err


# --- pure units ------------------------------------------------------------------------------


def test_equal_x_reads_every_curve_at_the_shortest_reach() -> None:
    a = ([0.0, 10.0, 20.0], [4.0, 3.0, 2.0])
    b = ([0.0, 5.0, 15.0], [5.0, 4.0, 2.0])
    x, values = compare.equal_x([a, b])
    assert x == 15.0
    assert values == [pytest.approx(2.5), pytest.approx(2.0)]
    assert compare.value_at(*a, 25.0) is None, "no extrapolation past the end"
    assert compare.value_at([5.0, 10.0], [1.0, 2.0], 2.0) is None, "nor before the start"
    assert compare.equal_x([a, ([], [])]) == (None, [None, None])


def fake_run(label: str, moe: bool) -> RunData:
    run = RunData(label, label, {"params_total": "100", "params_active": "50"}, 1000, 6)
    run.history = {
        LOSS: [(2, 4.0), (4, 3.0)],
        "perf/step_time_s": [(2, 1.0), (4, 0.5)],
        "perf/tokens_per_s": [(2, 500.0), (4, 2000.0)],
    }
    if moe:
        run.layers = {0: {"load_cv": [(2, 0.5), (4, 0.3)], "drop_fraction": [(2, 0.1), (4, 0.0)]}}
        run.history["moe/a2a_fraction"] = [(2, 0.2), (4, 0.1)]
    return run


def test_wall_clock_axis_and_dense_dashes() -> None:
    dense, moe = fake_run("dense", False), fake_run("moe", True)
    seconds = compare.train_seconds(dense)
    assert (seconds(2), seconds(3), seconds(4)) == (2.0, 2.5, 3.0)  # 2 steps x 1 s, 2 x 0.5 s
    assert compare.curve(dense, "flops") == ([2 * 1000 * 6, 4 * 1000 * 6], [4.0, 3.0])
    table = compare.build_comparison([dense, moe])
    assert table.at == {"tokens": 4000, "wall": 3.0, "flops": 24000}
    cells = dict(zip(compare.headers(), zip(*compare.cells(table), strict=True), strict=True))
    assert cells["tokens/s"] == ("2,000", "2,000"), "the start-up window is left out"
    assert cells["load CV"] == ("-", "0.300") and cells["dropped"] == ("-", "5.00%")
    assert cells["a2a %"] == ("-", "10.0%") and cells["eval loss"] == ("-", "-")


def test_straggler_columns_show_the_usual_slowest_rank_and_the_lag() -> None:
    two, one = fake_run("two ranks", False), fake_run("one rank", False)
    two.history["perf/slowest_rank"] = [(2, 3.0), (4, 1.0), (6, 3.0), (8, 1.0), (10, 1.0)]
    two.history["perf/straggler_lag"] = [(2, 0.5), (4, 0.1), (6, 0.3), (8, 0.1), (10, 0.0)]
    table = compare.build_comparison([two, one])
    cells = dict(zip(compare.headers(), zip(*compare.cells(table), strict=True), strict=True))
    assert cells["slowest rank"] == ("1", "-"), "the rank of most windows; one rank: none"
    # Every window counts, the first too: a straggler at start-up is still a straggler.
    assert cells["lag max"] == ("50%", "-") and cells["lag mean"] == ("20%", "-")
    assert compare.most_often([(2, 2.0), (4, 0.0)]) == 0.0, "a tie: the lowest rank"


def test_labels_tell_runs_of_one_variant_apart() -> None:
    def run(variant: str, overrides: str) -> SimpleNamespace:
        tags = {"variant": variant, "moelab.sweep.overrides": overrides}
        return SimpleNamespace(data=SimpleNamespace(tags=tags), info=SimpleNamespace(run_name="r"))

    runs = [
        run("tiny_dense", "model=tiny_dense zero=stage2"),
        run("tiny_moe_top2", "model=tiny_moe_top2 parallel.ep_size=1 zero=stage2"),
        run("tiny_moe_top2", "model=tiny_moe_top2 parallel.ep_size=2 zero=stage2"),
    ]
    assert collect.labels(runs) == [
        "tiny_dense",
        "tiny_moe_top2 parallel.ep_size=1",
        "tiny_moe_top2 parallel.ep_size=2",
    ]
