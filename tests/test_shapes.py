"""moelab.shapes: each formula against DeepSpeed where DeepSpeed defines it, else by hand."""

from __future__ import annotations

import ast
import itertools
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from deepspeed.moe.sharded_moe import top1gating, top2gating, topkgating

from moelab import shapes
from moelab.config import ModelConfig, MoEConfig
from moelab.models.configuration import MoelabLMConfig

SHAPES_FILE = Path(shapes.__file__)


def deepspeed_capacity(tokens: int, experts: int, k: int, factor: float, min_cap: int) -> int:
    """The capacity DeepSpeed's own gating function uses: its dispatch mask's last dim."""
    logits = torch.randn(tokens, experts)
    if k == 1:
        out = top1gating(logits, factor, min_cap, use_rts=False)
    elif k == 2:
        out = top2gating(logits, factor, min_cap, top2_2nd_expert_sampling=False)
    else:
        out = topkgating(logits, k, factor, min_cap)
    return int(out[2].shape[-1])


CAPACITY_GRID = [
    (tokens, experts, k, factor, min_cap)
    for tokens, experts, k, factor, min_cap in itertools.product(
        (4, 5, 50, 97, 128, 250), (1, 3, 6, 8, 16), (1, 2, 3, 4), (0.3, 1.0, 1.1, 1.25, 2.0), (0, 4)
    )
    if k <= experts
]


def test_expert_capacity_is_deepspeeds() -> None:
    torch.manual_seed(0)
    wrong = [
        (case, shapes.expert_capacity(*case), deepspeed_capacity(*case))
        for case in CAPACITY_GRID
        if shapes.expert_capacity(*case) != deepspeed_capacity(*case)
    ]
    assert not wrong, wrong[:5]


def test_expert_capacity_rounds_in_float32_like_deepspeed() -> None:
    # float64 gives ceil(55.00000000000001) = 56 and ceil(60.0) = 60 here; DeepSpeed 55 and 61.
    assert shapes.expert_capacity(50, 1, 1, 1.1, 0) == deepspeed_capacity(50, 1, 1, 1.1, 0) == 55
    assert shapes.expert_capacity(50, 1, 1, 1.2, 0) == deepspeed_capacity(50, 1, 1, 1.2, 0) == 61
    assert shapes.expert_capacity(1024, 8, 2, 1.25, 4) == 320
    assert shapes.expert_capacity(8, 8, 1, 1.0, 4) == 4  # min_capacity wins


@pytest.mark.parametrize(("ep_size", "num_experts"), [(1, 8), (2, 8), (4, 8), (8, 8), (4, 32)])
def test_expert_ownership_partitions_the_experts(ep_size: int, num_experts: int) -> None:
    world = 16
    owned = [list(shapes.experts_of_rank(shapes.ep_rank(r, ep_size), ep_size, num_experts))
             for r in range(world)]  # fmt: skip
    for r in range(world):  # EP groups: consecutive blocks of ep_size ranks
        group = range(r - r % ep_size, r - r % ep_size + ep_size)
        assert sorted(e for g in group for e in owned[g]) == list(range(num_experts))
        assert all(shapes.owner_of_expert(e, ep_size, num_experts) == r % ep_size for e in owned[r])
    assert owned[1] == ([4, 5, 6, 7] if (ep_size, num_experts) == (2, 8) else owned[1])


def test_threads_per_rank() -> None:
    assert shapes.threads_per_rank(16, 2) == 8
    assert shapes.threads_per_rank(16, 3) == 5
    assert shapes.threads_per_rank(2, 4) == 1  # at least one
    assert shapes.threads_per_rank(None, 2) == 1  # os.cpu_count() unknown
    assert shapes.threads_per_rank(16, 0) == 16
    assert shapes.threads_per_rank(16, 2, requested=3) == 3


def test_derived_sizes_by_hand() -> None:
    assert shapes.padded_vocab_size(50257, 128) == 50304
    assert shapes.padded_vocab_size(6288, 16) == 6288
    assert shapes.swiglu_hidden(2048, 8.0, None) == 8192
    assert shapes.swiglu_hidden(2048, 8.0, 5000) == 5000
    assert shapes.split_hidden(512, 1, 16) == 512
    assert shapes.split_hidden(512, 4, 0) == 128
    assert shapes.split_hidden(512, 3, 16) == 176  # 170.7 -> nearest multiple of 16
    assert shapes.split_hidden(8, 3, 16) == 16  # at least one multiple
    assert (shapes.kv_heads(8, None), shapes.kv_heads(8, 2), shapes.head_dim(2048, 8)) == (
        8,
        2,
        256,
    )
    assert [i for i in range(6) if shapes.is_moe_layer(i, 2)] == [1, 3, 5]
    assert [shapes.is_moe_ffn(f) for f in ("dense", "moe", "arctic", "pr_moe")] == [
        False, True, True, True,
    ]  # fmt: skip


SIZE_GRID = itertools.product(
    ("dense", "moe", "arctic", "pr_moe"),
    (96, 128),
    (None, 2),
    (None, 300),
    (1, 2, 3),
    (0, 16),
    (1, 2),
)
DERIVED = ("is_moe", "kv_heads", "head_dim", "padded_vocab_size", "mlp_hidden", "expert_hidden")


def test_model_config_and_hf_config_agree() -> None:
    """The schema and the exported model's config derive the same sizes (both from shapes)."""
    for ffn, d, kv, hidden, g, rnd, freq in SIZE_GRID:
        moe = MoEConfig(expert_hidden_size=hidden, granularity=g, granularity_round=rnd,
                        moe_layer_frequency=freq, expert_mlp_ratio=5.0)  # fmt: skip
        cfg = ModelConfig(ffn=ffn, d_model=d, n_layers=4, n_heads=4, n_kv_heads=kv,
                          vocab_size=1000, mlp_ratio=2.7, moe=moe)  # fmt: skip
        hf = MoelabLMConfig.from_model_config(cfg)
        assert [getattr(hf, n) for n in DERIVED] == [getattr(cfg, n) for n in DERIVED], cfg
        assert [hf.is_moe_layer(i) for i in range(4)] == [cfg.is_moe_layer(i) for i in range(4)]
        assert hf.to_model_config() == cfg


def test_hf_config_reads_the_old_layer_frequency_key() -> None:
    assert MoelabLMConfig.from_model_config(ModelConfig()).to_dict()["moe_layer_frequency"] == 1
    assert MoelabLMConfig(moe_moe_layer_frequency=2).moe_layer_frequency == 2


def test_moe_config_capacity_is_the_layers() -> None:
    """Granularity 2 gives DeepSpeed's layer 2E experts and 2k routes per token."""
    moe = MoEConfig(num_experts=4, top_k=2, granularity=2, capacity_factor=1.1, min_capacity=0)
    assert moe.capacity(50) == deepspeed_capacity(50, 8, 4, 1.1, 0) == 28
    assert moe.capacity(50, training=False) == shapes.expert_capacity(50, 8, 4, 2.0, 0) == 50


def test_shapes_is_standard_library_only() -> None:
    """An exported model folder carries a copy of shapes.py: it may import nothing else."""
    tree = ast.parse(SHAPES_FILE.read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}, imported
    models_copy = SHAPES_FILE.parent / "models" / "shapes.py"
    assert models_copy.resolve() == SHAPES_FILE.resolve()  # what transformers copies on export
    code = "import sys; import moelab.shapes; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
