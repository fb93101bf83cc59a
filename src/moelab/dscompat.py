"""Every DeepSpeed internal moelab relies on, in one place, checked against one version.

moelab pins one DeepSpeed version (the `deepspeed==X` dependency of pyproject.toml, the only
place it is written); `check_deepspeed` refuses any other at rank start-up, and
tests/test_dscompat.py fingerprints the signature and source of everything below, so an
upgrade fails there, naming what to re-check. What is touched, and why:

- `sharded_moe.TopKGate.forward` is restated (`gate_forward`): the router logits are computed
  once for both the gating and the router z-loss. It reads the gate's attributes
  (`gate_like` copies them) and calls `top1gating`/`top2gating`/`topkgating`,
  `multiplicative_jitter` and the `TOPK_GATE_TIMER` timer exactly as the original does.
- `MOELayer.forward` keeps the gate's first output as `l_aux` and `MoE.forward` returns it
  untouched: the gate puts `(l_aux, z_loss)` there and `moe_forward` unpacks it, so the
  z-loss leaves the layer through its outputs.
- `sharded_moe._AllToAll`, which `MOELayer.forward` looks up at every call, is replaced while
  MoE telemetry runs (`swap_all_to_all`, undone by `restore_all_to_all`): the backward
  all-to-alls are invisible to DeepSpeed's forward timers. AutoEP's `auto_ep_layer._AllToAllV`
  (variable splits, looked up the same way) likewise (`swap_all_to_all(..., autoep=True)`).
- AutoEP's replaced layer (`AutoEPMoELayer.__init__`, `_forward`, `_finalize_output`): its
  `router` (a `TokenChoiceTopKRouter` that calls its `gate` Linear once per forward, giving
  the logits, and returns the routes per expert third) and `experts` (`GroupedExperts`,
  parameters `w1` gate, `w3` up (E, H, D), `w2` (E, D, H)), each forward's two
  `_AllToAllV` calls (dispatch, then combine), and the `_is_autoep_layer` marker
  (`is_autoep_layer`, `AUTOEP_ROUTER`, `AUTOEP_ROUTER_GATE`, `autoep_routes_per_expert`,
  `AUTOEP_EXPERT_PARAMS`). moelab's block is a custom preset (`_build_custom_preset`: its
  defaults fill what `dsconfig.expert_parallel_section` leaves out); `balance=bias` is refused
  because the preset refuses `load_balance_coeff` (`_raise_unsupported_load_balance_coeff`).
- The MoE layers' own timers (`MOELayer.timers`, `TopKGate.timers`, their timer names, the
  `wall_clock_breakdown` flags that turn them on per layer; `moe_timer_ms` reads them).
- `DeepSpeedEngine._configure_zero_optimizer` is wrapped while an engine whose experts are
  all frozen is built (`zero_optimizer_without_moe`): ZeRO 1/2 asserts a non-empty MoE
  parameter group whenever the model has MoE layers.
- `groups._get_expert_parallel_rank` (`expert_parallel_rank`): checks moelab's EP ranks.
- The /dev/shm name of the CPU all-reduce buffer (csrc/cpu/comm/shm.cpp), which DeepSpeed
  never unlinks (`unlink_shm_buffer`).
- `deepspeed.autotuning.autotuner` imports mlflow (about 1.2 s of CPU) though training never
  autotunes: `defer_mlflow_import` leaves it unloaded until first used (`load_mlflow`).
- DeepSpeed's runner and `launch.py` end only by returning or by `sys.exit` (their `main`), so
  `fastexit.skip_deepspeed_launcher_teardown` knows their exit status without the teardown.
- ZeRO imports `zero.muon.original_muon` (the names `muon_optimizer.py` takes from it) for its
  Muon checks; its `@torch.compile` loads inductor, 1.5-3 s of CPU a rank: `skip_muon_import`.
- The checkpoint file names of `DeepSpeedEngine._get_ckpt_name` and `_get_expert_ckpt_name`
  (`NON_EXPERT_FILE`, `EXPERT_FILE`, `MODEL_STATES_GLOB`), read by export and fine-tuning.
- `optimizer.step` of the engine's optimizer is replaced while an update is skipped
  (`discarding_step`): `engine.step()` then still advances DeepSpeed's counters and schedule.
- `sharded_moe._sparse_encode`/`_sparse_decode` and the gate's and experts' forwards are
  wrapped while the MoE layer benchmark profiles a pass (`wrapped_moe_phases`).
- torch's process-group internals: `distributed_c10d.default_pg_timeout` (and its NCCL twin)
  for the groups DeepSpeed makes after start-up (`set_default_group_timeout`), and
  `_get_default_group()`'s backend options (`process_group_timeout`).

torch and DeepSpeed are imported lazily: the launcher reads the file names on a head node.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import sys
import threading
import types
from collections.abc import Callable, Iterator
from datetime import timedelta
from importlib import metadata
from typing import Any

NON_EXPERT_FILE = "mp_rank_00_model_states.pt"
EXPERT_FILE = re.compile(r"layer_(\d+)_expert_(\d+)_mp_rank_00_model_states\.pt")
MODEL_STATES_GLOB = "mp_rank_*_model_states.pt"
SHM_BUFFER = "deepspeed_allreduce_buffer_{uid}_{addr}_{port}_{rank}"


class DeepSpeedVersionError(RuntimeError):
    """The installed DeepSpeed is not the version moelab's internals were checked against."""


