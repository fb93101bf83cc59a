"""Fine-tuning: start from a trained run's weights and train only part of the model.

`train.init_from` names a run dir, its `checkpoints/` dir or one `global_step<N>/` dir;
DeepSpeed loads the module only (non-expert file and every expert shard, by global expert
id) and refreshes ZeRO's fp32 copies. `train.trainable` picks what trains:

    all                     everything (plain continued training)
    router                  the MoE routers (`gate`: classic `gate.wg`, AutoEP's Linear) only
    router+experts:<ids>    the routers and experts <ids> (global ids, e.g. 0,3) of every
                            layer (classic only: AutoEP's fused experts train or freeze whole)
    dense_only              everything but the routers and the experts

Frozen parameters get `requires_grad=False` before `deepspeed.initialize`, which leaves
them out of the optimizer (no optimizer state). Path and spec checks are torch-free so the
launcher runs them before any process starts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moelab.dscompat import MODEL_STATES_GLOB
from moelab.rundir import RunDir
from moelab.shapes import experts_of_rank

if TYPE_CHECKING:
    from torch import nn

    from moelab.config import ModelConfig

MODES = ("all", "router", "router+experts:<ids>", "dense_only")
_EXPERTS = re.compile(r"^router\+experts:(\d+(,\d+)*)$")


@dataclass(frozen=True)
class Trainable:
    """What trains, parsed from `train.trainable`."""

    spec: str
    """As written in the config, e.g. router+experts:0,3."""
    mode: str
    """all, router, router+experts or dense_only."""
    expert_ids: frozenset[int] = field(default_factory=frozenset)

    @property
    def router(self) -> bool:
        return self.mode in ("all", "router", "router+experts")

    @property
    def dense(self) -> bool:
        return self.mode in ("all", "dense_only")

    def expert(self, global_id: int) -> bool:
        return self.mode == "all" or global_id in self.expert_ids


def parse_trainable(spec: str, total_experts: int | None = None) -> Trainable:
    """Parse `train.trainable`; ValueError (one sentence) if it is not one of MODES."""
    if spec in ("all", "router", "dense_only"):
        return Trainable(spec, spec)
    match = _EXPERTS.match(spec)
    if match is None:
        raise ValueError(
            f"train.trainable={spec!r} is not valid; use one of: {', '.join(MODES)} "
            "(e.g. router+experts:0,3)."
        )
    ids = frozenset(int(i) for i in match.group(1).split(","))
    if total_experts is not None and max(ids) >= total_experts:
        raise ValueError(
            f"train.trainable={spec!r} names expert {max(ids)}, but MoE layers hold "
            f"{total_experts} experts (ids 0-{total_experts - 1}); name existing experts."
        )
    return Trainable(spec, "router+experts", ids)


def zero_refusal(spec: Trainable, total_experts: int, ep_size: int) -> int | None:
    """The first EP rank left without a trainable expert while another has one; else None.

    DeepSpeed's ZeRO stage 1/2 optimizer needs a non-empty MoE parameter group on a rank
    with MoE layers, and its gradient-norm collectives run once per group, so every rank
    must hold the same kind of groups. With no expert trainable anywhere (router,
    dense_only) moelab builds the optimizer as for a dense model (`engine.initialize`).
    """
    owned = [experts_of_rank(r, ep_size, total_experts) for r in range(ep_size)]
    bare = [r for r, ids in enumerate(owned) if not any(spec.expert(e) for e in ids)]
    return bare[0] if bare and len(bare) < ep_size else None


def resolve_init(path: str) -> tuple[Path, str]:
    """(directory DeepSpeed loads from, tag) of `train.init_from`; ValueError if none there."""
    p = Path(path).expanduser()
    if RunDir(p).checkpoints.is_dir():
        p = RunDir(p).checkpoints
    if (p / "latest").is_file():
        return p, (p / "latest").read_text().strip()
    if p.is_dir() and any(p.glob(MODEL_STATES_GLOB)):
        return p.parent, p.name
    raise ValueError(
        f"train.init_from={path} holds no checkpoint (no checkpoints/latest, latest, or "
        "*model_states.pt); point it at a run dir, its checkpoints/ dir or a global_step<N>/ dir."
    )


def source_model(path: str) -> ModelConfig | None:
    """The model config of the run `train.init_from` belongs to (None if not found)."""
    from moelab.config import load_config

    load_dir, _ = resolve_init(path)
    run_config = RunDir(load_dir.parent).config
    return load_config(run_config).model if run_config.is_file() else None


SHAPE_KEYS = (
    *("ffn", "d_model", "n_layers", "n_heads", "kv_heads", "padded_vocab_size"),
    *("mlp_hidden", "expert_hidden", "norm", "norm_affine", "tie_embeddings"),
)


def shape_mismatch(src: ModelConfig, dst: ModelConfig) -> str | None:
    """The first shape-defining key on which two model configs differ, as `key=a vs b`."""
    pairs = [(k, getattr(src, k), getattr(dst, k)) for k in SHAPE_KEYS]
    if src.is_moe and dst.is_moe:
        pairs += [("moe.num_experts x granularity", src.moe.total_experts, dst.moe.total_experts)]
        pairs += [("moe_layers", src.moe_layer_indices(), dst.moe_layer_indices())]
    return next((f"{k}={a} vs {b}" for k, a, b in pairs if a != b), None)


@dataclass(frozen=True)
class FreezeSummary:
    """Parameters that train and that are frozen, over the whole model (all EP ranks)."""

    mode: str
    trainable: int
    frozen: int

    def tags(self) -> dict[str, str]:
        return {
            "finetune.trainable": self.mode,
            "finetune.trainable_params": str(self.trainable),
            "finetune.frozen_params": str(self.frozen),
        }


def freeze(model: nn.Module, spec: Trainable, ep_size: int = 1) -> FreezeSummary:
    """Set requires_grad by `spec`, whichever MoE implementation (before deepspeed.initialize:
    AutoEP copies the flags to the layer it puts in place); counts are global (experts of the
    other EP ranks too)."""
    from moelab.moe_impls import all_moe_ffns

    model.requires_grad_(spec.dense)
    ffns = list(all_moe_ffns(model))
    for ffn in ffns:
        ffn.gate.requires_grad_(spec.router)
        _freeze_experts(ffn, spec)
    expert_params = {id(p) for ffn in ffns for p in ffn.expert_params()}
    counts = {True: 0, False: 0}
    for p in model.parameters():  # tied weights are listed once
        if id(p) not in expert_params:
            counts[p.requires_grad] += p.numel()
    for ffn in ffns:
        n_experts = layer_experts(ffn)
        per_expert = sum(p.numel() for p in ffn.expert_params()) // _local_experts(ffn)
        n_train = sum(spec.expert(e) for e in range(n_experts))
        counts[True] += n_train * per_expert
        counts[False] += (n_experts - n_train) * per_expert
    return FreezeSummary(spec.spec, counts[True], counts[False])


def layer_experts(ffn: Any) -> int:
    """Experts of one MoE layer over all EP ranks: the rows of its router's weight (D -> E)."""
    return int(next(ffn.gate.parameters()).shape[0])


