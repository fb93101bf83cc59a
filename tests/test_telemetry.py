"""Telemetry: the math of load/drop/entropy/peaks, a collapsed router, a real 2-rank launch."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from conftest import AUTOEP_VARIANTS, VARIANT_SWEEP, VariantSweep
from moelab import ds_moe as moe_layers
from moelab.config import MoEConfig, MoelabConfig
from moelab.shapes import expert_capacity
from moelab.telemetry import perf
from moelab.telemetry.experts import (
    MoeTelemetry,
    dropped_tokens,
    load_cv,
    max_over_mean,
    router_entropy,
)
from moelab.telemetry.sink import NullSink

CPU = torch.device("cpu")


def test_load_cv_and_max_over_mean() -> None:
    assert float(load_cv(torch.tensor([5.0, 5, 5, 5]))) == 0.0
    assert float(load_cv(torch.tensor([4.0, 0, 0, 0]))) == pytest.approx(math.sqrt(3))
    assert float(max_over_mean(torch.tensor([4.0, 0, 0, 0]))) == pytest.approx(4.0)
    per_layer = load_cv(torch.tensor([[1.0, 1], [2.0, 0]]))
    assert per_layer.tolist() == pytest.approx([0.0, 1.0])


def test_capacity_and_drops_follow_deepspeed() -> None:
    cfg = MoEConfig(num_experts=4, top_k=2, capacity_factor=1.25, min_capacity=4)
    # DeepSpeed: ceil(tokens / experts * capacity_factor * k), at least min_capacity.
    assert expert_capacity(64, 4, 2, cfg.capacity_factor, cfg.min_capacity) == 40
    assert expert_capacity(4, 4, 2, cfg.capacity_factor, cfg.min_capacity) == 4
    counts = torch.tensor([[50.0, 30, 30, 18]])  # 128 routes = 64 tokens x top-2
    assert dropped_tokens(counts, 40).tolist() == [10.0]


def test_router_entropy() -> None:
    uniform = router_entropy(torch.zeros(3, 8))
    assert uniform.tolist() == pytest.approx([math.log(8)] * 3)
    peaked = router_entropy(torch.tensor([[100.0, 0, 0, 0]]))
    assert float(peaked[0]) == pytest.approx(0.0, abs=1e-6)


def test_peak_table_dense_figures() -> None:
    assert perf.table_peak("NVIDIA H100 80GB HBM3", "bf16") == perf.Peak(989.4, "table:h100:bf16")
    assert perf.table_peak("NVIDIA H100 PCIe", "bf16").tflops == 756.0  # type: ignore[union-attr]
    assert perf.table_peak("NVIDIA H200", "fp32").tflops == 66.9  # type: ignore[union-attr]
    assert perf.table_peak("NVIDIA A100-SXM4-80GB", "fp32").tflops == 19.5  # type: ignore[union-attr]
    assert perf.table_peak("NVIDIA A40", "bf16").tflops == 149.7  # type: ignore[union-attr]
    assert perf.table_peak("NVIDIA GeForce RTX 4090", "bf16") is None


# torch.cuda.get_device_name() strings, the table key each must find, dense bf16 / fp32 peaks.
DEVICE_NAMES = [
    ("NVIDIA H100 80GB HBM3", "h100", 989.4, 66.9),
    ("NVIDIA H100 PCIe", "h100-pcie", 756.0, 51.2),
    ("NVIDIA H100 NVL", "h100-nvl", 835.5, 60.0),
    ("NVIDIA H200", "h200", 989.4, 66.9),
    ("NVIDIA H200 NVL", "h200-nvl", 835.5, 60.0),
    ("NVIDIA H800", "h800", 989.4, 66.9),
    ("NVIDIA H800 PCIe", "h800-pcie", 756.0, 51.2),
    ("NVIDIA A100-SXM4-80GB", "a100", 312.0, 19.5),
    ("NVIDIA A100 80GB PCIe", "a100", 312.0, 19.5),
    ("NVIDIA A800-SXM4-80GB", "a800", 312.0, 19.5),
    ("NVIDIA A800 40GB Active", "a800", 312.0, 19.5),
    ("NVIDIA L40S", "l40s", 362.05, 91.6),
    ("NVIDIA L4", "l4", 121.0, 30.3),
    ("NVIDIA A10", "a10", 125.0, 31.2),
    ("NVIDIA RTX A6000", "a6000", 154.8, 38.7),
    ("NVIDIA A40", "a40", 149.7, 37.4),
]


@pytest.mark.parametrize(("name", "key", "bf16", "fp32"), DEVICE_NAMES)
def test_every_table_entry_matches_its_device_name(
    name: str, key: str, bf16: float, fp32: float
) -> None:
    assert perf.table_peak(name, "bf16") == perf.Peak(bf16, f"table:{key}:bf16")
    assert perf.table_peak(name, "fp16") == perf.Peak(bf16, f"table:{key}:fp16")
    assert perf.table_peak(name, "fp32") == perf.Peak(fp32, f"table:{key}:fp32")


def test_device_names_cover_the_table_and_match_no_lookalike() -> None:
    from moelab.devices import DEVICES

    assert {key for _, key, _, _ in DEVICE_NAMES} == set(DEVICES)
    # Tokens, not substrings: none of these is a table entry (A10G is not an A10, L40 not L40S).
    lookalikes = ("NVIDIA A10G", "NVIDIA L40", "NVIDIA RTX 6000 Ada Generation", "NVIDIA GH200")
    for name in (*lookalikes, "NVIDIA H100 80GB HBM3 MIG 1g.10gb"):  # a slice: a fraction
        assert perf.table_peak(name, "bf16") is None, name


def test_unknown_gpu_is_measured_on_its_device_and_cached_by_name(tmp_path: Path) -> None:
    """The measurement runs on the device it is given (here the CPU, for a made-up GPU name)."""
    cache = tmp_path / "peak.json"
    name = "NVIDIA Imaginary X1"
    first = perf.gpu_peak(name, "fp32", cache, device="cpu", n=256)
    again = perf.gpu_peak(name, "fp32", cache, device="cpu", n=256)
    assert first.source == f"measured:cuda-matmul:{name}|fp32" and first.tflops > 0
    assert again == perf.Peak(first.tflops, f"cached:cuda-matmul:{name}|fp32")
    # Keyed by the GPU's name only: the CPU-model fallback (cpu_peak) was not used.
    assert json.loads(cache.read_text()) == {f"{name}|fp32": first.tflops}
    known = perf.gpu_peak("NVIDIA H200", "bf16", cache, device="cpu", n=256)
    assert known == perf.Peak(989.4, "table:h200:bf16")
    assert json.loads(cache.read_text()) == {f"{name}|fp32": first.tflops}


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
    tel = MoeTelemetry(model, cfg, tokens_per_forward=4 * 32, ep_size=1, device=CPU)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for step in range(1, steps + 1):
        tel.set_timing(step == steps)  # the window's last step is the sampled one
        ids = torch.randint(0, 500, (4, 32), generator=gen)
        out = model(ids, labels=ids)
        out.loss.backward()
        tel.on_micro_step(out.exp_counts)
        tel.on_step(1000.0)
    m = tel.metrics(tel.vector().unsqueeze(0))
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
    from helpers import moe_gates

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
    tel = MoeTelemetry(model, cfg.moe, tokens_per_forward=64, ep_size=1, device=CPU)
    tel.set_timing(True)
    model.eval()
    with torch.no_grad():
        model(torch.randint(0, 500, (2, 32)))
    tel.on_step(1.0)
    m = tel.metrics(tel.vector().unsqueeze(0))
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
    # One window = 2 steps x 2 ranks x 4 sequences x 128 tokens, routed to top-2 experts.
    window_tokens = 2 * 2 * 4 * 128
    for i in range(2):
        p = f"moe/layer_{i}"
        for key in ("a2a_ms", "gate_ms", "expert_ms"):
            assert m[f"{p}/{key}"] > 0, key
        shares = torch.tensor([m[f"{p}/expert_{e}_share"] for e in range(4)])
        # Both figures are scale-free: the logged shares give back the load figures.
        assert m[f"{p}/load_cv"] == pytest.approx(float(load_cv(shares)), rel=1e-5)
        assert m[f"{p}/load_max_over_mean"] == pytest.approx(float(shares.max() * 4), rel=1e-5)
        assert 0 <= m[f"{p}/drop_fraction"] < 1
        assert 0 < m[f"{p}/router_entropy"] <= math.log(4) + 1e-6
        assert m[f"{p}/tokens"] == window_tokens * 2
        assert sum(m[f"{p}/expert_{e}_share"] for e in range(4)) == pytest.approx(1.0)
    steps = [x.step for x in client.get_metric_history(rid, "moe/a2a_ms")]
    assert steps == list(range(2, 17, 2))
    for pkg in ("torch", "deepspeed", "transformers", "mlflow"):
        assert tags[f"version.{pkg}"]
    assert tags["hostnames"] and "world=2" in tags["layout"]
    # Where it ran, as a GPU run would say it: cuda / nccl / torch.optim.adamw.AdamW(fused).
    assert (tags["device"], tags["device_name"], tags["accelerator"]) == ("cpu", "cpu", "cpu")
    assert (tags["dist_backend"], tags["params_device"]) == ("gloo", "cpu")
    assert tags["moelab.optimizer"] == "torch.optim.adamw.AdamW"
    # MoE timers ran on one sampled step per 2-step window (its logging step), no more.
    timed = client.get_metric_history(rid, "moe/timed_steps")
    assert [(x.step, x.value) for x in timed] == [(s, 1.0) for s in range(2, 17, 2)]
    assert "sampled every 2 steps" in tags["telemetry.moe_timers"]
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


DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def moe_layer_ids(cfg: MoelabConfig) -> list[int]:
    """Blocks with an MoE FFN: every `moe_layer_frequency`-th (1-based)."""
    every = cfg.model.moe.moe_layer_frequency
    return [i for i in range(cfg.model.n_layers) if (i + 1) % every == 0]


def a2a_bytes_per_step(cfg: MoelabConfig) -> int:
    """Bytes one rank sends to the other ranks in MoE all-to-alls per optimizer step, from the
    config alone. DeepSpeed's MOELayer runs, per MoE layer and micro-step, 2 all-to-alls in
    forward (dispatch, combine) and their 2 reverses in backward, each of an (experts,
    capacity, d_model) buffer split evenly over the ep ranks: (ep - 1) / ep of it leaves the
    rank. Capacity as DeepSpeed's gating sets it with drop_tokens: ceil(tokens / experts x
    capacity_factor x k), at least min_capacity."""
    moe, t = cfg.model.moe, cfg.train
    tokens = t.micro_batch_size * cfg.data.seq_len  # per rank and micro-step
    experts, k = moe.num_experts * moe.granularity, moe.top_k * moe.granularity
    cap = expert_capacity(tokens, experts, k, moe.capacity_factor, moe.min_capacity)
    buffer = experts * cap * cfg.model.d_model * DTYPE_BYTES[t.precision]
    ep = cfg.parallel.ep_size
    return len(moe_layer_ids(cfg)) * t.grad_accum * 4 * buffer * (ep - 1) // ep


# 4 MoE layers x 1 micro-step x 4 all-to-alls x (4 experts x capacity x d_model 128 x 4 B) / 2,
# capacity ceil(512 tokens / 4 x 1.25 x k): 160 for top-1, 320 for top-2.
SWEEP_A2A_BYTES = {"tiny_moe_top1": 2_621_440, "tiny_moe_top2": 5_242_880, "tiny_arctic": 5_242_880}


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(SWEEP_A2A_BYTES))
def test_a2a_bytes_match_an_independent_count(variant: str, variant_sweep: VariantSweep) -> None:
    """The shared sweep's 2-rank ep2 runs: bytes sent per step and over the run equal the
    count from the config; Gbit/s is those bytes over the logged time; per-layer times add up."""
    from launcher.compose import compose_config, to_schema

    over = [a for a in VARIANT_SWEEP if a != "-m" and not a.startswith(("model=", "tracking."))]
    cfg = to_schema(compose_config([f"model={variant}", *over]))
    per_step = a2a_bytes_per_step(cfg)
    assert per_step == SWEEP_A2A_BYTES[variant]
    client, run = variant_sweep.client, variant_sweep.run(variant)
    m, rid = run.data.metrics, run.info.run_id
    assert m["moe/a2a_bytes"] == per_step
    # Cumulative over the run at each logging step (the eval forwards are not counted).
    total = client.get_metric_history(rid, "moe/a2a_bytes_total")
    logged = range(cfg.train.log_every, cfg.train.steps + 1, cfg.train.log_every)
    assert sorted((x.step, x.value) for x in total) == [(s, s * per_step) for s in logged]
    fwd, bwd = m["moe/a2a_ms"], m["moe/a2a_bwd_ms"]
    assert m["moe/a2a_gbps"] == pytest.approx(per_step * 8 / 1e9 / ((fwd + bwd) / 1e3), rel=1e-9)
    layers = moe_layer_ids(cfg)
    assert layers == [0, 1, 2, 3]
    assert all(m[f"moe/layer_{i}/a2a_bwd_ms"] > 0 for i in layers)
    assert sum(m[f"moe/layer_{i}/a2a_bwd_ms"] for i in layers) == pytest.approx(bwd, rel=1e-9)
    assert sum(m[f"moe/layer_{i}/a2a_ms"] for i in layers) == pytest.approx(fwd, rel=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("variant", AUTOEP_VARIANTS)
def test_autoep_sweep_logs_what_the_classic_sweep_logs(
    variant: str, variant_sweep: VariantSweep, autoep_sweep: VariantSweep
) -> None:
    """The same 2-rank ZeRO-2 ep2 sweep with model.moe.impl=autoep logs the same metric names;
    nothing is dropped; the all-to-alls send only the routed rows (variable splits), so each
    rank's step bytes are whole rows of d_model x 4 B, four times (dispatch, combine, 2
    reverses), at most every route of the rank."""
    from launcher.compose import compose_config, to_schema

    classic, run = variant_sweep.run(variant), autoep_sweep.run(variant)
    assert run.info.status == "FINISHED"
    assert (classic.data.tags["moe_impl"], run.data.tags["moe_impl"]) == ("classic", "autoep")
    assert set(run.data.metrics) == set(classic.data.metrics)
    ds = json.loads(Path(run.data.tags["run_dir"], "ds_config.json").read_text())
    assert ds["expert_parallel"]["autoep_size"] == 2
    over = [a for a in VARIANT_SWEEP if a != "-m" and not a.startswith(("model=", "tracking."))]
    cfg = to_schema(compose_config([f"model={variant}", *over]))
    m, rid, layers = run.data.metrics, run.info.run_id, moe_layer_ids(cfg)
    assert all(m[f"moe/layer_{i}/drop_fraction"] == 0.0 for i in layers)
    row = cfg.model.d_model * 4 * 4
    routes = cfg.train.micro_batch_size * cfg.data.seq_len * cfg.model.moe.top_k
    assert 0 < m["moe/a2a_bytes"] <= len(layers) * routes * row
    assert (2 * m["moe/a2a_bytes"]) % row == 0  # the mean over 2 ranks of whole rows
    for key in ("a2a_ms", "a2a_bwd_ms", "gate_ms", "expert_ms"):
        assert all(m[f"moe/layer_{i}/{key}"] > 0 for i in layers), key
    assert sum(m[f"moe/layer_{i}/a2a_ms"] for i in layers) == pytest.approx(m["moe/a2a_ms"])
    loss = [x.value for x in autoep_sweep.client.get_metric_history(rid, "train/loss")]
    assert loss[-1] < loss[0] - 0.5, loss
    total = [x.value for x in autoep_sweep.client.get_metric_history(rid, "moe/a2a_bytes_total")]
    assert total == sorted(total) and total[0] > 0


class RecordingSink(NullSink):
    """Keeps what rank 0 would log."""

    def __init__(self) -> None:
        self.logged: list[tuple[int, dict[str, float]]] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.logged.append((step, metrics))


def _losses(x: float) -> SimpleNamespace:
    """A model output's four losses (a dense model: no expert counts)."""
    loss, lm_loss, aux_loss, z_loss = (torch.tensor(v) for v in (x, x - 0.5, 0.25, 0.0))
    return SimpleNamespace(loss=loss, lm_loss=lm_loss, aux_loss=aux_loss, z_loss=z_loss)


