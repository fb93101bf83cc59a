"""moelab's sitecustomize, first on every launch's PYTHONPATH: DeepSpeed's launcher processes
import DeepSpeed without MLflow, and a sitecustomize it shadows still runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.compose import compose_config, to_schema
from launcher.render import rank_env
from moelab import startup

LAUNCHER_IMPORT = (
    "import sys, deepspeed.launcher.launch, deepspeed.launcher.runner; "
    "print(type(sys.modules['mlflow']).__name__)"
)


def python(code: str, pythonpath: list[str]) -> str:
    """stdout of `python -c code` with PYTHONPATH `pythonpath` (moelab is installed)."""
    env = os.environ | {"PYTHONPATH": os.pathsep.join(pythonpath), "DS_ACCELERATOR": "cpu"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_deepspeeds_launcher_processes_leave_mlflow_unloaded() -> None:
    assert python(LAUNCHER_IMPORT, [startup.FOLDER]).split() == ["_DeferredMlflow"]
    assert python(LAUNCHER_IMPORT, []).split() == ["module"], "DeepSpeed imports MLflow"


def test_a_shadowed_sitecustomize_still_runs(tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text("print('the environment s own sitecustomize')\n")
    out = python("print('main')", [startup.FOLDER, str(tmp_path)])
    assert out.splitlines() == ["the environment s own sitecustomize", "main"]


@pytest.mark.parametrize(
    ("overrides", "theirs"),
    [([], "/head/lib"), (["+cluster.env.PYTHONPATH=/cluster/lib"], "/cluster/lib")],
)
def test_every_rank_host_gets_the_folder_first(
    overrides: list[str], theirs: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before the launcher's own PYTHONPATH, or the one cluster.env sets."""
    monkeypatch.setenv("PYTHONPATH", "/head/lib")
    env = rank_env(to_schema(compose_config(overrides)), 2)
    assert env["PYTHONPATH"] == os.pathsep.join([startup.FOLDER, theirs])