def _local_experts(ffn: Any) -> int:
    """Experts this rank's build of the layer holds: one module each (classic) or one slice
    of the fused tensors (AutoEP's block, all experts until deepspeed.initialize)."""
    modules = getattr(ffn, "local_experts", None)
    return len(modules) if modules is not None else int(ffn.expert_params()[0].shape[0])


def _freeze_experts(ffn: Any, spec: Trainable) -> None:
    """Per expert on the classic layer; AutoEP's fused tensors train or freeze whole."""
    if hasattr(ffn, "local_experts"):
        for local, expert in enumerate(ffn.local_experts):
            expert.requires_grad_(spec.expert(ffn.global_expert_id(local)))
        return
    chosen = {spec.expert(e) for e in range(layer_experts(ffn))}
    if len(chosen) > 1:
        raise ValueError(
            f"train.trainable={spec.spec} trains some experts of a layer, but "
            "model.moe.impl=autoep fuses a layer's experts into tensors that train or freeze "
            "whole; name every expert or none (router, dense_only), or use impl=classic."
        )
    (trains,) = chosen
    for p in ffn.expert_params():
        p.requires_grad_(trains)


def load_init(ds_engine: Any, init_from: str | None) -> None:
    """Load the module weights of `init_from` into the engine (no optimizer, no scheduler)."""
    if not init_from:
        return
    load_dir, tag = resolve_init(init_from)
    # DeepSpeed restores *frozen* parameters from the checkpoint's record of frozen ones (a
    # ZeRO checkpoint keeps one, empty when nothing was frozen): the weights of a run that
    # froze nothing would be missing (KeyError). Loaded as trainable, they come from the
    # module state like every other weight; the flags are restored afterwards.
    frozen = [p for p in ds_engine.module.parameters() if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    try:
        path, _ = ds_engine.load_checkpoint(
            str(load_dir),
            tag=tag,
            load_module_only=True,
            load_optimizer_states=False,
            load_lr_scheduler_states=False,
        )
    finally:
        for p in frozen:
            p.requires_grad_(False)
    if path is None:
        raise RuntimeError(f"could not load train.init_from={init_from} ({load_dir}/{tag}).")