def supported_deepspeed() -> str:
    """The DeepSpeed version moelab pins (its `deepspeed==X` requirement)."""
    try:
        requires = metadata.requires("moelab") or []
    except metadata.PackageNotFoundError as err:
        raise DeepSpeedVersionError(
            "moelab is not installed, so its DeepSpeed pin is unknown; run `make install`."
        ) from err
    for req in requires:
        found = re.fullmatch(r"deepspeed\s*==\s*([^\s;]+)\s*(;.*)?", req)
        if found:
            return found.group(1)
    raise DeepSpeedVersionError("moelab's metadata pins no deepspeed==X; reinstall moelab.")


_MLFLOW_LOCK = threading.Lock()


class _DeferredMlflow(types.ModuleType):
    """Stands in for `mlflow` in sys.modules until used; any attribute loads the real one."""

    def __getattr__(self, name: str) -> Any:
        load_mlflow()
        return getattr(sys.modules["mlflow"], name)


def defer_mlflow_import() -> None:
    """Make `import mlflow` instant until mlflow is used; called before DeepSpeed is imported,
    whose autotuner imports mlflow and never uses it here. (importlib's LazyLoader would not
    do: before Python 3.13 `import` reads the module's `__spec__`, which loads it.)"""
    spec = None if "mlflow" in sys.modules else importlib.util.find_spec("mlflow")
    if spec is not None:
        stand_in = _DeferredMlflow("mlflow")
        stand_in.__spec__, stand_in.__file__ = spec, spec.origin  # inspect reads every __file__
        sys.modules["mlflow"] = stand_in


def load_mlflow() -> None:
    """Replace a deferred mlflow by the real module, one thread at a time (rank 0's replay and
    system-metrics threads both need it). Rank code calls it before `from mlflow... import`."""
    with _MLFLOW_LOCK:
        if isinstance(sys.modules.get("mlflow"), _DeferredMlflow):
            del sys.modules["mlflow"]
            importlib.import_module("mlflow")


def _muon_not_loaded(*args: Any, **kwargs: Any) -> None:
    raise RuntimeError("moelab trains with AdamW: DeepSpeed's Muon code is not loaded.")


