"""Measured decoding speed of an exported model: `generate()` tokens/s at given batch sizes."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel


@dataclass(frozen=True)
class Throughput:
    """Greedy decoding of `new_tokens` tokens per sequence after a `prompt_len` prompt."""

    batch_size: int
    prompt_len: int
    new_tokens: int
    seconds: float
    use_cache: bool = True

    @property
    def tokens_per_s(self) -> float:
        return self.batch_size * self.new_tokens / self.seconds


def generate_throughput(
    model_dir: str | Path | PreTrainedModel,
    batch_sizes: tuple[int, ...] = (1, 16),
    prompt_len: int = 32,
    new_tokens: int = 32,
    repeats: int = 3,
    use_cache: bool = True,
) -> list[Throughput]:
    """Best of `repeats` timed `generate()` calls per batch size (after one warm-up call), of
    an exported folder or a model already built; `use_cache=False` re-runs the whole sequence
    at every step.

    Prompts are random token ids of equal length (no padding); `min_new_tokens` keeps EOS
    from ending a call early, so every call decodes exactly `new_tokens` tokens.
    """
    if isinstance(model_dir, PreTrainedModel):
        model: Any = model_dir.eval()
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True).eval()
    gen = torch.Generator().manual_seed(0)
    results = []
    kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
    kwargs |= {"use_cache": use_cache, "pad_token_id": model.generation_config.pad_token_id or 0}
    for b in batch_sizes:
        ids = torch.randint(0, model.config.vocab_size, (b, prompt_len), generator=gen)
        with torch.inference_mode():
            model.generate(ids, **kwargs)
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                model.generate(ids, **kwargs)
                best = min(best, time.perf_counter() - t0)
        results.append(Throughput(b, prompt_len, new_tokens, best, use_cache))
    return results


def format_throughput(results: list[Throughput]) -> str:
    """A table: one row per measurement."""
    lines = [
        f"{'batch':>5}  {'prompt':>6}  {'new':>4}  {'cache':>5}  {'seconds':>8}  {'tokens/s':>9}"
    ]
    for r in results:
        lines.append(
            f"{r.batch_size:>5}  {r.prompt_len:>6}  {r.new_tokens:>4}  {r.use_cache!s:>5}  "
            f"{r.seconds:>8.3f}  {r.tokens_per_s:>9.1f}"
        )
    return "\n".join(lines)
