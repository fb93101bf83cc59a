"""Run by Python at the start of every process of a moelab launch (`moelab.startup.FOLDER` is
first on the rank environment's PYTHONPATH): DeepSpeed's runner, its per-host
`deepspeed.launcher.launch`, the ranks.

Each of them imports DeepSpeed, whose autotuner imports MLflow: about 2 s of CPU per process
on a 2-core VM (and about 1 s more in its teardown at exit), though none of them uses it.
`defer_mlflow_import` makes that import instant until MLflow is first used. DeepSpeed's runner
and `launch.py` then end without the interpreter's module teardown (about 0.8 s each, after the
ranks are done: `moelab.fastexit.skip_deepspeed_launcher_teardown`), and `launch.py` notices
its ranks' exit at once instead of within a second and a second later
(`moelab.fastexit.wake_deepspeed_launch_on_rank_exit`). Then the sitecustomize module this one
shadows on sys.path, if any, runs as it would have.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def _moelab_hooks() -> None:
    try:
        from moelab.fastexit import (
            skip_deepspeed_launcher_teardown,
            wake_deepspeed_launch_on_rank_exit,
        )
    except ImportError:  # a host whose Python lacks moelab: nothing to hook with
        return
    skip_deepspeed_launcher_teardown()  # before any other import: its exit handler runs last
    wake_deepspeed_launch_on_rank_exit()
    from moelab.dscompat import defer_mlflow_import

    defer_mlflow_import()


def _run_shadowed() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    path = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", path)
    if spec is not None and spec.loader is not None:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


_moelab_hooks()
_run_shadowed()
