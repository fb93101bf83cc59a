"""The MoE implementations, chosen by `model.moe.impl`, mapped to their adapter module.

Each adapter module gives the same functions: `build_ffn` (the training FFN of one block),
`moe_ffns` (a model's FFNs in order; each has `layer_idx`, `expert_params()` and a forward
giving a `MoEOutput`), `install_moe_timers`/`uninstall_moe_timers`, `set_moe_timing`,
`read_and_reset_moe_timers` and `register_router_hooks`. Imported lazily: only the
implementation a run uses is loaded.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from types import ModuleType
from typing import Any

ADAPTERS: dict[str, str] = {
    "classic": "moelab.ds_moe",  # deepspeed.moe: capacity, einsum dispatch, drops
    "autoep": "moelab.autoep",  # DeepSpeed AutoEP: dropless, grouped experts
}


def moe_impl(name: str) -> ModuleType:
    """The adapter module of MoE implementation `name`."""
    if name not in ADAPTERS:
        raise ValueError(f"model.moe.impl={name!r} is not one of {sorted(ADAPTERS)}.")
    return importlib.import_module(ADAPTERS[name])


def all_moe_ffns(model: Any) -> Iterator[Any]:
    """Every training MoE FFN of `model`, whichever implementation, in order."""
    for module in model.modules():
        if getattr(module, "is_moe_ffn", False):
            yield module
