"""The engine module: ZeRO 1/2 with every expert frozen builds and trains (one real rank)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from typing import Any

import pytest

from helpers import REPO, free_port

# One gloo rank, for each (stage, trainable) case: build tiny MoE, freeze by `trainable`,
# deepspeed.initialize with ZeRO `stage`, take three optimizer steps (the warm-up's first two
# have lr 0), and report which tensors changed and how many elements the optimizer holds.
CHILD = textwrap.dedent(
    """
    import json, os, sys
    os.environ["DS_ACCELERATOR"] = "cpu"
    import torch
    from launcher.compose import compose_config, to_schema
    from moelab import engine
    from moelab.finetune import freeze, parse_trainable
    from moelab.models import build_model

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
        ds = engine.initialize(model, engine.build_ds_config(cfg))
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
        }))
    """
)
CASES = ("1:dense_only", "2:dense_only", "2:router")


@pytest.fixture(scope="module")
def frozen_runs() -> dict[str, dict[str, Any]]:
    """The child's report per case, from one process (one DeepSpeed import)."""
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": f"{REPO / 'src'}:{REPO}",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "OMP_NUM_THREADS": "1",
    }
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