@pytest.mark.parametrize("enabled", [True, False])
def test_a_log_step_gathers_one_vector_of_every_metric(
    monkeypatch: pytest.MonkeyPatch, enabled: bool
) -> None:
    """Losses (means over the updated steps' micro-steps), skipped steps, LR and gradient
    norm, perf: one float64 vector per logging step, logged through the sink at the cadence
    (every 2 steps and the last)."""
    from launcher.compose import compose_config, to_schema
    from moelab.engine import DistInfo
    from moelab.telemetry import core

    over = ["model=tiny_dense", "train.log_every=2", "train.steps=5"]
    cfg = to_schema(compose_config([*over, f"telemetry.enabled={enabled}"]))
    cfg.telemetry = dataclasses.replace(cfg.telemetry, system_metrics=False, peak_tflops=1.0)
    gathered: list[torch.Tensor] = []
    real_gather = core.gather_rows
    monkeypatch.setattr(core, "gather_rows", lambda v: gathered.append(v) or real_gather(v))
    info = DistInfo(rank=0, world_size=1, local_rank=0, local_world_size=1, ep_size=1)
    sink = RecordingSink()
    tel = core.Telemetry(cfg, info, torch.nn.Linear(2, 2), sink)
    engine = SimpleNamespace(
        get_lr=lambda: [0.5], get_global_grad_norm=lambda: 2.0, fp16_enabled=lambda: False
    )
    steps = [([1.0, 3.0], True), ([5.0, 7.0], True), ([math.nan] * 2, False), ([2.0] * 2, False)]
    for step, (losses, updated) in enumerate([*steps, ([1.0, 1.0], True)], start=1):
        tel.begin_step(step)
        for x in losses:
            tel.on_micro_step(_losses(x))
        assert float(tel.step_loss()) == pytest.approx(sum(losses), nan_ok=True)
        tel.end_step(updated)
        tel.maybe_log(step, engine)
    tel.close()
    assert [step for step, _ in sink.logged] == [2, 4, 5]
    assert len(gathered) == 3 and all(v.dtype == torch.float64 for v in gathered)
    (_, first), (_, skipped), (_, last) = sink.logged
    assert {k: first[k] for k in first if k.startswith("train/")} == {
        "train/lr": 0.5,
        "train/loss": 4.0,
        "train/lm_loss": 3.5,
        "train/aux_loss": 0.25,
        "train/z_loss": 0.0,
        "train/grad_norm": 2.0,
        "train/skipped_steps": 0.0,
    }
    # Every step of the window skipped: no losses, no gradient norm.
    assert {k: v for k, v in skipped.items() if k.startswith("train/")} == {
        "train/lr": 0.5,
        "train/skipped_steps": 2.0,
    }
    assert (last["train/loss"], last["train/skipped_steps"]) == (1.0, 2.0)
    perf_keys = {"perf/step_time_s", "perf/tokens_per_s", "perf/samples_per_s"}
    assert perf_keys <= first.keys() and first["perf/step_time_s"] > 0
    assert ("perf/mfu" in first) is enabled


