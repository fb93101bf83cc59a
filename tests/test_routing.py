"""Routing analysis of real ep2-trained MoE checkpoints (classic and AutoEP) on held-out plays."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image as mpimg
import pytest
import torch
from trained_autoep import autoep_runs, trained_autoep  # noqa: F401

from moelab import data
from moelab.analysis.routing import TOP_TOKENS, analyze, doc_title, routing_section, write_outputs
from moelab.export import load_inference_model, source_tokenizer
from trained_moe import TrainedMoE, trained_moe  # noqa: F401


def test_doc_title_is_the_first_line() -> None:
    assert doc_title("\n  Hamlet\n\nACT I", 0) == "Hamlet"
    assert doc_title("   \n", 3) == "doc3"


@pytest.mark.slow
def test_routing_outputs(trained_moe: TrainedMoE, tmp_path: Path) -> None:  # noqa: F811
    stats = analyze(trained_moe.run_dir, max_tokens_per_doc=300)
    assert stats.top_k == 2 and stats.num_experts == 4
    assert [lr.layer for lr in stats.layers] == [0, 1, 2, 3]  # tiny_moe_top2: every layer
    assert stats.documents and stats.tokens == 300 * len(stats.documents)
    for lr in stats.layers:
        assert len(lr.top_tokens) == 4 and all(len(t) <= TOP_TOKENS for t in lr.top_tokens)
        for tokens in lr.top_tokens:
            counts = [n for _, n in tokens]
            assert counts == sorted(counts, reverse=True)
        # every token goes to top_k distinct experts
        assert sum(lr.routes_per_expert) == 2 * stats.tokens
        assert set(lr.doc_share) == set(stats.documents)
        for share in lr.doc_share.values():
            assert len(share) == 4 and sum(share) == pytest.approx(1.0)
        assert 0.0 <= lr.keep_rate <= 1.0 and 0.25 <= lr.chance_keep_rate <= 1.0

    html = routing_section(stats)
    assert html.startswith('<section class="routing">') and html.count("data:image/png") == 2
    out = write_outputs(stats, tmp_path / "routing")
    assert json.loads((out / "routing.json").read_text())["layers"][0]["layer"] == 0
    for png in ("doc_share.png", "keep_rate.png"):
        assert mpimg.imread(out / png).shape[0] > 50


@pytest.mark.slow
def test_report_routing_section(trained_moe: TrainedMoE, tmp_path: Path) -> None:  # noqa: F811
    from launcher.report import EXTRA_SECTIONS, sections
    from launcher.report.collect import RunData

    assert sections.routing in EXTRA_SECTIONS  # every report page gets it
    moe = RunData("r1", "tiny_moe_top2", {}, 1, 1, layers={0: {}}, run_dir=str(trained_moe.run_dir))
    no_ckpt = RunData("r2", "other_moe", {}, 1, 1, layers={0: {}}, run_dir=str(tmp_path))
    dense = RunData("r3", "tiny_dense", {}, 1, 1, run_dir=str(trained_moe.run_dir))
    section = sections.routing([moe, no_ckpt, dense], tmp_path / "out")
    assert section is not None
    title, html = section
    assert title.startswith("Routing analysis")
    assert "<h3>tiny_moe_top2</h3>" in html and "other_moe" not in html and "tiny_dense" not in html
    assert (tmp_path / "out" / "routing-tiny_moe_top2" / "routing.json").exists()
    assert sections.routing([no_ckpt, dense], tmp_path / "out") is None


@pytest.mark.slow
def test_routing_of_an_autoep_run(trained_autoep: TrainedMoE) -> None:  # noqa: F811
    """The dropless layer's router is read as the classic one's: every token's top-2 routes
    in every layer, and the routes of a document match the layer's own expert counts."""
    stats = analyze(trained_autoep.run_dir, max_tokens_per_doc=64)
    assert stats.top_k == 2 and stats.num_experts == 4
    assert [lr.layer for lr in stats.layers] == [0, 1, 2, 3]
    assert stats.documents and stats.tokens == 64 * len(stats.documents)
    for lr in stats.layers:
        assert sum(lr.routes_per_expert) == 2 * stats.tokens
        for share in lr.doc_share.values():
            assert len(share) == 4 and sum(share) == pytest.approx(1.0)
    # the recorder's counts are the model's own (DroplessMoE's exp_counts) on the same tokens
    model, source = load_inference_model(trained_autoep.run_dir)
    tok = source_tokenizer(source.cfg)
    text = data.load_splits(source.cfg.data)["validation"][source.cfg.data.text_column][0]
    ids = tok(text, add_special_tokens=False, verbose=False)["input_ids"][:64]
    with torch.inference_mode():
        counts = model(torch.tensor([ids])).exp_counts
    first = stats.documents[0]
    for lr, want in zip(stats.layers, counts, strict=True):
        got = [round(x * 2 * len(ids)) for x in lr.doc_share[first]]
        assert got == want.tolist(), (lr.layer, got, want)
