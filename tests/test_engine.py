"""The engine module: ZeRO 1/2 with every expert frozen builds and trains (one real rank)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from typing import Any

import pytest
import torch

from helpers import REPO, one_rank_env

# One gloo rank, for each (stage, trainable) case: build tiny MoE, freeze by `trainable`,
# deepspeed.initialize with ZeRO `stage`, take three optimizer steps (the warm-up's first two
# have lr 0), and report which tensors changed, how many elements the optimizer holds, and
# which of DeepSpeed's Muon code and torch.compile's inductor were loaded from their files.
CHILD = textwrap.dedent(
    """
    import json, os, sys
    os.environ["DS_ACCELERATOR"] = "cpu"
    import torch
    from launcher.compose import compose_config, to_schema
    from moelab import engine
    from moelab.dsconfig import build_ds_config
    from moelab.finetune import freeze, parse_trainable
    from moelab.models import build_model

    LOADED = ("deepspeed.runtime.zero.muon.original_muon", "torch._inductor.compile_fx")
    engine.init_distributed(1)
    for case in sys.argv[1:]:
        stage, trainable = case.split(":", 1)
        cfg = to_schema(compose_config([
            "model=tiny_moe_top2", "cluster.nproc_per_node=1", f"zero=stage{stage}",
            "train.micro_batch_size=2", "train.grad_accum=1",
        ]))
        torch.manual_seed(0)
        model = build_model(cfg.model, 1, 0, 0)
        summary = freeze(model, parse_trainable(trainable))
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        ds = engine.initialize(model, build_ds_config(cfg))
        ids = torch.randint(0, 256, (2, 32))
        for _ in range(3):
            ds.backward(ds(ids, labels=ids).loss)
            ds.step()
        after = dict(ds.module.named_parameters())
        groups = ds.optimizer.optimizer.param_groups
        print(json.dumps({
            "case": case,
            "frozen_all": engine.experts_all_frozen(model),
            "changed": sorted(n for n in before if not torch.equal(before[n], after[n].detach())),
            "trainable": summary.trainable,
            "optimizer_numel": sum(p.numel() for g in groups for p in g["params"]),
            "groups": len(groups),
            "loaded": [m for m in LOADED if getattr(sys.modules.get(m), "__file__", None)],
        }))
    """
)
CASES = ("1:dense_only", "2:dense_only", "2:router")


@pytest.fixture(scope="module")
def frozen_runs() -> dict[str, dict[str, Any]]:
    """The child's report per case, from one process (one DeepSpeed import)."""
    env = one_rank_env()
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, *CASES],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {r["case"]: r for r in reports}


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_with_every_expert_frozen_trains_only_the_rest(
    frozen_runs: dict[str, dict[str, Any]], stage: int
) -> None:
    out = frozen_runs[f"{stage}:dense_only"]
    assert out["frozen_all"] is True
    changed = out["changed"]
    assert "model.embed_tokens.weight" in changed, changed
    assert not [n for n in changed if "experts" in n or ".gate.wg." in n], changed
    # The ZeRO optimizer flattens the trainable tensors into its groups: their element count
    # is exactly the trainable count (one rank holds every expert, so nothing is sharded).
    assert out["optimizer_numel"] == out["trainable"]


def test_zero_router_only_has_one_dense_group(frozen_runs: dict[str, dict[str, Any]]) -> None:
    out = frozen_runs["2:router"]
    changed = out["changed"]
    assert len(changed) == 4 and all(".gate.wg." in n for n in changed), changed
    assert out["groups"] == 1 and out["optimizer_numel"] == out["trainable"]


def test_zero_engines_load_neither_muon_nor_inductor(
    frozen_runs: dict[str, dict[str, Any]],
) -> None:
    """DeepSpeed's ZeRO check imports its Muon optimizer, whose torch.compile loads inductor
    (1.5-3 s of CPU per rank), unless `dscompat.skip_muon_import` stands in for it."""
    loaded = {case: out["loaded"] for case, out in frozen_runs.items()}
    assert loaded == {case: [] for case in CASES}