def skip_muon_import() -> None:
    """Before `deepspeed.initialize`: `zero.muon.original_muon`, which ZeRO imports for its Muon
    checks and steps (never taken with moelab's AdamW), is a stand-in that raises if called."""
    stand_in, fail = types.ModuleType("deepspeed.runtime.zero.muon.original_muon"), _muon_not_loaded
    muon = type("MuonWithAuxAdam", (), {"__init__": fail})
    vars(stand_in).update(MuonWithAuxAdam=muon, adam_update=fail, muon_update=fail)
    sys.modules.setdefault(stand_in.__name__, stand_in)  # unless the real one is loaded


def check_deepspeed(installed: str | None = None) -> None:
    """Raise DeepSpeedVersionError unless `installed` (default: the installed one) is supported."""
    supported = supported_deepspeed()
    version = installed if installed is not None else metadata.version("deepspeed")
    if version.split("+")[0] != supported:  # a local build label (+hash) is the same release
        raise DeepSpeedVersionError(
            f"DeepSpeed {version} is installed but moelab supports only {supported}; install "
            f"deepspeed=={supported} (make install) or re-check moelab.dscompat for {version}."
        )


def gate_like(cls: type, gate: Any) -> Any:
    """A `cls` (a TopKGate subclass) with `gate`'s options and its router Linear `wg`."""
    import torch

    with torch.device("meta"):  # no init draw: the RNG stream stays as without it
        new = cls(gate.wg.in_features, gate.wg.out_features, gate.k)
    for key, value in vars(gate).items():
        if not key.startswith("_") and key != "training":
            setattr(new, key, value)
    new.wg = gate.wg
    return new


def gate_forward(
    gate: Any,
    input: Any,
    used_token: Any,
    sparse_routes: bool,
    use_tutel: bool,
    z_loss_of: Callable[[Any], Any],
) -> tuple[Any, ...]:
    """`TopKGate.forward` with `(l_aux, z_loss_of(logits))` in the place of `l_aux`."""
    import torch
    from deepspeed.moe.sharded_moe import TOPK_GATE_TIMER, multiplicative_jitter

    if gate.wall_clock_breakdown:
        gate.timers(TOPK_GATE_TIMER).start()
    x = input.float()
    if gate.noisy_gate_policy == "Jitter" and gate.training:
        x = multiplicative_jitter(x, device=input.device)
    logits = torch.nn.functional.linear(x, weight=gate.wg.weight.float())  # (tokens, E)
    # A copy: top2gating adds its Gumbel noise to `logits` in place.
    z_loss = z_loss_of(logits.clone())
    out = _gating(gate, logits, used_token, sparse_routes, use_tutel)
    if gate.wall_clock_breakdown:
        gate.timers(TOPK_GATE_TIMER).stop()
        gate.gate_time = gate.timers(TOPK_GATE_TIMER).elapsed(reset=False)
    return ((out[0], z_loss), *out[1:])


def _gating(
    gate: Any, logits: Any, used_token: Any, sparse_routes: bool, use_tutel: bool
) -> tuple[Any, ...]:
    from deepspeed.moe.sharded_moe import top1gating, top2gating, topkgating

    cap = gate.capacity_factor if gate.training else gate.eval_capacity_factor
    if gate.k == 1:
        noise = gate.noisy_gate_policy if gate.training else None
        return top1gating(
            logits, cap, gate.min_capacity, used_token, noise, gate.drop_tokens,
            gate.use_rts, gate.ep_group, sparse_routes, use_tutel,
        )  # fmt: skip
    if gate.k == 2:
        return top2gating(
            logits, cap, gate.min_capacity, gate.drop_tokens, gate.ep_group,
            gate.top2_2nd_expert_sampling, sparse_routes,
        )  # fmt: skip
    return topkgating(
        logits, gate.k, cap, gate.min_capacity, gate.drop_tokens, gate.ep_group,
        sparse_routes=sparse_routes,
    )  # fmt: skip


