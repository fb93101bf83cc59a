"""DeepSpeed checkpoint of a run -> one Hugging Face `save_pretrained` folder.

A run's checkpoint tag holds the non-expert weights once (`mp_rank_00_model_states.pt`,
replicated under ZeRO 0-2) and one file per expert, named by its global id, written by
the EP rank that owns it (`layer_<L>_expert_<E>_mp_rank_00_model_states.pt`). Reading
every expert file gathers all EP ranks' experts into a single state dict, which loads into
the model with `moe_runtime: torch` (the pure-torch MoE dispatch: no DeepSpeed, no process
group). The folder gets the config, safetensors weights, the run's tokenizer and the
modeling code (copied by transformers' custom-code mechanism), so
`AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)` loads it anywhere.

A `model.moe.impl: autoep` run saves AutoEP's layer instead: the router as
`<block>.router.gate.weight` among the non-expert weights, and per expert file the expert's
slices of the grouped tensors, `<block>.experts.w1.<E>` (gate, H x D), `w3.<E>` (up, H x D)
and `w2.<E>` (down, D x H). `autoep_to_dropless` renames them to the exported model's
`DroplessMoE` (`<block>.gate.weight`, `<block>.experts.gate_up_proj` (E, 2H, D) = [w1; w3]
per expert, `<block>.experts.down_proj` (E, D, H) = w2).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from transformers import PreTrainedModel, PreTrainedTokenizerFast
from transformers.initialization import no_init_weights

from moelab import data
from moelab.checkpoint import read_meta
from moelab.config import MoelabConfig, load_config
from moelab.dscompat import EXPERT_FILE, NON_EXPERT_FILE
from moelab.export_native import native_arch, native_model
from moelab.models import MoelabForCausalLM, MoelabLMConfig
from moelab.rundir import RunDir

EXPORT_INFO = "moelab_export.json"
"""In the exported folder: the source run dir, checkpoint tag and step, and its MLflow run."""


@dataclass(frozen=True)
class Source:
    """Which checkpoint of which run was read."""

    run_dir: Path
    tag: str
    step: int
    cfg: MoelabConfig


def resolve_source(run_dir: str | Path, tag: str | None = None) -> Source:
    """The run's config and checkpoint tag (the newest complete one unless `tag` is given)."""
    run_dir = Path(run_dir).resolve()
    if not RunDir(run_dir).config.exists():
        raise ValueError(f"{run_dir} has no config.yaml; pass a moelab run directory.")
    meta = read_meta(run_dir)
    if tag is None:
        if meta is None:
            raise ValueError(
                f"{run_dir} has no complete checkpoint; train with train.checkpoint_every > 0."
            )
        tag = str(meta["tag"])
    if not (RunDir(run_dir).checkpoints / tag).is_dir():
        raise ValueError(
            f"checkpoint tag {tag!r} is not in {RunDir(run_dir).checkpoints}; pick an existing one."
        )
    step = int(tag.removeprefix("global_step")) if tag.startswith("global_step") else -1
    return Source(run_dir, tag, step, load_config(RunDir(run_dir).config))


def _load(path: Path) -> dict[str, Any]:
    # DeepSpeed pickles optimizer/scheduler state beside the weights: a full unpickle of the
    # run's own files (never load checkpoints from an untrusted source).
    state = torch.load(path, map_location="cpu", weights_only=False)
    assert isinstance(state, dict)
    return state


AUTOEP_EXPERT_KEY = re.compile(r"(?P<block>.+)\.experts\.(?P<w>w[123])\.(?P<e>\d+)")
"""An AutoEP expert file's key: `<block>.experts.<w1|w2|w3>.<global expert id>`."""
AUTOEP_ROUTER_KEY = re.compile(r"(?P<block>.+)\.router\.gate\.weight")


