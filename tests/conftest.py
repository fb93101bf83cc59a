"""Shared fixtures: the repo root, a clean environment for launcher subprocesses."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from netns import TwoHosts, missing_prerequisite

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data cache for all launches of the session (tokenizer trained once)."""
    return tmp_path_factory.mktemp("moelab-cache")


@pytest.fixture(scope="session")
def two_hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoHosts]:
    """Two namespaces on a veth link, an sshd in each; removed afterwards, also on failure."""
    reason = missing_prerequisite()
    if reason is not None:
        print(f"\nSKIPPED two-host tests: {reason}")
        pytest.skip(f"two-host network unavailable: {reason}")
    hosts = TwoHosts(tmp_path_factory.mktemp("two-hosts"))
    try:
        hosts.setup()
        yield hosts
    finally:
        hosts.teardown()