def moe_forward(moe: Any, x: Any) -> tuple[Any, Any, Any, Any]:
    """(out, l_aux, z_loss, exp_counts) of `deepspeed.moe.layer.MoE` with a `gate_forward`
    gate: DeepSpeed hands the gate's `(l_aux, z_loss)` back where it hands back l_aux."""
    out, (l_aux, z_loss), exp_counts = moe(x)
    return out, l_aux, z_loss, exp_counts


def set_moe_timing_flags(moe: Any, on: bool) -> None:
    """Turn the timers of one `MoE` layer and its gate on or off (`wall_clock_breakdown`)."""
    moe.deepspeed_moe.wall_clock_breakdown = on
    moe.deepspeed_moe.gate.wall_clock_breakdown = on


def moe_timer_ms(moe: Any) -> dict[str, float]:
    """{'a2a1', 'a2a2', 'moe', 'gate'}: ms in one `MoE` layer's timers, which are then reset."""
    from deepspeed.moe import sharded_moe as sm

    layer = moe.deepspeed_moe
    names = {"a2a1": sm.FIRST_ALLTOALL_TIMER, "a2a2": sm.SECOND_ALLTOALL_TIMER, "moe": sm.MOE_TIMER}
    ms = {key: _read_timer(layer.timers, name) for key, name in names.items()}
    ms["gate"] = _read_timer(layer.gate.timers, sm.TOPK_GATE_TIMER)
    return ms


def _read_timer(timers: Any, name: str) -> float:
    if name not in timers.get_timers():
        return 0.0
    return float(timers(name).elapsed(reset=True))


_ORIGINAL_A2A: dict[str, Any] = {}


def _a2a_home(autoep: bool) -> tuple[Any, str]:
    """(module, attribute) of the all-to-all autograd function the MoE layers look up."""
    if autoep:
        from deepspeed.module_inject import auto_ep_layer

        return auto_ep_layer, "_AllToAllV"
    from deepspeed.moe import sharded_moe

    return sharded_moe, "_AllToAll"


def original_all_to_all(autoep: bool = False) -> Any:
    """DeepSpeed's own all-to-all autograd function: `_AllToAll` of the classic layer, or
    AutoEP's `_AllToAllV` (kept on first use, before any swap)."""
    module, name = _a2a_home(autoep)
    return _ORIGINAL_A2A.setdefault(name, getattr(module, name))


def swap_all_to_all(replacement: Any, autoep: bool = False) -> None:
    """Make the classic (or AutoEP) MoE layers run `replacement` instead of DeepSpeed's."""
    module, name = _a2a_home(autoep)
    original_all_to_all(autoep)
    setattr(module, name, replacement)


def restore_all_to_all(autoep: bool = False) -> None:
    """Undo `swap_all_to_all` (a no-op if nothing was swapped)."""
    module, name = _a2a_home(autoep)
    setattr(module, name, original_all_to_all(autoep))


AUTOEP_ROUTER = "router"
"""Submodule of an AutoEP layer: its `TokenChoiceTopKRouter`, built with the source block's
`gate` weights (the ds_config's `router_pattern`)."""
AUTOEP_ROUTER_GATE = "router.gate"
"""Submodule of an AutoEP layer: the router's Linear, called once per forward on the tokens
(S, D) (its output: the logits, (S, E), in the graph)."""
AUTOEP_EXPERT_PARAMS = ("w1", "w3", "w2")
"""AutoEP's `GroupedExperts` parameters: gate (E, H, D), up (E, H, D), down (E, D, H)."""


def autoep_routes_per_expert(router_out: tuple[Any, ...]) -> Any:
    """The routes per expert (E,) int32 of a `TokenChoiceTopKRouter` forward's output
    (top_scores, selected_experts, num_tokens_per_expert)."""
    return router_out[2]


def is_autoep_layer(module: Any) -> bool:
    """Whether `module` is the layer AutoEP put in place of an MoE block."""
    return bool(getattr(type(module), "_is_autoep_layer", False))


