"""Shared fixtures: the repo root, a clean environment for launcher subprocesses."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data cache for all launches of the session (tokenizer trained once)."""
    return tmp_path_factory.mktemp("moelab-cache")
