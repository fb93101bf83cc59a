"""Inference of the exported model: attention masks (left/right padding), padded tokens kept
out of MoE routing, KV-cache decoding, top-k > 2 routing, and an unchanged training forward."""

from __future__ import annotations

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest
import torch

from helpers import torch_twin_matches_deepspeed
from moelab.config import ModelConfig, MoEConfig
from moelab.models import MoelabForCausalLM, build_model
from moelab.models.modeling import attn_context

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 256
PAD = 0
# name -> (ffn, top_k, moe impl, granularity)
VARIANTS = {
    "dense": ("dense", 1, "classic", 1),
    "moe_top1": ("moe", 1, "classic", 1),
    "moe_top2": ("moe", 2, "classic", 1),
    "arctic": ("arctic", 2, "classic", 1),
    "pr_moe": ("pr_moe", 1, "classic", 1),
    "autoep": ("moe", 2, "autoep", 1),
    "moe_top4": ("moe", 2, "classic", 2),
}
# forward(input_ids, labels) of each variant (seeded below) before masks and caches existed
TRAINING_LOSS = {
    "dense": 5.563741207122803,
    "moe_top1": 5.579545497894287,
    "moe_top2": 5.579467296600342,
    "arctic": 5.578116416931152,
    "pr_moe": 5.605342388153076,
    "autoep": 5.573980331420898,
}


def model_config(name: str, drop: bool = False, capacity: float = 2.0) -> ModelConfig:
    ffn, k, impl, g = VARIANTS[name]
    moe = MoEConfig(
        num_experts=4, top_k=k, drop_tokens=drop, impl=impl, granularity=g,
        eval_capacity_factor=capacity, min_capacity=1,
    )  # fmt: skip
    return ModelConfig(
        ffn=ffn, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, moe=moe
    )


def tiny_model(name: str) -> MoelabForCausalLM:
    """A seeded random model with the exported model's runtime (pure torch, dropless)."""
    model = build_model(model_config(name), seed=0, moe_runtime="torch").eval()
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():  # the fused expert tensors have no initialiser of their own
        for n, p in model.named_parameters():
            if "experts.gate_up_proj" in n or "experts.down_proj" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model


def prompts(lengths: tuple[int, ...] = (5, 12, 9), seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=gen) for n in lengths]


def pad(rows: list[torch.Tensor], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, max length), padded on `side`."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        cols = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, cols], mask[i, cols] = r, 1
    return ids, mask


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_padded_batch_equals_one_by_one(name: str, side: str) -> None:
    model, rows = tiny_model(name), prompts()
    ids, mask = pad(rows, side)
    with torch.no_grad():
        batch = model(ids, attention_mask=mask)
        singles = [model(r.unsqueeze(0)) for r in rows]
    assert torch.isfinite(batch.logits).all()  # padded queries see themselves: no NaN
    for i, one in enumerate(singles):
        real = mask[i].bool()
        torch.testing.assert_close(batch.logits[i, real], one.logits[0], atol=1e-5, rtol=0)
    # padded tokens take no route: the batch's routes are the rows' routes
    for layer, counts in enumerate(batch.exp_counts):
        want = sum(one.exp_counts[layer] for one in singles)
        assert torch.equal(counts.long(), torch.as_tensor(want).long())


def test_left_padding_positions_and_mask() -> None:
    """Positions count real tokens (RoPE is relative, so logits alone would not tell); every
    query, a padded one too, sees at least one key (a fully masked SDPA row can give NaN)."""
    ids, mask = pad(prompts((2, 4)), "left")
    ctx = attn_context(ids, mask, None, None, 0)
    assert ctx.positions.tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]
    assert ctx.attn_mask is not None and ctx.attn_mask.any(dim=-1).all()
    assert ctx.attn_mask[0, 0, 3].tolist() == [False, False, True, True]
    assert ctx.token_mask is not None and ctx.token_mask.tolist() == mask.bool().tolist()


def count_new_tokens(model: MoelabForCausalLM) -> list[int]:
    lengths: list[int] = []
    model.register_forward_pre_hook(
        lambda _m, args, kwargs: lengths.append((args or [kwargs["input_ids"]])[0].shape[-1]),
        with_kwargs=True,
    )
    return lengths


GREEDY = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False, "pad_token_id": PAD}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_cached_generate_equals_uncached_and_one_by_one(name: str) -> None:
    model, rows = tiny_model(name), prompts()
    ids, mask = pad(rows, "left")
    lengths = count_new_tokens(model)
    with torch.no_grad():
        cached = model.generate(ids, attention_mask=mask, use_cache=True, **GREEDY)
        # the prompt once, then one new token per step
        assert lengths == [ids.shape[1]] + [1] * (GREEDY["max_new_tokens"] - 1)
        lengths.clear()
        uncached = model.generate(ids, attention_mask=mask, use_cache=False, **GREEDY)
        assert lengths[-1] == ids.shape[1] + GREEDY["max_new_tokens"] - 1
        singles = [model.generate(r.unsqueeze(0), use_cache=True, **GREEDY) for r in rows]
    assert torch.equal(cached, uncached)
    new = cached[:, ids.shape[1] :]
    for i, one in enumerate(singles):
        assert torch.equal(new[i], one[0, len(rows[i]) :])


def test_cache_holds_every_position() -> None:
    model, (row,) = tiny_model("moe_top2"), prompts((7,))
    with torch.no_grad():
        full = model(row.unsqueeze(0)).logits
        first = model(row[None, :4], use_cache=True)
        rest = model(row[None, 4:], past_key_values=first.past_key_values, use_cache=True)
    assert rest.past_key_values.get_seq_length() == 7
    torch.testing.assert_close(torch.cat([first.logits, rest.logits], 1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", list(TRAINING_LOSS))
def test_training_forward_is_unchanged(name: str) -> None:
    model = tiny_model(name)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(ids, labels=ids)
        masked = model(ids, labels=ids, attention_mask=torch.ones_like(ids))
    assert out.past_key_values is None
    assert out.loss.item() == pytest.approx(TRAINING_LOSS[name], abs=1e-6)
    torch.testing.assert_close(masked.loss, out.loss, atol=1e-6, rtol=0)


@pytest.mark.parametrize("drop", [False, True])
def test_top4_routing_matches_deepspeed_moe_in_eval(drop: bool) -> None:
    """Granularity 2 of top-2: 8 experts, k = 4 routes per token (DeepSpeed's `topkgating`)."""
    cfg = model_config("moe_top4", drop=drop, capacity=0.5)
    assert cfg.moe.active_experts == 4
    dropped = torch_twin_matches_deepspeed(cfg, VOCAB)
    assert any(dropped) == drop
