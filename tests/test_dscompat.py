"""The DeepSpeed internals moelab relies on (`moelab.dscompat`) are still the ones it was
written against: each one's signature and source are fingerprinted in
dscompat_fingerprints.json, so a DeepSpeed upgrade fails here, naming what to re-check.

After re-checking moelab.dscompat against a new DeepSpeed, record the new fingerprints with
`python tests/test_dscompat.py --update`.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import sys
import tomllib
from pathlib import Path
from typing import Any

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest

from moelab import dscompat

REPO = Path(__file__).resolve().parent.parent
FINGERPRINTS = Path(__file__).with_name("dscompat_fingerprints.json")

# symbol -> (how to get it, what in moelab.dscompat relies on it)
SYMBOLS: dict[str, tuple[str, str]] = {
    "sharded_moe.TopKGate.__init__": ("TopKGate.__init__", "gate_like, gate_forward"),
    "sharded_moe.TopKGate.forward": ("TopKGate.forward", "gate_forward (restates it)"),
    "sharded_moe.top1gating": ("top1gating", "_gating"),
    "sharded_moe.top2gating": ("top2gating", "_gating"),
    "sharded_moe.topkgating": ("topkgating", "_gating"),
    "sharded_moe.multiplicative_jitter": ("multiplicative_jitter", "gate_forward"),
    "sharded_moe.MOELayer.__init__": ("MOELayer.__init__", "set_moe_timing_flags"),
    "sharded_moe.MOELayer.forward": (
        "MOELayer.forward",
        "moe_forward (l_aux slot), swap_all_to_all, moe_timer_ms",
    ),
    "sharded_moe._AllToAll": ("_AllToAll", "swap_all_to_all and ds_moe._TimedAllToAll"),
    "sharded_moe._sparse_encode": ("_sparse_encode", "wrapped_moe_phases"),
    "sharded_moe._sparse_decode": ("_sparse_decode", "wrapped_moe_phases"),
    "layer.MoE.forward": ("MoE.forward", "moe_forward (l_aux slot)"),
    "timer.SynchronizedWallClockTimer.get_timers": ("get_timers", "moe_timer_ms"),
    "timer.SynchronizedWallClockTimer.Timer.elapsed": ("Timer.elapsed", "moe_timer_ms"),
    "engine.DeepSpeedEngine._configure_zero_optimizer": (
        "_configure_zero_optimizer",
        "zero_optimizer_without_moe",
    ),
    "engine.DeepSpeedEngine._get_ckpt_name": ("_get_ckpt_name", "NON_EXPERT_FILE"),
    "engine.DeepSpeedEngine._get_expert_ckpt_name": (
        "_get_expert_ckpt_name",
        "EXPERT_FILE, MODEL_STATES_GLOB",
    ),
    "groups._get_expert_parallel_rank": ("_get_expert_parallel_rank", "expert_parallel_rank"),
    "csrc/cpu/comm/shm.cpp": ("shm.cpp", "SHM_BUFFER, unlink_shm_buffer"),
    "auto_ep_layer._AllToAllV": ("_AllToAllV", "swap_all_to_all(autoep=True), _TimedAllToAllV"),
    "auto_ep_layer.AutoEPMoELayer.__init__": (
        "AutoEPMoELayer.__init__",
        "AUTOEP_ROUTER, AUTOEP_ROUTER_GATE, AUTOEP_EXPERT_PARAMS (tokens_per_expert)",
    ),
    "auto_ep_layer.AutoEPMoELayer._forward": (
        "AutoEPMoELayer._forward",
        "autoep_routes_per_expert, the a2a1/a2a2 order of autoep._TimedAllToAllV",
    ),
    "auto_ep_layer.AutoEPMoELayer._finalize_output": (
        "AutoEPMoELayer._finalize_output",
        "AUTOEP_ROUTER_GATE (one gate call per forward)",
    ),
    "ep_router.TokenChoiceTopKRouter.forward": (
        "TokenChoiceTopKRouter.forward",
        "autoep_routes_per_expert, AUTOEP_ROUTER_GATE",
    ),
    "ep_experts.GroupedExperts.__init__": ("GroupedExperts.__init__", "AUTOEP_EXPERT_PARAMS"),
    "auto_ep_presets.registry._build_custom_preset": (
        "_build_custom_preset",
        "the custom preset's defaults dsconfig.expert_parallel_section relies on",
    ),
    "auto_ep_presets.base._raise_unsupported_load_balance_coeff": (
        "_raise_unsupported_load_balance_coeff",
        "the balance=bias refusal (load_balance_coeff)",
    ),
    "autotuning.Autotuner.tune": ("Autotuner.tune", "defer_mlflow_import (mlflow's only use)"),
    "zero/muon/muon_optimizer.py": (
        "muon_optimizer.py",
        "skip_muon_import (the names it imports from original_muon)",
    ),
    "launcher.runner.main": ("runner.main", "fastexit: ends only by returning or sys.exit"),
    "launcher.launch.main": (
        "launch.main",
        "fastexit: ends only by returning or sys.exit; polls its ranks between time.sleep(1)",
    ),
}


def _symbols() -> dict[str, Any]:
    """symbol -> the object (or, for C++ sources, the file's text) the fingerprint is of."""
    import deepspeed
    from deepspeed.autotuning.autotuner import Autotuner
    from deepspeed.launcher import launch, runner
    from deepspeed.module_inject import auto_ep_layer
    from deepspeed.module_inject.auto_ep_presets import base, registry
    from deepspeed.moe import ep_experts, ep_router, layer, sharded_moe
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.utils import groups, timer

    timers = timer.SynchronizedWallClockTimer
    root = Path(deepspeed.__file__).parent
    shm = root / "ops" / "csrc" / "cpu" / "comm" / "shm.cpp"
    return {
        "sharded_moe.TopKGate.__init__": sharded_moe.TopKGate.__init__,
        "sharded_moe.TopKGate.forward": sharded_moe.TopKGate.forward,
        "sharded_moe.top1gating": sharded_moe.top1gating,
        "sharded_moe.top2gating": sharded_moe.top2gating,
        "sharded_moe.topkgating": sharded_moe.topkgating,
        "sharded_moe.multiplicative_jitter": sharded_moe.multiplicative_jitter,
        "sharded_moe.MOELayer.__init__": sharded_moe.MOELayer.__init__,
        "sharded_moe.MOELayer.forward": sharded_moe.MOELayer.forward,
        "sharded_moe._AllToAll": dscompat.original_all_to_all(),
        "sharded_moe._sparse_encode": sharded_moe._sparse_encode,
        "sharded_moe._sparse_decode": sharded_moe._sparse_decode,
        "layer.MoE.forward": layer.MoE.forward,
        "timer.SynchronizedWallClockTimer.get_timers": timers.get_timers,
        "timer.SynchronizedWallClockTimer.Timer.elapsed": timers.Timer.elapsed,
        "engine.DeepSpeedEngine._configure_zero_optimizer": (
            DeepSpeedEngine._configure_zero_optimizer
        ),
        "engine.DeepSpeedEngine._get_ckpt_name": DeepSpeedEngine._get_ckpt_name,
        "engine.DeepSpeedEngine._get_expert_ckpt_name": DeepSpeedEngine._get_expert_ckpt_name,
        "groups._get_expert_parallel_rank": groups._get_expert_parallel_rank,
        "csrc/cpu/comm/shm.cpp": shm.read_text() if shm.exists() else None,
        "auto_ep_layer._AllToAllV": dscompat.original_all_to_all(autoep=True),
        "auto_ep_layer.AutoEPMoELayer.__init__": auto_ep_layer.AutoEPMoELayer.__init__,
        "auto_ep_layer.AutoEPMoELayer._forward": auto_ep_layer.AutoEPMoELayer._forward,
        "auto_ep_layer.AutoEPMoELayer._finalize_output": (
            auto_ep_layer.AutoEPMoELayer._finalize_output
        ),
        "ep_router.TokenChoiceTopKRouter.forward": ep_router.TokenChoiceTopKRouter.forward,
        "ep_experts.GroupedExperts.__init__": ep_experts.GroupedExperts.__init__,
        "auto_ep_presets.registry._build_custom_preset": registry._build_custom_preset,
        "auto_ep_presets.base._raise_unsupported_load_balance_coeff": (
            base._raise_unsupported_load_balance_coeff
        ),
        "autotuning.Autotuner.tune": Autotuner.tune,
        "zero/muon/muon_optimizer.py": (root / "runtime/zero/muon/muon_optimizer.py").read_text(),
        "launcher.runner.main": runner.main,
        "launcher.launch.main": launch.main,
    }


def fingerprint(obj: Any) -> dict[str, str | None]:
    """{'signature', 'source_sha256'} of a function or class (of the text, for a C++ file)."""
    if obj is None or isinstance(obj, str):
        digest = hashlib.sha256(obj.encode()).hexdigest() if obj is not None else None
        return {"signature": None, "source_sha256": digest}
    signature = str(inspect.signature(obj)) if callable(obj) else None
    source = inspect.getsource(obj)
    return {"signature": signature, "source_sha256": hashlib.sha256(source.encode()).hexdigest()}


def current() -> dict[str, dict[str, str | None]]:
    return {name: fingerprint(obj) for name, obj in _symbols().items()}


def test_every_symbol_has_a_reason() -> None:
    assert set(SYMBOLS) == set(_symbols()) == set(json.loads(FINGERPRINTS.read_text()))


@pytest.mark.parametrize("name", sorted(SYMBOLS))
def test_deepspeed_internal_is_unchanged(name: str) -> None:
    recorded = json.loads(FINGERPRINTS.read_text())[name]
    got = current()[name]
    what, users = SYMBOLS[name]
    for key in ("signature", "source_sha256"):
        assert got[key] == recorded[key], (
            f"DeepSpeed's {what} ({name}) changed its {key.split('_')[0]}: re-check "
            f"{users} in moelab.dscompat against it, then run "
            "`python tests/test_dscompat.py --update`."
        )


def test_check_deepspeed_names_installed_and_supported_versions() -> None:
    supported = dscompat.supported_deepspeed()
    dscompat.check_deepspeed()  # the installed one is the supported one
    dscompat.check_deepspeed(f"{supported}+local")
    with pytest.raises(dscompat.DeepSpeedVersionError) as err:
        dscompat.check_deepspeed("0.0.1")
    message = str(err.value)
    assert message.startswith(f"DeepSpeed 0.0.1 is installed but moelab supports only {supported};")
    assert f"deepspeed=={supported}" in message and message.count(". ") == 0


def test_the_supported_version_is_pyprojects_pin() -> None:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [d for d in deps if d.startswith("deepspeed")]
    assert pin == f"deepspeed=={dscompat.supported_deepspeed()}"
    for path in ("Makefile", "Dockerfile"):
        text = (REPO / path).read_text()
        assert not re.search(r"deepspeed==\d|DEEPSPEED_VERSION[ ?:]*=\s*\d", text), path


def test_all_to_all_swap_is_undone() -> None:
    from deepspeed.moe import sharded_moe

    from moelab import ds_moe

    original = sharded_moe._AllToAll
    ds_moe.install_moe_timers()
    assert sharded_moe._AllToAll is ds_moe._TimedAllToAll
    ds_moe.uninstall_moe_timers()
    assert sharded_moe._AllToAll is original is dscompat.original_all_to_all()


def test_autoep_all_to_all_swap_is_undone() -> None:
    from deepspeed.module_inject import auto_ep_layer

    from moelab import autoep

    original = auto_ep_layer._AllToAllV
    autoep.install_moe_timers()
    assert auto_ep_layer._AllToAllV is autoep._TimedAllToAllV
    autoep.uninstall_moe_timers()
    assert auto_ep_layer._AllToAllV is original is dscompat.original_all_to_all(autoep=True)


def test_discarding_step_leaves_the_optimizer_as_it_was() -> None:
    import torch

    w = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([w], lr=1.0)
    w.grad = torch.ones(2)
    with dscompat.discarding_step(opt):
        opt.step()
    assert torch.equal(w.detach(), torch.ones(2)) and w.grad is None
    assert "step" not in vars(opt)


PRIVATE_PATTERNS = (
    r"(import|from)\s+deepspeed\.moe",
    r"_AllToAll\b",
    r"_AllToAllV\b",
    r"deepspeed\.module_inject",
    r"_build_custom_preset|_raise_unsupported",
    r"_configure_zero_optimizer",
    r"_get_expert_parallel_rank",
    r"allreduce_buffer",
    r"[\"'][\w*]*model_states\.pt[\"']",  # a file name in code, not in prose
    r"get_timers\(",
    r"_get_default_group",
    r"TOPK_GATE_TIMER",
)


def test_only_the_fence_touches_deepspeed_internals() -> None:
    allowed = {"dscompat.py": PRIVATE_PATTERNS, "ds_moe.py": PRIVATE_PATTERNS[:2]}
    found = []
    for path in sorted((REPO / "src" / "moelab").rglob("*.py")):
        text = path.read_text()
        for pattern in PRIVATE_PATTERNS:
            if pattern not in allowed.get(path.name, ()) and re.search(pattern, text):
                found.append(f"{path.relative_to(REPO)}: {pattern}")
    assert not found, f"DeepSpeed internals outside moelab.dscompat: {found}"


if __name__ == "__main__" and sys.argv[1:] == ["--update"]:
    FINGERPRINTS.write_text(json.dumps(current(), indent=1, sort_keys=True) + "\n")


DEFERRED_MLFLOW = """
import sys, threading
from moelab import dscompat
dscompat.defer_mlflow_import()
import deepspeed, deepspeed.autotuning.autotuner as autotuner
print(type(sys.modules["mlflow"]).__name__, "mlflow.tracking" in sys.modules)
threads = [threading.Thread(target=dscompat.load_mlflow) for _ in range(4)]
[t.start() for t in threads]
[t.join() for t in threads]
from mlflow.tracking import MlflowClient
import mlflow
print(type(sys.modules["mlflow"]).__name__, MlflowClient.__module__)
print(autotuner.mlflow.start_run is mlflow.start_run)
"""


def test_deepspeed_import_leaves_mlflow_unloaded_until_rank_0_needs_it() -> None:
    """A rank imports DeepSpeed without mlflow (its autotuner's import); the first use, from
    several threads at once, loads the one real module, which DeepSpeed's reference reaches."""
    import subprocess

    env = os.environ | {"PYTHONPATH": str(REPO / "src"), "DS_ACCELERATOR": "cpu"}
    out = subprocess.run(
        [sys.executable, "-c", DEFERRED_MLFLOW], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[:3] == [
        "_DeferredMlflow False",
        "module mlflow.tracking.client",
        "True",
    ]