def test_comms_profile_adds_comms_logger_to_ds_config() -> None:
    from launcher.compose import compose_config, to_schema
    from moelab.dsconfig import build_ds_config

    cfg = to_schema(compose_config(["model=tiny_moe_top2", "parallel=ep2"]))
    assert "comms_logger" not in build_ds_config(cfg)
    assert cfg.telemetry.enabled and not cfg.telemetry.comms_profile
    cfg = to_schema(compose_config(["model=tiny_moe_top2", "telemetry.comms_profile=true"]))
    assert build_ds_config(cfg)["comms_logger"] == {
        "enabled": True,
        "prof_all": True,
        "verbose": False,
    }


def test_moe_timers_run_only_on_sampled_steps_and_feed_the_metrics(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """DeepSpeed's timer reads (`Timer.elapsed`: a device sync on a GPU) happen on sampled
    steps only, and the logged per-step times are the sampled step's own."""
    from deepspeed.utils.timer import SynchronizedWallClockTimer
    from test_models import compose_model

    from moelab.models import build_model

    reads: list[str] = []
    real_elapsed = SynchronizedWallClockTimer.Timer.elapsed

    def elapsed(timer: Any, reset: bool = True) -> float:
        reads.append(timer.name_)
        return real_elapsed(timer, reset)

    monkeypatch.setattr(SynchronizedWallClockTimer.Timer, "elapsed", elapsed)
    cfg = compose_model("tiny_moe_top2")
    model = build_model(cfg).train()
    tel = MoeTelemetry(model, cfg.moe, tokens_per_forward=64, ep_size=1, device=CPU)
    per_step: list[int] = []
    for step in range(1, 5):
        tel.set_timing(step == 4)
        before = len(reads)
        ids = torch.randint(0, 500, (2, 32))
        out = model(ids, labels=ids)
        out.loss.backward()
        tel.on_micro_step(out.exp_counts)
        tel.on_step(1000.0)
        per_step.append(len(reads) - before)
        if step < 4:  # an unsampled step left nothing in the timers
            left = moe_layers.read_and_reset_moe_timers(model)
            assert all(v == 0.0 for ms in left.values() for v in ms.values())
    assert per_step[:3] == [0, 0, 0] and per_step[3] > 0
    m = tel.metrics(tel.vector().unsqueeze(0))
    assert m["moe/timed_steps"] == 1.0
    assert m["moe/layer_0/gate_ms"] > 0 and m["moe/layer_0/expert_ms"] > 0
    # ep_size 1: DeepSpeed runs no all-to-all, so nothing is sent and no backward one timed.
    assert (m["moe/a2a_bytes"], m["moe/a2a_bytes_total"], m["moe/a2a_gbps"]) == (0, 0, 0)
    assert [m[f"moe/layer_{i}/a2a_bwd_ms"] for i in cfg.moe_layer_indices()] == [0.0] * 4
    tel.close()


class BarSink(RecordingSink):
    """Records the progress bars asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.bars: list[tuple[int, int]] = []

    def progress(self, total: int, initial: int = 0) -> Any:
        self.bars.append((total, initial))
        return super().progress(total, initial)


@pytest.mark.parametrize("progress", [True, False])
def test_train_progress_decides_whether_rank_0_asks_for_a_bar(progress: bool) -> None:
    from launcher.compose import compose_config, to_schema
    from moelab.engine import DistInfo
    from moelab.telemetry import core

    cfg = to_schema(compose_config(["model=tiny_dense", f"train.progress={progress}"]))
    cfg.telemetry = dataclasses.replace(cfg.telemetry, system_metrics=False, peak_tflops=1.0)
    info = DistInfo(rank=0, world_size=1, local_rank=0, local_world_size=1, ep_size=1)
    sink = BarSink()
    tel = core.Telemetry(cfg, info, torch.nn.Linear(2, 2), sink)
    tel.begin_step(1)
    tel.close()
    assert sink.bars == ([(cfg.train.steps, 0)] if progress else [])


class ArtifactSink(RecordingSink):
    """Rank 0's sink, as far as plots go: records every artifact logged."""

    writes_artifacts = True

    def __init__(self) -> None:
        super().__init__()
        self.artifacts: list[tuple[Path, str | None]] = []

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.artifacts.append((Path(path), artifact_path))


def test_expert_load_plots_are_kept_in_the_run_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The heatmaps rank 0 draws are written to `<run dir>/plots/` and stay there; nothing is
    left in the temporary folder."""
    from launcher.compose import compose_config, to_schema
    from moelab.engine import DistInfo
    from moelab.models import build_model
    from moelab.telemetry import core

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(scratch))
    over = ["model=tiny_moe_top2", "train.log_every=2", "train.steps=4"]
    cfg = to_schema(compose_config([*over, "telemetry.heatmap_every=2"]))
    cfg.telemetry = dataclasses.replace(cfg.telemetry, system_metrics=False, peak_tflops=1.0)
    cfg.run_dir = str(tmp_path / "run")
    model = build_model(cfg.model).train()
    info = DistInfo(rank=0, world_size=1, local_rank=0, local_world_size=1, ep_size=1)
    sink = ArtifactSink()
    tel = core.Telemetry(cfg, info, model, sink)
    engine = SimpleNamespace(
        get_lr=lambda: [0.5], get_global_grad_norm=lambda: 2.0, fp16_enabled=lambda: False
    )
    for step in range(1, 5):
        tel.begin_step(step)
        ids = torch.randint(0, 500, (2, 32))
        out = model(ids, labels=ids)
        out.loss.backward()
        tel.on_micro_step(out)
        tel.end_step(True)
        tel.maybe_log(step, engine)
    tel.close()
    plots = tmp_path / "run" / "plots"
    names = ["expert_load_step2.png", "expert_load_step4.png", "expert_load_over_time.png"]
    assert sorted(sink.artifacts) == sorted((plots / name, "plots") for name in names)
    assert sorted(p.name for p in plots.iterdir()) == sorted(names)
    assert all(p.stat().st_size > 1000 for p in plots.iterdir())
    assert list(scratch.iterdir()) == []
