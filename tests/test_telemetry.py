"""Telemetry: the math of load/drop/entropy/peaks, a collapsed router, a real 2-rank launch."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from conftest import VariantSweep
from moelab.config import MoEConfig
from moelab.telemetry import perf
from moelab.telemetry.moe import (
    MoeTelemetry,
    capacity,
    dropped_tokens,
    load_cv,
    max_over_mean,
    router_entropy,
)


def test_load_cv_and_max_over_mean() -> None:
    assert float(load_cv(torch.tensor([5.0, 5, 5, 5]))) == 0.0
    assert float(load_cv(torch.tensor([4.0, 0, 0, 0]))) == pytest.approx(math.sqrt(3))
    assert float(max_over_mean(torch.tensor([4.0, 0, 0, 0]))) == pytest.approx(4.0)
    per_layer = load_cv(torch.tensor([[1.0, 1], [2.0, 0]]))
    assert per_layer.tolist() == pytest.approx([0.0, 1.0])


def test_capacity_and_drops_follow_deepspeed() -> None:
    cfg = MoEConfig(num_experts=4, top_k=2, capacity_factor=1.25, min_capacity=4)
    # DeepSpeed: ceil(tokens / experts * capacity_factor * k), at least min_capacity.
    assert capacity(64, 4, 2, cfg) == 40
    assert capacity(4, 4, 2, cfg) == 4
    counts = torch.tensor([[50.0, 30, 30, 18]])  # 128 routes = 64 tokens x top-2
    assert dropped_tokens(counts, 40).tolist() == [10.0]


def test_router_entropy() -> None:
    uniform = router_entropy(torch.zeros(3, 8))
    assert uniform.tolist() == pytest.approx([math.log(8)] * 3)
    peaked = router_entropy(torch.tensor([[100.0, 0, 0, 0]]))
    assert float(peaked[0]) == pytest.approx(0.0, abs=1e-6)


def test_peak_table_dense_figures() -> None:
    assert perf.table_peak("NVIDIA H100 80GB HBM3", "bf16") == perf.Peak(989.4, "table:H100:bf16")
    assert perf.table_peak("NVIDIA H100 PCIe", "bf16").tflops == 756.0  # type: ignore[union-attr]
    assert perf.table_peak("NVIDIA H200", "fp32").tflops == 66.9  # type: ignore[union-attr]
    assert perf.table_peak("NVIDIA A100-SXM4-80GB", "fp32").tflops == 19.5  # type: ignore[union-attr]
    assert perf.table_peak("NVIDIA A40", "bf16").tflops == 149.7  # type: ignore[union-attr]
    assert perf.table_peak("NVIDIA GeForce RTX 4090", "bf16") is None


def test_cpu_peak_is_measured_once_and_cached(tmp_path: Path) -> None:
    cache = tmp_path / "peak.json"
    first = perf.cpu_peak(cache, torch.get_num_threads(), "fp32")
    again = perf.cpu_peak(cache, torch.get_num_threads(), "fp32")
    assert first.source.startswith("measured:") and again.source.startswith("cached:")
    assert again.tflops == first.tflops > 0
    m = perf.perf_metrics(0.5, 1000, 10, 6_000_000, 2, perf.Peak(1.0, "x"))
    assert m["perf/tokens_per_s"] == 2000 and m["perf/tflops_per_device"] == pytest.approx(6e-3)
    assert m["perf/mfu"] == pytest.approx(6e-3)


def _window(model: torch.nn.Module, cfg: MoEConfig, steps: int = 3) -> dict[str, float]:
    """Train-mode forwards of one window through MoeTelemetry, metrics as on one rank."""
    tel = MoeTelemetry(model, cfg, tokens_per_forward=4 * 32, ep_size=1)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        ids = torch.randint(0, 500, (4, 32), generator=gen)
        out = model(ids, labels=ids)
        out.loss.backward()
        tel.on_micro_step(out.exp_counts)
        tel.on_step()
    m = tel.metrics(tel.vector().unsqueeze(0), steps, step_ms=1000.0)
    tel.close()
    shares = m.pop("_shares")
    assert torch.allclose(shares.sum(-1), torch.ones(shares.shape[0], dtype=shares.dtype))
    assert m["moe/layer_0/tokens"] == steps * 4 * 32 * cfg.top_k  # counts sum to tokens x k
    return m


def test_collapsed_router_shows_in_load_metrics() -> None:
    from test_models import compose_model, with_moe

    from moelab.models import build_model

    cfg = with_moe(compose_model("tiny_moe_top2"), top2_2nd_expert_sampling=False)
    normal = _window(build_model(cfg, seed=0), cfg.moe)
    collapsed_model = build_model(cfg, seed=0)
    from moelab.moe import moe_gates

    with torch.no_grad():
        for gate in moe_gates(collapsed_model).values():
            # All logits tie: argmax takes expert 0 first and expert 1 second for every token.
            gate.wg.weight.zero_()
    collapsed = _window(collapsed_model, cfg.moe)
    for i in range(cfg.n_layers):
        assert collapsed[f"moe/layer_{i}/load_cv"] > normal[f"moe/layer_{i}/load_cv"] + 0.5
        assert collapsed[f"moe/layer_{i}/drop_fraction"] > normal[f"moe/layer_{i}/drop_fraction"]
        assert collapsed[f"moe/layer_{i}/expert_2_share"] == 0.0
    assert normal["moe/dead_experts"] == 0
    assert collapsed["moe/dead_experts"] == 2 * cfg.n_layers
    assert normal["moe/layer_0/gate_ms"] > 0 and normal["moe/layer_0/expert_ms"] > 0


def test_eval_forwards_are_not_counted() -> None:
    from test_models import compose_model

    from moelab.models import build_model

    cfg = compose_model("tiny_moe_top2")
    model = build_model(cfg)
    tel = MoeTelemetry(model, cfg.moe, tokens_per_forward=64, ep_size=1)
    model.eval()
    with torch.no_grad():
        model(torch.randint(0, 500, (2, 32)))
    tel.on_step()
    m = tel.metrics(tel.vector().unsqueeze(0), 1, step_ms=1.0)
    assert m["moe/layer_0/gate_ms"] == 0.0 and m["moe/layer_0/router_entropy"] == 0.0
    tel.close()


@pytest.mark.slow
def test_two_rank_launch_logs_telemetry(tmp_path: Path, variant_sweep: VariantSweep) -> None:
    """tiny_moe_top2 of the shared 2-rank ZeRO-2 ep2 sweep: 16 steps, logged every 2, heatmaps
    every 8, system metrics every second (conftest.VARIANT_SWEEP)."""
    from matplotlib.image import imread

    client, run = variant_sweep.client, variant_sweep.run("tiny_moe_top2")
    m, tags, rid = run.data.metrics, run.data.tags, run.info.run_id
    assert run.info.status == "FINISHED"
    seen = ("perf/mfu", "perf/tflops_per_device", "moe/a2a_fraction", "moe/a2a_ms", "moe/a2a_gbps")
    print({k: m[k] for k in seen}, tags["perf.peak_source"], tags["perf.peak_tflops"])
    for key in ("perf/tokens_per_s", "perf/samples_per_s", "perf/step_time_s"):
        assert m[key] > 0, key
    assert m["perf/tflops_per_device"] > 0 and 0 < m["perf/mfu"] < 1
    assert float(tags["perf.peak_tflops"]) > 0 and tags["perf.peak_source"]
    assert 0 < m["moe/a2a_fraction"] < 1 and m["moe/a2a_ms"] > 0 and m["moe/a2a_bwd_ms"] > 0
    assert m["moe/a2a_bytes"] > 0 and m["moe/a2a_gbps"] > 0
    assert m["moe/dead_experts"] >= 0
    # One window = 2 steps x 2 ranks x 4 sequences x 128 tokens, routed to top-2 experts.
    window_tokens = 2 * 2 * 4 * 128
    for i in range(2):
        p = f"moe/layer_{i}"
        for key in ("a2a_ms", "gate_ms", "expert_ms"):
            assert m[f"{p}/{key}"] > 0, key
        assert m[f"{p}/load_cv"] >= 0 and m[f"{p}/load_max_over_mean"] >= 1
        assert 0 <= m[f"{p}/drop_fraction"] < 1
        assert 0 < m[f"{p}/router_entropy"] <= math.log(4) + 1e-6
        assert m[f"{p}/tokens"] == window_tokens * 2
        assert sum(m[f"{p}/expert_{e}_share"] for e in range(4)) == pytest.approx(1.0)
    steps = [x.step for x in client.get_metric_history(rid, "moe/a2a_ms")]
    assert steps == list(range(2, 17, 2))
    for pkg in ("torch", "deepspeed", "transformers", "mlflow"):
        assert tags[f"version.{pkg}"]
    assert tags["hostnames"] and "world=2" in tags["layout"]
    assert any(k.startswith("system/") for k in m), sorted(m)
    names = {a.path for a in client.list_artifacts(rid, "plots")}
    assert {
        "plots/expert_load_step8.png",
        "plots/expert_load_step16.png",
        "plots/expert_load_over_time.png",
    } <= names
    for name in ("plots/expert_load_step8.png", "plots/expert_load_over_time.png"):
        img = imread(client.download_artifacts(rid, name, str(tmp_path)))
        assert img.ndim == 3 and img.shape[0] > 50


def test_comms_profile_adds_comms_logger_to_ds_config() -> None:
    from launcher.compose import compose_config, to_schema
    from moelab.engine import build_ds_config

    cfg = to_schema(compose_config(["model=tiny_moe_top2", "parallel=ep2"]))
    assert "comms_logger" not in build_ds_config(cfg)
    assert cfg.telemetry.enabled and not cfg.telemetry.comms_profile
    cfg = to_schema(compose_config(["model=tiny_moe_top2", "telemetry.comms_profile=true"]))
    assert build_ds_config(cfg)["comms_logger"] == {
        "enabled": True,
        "prof_all": True,
        "verbose": False,
    }
