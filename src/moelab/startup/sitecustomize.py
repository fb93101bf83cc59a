"""Run by Python at the start of every process of a moelab launch (`moelab.startup.FOLDER` is
first on the rank environment's PYTHONPATH): DeepSpeed's runner, its per-host
`deepspeed.launcher.launch`, the ranks.

Each of them imports DeepSpeed, whose autotuner imports MLflow: about 2 s of CPU per process
on a 2-core VM (and about 1 s more in its teardown at exit), though none of them uses it.
`defer_mlflow_import` makes that import instant until MLflow is first used. Then the
sitecustomize module this one shadows on sys.path, if any, runs as it would have.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def _defer_mlflow() -> None:
    try:
        from moelab.dscompat import defer_mlflow_import
    except ImportError:  # a host whose Python lacks moelab: nothing to defer with
        return
    defer_mlflow_import()


def _run_shadowed() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    path = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", path)
    if spec is not None and spec.loader is not None:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


_defer_mlflow()
_run_shadowed()