@contextlib.contextmanager
def wrapped_moe_phases(
    moe: Any, wrap: Callable[[Callable[..., Any], str], Callable[..., Any]]
) -> Iterator[None]:
    """Within it, one `MoE` layer's forward phases run through `wrap(fn, phase)`, phase one of
    gate, dispatch, experts, combine (dispatch and combine: every MoE layer's)."""
    from deepspeed.moe import sharded_moe as sm

    layer = moe.deepspeed_moe
    encode, decode = sm._sparse_encode, sm._sparse_decode
    gate, experts = layer.gate.forward, layer.experts.forward
    layer.gate.forward, layer.experts.forward = wrap(gate, "gate"), wrap(experts, "experts")
    sm._sparse_encode, sm._sparse_decode = wrap(encode, "dispatch"), wrap(decode, "combine")
    try:
        yield
    finally:
        sm._sparse_encode, sm._sparse_decode = encode, decode
        layer.gate.forward, layer.experts.forward = gate, experts


@contextlib.contextmanager
def zero_optimizer_without_moe() -> Iterator[None]:
    """Build the ZeRO 1/2 optimizer as for a dense model (all experts frozen).

    DeepSpeed's ZeRO 1/2 optimizer asserts a non-empty MoE parameter group whenever the
    model has MoE layers. With every expert frozen there is nothing to put in one: the
    trainable parameters are all data-parallel, which is what the dense optimizer reduces.
    The engine keeps `has_moe_layers` for everything else (expert checkpoint files, groups).
    """
    from deepspeed.runtime.engine import DeepSpeedEngine

    original = DeepSpeedEngine._configure_zero_optimizer

    def dense(self: Any, optimizer: Any) -> Any:
        self.has_moe_layers = False
        try:
            return original(self, optimizer)
        finally:
            self.has_moe_layers = True

    DeepSpeedEngine._configure_zero_optimizer = dense
    try:
        yield
    finally:
        DeepSpeedEngine._configure_zero_optimizer = original


@contextlib.contextmanager
def discarding_step(optimizer: Any) -> Iterator[None]:
    """Within it, `optimizer.step()` discards the gradients instead of applying them."""
    original = optimizer.step

    def discard(*args: Any, **kwargs: Any) -> None:
        optimizer.zero_grad(set_to_none=True)

    own = "step" in vars(optimizer)
    optimizer.step = discard
    try:
        yield
    finally:
        if own:
            optimizer.step = original
        else:
            del optimizer.step


def expert_parallel_rank(ep_size: int) -> int:
    """This rank's index in its expert-parallel group, as DeepSpeed's groups have it."""
    from deepspeed.utils import groups

    return int(groups._get_expert_parallel_rank(f"ep_size_{ep_size}"))


def unlink_shm_buffer(rank: int) -> None:
    """Remove this rank's /dev/shm name of DeepSpeed's CPU all-reduce buffer (64 MiB).

    DeepSpeed never unlinks it, so every run would leave one file per rank in /dev/shm until
    the RAM-backed folder fills up; once all ranks have mapped it the mapping outlives the name.
    """
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    name = SHM_BUFFER.format(uid=os.getuid(), addr=addr, port=port, rank=rank)
    with contextlib.suppress(OSError):
        os.unlink(f"/dev/shm/{name}")


def process_group_timeout() -> timedelta | None:
    """The default process group's collective timeout, read back from its backend (None where
    this torch keeps it elsewhere)."""
    import torch
    import torch.distributed as dist

    device = torch.device("cuda" if dist.get_backend() == "nccl" else "cpu")
    try:
        timeout = dist.distributed_c10d._get_default_group()._get_backend(device).options._timeout
    except (AttributeError, RuntimeError):
        return None
    return timeout if isinstance(timeout, timedelta) else None


def set_default_group_timeout(timeout: timedelta) -> None:
    """Give process groups made from now on (DeepSpeed's expert-parallel ones) `timeout`."""
    from torch.distributed import distributed_c10d

    distributed_c10d.default_pg_timeout = distributed_c10d.default_pg_nccl_timeout = timeout