# NCCL has no CPU backend: every tensor the ranks hand to a collective must live on the
# engine's device. gloo accepts CPU tensors, so real CPU runs cannot show a violation; here the
# engine's device is `meta` (no data, never CPU) and torch.distributed is a recording fake.
META = torch.device("meta")


class RecordingDist:
    """The collectives of torch.distributed, recording the device of every tensor handed in."""

    def __init__(self) -> None:
        self.devices: list[tuple[str, torch.device]] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import torch.distributed as dist

        monkeypatch.setattr(dist, "is_available", lambda: True)
        monkeypatch.setattr(dist, "is_initialized", lambda: True)
        monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: 2)
        for name in ("all_reduce", "broadcast", "all_to_all_single", "reduce_scatter_tensor"):
            monkeypatch.setattr(dist, name, self._record(name))
        monkeypatch.setattr(dist, "all_gather", self._all_gather)
        monkeypatch.setattr(dist, "all_gather_into_tensor", self._record("all_gather_into_tensor"))

    def _record(self, name: str) -> Any:
        def collective(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> None:
            self.devices.append((name, tensor.device))
            for t in args:
                if isinstance(t, torch.Tensor):
                    self.devices.append((name, t.device))

        return collective

    def _all_gather(self, out: list[torch.Tensor], tensor: torch.Tensor, *a: Any, **k: Any) -> None:
        self.devices += [("all_gather", t.device) for t in (*out, tensor)]


def meta_moe_model() -> torch.nn.Module:
    from launcher.compose import compose_config, to_schema
    from moelab.models import build_model

    cfg = to_schema(compose_config(["model=tiny_moe_top2", "cluster.nproc_per_node=1"]))
    with torch.device(META):
        model = build_model(cfg.model, 1, 0, 0).train()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    return model


def test_every_tensor_handed_to_a_collective_is_on_the_engine_device(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """The loop's per-step flags (guard + stop request), the window's loss means, the eval
    mean and telemetry's gathered window are built on the engine's device, for every ZeRO
    stage and precision the guard distinguishes."""
    from types import SimpleNamespace

    from launcher.compose import compose_config, to_schema
    from moelab import engine
    from moelab.checkpoint import StopFlag
    from moelab.engine import DistInfo
    from moelab.guard import StepGuard
    from moelab.telemetry.core import Telemetry, gather_rows
    from moelab.telemetry.sink import NullSink

    rec = RecordingDist()
    rec.install(monkeypatch)
    model = meta_moe_model()
    ds_engine = SimpleNamespace(device=META, module=model)
    loss_sum = torch.zeros(4, device=META)[0]
    for stage, precision in [(0, "fp32"), (0, "fp16"), (2, "bf16")]:
        guard = StepGuard(skip=False, zero_stage=stage, precision=precision)
        flags = torch.cat([guard.local_flags(ds_engine, loss_sum), StopFlag(tmp_path).local(META)])
        engine.any_rank(flags)
    engine.all_reduce_mean(torch.zeros(4, device=META))
    cfg = to_schema(compose_config(["model=tiny_moe_top2", "telemetry.system_metrics=false"]))
    cfg.telemetry.peak_tflops = 1.0
    info = DistInfo(rank=0, world_size=2, local_rank=0, local_world_size=2, ep_size=1)
    monkeypatch.setattr(Telemetry, "_tags", lambda self, info, peak: None)  # object gather
    tel = Telemetry(cfg, info, model, NullSink())
    gather_rows(tel.window_vector())
    tel.close()
    assert len(rec.devices) >= 6
    assert {device for _, device in rec.devices} == {META}, rec.devices


def test_optimizer_is_picked_for_the_rank_device() -> None:
    """torch's AdamW as rendered on CPU; its fused kernel on a GPU; with optimizer offload,
    DeepSpeed's CPU Adam where that op builds, else torch's AdamW."""
    from launcher.compose import compose_config, to_schema
    from moelab import engine
    from moelab.dsconfig import build_ds_config

    cfg = to_schema(compose_config(["model=tiny_dense"]))
    rendered = build_ds_config(cfg)
    cpu = engine.pick_optimizer(rendered, "cpu")["optimizer"]["params"]
    cuda = engine.pick_optimizer(rendered, "cuda")["optimizer"]["params"]
    assert cpu["torch_adam"] and "fused" not in cpu
    assert cuda["torch_adam"] and cuda["fused"] is True
    assert "fused" not in rendered["optimizer"]["params"]  # a copy: the rendered one stays
    overrides = ["model=tiny_dense", "zero=stage2", "zero.offload_optimizer=cpu"]
    offload = build_ds_config(to_schema(compose_config(overrides)))
    for builds in (True, False):
        picked = engine.pick_optimizer(offload, "cuda", lambda b=builds: b)["optimizer"]
        assert picked["params"]["torch_adam"] is not builds and "fused" not in picked["params"]


# One gloo rank runs moelab's own optimizer steps (train.train_step) on tiny MoE at ZeRO 0, the
# stage whose guard also checks local gradients, counting every collective and every host read
# of a tensor that moelab's code makes (DeepSpeed's own gradient all-reduce is not counted).
LOOP_CHILD = textwrap.dedent(
    """
    import json, os, sys, tempfile
    os.environ["DS_ACCELERATOR"] = "cpu"
    import torch
    import torch.distributed as dist
    from launcher.compose import compose_config, to_schema
    from moelab import engine, train
    from moelab.dsconfig import build_ds_config
    from moelab.checkpoint import StopFlag
    from moelab.guard import StepGuard
    from moelab.models import build_model
    from moelab.telemetry.core import Telemetry
    from moelab.telemetry.sink import NullSink

    info = engine.init_distributed(1)
    cfg = to_schema(compose_config([
        "model=tiny_moe_top2", "cluster.nproc_per_node=1", "train.micro_batch_size=2",
        "train.grad_accum=2", "telemetry.enabled=false",
    ]))
    torch.manual_seed(0)
    model = build_model(cfg.model, 1, 0, 0)
    ds = engine.initialize(model, build_ds_config(cfg))
    tel = Telemetry(cfg, info, ds.module, NullSink())
    guard = StepGuard(False, 0, "fp32")
    stop = StopFlag(tempfile.mkdtemp())
    batches = iter([{"input_ids": torch.randint(0, 256, (2, 32))} for _ in range(8)])
    counts = {"collectives": 0, "host_reads": 0}
    def ours():  # called from moelab's own code (DeepSpeed's gradient all-reduce is not)
        return "/src/moelab/" in sys._getframe(2).f_code.co_filename
    for name in ("all_reduce", "all_gather", "broadcast", "all_gather_into_tensor"):
        real = getattr(dist, name)
        def counted(*a, real=real, **k):
            counts["collectives"] += ours()
            return real(*a, **k)
        setattr(dist, name, counted)
    for name in ("item", "tolist", "__float__", "__bool__"):
        real = getattr(torch.Tensor, name)
        def read(self, *a, real=real, **k):
            counts["host_reads"] += ours()
            return real(self, *a, **k)
        setattr(torch.Tensor, name, read)
    for step in range(1, 4):
        updated, stopping = train.train_step(ds, batches, tel, guard, stop, step)
        tel.end_step(updated)
    finite = bool(torch.isfinite(tel.losses.sums).all())
    print(json.dumps(counts | {"finite": finite, "stop": stopping}))
    """
)


def test_an_optimizer_step_makes_one_all_reduce_and_one_host_read() -> None:
    """The loop's own bookkeeping per optimizer step (non-finite guard, stop request, losses):
    one small all-reduce and one read of its result; the losses stay on the device. (Before:
    a guard all-reduce, a stop-flag all-reduce and a loss read per micro-step.)"""
    env = one_rank_env()
    proc = subprocess.run(
        [sys.executable, "-c", LOOP_CHILD], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {"collectives": 3, "host_reads": 3, "finite": True, "stop": False}, report