def autoep_to_dropless(state: dict[str, torch.Tensor], num_experts: int) -> dict[str, torch.Tensor]:
    """An AutoEP checkpoint's state dict (all experts gathered) keyed as `DroplessMoE`: the
    router's Linear as `<block>.gate.weight`, each layer's per-expert w1/w3/w2 slices stacked
    into `gate_up_proj` (E, 2H, D) rows [gate; up] and `down_proj` (E, D, H). Keys that are
    neither (the rest of the model) pass through."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    for key, tensor in state.items():
        if m := AUTOEP_EXPERT_KEY.fullmatch(key):
            by_w = experts.setdefault(m["block"], {})
            by_w.setdefault(m["w"], {})[int(m["e"])] = tensor
        elif m := AUTOEP_ROUTER_KEY.fullmatch(key):
            out[f"{m['block']}.gate.weight"] = tensor
        else:
            out[key] = tensor
    for block, w in experts.items():
        if any(sorted(w.get(n, {})) != list(range(num_experts)) for n in ("w1", "w2", "w3")):
            raise ValueError(
                f"{block} lacks experts of w1/w2/w3 (want ids 0-{num_experts - 1}); the "
                "checkpoint is incomplete: export another tag with --tag."
            )
        stack = [torch.cat((w["w1"][e], w["w3"][e])) for e in range(num_experts)]
        out[f"{block}.experts.gate_up_proj"] = torch.stack(stack)
        out[f"{block}.experts.down_proj"] = torch.stack([w["w2"][e] for e in range(num_experts)])
    return out


def gather_state_dict(source: Source) -> dict[str, torch.Tensor]:
    """Non-expert weights plus every expert of every MoE layer, keyed as in the model."""
    tag_dir = RunDir(source.run_dir).checkpoints / source.tag
    model = source.cfg.model
    autoep = model.is_moe and model.moe.impl == "autoep"
    if autoep and source.cfg.zero.stage == 3:
        raise ValueError(
            "a zero=stage3 run with model.moe.impl=autoep keeps its experts in ZeRO's "
            "partitions, not in expert files; export a run trained with zero=stage2 or lower."
        )
    state: dict[str, torch.Tensor] = dict(_load(tag_dir / NON_EXPERT_FILE)["module"])
    expert_files = sorted(p for p in tag_dir.iterdir() if EXPERT_FILE.fullmatch(p.name))
    for path in expert_files:
        state.update(_load(path))
    want = len(model.moe_layer_indices()) * model.moe.total_experts
    if len(expert_files) != want:
        raise ValueError(
            f"{tag_dir} holds {len(expert_files)} expert files, not {want} "
            f"({model.moe.total_experts} experts x {len(model.moe_layer_indices())} MoE "
            "layers); the checkpoint is incomplete: export another tag with --tag."
        )
    return autoep_to_dropless(state, model.moe.total_experts) if autoep else state


def inference_config(source: Source) -> MoelabLMConfig:
    """The HF config of the exported model: all experts local, pure-torch dropless MoE."""
    config = MoelabLMConfig.from_model_config(source.cfg.model, ep_size=1, moe_runtime="torch")
    config.moe_drop_tokens = False  # dropless serving: a token's output ignores its batch
    config.use_cache = True
    return config


def load_inference_model(
    run_dir: str | Path, tag: str | None = None
) -> tuple[MoelabForCausalLM, Source]:
    """The checkpoint's model with every expert, in eval mode, on the CPU."""
    source = resolve_source(run_dir, tag)
    state = gather_state_dict(source)
    with init_empty_weights(), no_init_weights():
        model = MoelabForCausalLM(inference_config(source))
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    return model.eval(), source


def source_tokenizer(cfg: MoelabConfig) -> PreTrainedTokenizerFast:
    """The run's tokenizer (cached by the data pipeline; trained again if the cache is gone)."""
    tok = data.get_tokenizer(cfg.data)
    tok.model_max_length = cfg.model.max_seq_len
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


FORMATS = ("auto", "native", "remote")


def choose_format(config: MoelabLMConfig, fmt: str) -> tuple[str, str | None, str]:
    """(written format, native architecture or None, one sentence why) for `--format fmt`."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r} is not one of {FORMATS}; pick one of them.")
    arch, reason = native_arch(config)
    if fmt == "remote":
        return "remote", None, "the self-contained trust_remote_code folder was asked for."
    if arch is None and fmt == "native":
        raise ValueError(
            f"--format native: {reason[0].lower()}{reason[1:-1]}; use --format remote."
        )
    return ("native", arch, reason) if arch else ("remote", None, reason)


def write_folder(
    model: MoelabForCausalLM,
    tok: PreTrainedTokenizerFast,
    out: Path,
    fmt: str = "auto",
    info: dict[str, Any] | None = None,
) -> tuple[str, str]:
    """Write `model` (inference config) and `tok` into `out` as a native or remote folder;
    returns (written format, reason)."""
    written, arch, reason = choose_format(model.config, fmt)
    out.mkdir(parents=True, exist_ok=True)
    target: PreTrainedModel = model
    if arch is not None:
        target = native_model(model, arch)
    else:  # copies modeling.py and what it imports relatively into `out` (auto_map in config)
        MoelabLMConfig.register_for_auto_class()
        MoelabForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    for holder in (target.config, target.generation_config):
        holder.eos_token_id, holder.pad_token_id = tok.eos_token_id, tok.pad_token_id
        holder.bos_token_id = tok.bos_token_id
    target.generation_config.use_cache = True
    target.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    info = dict(info or {}) | {"format": written, "reason": reason}
    info["architecture"] = arch or "MoelabForCausalLM"
    (out / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
    return written, reason


def export(
    run_dir: str | Path, out_dir: str | Path, tag: str | None = None, fmt: str = "auto"
) -> Path:
    """Write the folder of `run_dir`'s checkpoint to `out_dir` (`fmt`: auto, native or remote;
    its `moelab_export.json` says which was written and why)."""
    out = Path(out_dir)
    model, source = load_inference_model(run_dir, tag)
    written, reason = write_folder(
        model, source_tokenizer(source.cfg), out, fmt, export_info(source)
    )
    from moelab.model_card import write_card

    write_card(out, source, written, reason)
    return out


def export_info(source: Source) -> dict[str, Any]:
    info: dict[str, Any] = {"run_dir": str(source.run_dir), "tag": source.tag}
    info |= {"step": source.step, "variant": source.cfg.model.name}
    ref = RunDir(source.run_dir).run_ref
    if ref.exists():
        info["mlflow"] = json.loads(ref.read_text())
    return info
